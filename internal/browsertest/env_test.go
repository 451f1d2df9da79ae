package browsertest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/echkit/ech/router"
	"github.com/stretchr/testify/require"
)

// The loopback addresses the test listens on. Browsers use HTTPS records
// and ECH only for https URLs on the default port, so the router, the DoH
// server and the relays each take port 443 of their own address.
var (
	routerAddr  = netip.MustParseAddr("127.80.0.1")
	dohAddr     = netip.MustParseAddr("127.80.0.2")
	backendAddr = netip.MustParseAddr("127.80.0.3")
	// Each browser has its relay (see browser.relay), so that the browsers
	// can run in parallel and each observer sees one browser only.
)

const (
	publicName = "public.test" // the public_name of the router's keys
	dohName    = "doh.test"    // the DoH server's name in Firefox's network.trr.uri
)

// logRecord is one "connection" line of the router's log.
type logRecord map[string]string

func (l logRecord) String() string {
	keys := make([]string, 0, len(l))
	for k := range l {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%q", k, l[k])
	}
	return b.String()
}

// routerLog keeps the router's connection lines and writes every line as
// text to a file.
type routerLog struct {
	mu    *sync.Mutex
	lines *[]logRecord
	text  slog.Handler
}

func newRouterLog(w io.Writer) routerLog {
	return routerLog{mu: new(sync.Mutex), lines: new([]logRecord), text: slog.NewTextHandler(w, nil)}
}

func (h routerLog) Enabled(ctx context.Context, l slog.Level) bool { return h.text.Enabled(ctx, l) }

func (h routerLog) WithAttrs(as []slog.Attr) slog.Handler {
	h.text = h.text.WithAttrs(as)
	return h
}

func (h routerLog) WithGroup(name string) slog.Handler {
	h.text = h.text.WithGroup(name)
	return h
}

func (h routerLog) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.Message == "connection" {
		m := logRecord{}
		r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
		*h.lines = append(*h.lines, m)
	}
	return h.text.Handle(ctx, r)
}

// records returns the connection lines so far.
func (h routerLog) records() []logRecord {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(*h.lines)
}

// backendRequest is one HTTP request a backend served.
type backendRequest struct {
	Host  string
	Proto string
	TLS   *tls.ConnectionState // nil at the terminate route's plaintext backend
}

// tlsHello is one ClientHello the passthrough backend received: what
// crypto/tls made of it, and what the wire said.
type tlsHello struct {
	ServerName string
	ALPN       []string
	Extensions []uint16 // the extension types, in order
	Wire       *hello   // the same hello read from the wire: ECH type, key shares
	Error      error    // why Wire is nil
}

// passthroughBackend is the ECH-aware TLS server behind the router's
// passthrough routes: Go's crypto/tls completes the handshake for the
// inner hello the router replays. It serves a page for any name with a
// certificate for that name, and records every hello and request.
type passthroughBackend struct {
	ca     *echtest.CA
	p384   func(sni string) bool // names whose handshake only P-384 may key
	mu     sync.Mutex
	hellos []tlsHello
	reqs   []backendRequest
	srv    *http.Server
	addr   string
}

func (b *passthroughBackend) getConfig(chi *tls.ClientHelloInfo) (*tls.Config, error) {
	h := tlsHello{
		ServerName: chi.ServerName,
		ALPN:       slices.Clone(chi.SupportedProtos),
		Extensions: slices.Clone(chi.Extensions),
	}
	if rc, ok := chi.Conn.(*recordingConn); ok {
		h.Wire, h.Error = rc.firstHello()
	} else {
		h.Error = errors.New("not a recording connection")
	}
	b.mu.Lock()
	b.hellos = append(b.hellos, h)
	b.mu.Unlock()
	cert, err := b.ca.GetCertificate(chi)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{*cert},
		NextProtos:   []string{"h2", "http/1.1"},
		MinVersion:   tls.VersionTLS12,
	}
	if b.p384(chi.ServerName) {
		// Browsers send key shares for X25519MLKEM768, X25519 and
		// sometimes P-256, never P-384 first: the backend must ask for
		// it with a HelloRetryRequest.
		cfg.CurvePreferences = []tls.CurveID{tls.CurveP384}
	}
	return cfg, nil
}

