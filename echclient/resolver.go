package echclient

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	// DefaultTimeout bounds a [Resolver.Lookup] whose Resolver has no
	// Timeout.
	DefaultTimeout = 5 * time.Second

	// udpRetransmit is how long a UDP query waits before it is sent again.
	udpRetransmit = time.Second
	// ednsUDPSize is the UDP payload size we advertise in EDNS(0): the
	// value of DNS Flag Day 2020, which avoids IP fragmentation.
	ednsUDPSize = 1232
	// maxMessageSize is the largest DNS message: TCP's two-byte length.
	maxMessageSize = math.MaxUint16
	// maxAliasChain is the most AliasMode records Lookup follows, and
	// maxCNAMEChain the most CNAMEs it follows inside one answer.
	// NOTE: RFC 9460, Section 3 asks for a bound but sets none; 8 is ours.
	maxAliasChain = 8
	maxCNAMEChain = 8
	// dohContentType is the media type of RFC 8484, Section 6.
	dohContentType = "application/dns-message"
)

// resolvConfPath is the file the system resolver's servers are read from.
var resolvConfPath = "/etc/resolv.conf"

// Resolver looks up HTTPS records (RFC 9460, type 65). The zero value asks
// the servers of /etc/resolv.conf over UDP, with TCP when an answer is
// truncated. A Resolver is safe for concurrent use.
type Resolver struct {
	// Server is the "host:port" of a DNS server to ask instead of the
	// system's; the port defaults to 53.
	Server string
	// DoHURL, if set, is the URL of a DNS-over-HTTPS server (RFC 8484) that
	// is asked with POST instead of classic DNS; Server is then unused.
	DoHURL string
	// HTTPClient makes the DoH requests; nil means [http.DefaultClient].
	HTTPClient *http.Client
	// Timeout bounds each call to Lookup, AliasMode chain included; zero
	// means DefaultTimeout.
	Timeout time.Duration
}

// alias is an AliasMode record; target is "" for a TargetName of ".".
type alias struct {
	target string
	ttl    uint32
}

// response is what one DNS response says about the HTTPS records of the
// name asked.
type response struct {
	// owner is the name asked, after the CNAMEs of the answer section,
	// without the trailing dot.
	owner string
	// ttl is the smallest TTL of those CNAMEs, or math.MaxUint32.
	ttl     uint32
	aliases []alias
	records []Record
	// errs holds an error per ServiceMode record at owner that does not
	// parse, and incompatible counts those this package cannot use.
	errs         []error
	incompatible int
}

