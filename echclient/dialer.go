package echclient

import (
	"context"
	"crypto/hpke"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/echkit/ech"
	"golang.org/x/crypto/cryptobyte"
)

const (
	// maxCacheEntries bounds the names a Dialer caches.
	maxCacheEntries = 1024
	// maxCacheTTL bounds how long a Dialer caches a name.
	// NOTE: RFC 9460 sets no bound; a day is ours, as resolvers cap TTLs.
	maxCacheTTL = 24 * time.Hour
)

// Policy says what a [Dialer] does when it cannot use ECH.
type Policy int

const (
	// Opportunistic uses ECH when the name publishes a config crypto/tls
	// can use, and plain TLS otherwise: when there is no HTTPS record, no
	// ech parameter, the lookup fails, or the server disables ECH securely
	// (rejects it without retry configs, RFC 9849, Section 6.1.6).
	Opportunistic Policy = iota
	// RequireECH fails with [ErrECHRequired] in each of those cases, and
	// with [ErrECHRejected] when the server rejects ECH without retry
	// configs.
	RequireECH
)

// String returns the name of p.
func (p Policy) String() string {
	switch p {
	case Opportunistic:
		return "opportunistic"
	case RequireECH:
		return "require-ECH"
	}
	return "Policy(" + strconv.Itoa(int(p)) + ")"
}

// Dialer makes TLS connections with ECH: it looks up the HTTPS records of
// the address, connects to the endpoint they name, hands crypto/tls the
// ECHConfigList, and retries once with the server's retry configs when it
// rejects ECH (RFC 9849, Section 6.1.6). It caches the records of each name
// for their TTL, and replaces a cached config with retry configs that
// worked.
//
// The zero value is a Dialer with the [Opportunistic] policy, the system's
// DNS servers and crypto/tls defaults. A Dialer is safe for concurrent use
// and must not be copied after first use.
type Dialer struct {
	// Resolver looks up HTTPS records; nil means the zero Resolver.
	Resolver *Resolver
	// Config is the TLS configuration to start from. It is cloned, never
	// changed. An empty ServerName is the host of the address. The Dialer
	// sets EncryptedClientHelloConfigList, and MinVersion to TLS 1.3 when it
	// uses ECH.
	Config *tls.Config
	// NetDialer makes the TCP connections and resolves the addresses of
	// record targets without address hints; nil means a [net.Dialer] with
	// the 30-second connect timeout and keep-alive of
	// [net/http.DefaultTransport].
	NetDialer *net.Dialer
	// Policy says what to do when ECH cannot be used.
	Policy Policy

	mu    sync.Mutex
	cache map[string]cacheEntry
}

// cacheEntry is the result of a lookup, kept until expires. Its records are
// never changed: an update replaces the slice.
type cacheEntry struct {
	records []Record
	expires time.Time
}

// candidate is a record the Dialer may connect through.
type candidate struct {
	rec *Record
	ech ech.ConfigList // nil when the record's config is absent or unusable
}

// DialContext connects to addr ("host:port") on network ("tcp", "tcp4" or
// "tcp6") and completes a TLS handshake, with ECH when the host publishes a
// config; see [Dialer]. The returned [net.Conn] is always a [*tls.Conn]:
// its ConnectionState().ECHAccepted reports whether ECH was used. ctx bounds
// the lookup, the connection and the handshake; it does not bound the
// connection once returned.
//
// When a record's endpoint cannot be reached, DialContext tries the next
// record; a TLS error other than the rejection of ECH, such as a
// certificate that does not verify, ends the dial.
//
// The signature is the one [http.Transport.DialTLSContext] takes.
func (d *Dialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := d.dial(ctx, network, addr, nil)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// dial is DialContext; defaultProtos are the ALPN protocols to offer when
// d.Config has none.
func (d *Dialer) dial(ctx context.Context, network, addr string, defaultProtos []string) (*tls.Conn, error) {
	host, service, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("echclient: %w", err)
	}
	port, err := net.DefaultResolver.LookupPort(ctx, network, service)
	if err != nil {
		return nil, fmt.Errorf("echclient: %w", err)
	}
	cfg := d.baseConfig(host, defaultProtos)
	if _, err := netip.ParseAddr(host); err == nil {
		return d.dialPlain(ctx, network, addr, cfg, fmt.Errorf("%w: %s is an IP address", ErrNoRecord, host))
	}
	qname, err := canonicalName(QueryName(host, port))
	if err != nil {
		return d.dialPlain(ctx, network, addr, cfg, err)
	}
	recs, err := d.lookup(ctx, qname, host, port)
	if err != nil {
		return d.dialPlain(ctx, network, addr, cfg, err)
	}
	cands := candidates(recs, cfg)
	if len(cands) == 0 {
		return d.dialPlain(ctx, network, addr, cfg, fmt.Errorf("%w: %s: no record offers our ALPN protocols", ErrNoRecord, qname))
	}
	if cands[0].ech == nil && d.Policy == RequireECH {
		return nil, fmt.Errorf("%w: %w: %s", ErrECHRequired, ErrNoECHConfig, qname)
	}

	var errs []error
	for _, c := range cands {
		conn, err := d.connect(ctx, network, c.rec, port)
		if err != nil {
			// RFC 9460, Section 3: on a connection failure, try the next record.
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
			continue
		}
		tc, err := handshake(ctx, conn, cfg, c.ech)
		if err == nil {
			return tc, nil
		}
		var rej *tls.ECHRejectionError
		if c.ech == nil || !errors.As(err, &rej) {
			return nil, fmt.Errorf("echclient: %s: %w", addr, err)
		}
		return d.retry(ctx, network, qname, port, cfg, c, rej)
	}
	return nil, fmt.Errorf("echclient: %s: %w", addr, errors.Join(errs...))
}