func (b *passthroughBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	b.reqs = append(b.reqs, backendRequest{Host: r.Host, Proto: r.Proto, TLS: r.TLS})
	b.mu.Unlock()
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, "<!doctype html><title>%[1]s</title><h1>%[1]s</h1><p>passthrough backend, %[2]s, TLS server name %[3]q</p>\n",
		r.Host, r.Proto, r.TLS.ServerName)
}

// forName returns the hellos and requests whose server name is name.
func (b *passthroughBackend) forName(name string) ([]tlsHello, []backendRequest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var hs []tlsHello
	for _, h := range b.hellos {
		if strings.EqualFold(h.ServerName, name) {
			hs = append(hs, h)
		}
	}
	var rs []backendRequest
	for _, r := range b.reqs {
		if strings.EqualFold(r.TLS.ServerName, name) {
			rs = append(rs, r)
		}
	}
	return hs, rs
}

// plainBackend is the plaintext HTTP server behind the terminate route; it
// speaks HTTP/1.1 and HTTP/2 with prior knowledge, as the router forwards
// whichever the browser negotiated with it.
type plainBackend struct {
	mu   sync.Mutex
	reqs []backendRequest
	srv  *http.Server
	addr string
}

func (b *plainBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	b.reqs = append(b.reqs, backendRequest{Host: r.Host, Proto: r.Proto})
	b.mu.Unlock()
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprintf(w, "<!doctype html><title>%[1]s</title><h1>%[1]s</h1><p>terminate route, plaintext backend, %[2]s</p>\n", r.Host, r.Proto)
}

func (b *plainBackend) forHost(name string) []backendRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	var rs []backendRequest
	for _, r := range b.reqs {
		if strings.EqualFold(r.Host, name) {
			rs = append(rs, r)
		}
	}
	return rs
}

// env is everything the browsers talk to, on loopback.
type env struct {
	t         *testing.T
	artifacts string // kept when the test fails
	ca        *echtest.CA
	caPEM     string // file of the CA's root, for certutil
	key       ech.Key
	list      ech.ConfigList // the router's current configs, published in DNS
	stale     []ech.Key      // per browser, keys the router never had
	hidden    []string       // the names ECH hides, for the observer
	log       routerLog
	pass      *passthroughBackend
	plain     *plainBackend
	doh       *dohServer
	relays    map[string]*relay // by browser
	routerSrv *router.Server
}

// writeCert writes c as name.crt and name.key in dir.
func writeCert(t *testing.T, dir, name string, c tls.Certificate) {
	t.Helper()
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".crt"), chain, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600))
}

// listen443 listens on port 443 of addr.
func listen443(t *testing.T, addr netip.Addr) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 443).String())
	require.NoError(t, err, "another program has port 443 of %s", addr)
	return ln
}

