package echclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// Names used by the tests. The servers' certificates come from an
// echtest.CA, which issues them for whatever name a client asks for.
const (
	publicName = echtest.DefaultPublicName
	secretName = "secret.example"
	testTTL    = 300
)

// testTimeout bounds every test step that waits on the network.
const testTimeout = 10 * time.Second

// newKeySet returns a key set with one new key for publicName, sent as
// retry config, and the config list that publishes it.
func newKeySet(t testing.TB) (*ech.KeySet, ech.ConfigList) {
	t.Helper()
	ks := echtest.NewKeySet(t, publicName)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	return ks, list
}

// serverConn returns the TLS server side of raw for the ECH keys ks: the
// split-mode frontend of this module ([ech.NewConn]) in front of a crypto/tls
// backend. It is the one place that knows how the tests' server does ECH.
//
// The backend needs no ECH keys when the frontend accepted ECH. For a hello
// whose ECH was rejected (a stale config, GREASE) it gets ks, so that
// crypto/tls sends the client retry configs (RFC 9849, Section 7.1).
func serverConn(ctx context.Context, raw net.Conn, ks *ech.KeySet, base *tls.Config) (*tls.Conn, error) {
	c, err := ech.NewConn(ctx, raw, ech.WithKeySet(ks))
	if err != nil {
		return nil, err
	}
	cfg := base.Clone()
	if !c.ECHAccepted() {
		cfg.EncryptedClientHelloKeys = ks.Keys()
	}
	return tls.Server(c, cfg), nil
}

// echServer is a TLS server with ECH on 127.0.0.1. After the handshake it
// writes the server name it saw, a newline, and closes.
type echServer struct {
	addr  string
	port  int
	conns atomic.Int32
}

// startECHServer starts an echServer whose n-th connection (from 0) uses the
// key set keys(n).
func startECHServer(t testing.TB, ca *echtest.CA, keys func(n int) *ech.KeySet) *echServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &echServer{addr: l.Addr().String(), port: l.Addr().(*net.TCPAddr).Port}
	cfg := &tls.Config{GetCertificate: ca.GetCertificate, MinVersion: tls.VersionTLS13}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		l.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			raw, err := l.Accept()
			if err != nil {
				return
			}
			n := int(s.conns.Add(1) - 1)
			wg.Go(func() {
				defer raw.Close()
				raw.SetDeadline(time.Now().Add(testTimeout))
				tc, err := serverConn(ctx, raw, keys(n), cfg)
				if err != nil {
					return
				}
				if err := tc.HandshakeContext(ctx); err != nil {
					return // such as the client's ech_required alert
				}
				io.WriteString(tc, tc.ConnectionState().ServerName+"\n")
				tc.Close()
			})
		}
	})
	return s
}

// readServerName reads the line an echServer writes.
func readServerName(t testing.TB, c net.Conn) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(testTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	return strings.TrimSuffix(line, "\n")
}

// echListener is a net.Listener on 127.0.0.1 whose connections are TLS
// server connections with ECH, for an http.Server.
type echListener struct {
	net.Listener
	conns chan net.Conn
}

func newECHListener(t testing.TB, ca *echtest.CA, ks *ech.KeySet) *echListener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	el := &echListener{Listener: l, conns: make(chan net.Conn)}
	cfg := &tls.Config{
		GetCertificate: ca.GetCertificate,
		MinVersion:     tls.VersionTLS13,
		NextProtos:     []string{"h2", "http/1.1"},
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() {
		for {
			raw, err := l.Accept()
			if err != nil {
				close(el.conns)
				return
			}
			go func() {
				tc, err := serverConn(ctx, raw, ks, cfg)
				if err != nil {
					raw.Close()
					return
				}
				select {
				case el.conns <- tc:
				case <-ctx.Done():
					raw.Close()
				}
			}()
		}
	}()
	return el
}

func (l *echListener) Accept() (net.Conn, error) {
	c, ok := <-l.conns
	if !ok {
		return nil, net.ErrClosed
	}
	return c, nil
}

