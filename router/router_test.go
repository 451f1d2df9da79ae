package router

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/testpki"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

const (
	publicName = "cover.example"
	tlsName    = "secret.example"
	plainName  = "mail.example"
)

// logLine is one "connection" line of the router's log.
type logLine map[string]string

// captureHandler sends the router's connection lines to a channel and
// keeps every record in all.
type captureHandler struct {
	c   chan logLine
	all *records
}

// records is every log record of a router, as "LEVEL message k=v ..."
// lines.
type records struct {
	mu    sync.Mutex
	lines []string
}

// matching returns the lines that contain every one of subs.
func (rs *records) matching(subs ...string) []string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	var out []string
next:
	for _, l := range rs.lines {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

// text returns every line.
func (rs *records) text() string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return strings.Join(rs.lines, "\n")
}

func (h captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h captureHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h captureHandler) WithGroup(string) slog.Handler            { return h }

func (h captureHandler) Handle(_ context.Context, r slog.Record) error {
	m := logLine{}
	line := r.Level.String() + " " + r.Message
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		line += " " + a.Key + "=" + a.Value.String()
		return true
	})
	if h.all != nil {
		h.all.mu.Lock()
		h.all.lines = append(h.all.lines, line)
		h.all.mu.Unlock()
	}
	if r.Message != "connection" {
		return nil
	}
	m["level"] = r.Level.String()
	select {
	case h.c <- m:
	default: // a test that does not read the log
	}
	return nil
}

// env is a router on loopback with its PKI and keys.
type env struct {
	t    testing.TB
	ca   *testpki.CA
	ks   *ech.KeySet
	list ech.ConfigList
	r    *Router
	addr string
	logs chan logLine
	all  *records
}

func newKey(t testing.TB, avoid ...uint8) ech.Key {
	t.Helper()
	k, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: avoid})
	require.NoError(t, err)
	return k
}

func newEnv(t testing.TB) *env {
	t.Helper()
	ca, err := testpki.NewCA()
	require.NoError(t, err)
	ks, err := ech.NewKeySet(newKey(t))
	require.NoError(t, err)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	pub, err := ca.Leaf(publicName)
	require.NoError(t, err)
	e := &env{t: t, ca: ca, ks: ks, list: list, logs: make(chan logLine, 1000), all: new(records)}
	e.r = &Router{Keys: ks, PublicName: publicName, PublicCertificate: &pub, Logger: slog.New(captureHandler{e.logs, e.all})}
	t.Cleanup(func() { e.r.Close() })
	return e
}

// serve starts a listener with routes and returns its address.
func (e *env) serve(routes ...Route) string {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(e.t, err)
	go e.r.Serve(ln, routes)
	e.addr = ln.Addr().String()
	return e.addr
}

func (e *env) cert(names ...string) *tls.Certificate {
	c, err := e.ca.Leaf(names...)
	require.NoError(e.t, err)
	return &c
}

// log returns the next connection line.
func (e *env) log() logLine {
	e.t.Helper()
	select {
	case l := <-e.logs:
		return l
	case <-time.After(10 * time.Second):
		e.t.Fatal("no connection logged")
		return nil
	}
}

func (e *env) clientConfig(name string, list ech.ConfigList, alpn ...string) *tls.Config {
	return &tls.Config{ServerName: name, RootCAs: e.ca.Pool, EncryptedClientHelloConfigList: list, NextProtos: alpn}
}

// exchange connects with cfg, reads the backend's greeting line, sends
// "ping", half-closes, and reads the echo up to the backend's close.
func exchange(addr string, cfg *tls.Config) (greeting, echo string, state tls.ConnectionState, err error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return "", "", state, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	greeting, err = br.ReadString('\n')
	if err != nil {
		return "", "", state, fmt.Errorf("reading greeting: %w", err)
	}
	if _, err := io.WriteString(conn, "ping\n"); err != nil {
		return "", "", state, err
	}
	if err := conn.CloseWrite(); err != nil {
		return "", "", state, err
	}
	rest, err := io.ReadAll(br)
	return strings.TrimSpace(greeting), string(rest), conn.ConnectionState(), err
}