// parseResponse parses msg, the response to a query for the HTTPS records of
// qname with this id. It returns an error wrapping [ErrMalformedResponse] if
// msg does not parse or answers another question, and [ErrDNSFailure] for a
// response code other than NOERROR and NXDOMAIN. A malformed HTTPS record is
// not an error of the response: it is reported in errs.
func parseResponse(msg []byte, id uint16, qname dnsmessage.Name) (*response, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrMalformedResponse, err)
	}
	if h.ID != id || !h.Response {
		return nil, fmt.Errorf("%w: not a response to our query", ErrMalformedResponse)
	}
	if h.RCode != dnsmessage.RCodeSuccess && h.RCode != dnsmessage.RCodeNameError {
		return nil, fmt.Errorf("%w: %s: response code %v", ErrDNSFailure, qname, h.RCode)
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return nil, fmt.Errorf("%w: question: %v", ErrMalformedResponse, err)
	}
	if len(qs) != 1 || qs[0].Type != dnsmessage.TypeHTTPS || qs[0].Class != dnsmessage.ClassINET ||
		asciiLower(qs[0].Name.String()) != asciiLower(qname.String()) {
		return nil, fmt.Errorf("%w: answers another question", ErrMalformedResponse)
	}

	type httpsRR struct {
		owner string
		ttl   uint32
		rr    dnsmessage.SVCBResource
		err   error
	}
	type cname struct {
		target string
		ttl    uint32
	}
	var rrs []httpsRR
	cnames := make(map[string]cname)
	for {
		hdr, err := p.AnswerHeader()
		if err == dnsmessage.ErrSectionDone {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: answer: %v", ErrMalformedResponse, err)
		}
		owner := asciiLower(hdr.Name.String())
		switch {
		case hdr.Class != dnsmessage.ClassINET:
			err = p.SkipAnswer()
		case hdr.Type == dnsmessage.TypeCNAME:
			var c dnsmessage.CNAMEResource
			if c, err = p.CNAMEResource(); err == nil {
				cnames[owner] = cname{asciiLower(c.CNAME.String()), hdr.TTL}
			}
		case hdr.Type == dnsmessage.TypeHTTPS:
			r, rerr := p.HTTPSResource()
			if rerr != nil {
				// The RDATA is malformed, not the message: skip this record.
				rrs = append(rrs, httpsRR{owner: owner, err: rerr})
				err = p.SkipAnswer()
				break
			}
			rrs = append(rrs, httpsRR{owner: owner, ttl: hdr.TTL, rr: r.SVCBResource})
		default:
			err = p.SkipAnswer()
		}
		if err != nil {
			return nil, fmt.Errorf("%w: answer: %v", ErrMalformedResponse, err)
		}
	}

	// A recursive resolver answers for the end of a CNAME chain, with the
	// chain in front (RFC 1034, Section 3.6.2).
	owner := strings.TrimSuffix(asciiLower(qname.String()), ".")
	resp := &response{ttl: math.MaxUint32}
	for i := 0; ; i++ {
		c, ok := cnames[owner+"."]
		if !ok {
			break
		}
		if i == maxCNAMEChain {
			return nil, fmt.Errorf("%w: CNAMEs from %s", ErrAliasChain, qname)
		}
		target, err := canonicalName(c.target)
		if err != nil {
			return nil, fmt.Errorf("%w: CNAME target: %v", ErrMalformedResponse, err)
		}
		owner, resp.ttl = target, min(resp.ttl, c.ttl)
	}
	resp.owner = owner
	for _, r := range rrs {
		if r.owner != owner+"." {
			continue // not on the path of our question
		}
		switch {
		case r.err != nil:
			resp.errs = append(resp.errs, fmt.Errorf("%w: %s: %v", ErrMalformedRecord, owner, r.err))
		case r.rr.Priority == 0:
			// RFC 9460, Section 2.4.2: AliasMode; its SvcParams are ignored.
			a := alias{ttl: r.ttl}
			if t := r.rr.Target.String(); t != "." {
				target, err := canonicalName(t)
				if err != nil {
					resp.errs = append(resp.errs, fmt.Errorf("%w: %s: AliasMode TargetName: %v", ErrMalformedRecord, owner, err))
					continue
				}
				a.target = target
			}
			resp.aliases = append(resp.aliases, a)
		default:
			rec, err := parseRecord(owner, r.ttl, &r.rr)
			switch {
			case errors.Is(err, errIncompatible):
				resp.incompatible++
			case err != nil:
				resp.errs = append(resp.errs, err)
			default:
				resp.records = append(resp.records, rec)
			}
		}
	}
	return resp, nil
}

// buildQuery returns a query for the HTTPS records of name, with an EDNS(0)
// OPT record.
func buildQuery(id uint16, name dnsmessage.Name) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, 64+len(name.Data)), dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(dnsmessage.Question{Name: name, Type: dnsmessage.TypeHTTPS, Class: dnsmessage.ClassINET}); err != nil {
		return nil, err
	}
	if err := b.StartAdditionals(); err != nil {
		return nil, err
	}
	var opt dnsmessage.ResourceHeader
	if err := opt.SetEDNS0(ednsUDPSize, dnsmessage.RCodeSuccess, false); err != nil {
		return nil, err
	}
	if err := b.OPTResource(opt, dnsmessage.OPTResource{}); err != nil {
		return nil, err
	}
	return b.Finish()
}