// testDNS is a DNS server on 127.0.0.1 that answers from a zone over UDP
// and TCP on one port, and over DoH (RFC 8484) at doh.URL. Like a recursive
// resolver, it follows CNAMEs and puts the chain in the answer.
type testDNS struct {
	addr string
	doh  *httptest.Server

	mu   sync.Mutex
	zone map[string][]dnsmessage.Resource
	// raw replaces the whole response for a name.
	raw map[string]func(id uint16) []byte

	udpQueries, tcpQueries, dohQueries atomic.Int32
	// truncate sets TC on every UDP response, silent drops every query.
	truncate, silent atomic.Bool
}

func newTestDNS(t testing.TB) *testDNS {
	t.Helper()
	s := &testDNS{zone: make(map[string][]dnsmessage.Resource), raw: make(map[string]func(uint16) []byte)}
	var pc net.PacketConn
	var l net.Listener
	for range 20 {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close() // the TCP port is taken: try another
		pc = nil
	}
	require.NotNil(t, pc, "no port free for both UDP and TCP")
	s.addr = pc.LocalAddr().String()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		pc.Close()
		l.Close()
		wg.Wait()
	})
	wg.Go(func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			s.udpQueries.Add(1)
			if resp := s.answer(buf[:n], true); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	})
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				stop := context.AfterFunc(ctx, func() { c.Close() })
				defer stop()
				for {
					var n [2]byte
					if _, err := io.ReadFull(c, n[:]); err != nil {
						return
					}
					q := make([]byte, binary.BigEndian.Uint16(n[:]))
					if _, err := io.ReadFull(c, q); err != nil {
						return
					}
					s.tcpQueries.Add(1)
					resp := s.answer(q, false)
					if resp == nil {
						continue
					}
					c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(resp))), resp...))
				}
			})
		}
	})
	s.doh = httptest.NewTLSServer(http.HandlerFunc(s.serveDoH))
	t.Cleanup(s.doh.Close)
	return s
}

func (s *testDNS) serveDoH(w http.ResponseWriter, r *http.Request) {
	s.dohQueries.Add(1)
	if r.Method != http.MethodPost || r.Header.Get("Content-Type") != dohContentType {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	q, err := io.ReadAll(io.LimitReader(r.Body, 65536))
	if err != nil {
		return
	}
	resp := s.answer(q, false)
	if resp == nil {
		<-r.Context().Done()
		panic(http.ErrAbortHandler) // send no response at all
	}
	w.Header().Set("Content-Type", dohContentType)
	w.Write(resp)
}

// answer returns the response to query, or nil to send none.
func (s *testDNS) answer(query []byte, udp bool) []byte {
	if s.silent.Load() {
		return nil
	}
	var q dnsmessage.Message
	if err := q.Unpack(query); err != nil || len(q.Questions) != 1 {
		return nil
	}
	question := q.Questions[0]
	name := asciiLower(question.Name.String())
	s.mu.Lock()
	defer s.mu.Unlock()
	if f, ok := s.raw[name]; ok {
		return f(q.Header.ID)
	}
	resp := dnsmessage.Message{
		Header: dnsmessage.Header{
			ID: q.Header.ID, Response: true, Authoritative: true,
			RecursionDesired: q.Header.RecursionDesired, RecursionAvailable: true,
		},
		Questions: q.Questions,
	}
	known := false
	for range 10 {
		rrs, ok := s.zone[name]
		if !ok {
			break
		}
		known = true
		next := ""
		for _, rr := range rrs {
			switch {
			case rr.Header.Type == question.Type:
				resp.Answers = append(resp.Answers, rr)
			case rr.Header.Type == dnsmessage.TypeCNAME:
				resp.Answers = append(resp.Answers, rr)
				next = asciiLower(rr.Body.(*dnsmessage.CNAMEResource).CNAME.String())
			}
		}
		if next == "" {
			break
		}
		name = next
	}
	if !known {
		resp.Header.RCode = dnsmessage.RCodeNameError
	}
	msg, err := resp.Pack()
	if err != nil {
		panic(err)
	}
	if udp {
		size := 512
		for _, rr := range q.Additionals {
			if rr.Header.Type == dnsmessage.TypeOPT {
				size = max(size, int(rr.Header.Class))
			}
		}
		if s.truncate.Load() || len(msg) > size {
			resp.Header.Truncated = true
			resp.Answers = nil
			msg, _ = resp.Pack()
		}
	}
	return msg
}

// add puts a record of name into the zone.
func (s *testDNS) add(name string, ttl uint32, body dnsmessage.ResourceBody) {
	fqdn := asciiLower(strings.TrimSuffix(name, ".") + ".")
	var typ dnsmessage.Type
	switch b := body.(type) {
	case *dnsmessage.HTTPSResource:
		typ = dnsmessage.TypeHTTPS
	case *dnsmessage.CNAMEResource:
		typ = dnsmessage.TypeCNAME
	case *dnsmessage.AResource:
		typ = dnsmessage.TypeA
	case *dnsmessage.UnknownResource:
		typ = b.Type
	default:
		panic("testDNS: unexpected record body")
	}
	rr := dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(fqdn), Type: typ, Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   body,
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.zone[fqdn] = append(s.zone[fqdn], rr)
}

// https adds an HTTPS record; a priority of 0 makes it AliasMode.
func (s *testDNS) https(name string, ttl uint32, priority uint16, target string, params ...dnsmessage.SVCParam) {
	r := &dnsmessage.HTTPSResource{SVCBResource: dnsmessage.SVCBResource{
		Priority: priority,
		Target:   dnsmessage.MustNewName(strings.TrimSuffix(target, ".") + "."),
	}}
	for _, p := range params {
		r.SetParam(p.Key, p.Value)
	}
	s.add(name, ttl, r)
}

// rawHTTPS adds an HTTPS record with the RDATA rdata.
func (s *testDNS) rawHTTPS(name string, rdata []byte) {
	s.add(name, testTTL, &dnsmessage.UnknownResource{Type: dnsmessage.TypeHTTPS, Data: rdata})
}

func (s *testDNS) a(name, addr string) {
	s.add(name, testTTL, &dnsmessage.AResource{A: netip.MustParseAddr(addr).As4()})
}

func (s *testDNS) cname(name, target string) {
	s.add(name, testTTL, &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName(target + ".")})
}