// echoBackend greets, then echoes until EOF, then closes.
func echoBackend(c io.ReadWriter, greeting string) {
	fmt.Fprintln(c, greeting)
	io.Copy(c, c)
}

// tlsBackend starts an ECH-aware crypto/tls backend; it greets with
// "tls <server name> <alpn>".
func (e *env) tlsBackend(names ...string) string {
	e.t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{*e.cert(names...)},
		NextProtos:   []string{"h2", "http/1.1"},
	})
	require.NoError(e.t, err)
	e.t.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, func(c net.Conn) {
		tc := c.(*tls.Conn)
		if tc.Handshake() != nil {
			return
		}
		cs := tc.ConnectionState()
		echoBackend(tc, fmt.Sprintf("tls %s %s", cs.ServerName, cs.NegotiatedProtocol))
	})
	return ln.Addr().String()
}

// proxyTLSBackend starts a passthrough backend behind PROXY: it sends the
// header it reads to proxied, then is a TLS server for tlsName.
func (e *env) proxyTLSBackend(proxied chan<- proxyInfo) string {
	e.t.Helper()
	t := e.t
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	cert := e.cert(tlsName)
	go acceptLoop(ln, func(c net.Conn) {
		br := bufio.NewReader(c)
		var pi proxyInfo
		pi.src, pi.dst, pi.tlvs, pi.err = readProxyHeader(br)
		proxied <- pi
		tc := tls.Server(&bufConn{Conn: c, r: br}, &tls.Config{Certificates: []tls.Certificate{*cert}})
		if tc.Handshake() == nil {
			echoBackend(tc, "tls")
		}
	})
	return ln.Addr().String()
}

// proxyInfo is what a plain backend learned from a PROXY header.
type proxyInfo struct {
	src, dst netip.AddrPort
	tlvs     map[uint8]string
	err      error
}

// plainBackend starts a plaintext backend that greets with "plain label"; if
// proxy is not nil it first reads a PROXY v2 header and sends it there.
func (e *env) plainBackend(label string, proxy chan<- proxyInfo) string {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(e.t, err)
	e.t.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, func(c net.Conn) {
		br := bufio.NewReader(c)
		if proxy != nil {
			var pi proxyInfo
			pi.src, pi.dst, pi.tlvs, pi.err = readProxyHeader(br)
			proxy <- pi
			if pi.err != nil {
				return
			}
		}
		echoBackend(struct {
			io.Reader
			io.Writer
		}{br, c}, "plain "+label)
	})
	return ln.Addr().String()
}

func acceptLoop(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			serve(c)
		}()
	}
}

// readProxyHeader parses a PROXY v2 header (HAProxy's proxy-protocol.txt,
// Section 2.2).
func readProxyHeader(r io.Reader) (src, dst netip.AddrPort, tlvs map[uint8]string, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return src, dst, nil, err
	}
	if [12]byte(hdr[:12]) != proxyV2Signature || hdr[12] != proxyV2VersionProxy {
		return src, dst, nil, errors.New("not a PROXY v2 PROXY header")
	}
	body := make([]byte, int(hdr[14])<<8|int(hdr[15]))
	if _, err := io.ReadFull(r, body); err != nil {
		return src, dst, nil, err
	}
	s := cryptobyte.String(body)
	n := map[uint8]int{proxyFamTCP4: 4, proxyFamTCP6: 16}[hdr[13]]
	if n == 0 {
		return src, dst, nil, fmt.Errorf("family 0x%02x", hdr[13])
	}
	var sa, da []byte
	var sp, dp uint16
	if !s.ReadBytes(&sa, n) || !s.ReadBytes(&da, n) || !s.ReadUint16(&sp) || !s.ReadUint16(&dp) {
		return src, dst, nil, errors.New("short addresses")
	}
	a1, _ := netip.AddrFromSlice(sa)
	a2, _ := netip.AddrFromSlice(da)
	tlvs = make(map[uint8]string)
	for !s.Empty() {
		var typ uint8
		var v cryptobyte.String
		if !s.ReadUint8(&typ) || !s.ReadUint16LengthPrefixed(&v) {
			return src, dst, nil, errors.New("bad TLV")
		}
		tlvs[typ] = string(v)
	}
	return netip.AddrPortFrom(a1, sp), netip.AddrPortFrom(a2, dp), tlvs, nil
}

