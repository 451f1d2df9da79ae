package echkeys

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/echkit/ech"
)

// Record is a ServiceMode HTTPS record (RFC 9460) with target "." and the
// parameters this package manages: alpn and ech (RFC 9848).
type Record struct {
	// Name is the owner name, with or without the final dot.
	Name string
	// TTL is the record's TTL.
	TTL time.Duration
	// Priority is the SvcPriority; 1 in the records a Publisher writes.
	Priority uint16
	// ALPN is the alpn parameter; nil for none.
	ALPN []string
	// ConfigList is the ech parameter; nil for none.
	ConfigList ech.ConfigList
}

// String returns r as a zone-file line.
func (r Record) String() string {
	return r.ConfigList.HTTPSRecord(r.Name, r.TTL, r.ALPN...)
}

// Current is what a name holds in DNS, as far as publishing goes.
type Current struct {
	// Alias is the target of a CNAME at the name, or of an AliasMode
	// HTTPS record; empty if there is none.
	Alias string
	// Records are the ServiceMode HTTPS records at the name.
	Records []Record
}

// Provider reads and writes the HTTPS records of a DNS zone. [RFC2136]
// implements it; an adapter to another provider's API (Cloudflare, Route
// 53, libdns) needs these two methods.
type Provider interface {
	// Lookup returns what name holds now, from the zone's authoritative
	// source, not a cache.
	Lookup(ctx context.Context, name string) (Current, error)
	// Replace makes rec the only HTTPS record at rec.Name. It must fail,
	// with an error wrapping [ErrCNAME], if the name is a CNAME.
	Replace(ctx context.Context, rec Record) error
}

// Name is a name whose HTTPS record a [Publisher] keeps.
type Name struct {
	// Name is the DNS name, such as "www.example.com".
	Name string
	// ALPN are the protocols of the record's alpn parameter, those the
	// routes of Name serve, such as "h2", "http/1.1".
	ALPN []string
	// Create allows creating the record when the name has no HTTPS
	// record. Without it such a name is skipped: its owner has not asked
	// for one.
	Create bool
}

// Publisher keeps, for each of its names, one HTTPS record
// "1 . alpn=... ech=..." with the config list a [Manager] advertises. It
// reads the zone on every publish, so it never trusts a stale memory of
// what it published; it refuses to write over an alias; it never replaces
// a config with an older one of the same directory (several routers may
// publish); and it logs every change. A Publisher is used by one Manager.
//
// NOTE: the record replaces every HTTPS record at the name; parameters
// other than alpn and ech (port, address hints) are not kept. Give every
// Manager of a fleet the same Publisher settings: each one publishes, the
// updates agree, and the one that deletes keys has seen the zone.
type Publisher struct {
	// Provider reads and writes the zone.
	Provider Provider
	// Names are the names to publish.
	Names []Name
	// TTL is the TTL of the records; zero means the Manager's TTL.
	TTL time.Duration
	// Timeout bounds one publish of all names; zero means 30 seconds.
	Timeout time.Duration
	// Logger receives a line for every change and failure; nil means
	// slog.Default().
	Logger *slog.Logger

	mu sync.Mutex
	// absent maps a config to the time since which every name has been
	// seen without it; a config seen in DNS is not in it.
	absent map[string]time.Time
}

func (p *Publisher) logger() *slog.Logger {
	if p.Logger != nil {
		return p.Logger
	}
	return slog.Default()
}

// absentSince returns since when config has been out of every name, as
// this Publisher saw it, and false if it is in DNS or was not looked for.
func (p *Publisher) absentSince(config []byte) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.absent[string(config)]
	return t, ok
}

// publish makes every name hold list. created gives the creation time of
// the configs of the Manager's directory, to tell an older list from a
// newer one. It returns an error wrapping [ErrPublish] or [ErrCNAME] for
// the names it could not publish; the others are published.
func (p *Publisher) publish(ctx context.Context, list ech.ConfigList, created map[string]time.Time, now time.Time) error {
	timeout := p.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	want, err := ech.ParseConfigList(list)
	if err != nil {
		return err
	}
	wantTime := latest(want, created)
	inDNS := make(map[string]bool) // configs at some name after this round
	var errs []error
	complete := true
	for _, n := range p.Names {
		rec := Record{Name: n.Name, TTL: p.TTL, Priority: 1, ALPN: n.ALPN, ConfigList: list}
		cur, err := p.Provider.Lookup(ctx, n.Name)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrPublish, n.Name, err))
			complete = false
			continue
		}
		if cur.Alias != "" {
			p.logger().Error("echkeys: not publishing over an alias", slog.String("name", n.Name), slog.String("alias", cur.Alias))
			errs = append(errs, fmt.Errorf("%w: %s is an alias of %s", ErrCNAME, n.Name, cur.Alias))
			continue
		}
		old := oldConfigs(cur.Records)
		switch {
		case len(cur.Records) == 0 && !n.Create:
			p.logger().Warn("echkeys: name has no HTTPS record; not creating one", slog.String("name", n.Name))
			continue
		case len(cur.Records) == 1 && sameRecord(cur.Records[0], rec):
			mark(inDNS, old)
			continue
		case latest(old, created).After(wantTime):
			// Another router of the fleet already publishes a newer key.
			mark(inDNS, old)
			continue
		}
		if err := p.Provider.Replace(ctx, rec); err != nil {
			p.logger().Error("echkeys: publish failed", slog.String("name", n.Name), slog.String("error", err.Error()))
			errs = append(errs, fmt.Errorf("%w: %s: %w", ErrPublish, n.Name, err))
			mark(inDNS, old) // perhaps still there
			complete = false
			continue
		}
		mark(inDNS, want)
		p.logger().Info("echkeys: published", slog.String("name", n.Name),
			slog.Any("old_config_ids", ids(old)), slog.Any("new_config_ids", ids(want)),
			slog.String("record", rec.String()))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.absent == nil {
		p.absent = make(map[string]time.Time)
	}
	for c := range inDNS {
		delete(p.absent, c)
	}
	for c := range p.absent {
		if _, ok := created[c]; !ok {
			delete(p.absent, c) // a deleted key
		}
	}
	if complete {
		for c := range created {
			if _, ok := p.absent[c]; !ok && !inDNS[c] {
				p.absent[c] = now
			}
		}
	}
	return errors.Join(errs...)
}

// oldConfigs returns the configs of recs.
func oldConfigs(recs []Record) []*ech.Config {
	var out []*ech.Config
	for _, r := range recs {
		cs, err := ech.ParseConfigList(r.ConfigList)
		if err == nil {
			out = append(out, cs...)
		}
	}
	return out
}

// latest returns the newest creation time of configs, zero for unknown ones.
func latest(configs []*ech.Config, created map[string]time.Time) time.Time {
	var t time.Time
	for _, c := range configs {
		raw, err := c.Marshal()
		if err != nil {
			continue
		}
		if ct, ok := created[string(raw)]; ok && ct.After(t) {
			t = ct
		}
	}
	return t
}

func mark(set map[string]bool, configs []*ech.Config) {
	for _, c := range configs {
		if raw, err := c.Marshal(); err == nil {
			set[string(raw)] = true
		}
	}
}

func ids(configs []*ech.Config) []int {
	out := make([]int, len(configs))
	for i, c := range configs {
		out[i] = int(c.ConfigID)
	}
	return out
}

// sameRecord reports whether a and b publish the same thing.
func sameRecord(a, b Record) bool {
	return a.Priority == b.Priority && a.TTL == b.TTL && slices.Equal(a.ALPN, b.ALPN) &&
		bytes.Equal(a.ConfigList, b.ConfigList)
}