// newEnv starts the router, its backends, the DoH server and a relay on
// port 443 of each of relays' addresses. hrrName reports the names whose
// backend forces a HelloRetryRequest.
func newEnv(t *testing.T, artifacts string, routes []router.RouteConfig, hrrName func(string) bool, relays map[string]netip.Addr) *env {
	t.Helper()
	e := &env{t: t, artifacts: artifacts, ca: echtest.NewCA(t), doh: newDoHServer()}
	dir := t.TempDir()

	e.caPEM = filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(e.caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.ca.Root().Raw}), 0o600))

	// The router's key, sent as retry config to clients with a stale one.
	var err error
	e.key, err = ech.GenerateKey(publicName, &ech.KeyOptions{})
	require.NoError(t, err)
	ks, err := ech.NewKeySet(e.key)
	require.NoError(t, err)
	e.list, err = ks.ConfigList()
	require.NoError(t, err)
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	pemKey, err := ech.MarshalPEM(e.key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "keys", "current.ech"), pemKey, 0o600))

	// The passthrough backend.
	e.pass = &passthroughBackend{ca: e.ca, p384: hrrName}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(backendAddr, 0).String())
	require.NoError(t, err)
	e.pass.addr = ln.Addr().String()
	e.pass.srv = &http.Server{Handler: e.pass, ReadHeaderTimeout: 10 * time.Second, ErrorLog: discardLog()}
	go e.pass.srv.Serve(tls.NewListener(recordingListener{ln}, &tls.Config{GetConfigForClient: e.pass.getConfig}))
	t.Cleanup(func() { e.pass.srv.Close() })

	// The terminate route's plaintext backend.
	e.plain = &plainBackend{}
	ln, err = net.Listen("tcp", netip.AddrPortFrom(backendAddr, 0).String())
	require.NoError(t, err)
	e.plain.addr = ln.Addr().String()
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	e.plain.srv = &http.Server{Handler: e.plain, ReadHeaderTimeout: 10 * time.Second, Protocols: &protos, ErrorLog: discardLog()}
	go e.plain.srv.Serve(ln)
	t.Cleanup(func() { e.plain.srv.Close() })

	// The router, from a configuration file as cmd/ech-router runs it.
	writeCert(t, dir, "public", e.ca.Certificate(publicName))
	var terminateNames []string
	for i := range routes {
		switch routes[i].Mode {
		case "passthrough":
			routes[i].Backend = e.pass.addr
		case "terminate":
			routes[i].Backend = e.plain.addr
			routes[i].Cert, routes[i].Key = "terminate.crt", "terminate.key"
			terminateNames = append(terminateNames, routes[i].ServerNames...)
		}
	}
	if len(terminateNames) > 0 {
		writeCert(t, dir, "terminate", e.ca.Certificate(terminateNames...))
	}
	cfg := router.Config{
		Keys:             router.KeysConfig{Dir: "keys", Reload: "0s"},
		Public:           router.PublicConfig{Name: publicName, Cert: "public.crt", Key: "public.key"},
		HandshakeTimeout: "10s",
		DialTimeout:      "5s",
		ShutdownTimeout:  "2s",
		// The assertions read the inner names from the log.
		LogInnerNames: new(true),
		Listeners: []router.ListenerConfig{{
			Address: netip.AddrPortFrom(routerAddr, 443).String(),
			Routes:  routes,
		}},
	}
	js, err := json.MarshalIndent(cfg, "", "  ")
	require.NoError(t, err)
	cfgPath := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(cfgPath, js, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(artifacts, "router.json"), js, 0o600))
	loaded, err := router.LoadConfig(cfgPath)
	require.NoError(t, err)
	logFile, err := os.Create(filepath.Join(artifacts, "router.log"))
	require.NoError(t, err)
	t.Cleanup(func() { logFile.Close() })
	e.log = newRouterLog(logFile)
	e.routerSrv, err = router.New(loaded, slog.New(e.log))
	require.NoError(t, err)
	require.NoError(t, e.routerSrv.Listen(), "port 443 of %s", routerAddr)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.routerSrv.Run(ctx, nil) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("router: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("router did not stop")
		}
	})

	// The DoH server, for Chromium by its address and for Firefox by its
	// name with network.trr.bootstrapAddr.
	dohLn := listen443(t, dohAddr)
	go e.doh.serve(dohLn, e.ca.Certificate(dohName, dohAddr.String()), discardLog())
	t.Cleanup(e.doh.close)

	// The observers between the browsers and the router.
	e.relays = make(map[string]*relay)
	for name, addr := range relays {
		r := newRelay(listen443(t, addr), netip.AddrPortFrom(routerAddr, 443).String())
		t.Cleanup(r.close)
		e.relays[name] = r
	}
	return e
}

// discardLog silences http.Server's complaints about the connections that
// browsers reset.
func discardLog() *log.Logger { return log.New(io.Discard, "", 0) }