func TestModes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stale, err := ech.NewKeySet(newKey(t, e.ks.ConfigIDs()...))
	require.NoError(t, err)
	staleList, err := stale.ConfigList()
	require.NoError(t, err)
	addr := e.serve(
		Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)},
		Route{Name: "plain", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: e.plainBackend("mail", nil),
			Certificate: e.cert(plainName), ALPN: []string{"imap"}},
	)
	for _, tc := range []struct {
		name     string
		server   string
		list     ech.ConfigList
		alpn     string
		greeting string
		route    string
		status   string
		outer    string
	}{
		{"passthrough/ECH", tlsName, e.list, "h2", "tls secret.example h2", "tls", "accepted", publicName},
		{"passthrough/no ECH", tlsName, nil, "h2", "tls secret.example h2", "tls", "not offered", tlsName},
		{"terminate/ECH", plainName, e.list, "imap", "plain mail", "plain", "accepted", publicName},
		{"terminate/no ECH", plainName, nil, "imap", "plain mail", "plain", "not offered", plainName},
		{"passthrough/stale", tlsName, staleList, "h2", "tls secret.example h2", "tls", "accepted", publicName},
		{"terminate/stale", plainName, staleList, "imap", "plain mail", "plain", "accepted", publicName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.clientConfig(tc.server, tc.list, tc.alpn)
			greeting, echo, state, err := exchange(addr, cfg)
			var rej *tls.ECHRejectionError
			if errors.As(err, &rej) {
				l := e.log()
				assert.Equal(t, "rejected", l["ech"])
				assert.Equal(t, "public", l["route"])
				require.NotEmpty(t, rej.RetryConfigList)
				cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
				greeting, echo, state, err = exchange(addr, cfg)
			}
			require.NoError(t, err)
			assert.Equal(t, tc.greeting, greeting)
			assert.Equal(t, "ping\n", echo, "half-close forwarded both ways")
			assert.Equal(t, tc.list != nil, state.ECHAccepted)
			assert.Equal(t, tc.alpn, state.NegotiatedProtocol)
			l := e.log()
			assert.Equal(t, tc.status, l["ech"])
			assert.Equal(t, tc.outer, l["outer_sni"])
			assert.Equal(t, tc.route, l["route"])
			assert.Equal(t, tc.alpn, l["alpn"])
			assert.Empty(t, l["error"])
			if tc.list != nil {
				assert.Equal(t, tc.server, l["inner_sni"])
				assert.NotEmpty(t, l["config_id"])
			}
			for _, k := range []string{"client", "mode", "bytes_in", "bytes_out", "duration"} {
				assert.NotEmpty(t, l[k], k)
			}
			assert.NotEqual(t, "0", l["bytes_in"])
			assert.NotEqual(t, "0", l["bytes_out"])
		})
	}
}

func TestProxyProtocol(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	proxied := make(chan proxyInfo, 10)
	proxyBackend := e.plainBackend("mail", proxied)

	addr := e.serve(
		Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.proxyTLSBackend(proxied), ProxyProtocol: true},
		Route{Name: "plain", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: proxyBackend,
			Certificate: e.cert(plainName), ALPN: []string{"smtp"}, ProxyProtocol: true},
	)
	for _, tc := range []struct {
		name, server, alpn, negotiated string
	}{
		{"passthrough", tlsName, "h2", ""},
		{"terminate", plainName, "smtp", "smtp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			require.NoError(t, err)
			local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
			greeting, echo, state, err := exchange2(conn, e.clientConfig(tc.server, e.list, tc.alpn))
			require.NoError(t, err)
			assert.True(t, state.ECHAccepted)
			assert.NotEmpty(t, greeting)
			assert.Equal(t, "ping\n", echo)
			pi := <-proxied
			require.NoError(t, pi.err)
			assert.Equal(t, local, pi.src, "the backend sees the client's address")
			assert.Equal(t, addr, pi.dst.String(), "and the address the client connected to")
			assert.Equal(t, tc.server, pi.tlvs[pp2TypeAuthority])
			assert.Equal(t, tc.negotiated, pi.tlvs[pp2TypeALPN])
			e.log()
		})
	}
}