// Lookup returns the ServiceMode HTTPS records of the origin https://host:port
// (port 0 means 443), in order of priority, with their parameters parsed. It
// follows AliasMode records, at most 8, and the CNAMEs in each answer.
// Records that are malformed or need a parameter this package does not know
// are left out, as RFC 9460 has clients do.
//
// Lookup returns an error wrapping [ErrNoRecord] if the name has no usable
// ServiceMode record, [ErrMalformedRecord] if it has records and none parses,
// [ErrMalformedResponse] if a response does not parse, [ErrAliasChain],
// [ErrInvalidHost], or [ErrDNSFailure] if a server does not answer in time
// (then together with [context.DeadlineExceeded] or the network error).
func (r *Resolver) Lookup(ctx context.Context, host string, port int) ([]Record, error) {
	name, err := canonicalName(QueryName(host, port))
	if err != nil {
		return nil, err
	}
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	ttl := uint32(math.MaxUint32)
	seen := []string{name}
	for hop := 0; ; hop++ {
		resp, err := r.query(ctx, name)
		if err != nil {
			return nil, err
		}
		ttl = min(ttl, resp.ttl)
		if len(resp.aliases) > 0 {
			// RFC 9460, Section 2.4.2: with an AliasMode record in the set,
			// ServiceMode records are ignored. Of several, we take the first.
			a := resp.aliases[0]
			if a.target == "" {
				// RFC 9460, Section 2.5.1: "." says the service does not exist.
				return nil, fmt.Errorf("%w: %s: AliasMode to \".\"", ErrNoRecord, resp.owner)
			}
			if hop == maxAliasChain || slices.Contains(seen, a.target) {
				return nil, fmt.Errorf("%w: AliasMode records from %s", ErrAliasChain, seen[0])
			}
			seen = append(seen, a.target)
			name, ttl = a.target, min(ttl, a.ttl)
			continue
		}
		d := time.Duration(ttl) * time.Second
		recs := resp.records
		switch {
		case len(recs) > 0:
		case len(resp.errs) > 0:
			return nil, resp.errs[0]
		case resp.incompatible > 0:
			return nil, fmt.Errorf("%w: %s: every record needs an unknown parameter", ErrNoRecord, resp.owner)
		case hop > 0:
			// The chain ends without ServiceMode records: connect to its
			// end as if it had one without parameters.
			recs = []Record{{Name: resp.owner, Target: resp.owner, TTL: d}}
		default:
			return nil, fmt.Errorf("%w: %s", ErrNoRecord, resp.owner)
		}
		for i := range recs {
			recs[i].TTL = min(recs[i].TTL, d)
		}
		// NOTE: records of equal priority keep the server's order; RFC 9460
		// lets clients shuffle them, we leave that to the server.
		slices.SortStableFunc(recs, func(a, b Record) int { return int(a.Priority) - int(b.Priority) })
		return recs, nil
	}
}

// query asks for the HTTPS records of name.
func (r *Resolver) query(ctx context.Context, name string) (*response, error) {
	qname, err := dnsmessage.NewName(name + ".")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidHost, err)
	}
	// RFC 8484, Section 4.1: a DoH query has ID 0, so that it caches well.
	var id uint16
	if r.DoHURL == "" {
		var b [2]byte
		rand.Read(b[:])
		id = binary.BigEndian.Uint16(b[:])
	}
	query, err := buildQuery(id, qname)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidHost, err)
	}
	var msg []byte
	if r.DoHURL != "" {
		msg, err = r.exchangeDoH(ctx, query)
	} else {
		msg, err = r.exchangeClassic(ctx, query, id)
	}
	if err != nil {
		return nil, err
	}
	return parseResponse(msg, id, qname)
}

