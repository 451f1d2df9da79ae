package echkeys

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// RFC2136 is a [Provider] that sends dynamic updates (RFC 2136) signed with
// TSIG (RFC 8945) to a zone's primary server, as BIND, Knot DNS and
// PowerDNS accept them, and reads the zone from the same server.
type RFC2136 struct {
	// Server is the primary's "host:port".
	Server string
	// Zone is the zone the names are in, such as "example.com".
	Zone string
	// KeyName is the TSIG key's name.
	KeyName string
	// Secret is the TSIG key's secret, in base64.
	Secret string
	// Algorithm is the TSIG algorithm, such as "hmac-sha256" (the default)
	// or "hmac-sha512".
	Algorithm string
	// Timeout bounds each exchange with the server; zero means 10 seconds.
	Timeout time.Duration
}

var _ Provider = (*RFC2136)(nil)

func (p *RFC2136) client() *dns.Client {
	t := p.Timeout
	if t == 0 {
		t = 10 * time.Second
	}
	c := &dns.Client{Net: "tcp", Timeout: t}
	if p.KeyName != "" {
		c.TsigSecret = map[string]string{dns.CanonicalName(p.KeyName): p.Secret}
	}
	return c
}

func (p *RFC2136) algorithm() string {
	if p.Algorithm == "" {
		return dns.HmacSHA256
	}
	return dns.Fqdn(strings.ToLower(p.Algorithm))
}

// Lookup asks the server for the HTTPS records of name, without recursion.
func (p *RFC2136) Lookup(ctx context.Context, name string) (Current, error) {
	q := new(dns.Msg)
	q.SetQuestion(dns.CanonicalName(name), dns.TypeHTTPS)
	q.RecursionDesired = false
	r, _, err := p.client().ExchangeContext(ctx, q, p.Server)
	if err != nil {
		return Current{}, fmt.Errorf("echkeys: query: %w", err)
	}
	if r.Rcode != dns.RcodeSuccess && r.Rcode != dns.RcodeNameError {
		return Current{}, fmt.Errorf("echkeys: query: %s", dns.RcodeToString[r.Rcode])
	}
	var cur Current
	owner := dns.CanonicalName(name)
	for _, rr := range r.Answer {
		if dns.CanonicalName(rr.Header().Name) != owner {
			continue
		}
		switch rr := rr.(type) {
		case *dns.CNAME:
			cur.Alias = rr.Target
		case *dns.HTTPS:
			if rr.Priority == 0 {
				cur.Alias = rr.Target // RFC 9460, Section 2.4.2: AliasMode
				continue
			}
			rec := Record{Name: owner, TTL: time.Duration(rr.Hdr.Ttl) * time.Second, Priority: rr.Priority}
			for _, kv := range rr.Value {
				switch kv := kv.(type) {
				case *dns.SVCBAlpn:
					rec.ALPN = kv.Alpn
				case *dns.SVCBECHConfig:
					rec.ConfigList = kv.ECH
				}
			}
			cur.Records = append(cur.Records, rec)
		}
	}
	return cur, nil
}

// Replace sends one update that, on the condition that name has no CNAME
// (RFC 2136, Section 2.4.3), deletes the HTTPS records of rec.Name and adds
// rec.
func (p *RFC2136) Replace(ctx context.Context, rec Record) error {
	owner := dns.CanonicalName(rec.Name)
	https := &dns.HTTPS{SVCB: dns.SVCB{
		Hdr:      dns.RR_Header{Name: owner, Rrtype: dns.TypeHTTPS, Class: dns.ClassINET, Ttl: uint32(rec.TTL / time.Second)},
		Priority: rec.Priority,
		Target:   ".",
	}}
	if len(rec.ALPN) > 0 {
		https.Value = append(https.Value, &dns.SVCBAlpn{Alpn: rec.ALPN})
	}
	if rec.ConfigList != nil {
		https.Value = append(https.Value, &dns.SVCBECHConfig{ECH: rec.ConfigList})
	}
	m := new(dns.Msg)
	m.SetUpdate(dns.CanonicalName(p.Zone))
	m.RRsetNotUsed([]dns.RR{&dns.CNAME{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeCNAME, Class: dns.ClassINET}}})
	m.RemoveRRset([]dns.RR{&dns.HTTPS{SVCB: dns.SVCB{Hdr: dns.RR_Header{Name: owner, Rrtype: dns.TypeHTTPS, Class: dns.ClassINET}}}})
	m.Insert([]dns.RR{https})
	if p.KeyName != "" {
		m.SetTsig(dns.CanonicalName(p.KeyName), p.algorithm(), 300, time.Now().Unix())
	}
	r, _, err := p.client().ExchangeContext(ctx, m, p.Server)
	if err != nil {
		return fmt.Errorf("echkeys: update: %w", err)
	}
	switch r.Rcode {
	case dns.RcodeSuccess:
		return nil
	case dns.RcodeYXRrset:
		return fmt.Errorf("%w: %s has a CNAME", ErrCNAME, owner)
	}
	return fmt.Errorf("echkeys: update of %s: %s", owner, dns.RcodeToString[r.Rcode])
}