func TestProxyHeaderIPv6AndLocal(t *testing.T) {
	t.Parallel()
	src := &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 40000}
	dst := &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 443}
	hdr, err := appendProxyHeader(nil, src, dst, "", "", 0)
	require.NoError(t, err)
	s, d, tlvs, err := readProxyHeader(strings.NewReader(string(hdr)))
	require.NoError(t, err)
	assert.Equal(t, "[2001:db8::1]:40000", s.String())
	assert.Equal(t, "::ffff:192.0.2.1", d.Addr().String(), "mixed families use IPv6")
	assert.Empty(t, tlvs)

	// Not TCP: a LOCAL header with no addresses.
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	hdr, err = appendProxyHeader(nil, p1.LocalAddr(), p1.RemoteAddr(), "x.example", "", 0)
	require.NoError(t, err)
	assert.Equal(t, proxyV2VersionLocal, hdr[12])
	assert.Equal(t, proxyFamUnspec, hdr[13])
}

// bufConn is a net.Conn that reads through a bufio.Reader.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func exchange2(conn net.Conn, cfg *tls.Config) (greeting, echo string, state tls.ConnectionState, err error) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(conn, cfg)
	br := bufio.NewReader(tc)
	if greeting, err = br.ReadString('\n'); err != nil {
		return "", "", state, err
	}
	io.WriteString(tc, "ping\n")
	tc.CloseWrite()
	rest, err := io.ReadAll(br)
	return strings.TrimSpace(greeting), string(rest), tc.ConnectionState(), err
}

func TestALPNRouting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cert := e.cert("chat.example")
	addr := e.serve(
		Route{Name: "imap", ServerNames: []string{"chat.example"}, ALPN: []string{"imap"}, Mode: ModeTerminate, Backend: e.plainBackend("imap", nil), Certificate: cert},
		Route{Name: "smtp", ServerNames: []string{"chat.example"}, ALPN: []string{"smtp"}, Mode: ModeTerminate, Backend: e.plainBackend("smtp", nil), Certificate: cert},
		Route{Name: "web", ServerNames: []string{"*.example"}, ALPN: []string{"h2", "http/1.1"}, Mode: ModeTerminate, Backend: e.plainBackend("web", nil), Certificate: cert},
		Route{Name: "default", ServerNames: []string{"*"}, Mode: ModeTerminate, Backend: e.plainBackend("default", nil), Certificate: cert},
	)
	for _, tc := range []struct {
		alpn       []string
		greeting   string
		negotiated string
	}{
		{[]string{"imap"}, "plain imap", "imap"},
		{[]string{"smtp"}, "plain smtp", "smtp"},
		{[]string{"http/1.1", "h2"}, "plain web", "h2"},
		{nil, "plain default", ""},
		{[]string{"xmpp-client"}, "plain default", ""},
	} {
		t.Run(strings.Join(tc.alpn, ","), func(t *testing.T) {
			greeting, _, state, err := exchange(addr, e.clientConfig("chat.example", e.list, tc.alpn...))
			require.NoError(t, err)
			assert.True(t, state.ECHAccepted)
			assert.Equal(t, tc.greeting, greeting)
			assert.Equal(t, tc.negotiated, state.NegotiatedProtocol)
			l := e.log()
			assert.Equal(t, strings.TrimPrefix(tc.greeting, "plain "), l["route"])
			assert.Equal(t, tc.negotiated, l["alpn_negotiated"])
		})
	}
}