// retry follows an ECH rejection of c's config (RFC 9849, Section 6.1.6).
func (d *Dialer) retry(ctx context.Context, network, qname string, port int, cfg *tls.Config, c candidate, rej *tls.ECHRejectionError) (*tls.Conn, error) {
	retryConfigs := ech.ConfigList(rej.RetryConfigList)
	if !usableConfigList(retryConfigs) {
		// No retry configs we can use: the server has securely disabled ECH.
		if d.Policy == RequireECH {
			return nil, fmt.Errorf("%w: %s: no usable retry configs: %w", ErrECHRejected, qname, rej)
		}
		retryConfigs = nil
	}
	conn, err := d.connect(ctx, network, c.rec, port)
	if err != nil {
		return nil, fmt.Errorf("echclient: %s: %w", qname, err)
	}
	tc, err := handshake(ctx, conn, cfg, retryConfigs)
	if err == nil {
		if retryConfigs != nil {
			d.storeRetryConfigs(qname, c.rec, retryConfigs)
		}
		return tc, nil
	}
	if errors.As(err, &rej) {
		// A client does not follow retry configs sent in answer to retry
		// configs: the server's configuration is inconsistent.
		return nil, fmt.Errorf("%w: %s: retry configs rejected too: %w", ErrECHRejected, qname, err)
	}
	return nil, fmt.Errorf("echclient: %s: %w", qname, err)
}

// dialPlain connects to addr with plain TLS because ECH is not available for
// reason, unless the policy requires ECH or ctx is done.
func (d *Dialer) dialPlain(ctx context.Context, network, addr string, cfg *tls.Config, reason error) (*tls.Conn, error) {
	if d.Policy == RequireECH {
		return nil, fmt.Errorf("%w: %w", ErrECHRequired, reason)
	}
	if ctx.Err() != nil {
		return nil, reason
	}
	conn, err := d.netDialer().DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("echclient: %s: %w", addr, err)
	}
	tc, err := handshake(ctx, conn, cfg, nil)
	if err != nil {
		return nil, fmt.Errorf("echclient: %s: %w", addr, err)
	}
	return tc, nil
}

// handshake runs the TLS handshake on conn, with ECH if configs is not nil,
// and closes conn if it fails.
func handshake(ctx context.Context, conn net.Conn, cfg *tls.Config, configs ech.ConfigList) (*tls.Conn, error) {
	if configs != nil {
		cfg = cfg.Clone()
		// crypto/tls offers ECH only in TLS 1.3.
		cfg.MinVersion = tls.VersionTLS13
		cfg.EncryptedClientHelloConfigList = configs
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	return tc, nil
}

// connect opens a connection to the endpoint of rec: its address hints
// first, IPv4 then IPv6, then the addresses of its target; on rec's port if
// it has one, else on port.
//
// NOTE: the attempts are sequential, not Happy Eyeballs (RFC 8305); IPv4
// hints go first so that a host without IPv6 does not wait on them.
func (d *Dialer) connect(ctx context.Context, network string, rec *Record, port int) (net.Conn, error) {
	if rec.Port != 0 {
		port = int(rec.Port)
	}
	p := strconv.Itoa(port)
	nd := d.netDialer()
	var hints []netip.Addr
	if network != "tcp6" {
		hints = append(hints, rec.IPv4Hint...)
	}
	if network != "tcp4" {
		hints = append(hints, rec.IPv6Hint...)
	}
	var errs []error
	for _, a := range hints {
		c, err := nd.DialContext(ctx, network, net.JoinHostPort(a.String(), p))
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			return nil, errors.Join(errs...)
		}
	}
	// RFC 9460, Section 7.3: hints stand in for the target's addresses,
	// which are authoritative.
	c, err := nd.DialContext(ctx, network, net.JoinHostPort(rec.Target, p))
	if err != nil {
		return nil, errors.Join(append(errs, err)...)
	}
	return c, nil
}

