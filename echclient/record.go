package echclient

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/echkit/ech"
	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/net/dns/dnsmessage"
)

// Record is one ServiceMode HTTPS record (RFC 9460) with its SvcParams
// parsed. Absent parameters are zero: nil slices, port 0.
//
// When an AliasMode chain ends at a name that has no ServiceMode records,
// [Resolver.Lookup] returns one Record with Priority 0 and Target set to that
// name, and no parameters: the client connects to the alias target's own
// addresses (RFC 9460, Section 2.4.2).
type Record struct {
	// Name is the owner name of the record, after any AliasMode records
	// and CNAMEs, without the trailing dot.
	Name string
	// Priority is the SvcPriority: lower values are preferred.
	Priority uint16
	// Target is the effective TargetName, the host to connect to: Name
	// when the record's TargetName is "." (RFC 9460, Section 2.5.2).
	Target string
	// ALPN is the alpn parameter: the protocol IDs the endpoint supports
	// besides the default http/1.1.
	ALPN []string
	// NoDefaultALPN is the no-default-alpn parameter: the endpoint does not
	// support http/1.1.
	NoDefaultALPN bool
	// Port is the port parameter, or 0.
	Port uint16
	// IPv4Hint and IPv6Hint are the ipv4hint and ipv6hint parameters:
	// addresses of Target a client may use before it resolves Target.
	IPv4Hint []netip.Addr
	IPv6Hint []netip.Addr
	// ECH is the ech parameter (RFC 9848), or nil. It has passed
	// [ech.ParseConfigList] but may hold no config crypto/tls can use.
	ECH ech.ConfigList
	// TTL is how long the record may be cached: the smallest TTL of the
	// records followed to reach it (AliasMode, CNAME and the record itself).
	TTL time.Duration
}

// errIncompatible marks a record whose mandatory parameter this package does
// not know; a client ignores it (RFC 9460, Section 8).
var errIncompatible = errors.New("echclient: record with unknown mandatory parameter")