func TestPublicName(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := e.serve()
	hc := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: e.ca.Pool},
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			},
		},
	}
	get := func(path string) (*http.Response, string) {
		resp, err := hc.Get("https://" + publicName + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, string(b)
	}

	resp, body := get(WellKnownPath)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	var doc OriginSVCB
	require.NoError(t, json.Unmarshal([]byte(body), &doc))
	assert.EqualValues(t, 3600, doc.RegenInterval)
	require.Len(t, doc.Endpoints, 1)
	assert.Equal(t, 1, doc.Endpoints[0].Priority)
	assert.Equal(t, e.list.String(), doc.Endpoints[0].Params.ECH)
	assert.JSONEq(t, fmt.Sprintf(`{"regeninterval":3600,"endpoints":[{"priority":1,"params":{"ech":%q}}]}`, e.list), body)
	l := e.log()
	assert.Equal(t, "public", l["route"])
	assert.Equal(t, "not offered", l["ech"])

	resp, body = get(ConfigListPath)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, e.list.String()+"\n", body)
	e.log()

	resp, _ = get("/nothing")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	e.log()

	// The list follows the key set.
	k2 := newKey(t, e.ks.ConfigIDs()...)
	require.NoError(t, e.ks.Replace(k2))
	_, body = get(ConfigListPath)
	list2, err := e.ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, list2.String()+"\n", body)

	// GREASE-like: a hello with ECH the router cannot decrypt for an inner
	// name gets the public name's certificate and retry configs.
	stale, err := ech.NewKeySet(newKey(t, 1, 2))
	require.NoError(t, err)
	staleList, _ := stale.ConfigList()
	_, _, _, err = exchange(addr, e.clientConfig(tlsName, staleList))
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	assert.Equal(t, []byte(list2), rej.RetryConfigList)
}

// TestPassthroughHelloRetryRequest runs a backend that only takes P-256
// key shares, so the client's first hello gets a HelloRetryRequest and its
// second hello is decrypted by the router with the same HPKE context.
func TestPassthroughHelloRetryRequest(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates:     []tls.Certificate{*e.cert(tlsName)},
		CurvePreferences: []tls.CurveID{tls.CurveP256},
	})
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, func(c net.Conn) {
		if tc := c.(*tls.Conn); tc.Handshake() == nil {
			echoBackend(tc, "tls "+tc.ConnectionState().ServerName)
		}
	})
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: ln.Addr().String()})
	greeting, echo, state, err := exchange(addr, e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, tls.CurveP256, state.CurveID, "the handshake went through a HelloRetryRequest")
	assert.Equal(t, "tls "+tlsName, greeting)
	assert.Equal(t, "ping\n", echo)
	l := e.log()
	assert.Equal(t, "accepted", l["ech"])
	assert.Empty(t, l["error"])
}

func TestCatchAllDoesNotTakeThePublicName(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := e.serve(Route{Name: "all", ServerNames: []string{"*"}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	conn, err := tls.Dial("tcp", addr, e.clientConfig(publicName, nil, "http/1.1"))
	require.NoError(t, err)
	assert.Equal(t, publicName, conn.ConnectionState().PeerCertificates[0].Subject.CommonName)
	conn.Close()
	l := e.log()
	assert.Equal(t, "public", l["route"])
	assert.Equal(t, "http/1.1", l["alpn_negotiated"])
}

func TestNoRoute(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	_, _, _, err := exchange(addr, e.clientConfig("other.example", e.list))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "unrecognized name")
	l := e.log()
	assert.Equal(t, "accepted", l["ech"])
	assert.Equal(t, "other.example", l["inner_sni"])
	assert.Equal(t, errNoRoute.Error(), l["error"])

	// A hello that is not TLS is refused by NewConn and logged.
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	io.WriteString(conn, "GET / HTTP/1.0\r\n\r\n")
	conn.Close()
	l = e.log()
	assert.Contains(t, l["error"], ech.ErrNotTLS.Error())
	assert.Equal(t, "unknown", l["ech"], "NewConn refused the hello before anyone knew")

	// A hello that parses and offers ECH, then breaks a rule: logged as
	// offered, with its name in the clear.
	conn, err = net.Dial("tcp", addr)
	require.NoError(t, err)
	conn.Write(editHello(t, captureHello(t, e.clientConfig(tlsName, e.list)), func(typ uint16, body []byte) [][2][]byte {
		if typ == testExtensionECH {
			return [][2][]byte{ext(typ, []byte{1})} // an inner ECH extension, from a client
		}
		return [][2][]byte{ext(typ, body)}
	}))
	conn.Close()
	l = e.log()
	assert.Contains(t, l["error"], ech.ErrIllegalParameter.Error())
	assert.Equal(t, "offered", l["ech"])
	assert.Equal(t, publicName, l["outer_sni"])
}

func TestBackendDown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dead := closedAddr(t)
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: dead})
	_, _, _, err := exchange(addr, e.clientConfig(tlsName, e.list))
	require.Error(t, err)
	assert.Contains(t, e.log()["error"], "router: backend")
}