// setRaw makes f the whole response for name.
func (s *testDNS) setRaw(name string, f func(id uint16) []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.raw[asciiLower(name+".")] = f
}

// resolver returns a Resolver that asks s over UDP and TCP.
func (s *testDNS) resolver() *Resolver {
	return &Resolver{Server: s.addr, Timeout: testTimeout}
}

// dohResolver returns a Resolver that asks s over DoH.
func (s *testDNS) dohResolver() *Resolver {
	return &Resolver{DoHURL: s.doh.URL + "/dns-query", HTTPClient: s.doh.Client(), Timeout: testTimeout}
}

// netDialer returns a net.Dialer that resolves host names with s.
func (s *testDNS) netDialer() *net.Dialer {
	return &net.Dialer{Resolver: &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, s.addr)
		},
	}}
}

// SvcParam builders.

func alpnParam(ids ...string) dnsmessage.SVCParam {
	var v []byte
	for _, id := range ids {
		v = append(append(v, byte(len(id))), id...)
	}
	return dnsmessage.SVCParam{Key: dnsmessage.SVCParamALPN, Value: v}
}

func portParam(port int) dnsmessage.SVCParam {
	return dnsmessage.SVCParam{Key: dnsmessage.SVCParamPort, Value: binary.BigEndian.AppendUint16(nil, uint16(port))}
}

func hintParam(addrs ...string) dnsmessage.SVCParam {
	p := dnsmessage.SVCParam{Key: dnsmessage.SVCParamIPv4Hint}
	for _, s := range addrs {
		a := netip.MustParseAddr(s)
		if a.Is6() {
			p.Key = dnsmessage.SVCParamIPv6Hint
		}
		p.Value = append(p.Value, a.AsSlice()...)
	}
	return p
}

func echParam(l ech.ConfigList) dnsmessage.SVCParam {
	return dnsmessage.SVCParam{Key: dnsmessage.SVCParamECH, Value: l}
}

func param(key uint16, value ...byte) dnsmessage.SVCParam {
	return dnsmessage.SVCParam{Key: dnsmessage.SVCParamKey(key), Value: value}
}