// exchangeClassic sends query over UDP to each server in turn until one
// answers, and again over TCP when the answer is truncated.
func (r *Resolver) exchangeClassic(ctx context.Context, query []byte, id uint16) ([]byte, error) {
	servers := []string{r.Server}
	if r.Server == "" {
		servers = systemServers()
	} else if _, _, err := net.SplitHostPort(r.Server); err != nil {
		servers = []string{net.JoinHostPort(r.Server, "53")}
	}
	var err error
	for _, s := range servers {
		var msg []byte
		msg, err = exchangeUDP(ctx, s, query, id)
		if err == nil && truncated(msg) {
			msg, err = exchangeTCP(ctx, s, query)
		}
		if err == nil {
			return msg, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}

// truncated reports whether msg has the TC bit (RFC 1035, Section 4.1.1).
func truncated(msg []byte) bool {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	return err == nil && h.Truncated
}

// exchangeUDP sends query to server over UDP, again every udpRetransmit,
// and returns the first response with the query's ID. Until ctx is done,
// datagrams that are not such a response are ignored, as a spoofer's would be.
func exchangeUDP(ctx context.Context, server string, query []byte, id uint16) ([]byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", server)
	if err != nil {
		return nil, netError(ctx, server, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	buf := make([]byte, maxMessageSize)
	for {
		if _, err := c.Write(query); err != nil {
			return nil, netError(ctx, server, err)
		}
		c.SetReadDeadline(time.Now().Add(udpRetransmit))
		for {
			n, err := c.Read(buf)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
				break // send again
			}
			if err != nil {
				return nil, netError(ctx, server, err)
			}
			var p dnsmessage.Parser
			if h, err := p.Start(buf[:n]); err == nil && h.ID == id && h.Response {
				return slices.Clone(buf[:n]), nil
			}
		}
	}
}

// exchangeTCP sends query to server over TCP (RFC 1035, Section 4.2.2).
func exchangeTCP(ctx context.Context, server string, query []byte) ([]byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", server)
	if err != nil {
		return nil, netError(ctx, server, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	out := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(query)), uint16(len(query)))
	if _, err := c.Write(append(out, query...)); err != nil {
		return nil, netError(ctx, server, err)
	}
	var n [2]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return nil, netError(ctx, server, err)
	}
	msg := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(c, msg); err != nil {
		return nil, netError(ctx, server, err)
	}
	return msg, nil
}

// exchangeDoH sends query to r.DoHURL with POST (RFC 8484, Section 4.1).
func (r *Resolver) exchangeDoH(ctx context.Context, query []byte) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.DoHURL, bytes.NewReader(query))
	if err != nil {
		return nil, fmt.Errorf("%w: DoH: %w", ErrDNSFailure, err)
	}
	req.Header.Set("Content-Type", dohContentType)
	req.Header.Set("Accept", dohContentType)
	client := r.HTTPClient
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, netError(ctx, "DoH", err)
	}
	defer resp.Body.Close()
	if ctx.Err() != nil {
		return nil, netError(ctx, "DoH", ctx.Err())
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: DoH: HTTP status %s", ErrDNSFailure, resp.Status)
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != dohContentType {
		return nil, fmt.Errorf("%w: DoH: content type %q", ErrMalformedResponse, resp.Header.Get("Content-Type"))
	}
	msg, err := io.ReadAll(io.LimitReader(resp.Body, maxMessageSize+1))
	if err != nil {
		return nil, netError(ctx, "DoH", err)
	}
	if len(msg) > maxMessageSize {
		return nil, fmt.Errorf("%w: DoH: body longer than %d bytes", ErrMalformedResponse, maxMessageSize)
	}
	return msg, nil
}

// netError wraps a network error of a query to server in ErrDNSFailure,
// with the context's error in place of the one closing the connection made.
func netError(ctx context.Context, server string, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return fmt.Errorf("%w: %s: %w", ErrDNSFailure, server, err)
}

// systemServers returns the servers of resolvConfPath, or the local
// server, as Go's resolver does without one.
func systemServers() []string {
	var servers []string
	if f, err := os.Open(resolvConfPath); err == nil {
		servers = parseResolvConf(f)
		f.Close()
	}
	if len(servers) == 0 {
		servers = []string{"127.0.0.1:53", "[::1]:53"}
	}
	return servers
}

// parseResolvConf returns the "nameserver" addresses of a resolv.conf file
// as "host:53".
func parseResolvConf(r io.Reader) []string {
	var servers []string
	s := bufio.NewScanner(r)
	for s.Scan() {
		f := strings.Fields(s.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		if a, err := netip.ParseAddr(f[1]); err == nil {
			servers = append(servers, netip.AddrPortFrom(a, 53).String())
		}
	}
	return servers
}

// asciiLower lowers the ASCII letters of a DNS name, and leaves every other
// byte as it is (unlike strings.ToLower, which rewrites invalid UTF-8).
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}