func TestMatchName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"a.example", "a.example", true},
		{"a.example", "A.Example", true},
		{"a.example", "b.example", false},
		{"*.example", "a.example", true},
		{"*.example", "a.b.example", false},
		{"*.example", "example", false},
		{"*.example", ".example", false},
		{"*", "anything.example", true},
		{"*", "", false},
	} {
		assert.Equal(t, tc.want, matchName(tc.pattern, tc.name), "%s ~ %s", tc.pattern, tc.name)
	}
}

func TestShutdownWaitsThenCloses(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})

	// A connection in progress: greeting read, not closed.
	conn, err := tls.Dial("tcp", addr, e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	defer conn.Close()
	_, err = bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = e.r.Shutdown(ctx)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "the connection was still open")
	assert.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond, "Shutdown waited")
	e.log()

	// New connections are refused.
	_, err = net.DialTimeout("tcp", addr, time.Second)
	assert.Error(t, err)

	// A Shutdown with nothing in progress returns at once.
	e2 := newEnv(t)
	e2.serve()
	require.NoError(t, e2.r.Shutdown(t.Context()))
}

func TestServeRefusesBadRouter(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	assert.Error(t, (&Router{}).Serve(ln, nil))
	e := newEnv(t)
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	assert.ErrorContains(t, e.r.Serve(ln, []Route{{Name: "x", ServerNames: []string{"x"}, Mode: ModeTerminate}}), "certificate")
}

// TestKeyReloadUnderLoad replaces the keys over and over while clients
// connect with the config they all know: no handshake may fail.
func TestKeyReloadUnderLoad(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir := t.TempDir()
	a, b := e.ks.Keys()[0], newKey(t, e.ks.ConfigIDs()...)
	writeKey(t, dir, "a.ech", a)
	kd := &KeyDir{Dir: dir, Set: e.ks, Logger: slog.New(captureHandler{c: make(chan logLine)})}
	changed, err := kd.Reload()
	require.NoError(t, err)
	assert.True(t, changed)
	changed, err = kd.Reload()
	require.NoError(t, err)
	assert.False(t, changed, "same files, same keys")

	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	go func() {
		for range e.logs {
		}
	}()

	// Run until enough handshakes and reloads have overlapped, or a time
	// limit for slow machines (the race detector makes handshakes slow).
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var handshakes, reloads atomic.Int64
	var mu sync.Mutex
	var failures []error
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			cfg := e.clientConfig(tlsName, e.list)
			cfg.CurvePreferences = []tls.CurveID{tls.X25519} // cheaper than ML-KEM
			for ctx.Err() == nil {
				_, echo, state, err := exchange(addr, cfg)
				if err == nil && (!state.ECHAccepted || echo != "ping\n") {
					err = fmt.Errorf("accepted=%v echo=%q", state.ECHAccepted, echo)
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
				}
				if handshakes.Add(1) >= 40 && reloads.Load() >= 10 {
					cancel()
				}
			}
		})
	}
	// Add and remove key b over and over; key a stays.
	trigger := make(chan struct{})
	watching := make(chan struct{})
	go func() { kd.Watch(ctx, 0, trigger); close(watching) }()
	for n := 0; ctx.Err() == nil; n++ {
		if n%2 == 0 {
			writeKey(t, dir, "b.ech", b)
		} else {
			require.NoError(t, removeFile(dir, "b.ech"))
		}
		select {
		case trigger <- struct{}{}:
			reloads.Add(1)
		case <-ctx.Done():
		}
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	<-watching // its last reload must not undo the ones below
	assert.Empty(t, failures)
	assert.GreaterOrEqual(t, handshakes.Load(), int64(40))
	assert.GreaterOrEqual(t, reloads.Load(), int64(10))
	t.Logf("%d handshakes, %d reloads", handshakes.Load(), reloads.Load())

	// Key b works once loaded.
	writeKey(t, dir, "b.ech", b)
	_, err = kd.Reload()
	require.NoError(t, err)
	listB, err := ech.NewKeySet(b)
	require.NoError(t, err)
	lb, _ := listB.ConfigList()
	_, _, state, err := exchange(addr, e.clientConfig(tlsName, lb))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)

	// A directory without keys leaves the keys in use.
	require.NoError(t, removeFile(dir, "a.ech"))
	require.NoError(t, removeFile(dir, "b.ech"))
	_, err = kd.Reload()
	assert.ErrorIs(t, err, ech.ErrNoKeys)
	assert.Equal(t, 2, e.ks.Len())
}