// env is a DNS server and an ECH server with one key set, and the names
// and certificates the tests use.
type env struct {
	ca   *echtest.CA
	dns  *testDNS
	ks   *ech.KeySet
	list ech.ConfigList
	srv  *echServer
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{ca: echtest.NewCA(t), dns: newTestDNS(t)}
	e.ks, e.list = newKeySet(t)
	e.srv = startECHServer(t, e.ca, func(int) *ech.KeySet { return e.ks })
	return e
}

// dialer returns a Dialer that uses e's DNS server for everything.
func (e *env) dialer(p Policy) *Dialer {
	return &Dialer{
		Resolver:  e.dns.resolver(),
		Config:    &tls.Config{RootCAs: e.ca.Pool()},
		NetDialer: e.dns.netDialer(),
		Policy:    p,
	}
}

// publish adds an HTTPS record for name pointing at e's ECH server, with
// the config list l.
func (e *env) publish(name string, ttl uint32, l ech.ConfigList) {
	e.dns.https(name, ttl, 1, ".", portParam(e.srv.port), hintParam("127.0.0.1"), echParam(l))
}

func (e *env) hostPort(host string) string {
	return net.JoinHostPort(host, strconv.Itoa(e.srv.port))
}

// closedPort returns a loopback port nothing listens on.
func closedPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	return port
}

// seedID is the ID of the seed responses.
const seedID = 0x1234

// packMsg returns a response to the HTTPS query for qname with answers.
func packMsg(t testing.TB, h dnsmessage.Header, qname string, answers ...dnsmessage.Resource) []byte {
	t.Helper()
	m := dnsmessage.Message{
		Header:    h,
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(qname + "."), Type: dnsmessage.TypeHTTPS, Class: dnsmessage.ClassINET}},
		Answers:   answers,
	}
	msg, err := m.Pack()
	require.NoError(t, err)
	return msg
}

func httpsRR(owner string, r *dnsmessage.SVCBResource) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner + "."), Class: dnsmessage.ClassINET, TTL: testTTL},
		Body:   &dnsmessage.HTTPSResource{SVCBResource: *r},
	}
}

func rawRR(owner string, typ dnsmessage.Type, rdata []byte) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(owner + "."), Class: dnsmessage.ClassINET, TTL: testTTL},
		Body:   &dnsmessage.UnknownResource{Type: typ, Data: rdata},
	}
}

// seedResponses returns responses to the HTTPS query for secretName with
// ID seedID, of every record shape the tests use.
func seedResponses(t testing.TB) [][]byte {
	t.Helper()
	_, list := newKeySet(t)
	h := dnsmessage.Header{ID: seedID, Response: true, RecursionAvailable: true}
	nx := h
	nx.RCode = dnsmessage.RCodeNameError
	return [][]byte{
		// As a large CDN publishes them.
		packMsg(t, h, secretName, httpsRR(secretName, svcb(1, ".", alpnParam("h3", "h2"),
			hintParam("192.0.2.1", "192.0.2.2"), echParam(list), hintParam("2001:db8::1", "2001:db8::2")))),
		packMsg(t, h, secretName,
			httpsRR(secretName, svcb(2, "svc2.example.", alpnParam("h2"), portParam(8443))),
			httpsRR(secretName, svcb(1, ".", param(0, 0, 3), alpnParam("h2", "http/1.1"), param(2), portParam(443), echParam(list)))),
		packMsg(t, h, secretName, httpsRR(secretName, svcb(0, "svc2.example."))),
		packMsg(t, h, secretName, httpsRR(secretName, svcb(0, "."))),
		packMsg(t, h, secretName,
			rawRR(secretName, dnsmessage.TypeCNAME, []byte("\x04svc2\x07example\x00")),
			httpsRR("svc2.example", svcb(1, ".", echParam(list)))),
		packMsg(t, h, secretName, httpsRR(secretName, svcb(1, ".", param(0, 0xfd, 0xe8), param(65000, 1)))),
		packMsg(t, h, secretName, rawRR(secretName, dnsmessage.TypeHTTPS, []byte{0, 1, 0, 0, 3, 0, 2, 1, 1, 0, 1, 0, 1, 'x'})),
		packMsg(t, nx, secretName),
	}
}