// candidates returns the records of recs a client with cfg can use, in
// order. A record is left out if it names no ALPN protocol of cfg; one that
// names any is offered all of cfg's protocols, which run over the same
// transport (RFC 9460, Section 7.1.2). If any record has a usable ECH
// config, those without one are left out, so that ECH is not given up for a
// less preferred endpoint.
func candidates(recs []Record, cfg *tls.Config) []candidate {
	var out []candidate
	withECH := false
	for i := range recs {
		rec := &recs[i]
		if len(cfg.NextProtos) > 0 && !slices.ContainsFunc(cfg.NextProtos, func(p string) bool {
			return slices.Contains(rec.ALPN, p) || p == "http/1.1" && !rec.NoDefaultALPN
		}) {
			continue
		}
		c := candidate{rec: rec}
		if usableConfigList(rec.ECH) {
			c.ech = rec.ECH
			withECH = true
		}
		out = append(out, c)
	}
	if withECH {
		// NOTE: RFC 9848 has a client give up the fallback to a direct
		// connection when every endpoint has ech; we go further and leave
		// out the endpoints without ech as soon as one has it, so that an
		// attacker cannot strip ECH by making the others fail.
		out = slices.DeleteFunc(out, func(c candidate) bool { return c.ech == nil })
	}
	return out
}

// usableConfigList reports whether l holds a config crypto/tls would use:
// version 0xfe0d, a valid public name, no mandatory extension, a KEM, KDF
// and AEAD crypto/hpke implements, and a public key of the KEM's form. It
// makes the choice crypto/tls makes, so that a list it would refuse falls
// back to plain TLS instead of failing the handshake.
func usableConfigList(l ech.ConfigList) bool {
	s := cryptobyte.String(l)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() {
		return false
	}
	for !list.Empty() {
		raw := list
		var version uint16
		var contents cryptobyte.String
		if !list.ReadUint16(&version) || !list.ReadUint16LengthPrefixed(&contents) {
			return false
		}
		if version != ech.VersionECH {
			continue
		}
		c, err := ech.ParseConfig(raw[:len(raw)-len(list)])
		if err != nil || ech.ValidPublicName(c.PublicName) != nil || len(c.MandatoryExtensions()) > 0 {
			continue
		}
		kem, err := hpke.NewKEM(uint16(c.KEM))
		if err != nil {
			continue
		}
		if _, err := kem.NewPublicKey(c.PublicKey); err != nil {
			continue
		}
		for _, cs := range c.CipherSuites {
			_, kdfErr := hpke.NewKDF(uint16(cs.KDF))
			_, aeadErr := hpke.NewAEAD(uint16(cs.AEAD))
			if kdfErr == nil && aeadErr == nil {
				return true
			}
		}
	}
	return false
}

// baseConfig returns the TLS configuration for host.
func (d *Dialer) baseConfig(host string, defaultProtos []string) *tls.Config {
	var cfg *tls.Config
	if d.Config != nil {
		cfg = d.Config.Clone()
	} else {
		cfg = new(tls.Config)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	if len(cfg.NextProtos) == 0 {
		cfg.NextProtos = defaultProtos
	}
	cfg.EncryptedClientHelloConfigList = nil
	return cfg
}

func (d *Dialer) netDialer() *net.Dialer {
	if d.NetDialer != nil {
		return d.NetDialer
	}
	// The dialer of http.DefaultTransport.
	return &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
}

// lookup returns the records of qname, the query name of host and port,
// from the cache or the resolver.
func (d *Dialer) lookup(ctx context.Context, qname, host string, port int) ([]Record, error) {
	now := time.Now()
	d.mu.Lock()
	e, ok := d.cache[qname]
	d.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.records, nil
	}
	r := d.Resolver
	if r == nil {
		r = new(Resolver)
	}
	recs, err := r.Lookup(ctx, host, port)
	if err != nil {
		return nil, err
	}
	ttl := maxCacheTTL
	for _, rec := range recs {
		ttl = min(ttl, rec.TTL)
	}
	if ttl > 0 {
		d.store(qname, cacheEntry{recs, now.Add(ttl)})
	}
	return recs, nil
}

// storeRetryConfigs replaces, in the cached records of qname, the ECH config
// of the record rec with retry configs that worked. The entry keeps its
// expiry: the retry configs stand in for the DNS config until then.
func (d *Dialer) storeRetryConfigs(qname string, rec *Record, configs ech.ConfigList) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.cache[qname]
	if !ok || !time.Now().Before(e.expires) {
		return
	}
	recs := slices.Clone(e.records)
	for i := range recs {
		if recs[i].Target == rec.Target && recs[i].Priority == rec.Priority && recs[i].Port == rec.Port {
			recs[i].ECH = slices.Clone(configs)
		}
	}
	d.cache[qname] = cacheEntry{recs, e.expires}
}

// store caches e for qname, making room if the cache is full.
func (d *Dialer) store(qname string, e cacheEntry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cache == nil {
		d.cache = make(map[string]cacheEntry)
	}
	if len(d.cache) >= maxCacheEntries {
		now := time.Now()
		for k, v := range d.cache {
			if !now.Before(v.expires) {
				delete(d.cache, k)
			}
		}
		for k := range d.cache {
			if len(d.cache) < maxCacheEntries {
				break
			}
			delete(d.cache, k) // an arbitrary entry
		}
	}
	d.cache[qname] = e
}