// flakyListener fails its first n accepts with err, then accepts from the
// listener it wraps.
type flakyListener struct {
	net.Listener
	n   atomic.Int32
	err error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.n.Add(-1) >= 0 {
		return nil, l.err
	}
	return l.Listener.Accept()
}

// TestAcceptRetriesTemporaryErrors checks that Serve backs off on
// temporary accept errors (running out of file descriptors), logs once per
// burst, and then serves; and that it stops on other errors.
func TestAcceptRetriesTemporaryErrors(t *testing.T) {
	t.Parallel()
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ECONNABORTED} {
		t.Run(errno.Error(), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			fl := &flakyListener{Listener: ln, err: &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", errno)}}
			fl.n.Store(6)
			done := make(chan error, 1)
			go func() {
				done <- e.r.Serve(fl, []Route{{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)}})
			}()
			greeting, _, state, err := exchange(ln.Addr().String(), e.clientConfig(tlsName, e.list))
			require.NoError(t, err)
			assert.True(t, state.ECHAccepted)
			assert.Equal(t, "tls "+tlsName, greeting)
			assert.Len(t, e.all.matching("WARN accept failed", errno.Error()), 1, "one line per burst:\n%s", e.all.text())
			assert.Len(t, e.all.matching("INFO accepting again", "failed_accepts=6"), 1, e.all.text())
			e.r.Close()
			assert.ErrorIs(t, <-done, ErrClosed)
		})
	}
	t.Run("permanent", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		fl := &flakyListener{Listener: ln, err: &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EINVAL)}}
		fl.n.Store(1)
		assert.ErrorIs(t, e.r.Serve(fl, nil), syscall.EINVAL)
	})
}