// parseRecord parses the ServiceMode record rr found at owner, whose RDATA
// (RFC 9460, Section 2.2) is, in the TLS presentation language:
//
//	struct {
//	    uint16 key;
//	    opaque value<0..2^16-1>;
//	} SvcParam;
//
//	struct {
//	    uint16 priority;
//	    DomainName target;     /* uncompressed */
//	    SvcParam params[rest]; /* keys strictly increasing */
//	} RDATA;
//
// It checks
// every SvcParam this package knows against its wire format (RFC 9460,
// Section 7; RFC 9848, Section 3); a record that breaks one gives an error
// wrapping [ErrMalformedRecord], a record that needs a parameter this
// package does not know gives errIncompatible.
//
// dnsmessage has already checked the RDATA framing: the TargetName, the
// strictly increasing SvcParamKeys (RFC 9460, Section 2.2) and every value
// length.
func parseRecord(owner string, ttl uint32, rr *dnsmessage.SVCBResource) (Record, error) {
	malformed := func(format string, args ...any) (Record, error) {
		return Record{}, fmt.Errorf("%w: %s: %s", ErrMalformedRecord, owner, fmt.Sprintf(format, args...))
	}
	rec := Record{Name: owner, Priority: rr.Priority, Target: owner, TTL: time.Duration(ttl) * time.Second}
	if t := rr.Target.String(); t != "." {
		target, err := canonicalName(t)
		if err != nil {
			return malformed("TargetName: %v", err)
		}
		rec.Target = target
	}
	var mandatory []dnsmessage.SVCParamKey
	for _, p := range rr.Params {
		v := cryptobyte.String(p.Value)
		switch p.Key {
		case dnsmessage.SVCParamMandatory:
			// RFC 9460, Section 8: a non-empty list of keys in strictly
			// increasing order, not including mandatory itself.
			if len(v) == 0 || len(v)%2 != 0 {
				return malformed("mandatory value of %d bytes", len(v))
			}
			for !v.Empty() {
				var k uint16
				v.ReadUint16(&k)
				key := dnsmessage.SVCParamKey(k)
				if key == dnsmessage.SVCParamMandatory || len(mandatory) > 0 && key <= mandatory[len(mandatory)-1] {
					return malformed("mandatory lists %v out of order", key)
				}
				mandatory = append(mandatory, key)
			}
		case dnsmessage.SVCParamALPN:
			// RFC 9460, Section 7.1.1: a non-empty list of
			//   opaque alpn_id<1..255>;
			if v.Empty() {
				return malformed("empty alpn")
			}
			for !v.Empty() {
				var id cryptobyte.String
				if !v.ReadUint8LengthPrefixed(&id) || id.Empty() {
					return malformed("bad alpn-id")
				}
				rec.ALPN = append(rec.ALPN, string(id))
			}
		case dnsmessage.SVCParamNoDefaultALPN:
			if !v.Empty() {
				return malformed("no-default-alpn with a value")
			}
			rec.NoDefaultALPN = true
		case dnsmessage.SVCParamPort:
			if !v.ReadUint16(&rec.Port) || !v.Empty() {
				return malformed("port value of %d bytes", len(p.Value))
			}
		case dnsmessage.SVCParamIPv4Hint:
			// RFC 9460, Section 7.3: a non-empty list of addresses.
			if len(v) == 0 || len(v)%4 != 0 {
				return malformed("ipv4hint value of %d bytes", len(v))
			}
			for !v.Empty() {
				var a [4]byte
				v.CopyBytes(a[:])
				rec.IPv4Hint = append(rec.IPv4Hint, netip.AddrFrom4(a))
			}
		case dnsmessage.SVCParamIPv6Hint:
			if len(v) == 0 || len(v)%16 != 0 {
				return malformed("ipv6hint value of %d bytes", len(v))
			}
			for !v.Empty() {
				var a [16]byte
				v.CopyBytes(a[:])
				rec.IPv6Hint = append(rec.IPv6Hint, netip.AddrFrom16(a))
			}
		case dnsmessage.SVCParamECH:
			// RFC 9848, Section 3: the value is an ECHConfigList.
			if _, err := ech.ParseConfigList(p.Value); err != nil {
				return malformed("ech: %v", err)
			}
			// NOTE: clone so that the record, which may be cached, does not
			// share the buffer of the other parameters.
			rec.ECH = slices.Clone(p.Value)
		}
	}
	for _, k := range mandatory {
		// RFC 9460, Section 8: a listed key must be present.
		if !slices.ContainsFunc(rr.Params, func(p dnsmessage.SVCParam) bool { return p.Key == k }) {
			return malformed("mandatory %v is missing", k)
		}
		if !knownKey(k) {
			return Record{}, fmt.Errorf("%w: %s: %v", errIncompatible, owner, k)
		}
	}
	// RFC 9460, Section 7.1.1: no-default-alpn without alpn leaves the
	// endpoint with no protocol.
	if rec.NoDefaultALPN && rec.ALPN == nil {
		return malformed("no-default-alpn without alpn")
	}
	return rec, nil
}

// knownKey reports whether parseRecord understands k.
func knownKey(k dnsmessage.SVCParamKey) bool {
	switch k {
	case dnsmessage.SVCParamMandatory, dnsmessage.SVCParamALPN, dnsmessage.SVCParamNoDefaultALPN,
		dnsmessage.SVCParamPort, dnsmessage.SVCParamIPv4Hint, dnsmessage.SVCParamECH, dnsmessage.SVCParamIPv6Hint:
		return true
	}
	return false
}

// String returns r in the presentation format of RFC 9460, Section 2.1,
// without owner name, TTL and class, for logs and tools:
//
//	1 svc.example.net. alpn="h2,h3" port=8443 ipv4hint=192.0.2.1 ech="AEX+DQBB..."
func (r Record) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d %s.", r.Priority, r.Target)
	if r.ALPN != nil {
		fmt.Fprintf(&b, " alpn=%q", strings.Join(r.ALPN, ","))
	}
	if r.NoDefaultALPN {
		b.WriteString(" no-default-alpn")
	}
	if r.Port != 0 {
		fmt.Fprintf(&b, " port=%d", r.Port)
	}
	writeAddrs(&b, "ipv4hint", r.IPv4Hint)
	if r.ECH != nil {
		fmt.Fprintf(&b, " ech=%q", base64.StdEncoding.EncodeToString(r.ECH))
	}
	writeAddrs(&b, "ipv6hint", r.IPv6Hint)
	return b.String()
}

func writeAddrs(b *strings.Builder, key string, addrs []netip.Addr) {
	for i, a := range addrs {
		if i == 0 {
			fmt.Fprintf(b, " %s=", key)
		} else {
			b.WriteByte(',')
		}
		b.WriteString(a.String())
	}
}

// QueryName returns the name of the HTTPS records of the origin
// https://host:port (RFC 9460, Section 9.1): host itself for the default port
// 443 (or 0), otherwise "_PORT._https.host" (Port Prefix Naming, Section 2.3).
// It does not check host; [Resolver.Lookup] does.
func QueryName(host string, port int) string {
	host = strings.TrimSuffix(host, ".")
	if port == 0 || port == 443 {
		return host
	}
	return "_" + strconv.Itoa(port) + "._https." + host
}

// QueryNameURL returns the name of the HTTPS records for u, an "https" or
// "http" URL, with the host and port of [SplitURL].
func QueryNameURL(u *url.URL) (string, error) {
	host, port, err := SplitURL(u)
	if err != nil {
		return "", err
	}
	return QueryName(host, port), nil
}

// SplitURL returns the host and port whose HTTPS records apply to u. An
// "https" URL's default port is 443; an "http" URL maps to the "https" origin
// with the same port, port 80 to 443 (RFC 9460, Section 9.5).
func SplitURL(u *url.URL) (host string, port int, err error) {
	host = u.Hostname()
	switch u.Scheme {
	case "https":
		port = 443
	case "http":
		port = 80
	default:
		return "", 0, fmt.Errorf("%w: scheme %q has no HTTPS records", ErrInvalidHost, u.Scheme)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return "", 0, fmt.Errorf("%w: bad port %q", ErrInvalidHost, p)
		}
		port = int(n)
	}
	if port == 80 && u.Scheme == "http" {
		port = 443
	}
	if _, err := canonicalName(host); err != nil {
		return "", 0, err
	}
	return host, port, nil
}

// canonicalName checks that name is a DNS host name, as Lookup takes it and
// as a TargetName must be, and returns it in lower case without the trailing
// dot. Labels are 1 to 63 letters, digits, hyphens or underscores (for Port
// Prefix Naming); the whole name at most 253 bytes; an IP address is refused.
func canonicalName(name string) (string, error) {
	name = strings.TrimSuffix(name, ".")
	if len(name) == 0 || len(name) > 253 {
		return "", fmt.Errorf("%w: length %d", ErrInvalidHost, len(name))
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return "", fmt.Errorf("%w: %s is an IP address", ErrInvalidHost, name)
	}
	b := []byte(name)
	label := 0
	for i, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return "", fmt.Errorf("%w: empty label in %q", ErrInvalidHost, name)
			}
			label = 0
			continue
		case 'A' <= c && c <= 'Z':
			b[i] = c + 'a' - 'A'
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return "", fmt.Errorf("%w: bad character 0x%02x", ErrInvalidHost, c)
		}
		if label++; label > 63 {
			return "", fmt.Errorf("%w: label longer than 63 bytes", ErrInvalidHost)
		}
	}
	if label == 0 {
		return "", fmt.Errorf("%w: empty label in %q", ErrInvalidHost, name)
	}
	return string(b), nil
}