// TestAcceptEMFILEProcess runs a router in a child process of the test
// binary whose RLIMIT_NOFILE is low, fills its descriptor table with idle
// connections, and checks that the router is still serving after they
// are gone.
func TestAcceptEMFILEProcess(t *testing.T) {
	if os.Getenv("ROUTER_EMFILE_CHILD") == "1" {
		emfileChild(t)
		return
	}
	t.Parallel()
	e := newEnv(t)
	dir := t.TempDir()
	// The child uses the parent's key and certificate, passed as files.
	k := newKey(t)
	require.NoError(t, e.ks.Replace(k))
	list, err := e.ks.ConfigList()
	require.NoError(t, err)
	writeKey(t, dir, "k.ech", k)
	writeCert(t, dir, "pub", e.cert(publicName))

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestAcceptEMFILEProcess$")
	cmd.Env = append(os.Environ(), "ROUTER_EMFILE_CHILD=1", "ROUTER_EMFILE_DIR="+dir)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	require.NoError(t, cmd.Start())
	defer func() { stdin.Close(); cmd.Wait() }()
	br := bufio.NewReader(stdout)
	var addr string
	for addr == "" {
		line, err := br.ReadString('\n')
		require.NoError(t, err, "child: %s", &stderr)
		if a, ok := strings.CutPrefix(strings.TrimSpace(line), "ADDR "); ok {
			addr = a
		}
	}
	go io.Copy(io.Discard, br)

	// 3x the child's limit of idle connections: the router runs out of
	// descriptors while they wait for a ClientHello.
	var conns []net.Conn
	for range 3 * emfileLimit {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		require.NoError(t, err)
		conns = append(conns, c)
	}
	require.Eventually(t, func() bool { return strings.Contains(stderr.String(), "accept failed") },
		20*time.Second, 10*time.Millisecond, "child: %s", &stderr)
	for _, c := range conns {
		c.Close()
	}
	cfg := &tls.Config{ServerName: publicName, RootCAs: e.ca.Pool, EncryptedClientHelloConfigList: list}
	var conn *tls.Conn
	require.Eventually(t, func() bool {
		conn, err = tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
		return err == nil
	}, 20*time.Second, 50*time.Millisecond, "the router serves again; child: %s", &stderr)
	conn.Close()
	// One line per burst, each burst ended by a line once accepting works.
	// The hellos are read concurrently, so a slot freed by one client can
	// end a burst that the next accept starts again; the lines reach us
	// through a pipe.
	assert.Eventually(t, func() bool {
		return strings.Count(stderr.String(), "accept failed") == strings.Count(stderr.String(), "accepting again")
	}, 10*time.Second, 20*time.Millisecond, "child: %s", &stderr)
	stdin.Close()
	require.NoError(t, cmd.Wait(), "child: %s", &stderr)
}

// emfileLimit is the RLIMIT_NOFILE of TestAcceptEMFILEProcess's child.
const emfileLimit = 64

// emfileChild is TestAcceptEMFILEProcess's child: it lowers its
// RLIMIT_NOFILE, prints the router's address and serves until stdin ends.
func emfileChild(t *testing.T) {
	dir := os.Getenv("ROUTER_EMFILE_DIR")
	keys, err := ech.LoadKeyDir(dir)
	require.NoError(t, err)
	ks, err := ech.NewKeySet(keys...)
	require.NoError(t, err)
	pub, err := tls.LoadX509KeyPair(filepath.Join(dir, "pub.crt"), filepath.Join(dir, "pub.key"))
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &Router{Keys: ks, PublicName: publicName, PublicCertificate: &pub, HandshakeTimeout: 2 * time.Second,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: emfileLimit, Max: emfileLimit}))
	done := make(chan error, 1)
	go func() { done <- r.Serve(ln, nil) }()
	fmt.Printf("ADDR %s\n", ln.Addr())
	go func() { io.Copy(io.Discard, os.Stdin); r.Close() }()
	require.ErrorIs(t, <-done, ErrClosed)
}

// lockedBuffer is a strings.Builder safe for concurrent use.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestHideInnerNames checks that with HideInnerNames the names clients
// sent encrypted appear nowhere in the log, and that log_inner_names:
// false sets it.
func TestHideInnerNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.r.HideInnerNames = true
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	_, _, state, err := exchange(addr, e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	l := e.log()
	assert.Equal(t, "tls", l["route"])
	_, ok := l["inner_sni"]
	assert.False(t, ok)
	_, _, _, err = exchange(addr, e.clientConfig("other.example", e.list))
	require.Error(t, err)
	e.log()
	assert.NotContains(t, e.all.text(), tlsName)
	assert.NotContains(t, e.all.text(), "other.example")

	cfg, err := ParseConfig("router.json", []byte(strings.Replace(goodConfig, `"handshake_timeout"`, `"log_inner_names": false, "handshake_timeout"`, 1)))
	require.NoError(t, err)
	require.NotNil(t, cfg.LogInnerNames)
	assert.False(t, *cfg.LogInnerNames)
}
