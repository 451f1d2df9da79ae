// Command demo shows split-mode ECH end to end, in one process on loopback
// with nothing to prepare: it generates an ECH key, starts the router of
// package router with two routes (one passed through to an ECH-aware
// crypto/tls backend, one terminated by the router and forwarded as
// plaintext, with a PROXY v2 header, to a small TCP service) and, on a UDP
// socket, one QUIC route to an HTTP/3 server of quic-go, runs clients
// against it and prints what each one showed on the wire and reached.
// BoringSSL's bssl-tool and NSS's tstclnt are run too when they are on PATH.
// It exits 0 when every row is as expected, 1 otherwise.
//
//	go run ./example/demo
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"flag"
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
	"text/tabwriter"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echclient"
	"github.com/echkit/ech/internal/testpki"
	"github.com/echkit/ech/router"
)

// The names of the demo. Only publicName is ever visible on the wire when
// ECH is used.
const (
	publicName = "cover.example"  // the router's own name, the ECHConfig public_name
	tlsName    = "secret.example" // passthrough to an ECH-aware crypto/tls backend
	plainName  = "mail.example"   // terminated by the router, plaintext to a TCP service
)

// Backend names, as the backends greet their clients.
const (
	tlsBackend   = "tls-backend"
	plainBackend = "plain-service"
	h3Backend    = "h3-backend"
	publicSite   = "router (public name)"
)

var verbose = flag.Bool("v", false, "print the router's log and the output of bssl-tool and tstclnt on standard error")

func main() {
	flag.Parse()
	os.Exit(run(os.Stdout))
}

// demo is the running setup.
type demo struct {
	tmp     string
	ca      *testpki.CA
	list    ech.ConfigList // the published ECHConfigList
	stale   ech.ConfigList // a list for a key the router no longer has
	addr    string         // the router
	udpAddr string         // the router's QUIC side
	records chan map[string]string
}

// run runs the demo, printing to w, and returns the exit code.
func run(w io.Writer) int {
	d, cleanup, err := setup(w)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		return 1
	}
	defer cleanup()

	rows := []*row{
		d.goClient("Go crypto/tls, ECH", tlsName, d.list, want{publicName, tlsName, "accepted", tlsBackend}),
		d.goClient("Go crypto/tls, ECH", plainName, d.list, want{publicName, plainName, "accepted", plainBackend}),
		d.goClient("Go, stale ECH config", tlsName, d.stale, want{publicName, tlsName, "rejected, retried: accepted", tlsBackend}),
		d.goWellKnown(want{publicName, plainName, "accepted", plainBackend}),
		d.goClient("Go, no ECH", tlsName, nil, want{tlsName, "-", "not offered", tlsBackend}),
		d.h3Client("quic-go HTTP/3, ECH", want{publicName, tlsName, "accepted", h3Backend}),
	}
	var skipped []string
	if path, err := exec.LookPath("bssl-tool"); err == nil {
		rows = append(rows, d.bssl(path, want{publicName, tlsName, "accepted", tlsBackend}))
	} else {
		skipped = append(skipped, "bssl-tool (BoringSSL; Debian package android-boringssl)")
	}
	if path, err := exec.LookPath("tstclnt"); err == nil {
		rows = append(rows, d.tstclnt(path, want{publicName, plainName, "accepted", plainBackend}))
	} else {
		skipped = append(skipped, "tstclnt (NSS; Debian package libnss3-tools)")
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tNAME ON THE WIRE\tINNER NAME\tECH\tBACKEND REACHED\t")
	bad := 0
	for _, r := range rows {
		mark := ""
		if !r.ok() {
			bad++
			mark = "  <- WRONG, want " + r.want.String()
			if r.err != nil {
				mark += ": " + r.err.Error()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.client, r.got.wire, r.got.inner, r.got.ech, r.got.backend, mark)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, s := range skipped {
		fmt.Fprintf(w, "not run, not on PATH: %s\n", s)
	}
	if bad > 0 {
		fmt.Fprintf(w, "FAIL: %d of %d rows are wrong\n", bad, len(rows))
		return 1
	}
	fmt.Fprintf(w, "ok: all %d rows as expected\n", len(rows))
	return 0
}

// want is what a row shows.
type want struct {
	wire, inner, ech, backend string
}

func (w want) String() string {
	return fmt.Sprintf("%s | %s | %s | %s", w.wire, w.inner, w.ech, w.backend)
}

type row struct {
	client string
	got    want
	want   want
	err    error
}

func (r *row) ok() bool { return r.err == nil && r.got == r.want }

func setup(w io.Writer) (*demo, func(), error) {
	var cleanups []func()
	cleanup := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	fail := func(err error) (*demo, func(), error) { cleanup(); return nil, nil, err }

	tmp, err := os.MkdirTemp("", "ech-demo-")
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(tmp) })
	ca, err := testpki.NewCA()
	if err != nil {
		return fail(err)
	}
	d := &demo{tmp: tmp, ca: ca, records: make(chan map[string]string, 100)}

	// The ECH key, and an older one the router no longer has.
	key, err := ech.GenerateKey(publicName, nil)
	if err != nil {
		return fail(err)
	}
	key.SendAsRetry = true
	ks, err := ech.NewKeySet(key)
	if err != nil {
		return fail(err)
	}
	if d.list, err = ks.ConfigList(); err != nil {
		return fail(err)
	}
	old, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
	if err != nil {
		return fail(err)
	}
	oldSet, err := ech.NewKeySet(old)
	if err != nil {
		return fail(err)
	}
	if d.stale, err = oldSet.ConfigList(); err != nil {
		return fail(err)
	}

	// The backends.
	tlsLn, err := serveTLSBackend(ca)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { tlsLn.Close() })
	plainLn, err := servePlain()
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { plainLn.Close() })
	h3Srv, h3Addr, err := serveH3Backend(ca)
	if err != nil {
		return fail(err)
	}
	cleanups = append(cleanups, func() { h3Srv.Close() })

	// The router.
	pubCert, err := ca.Leaf(publicName)
	if err != nil {
		return fail(err)
	}
	mailCert, err := ca.Leaf(plainName)
	if err != nil {
		return fail(err)
	}
	r := &router.Router{
		Keys:              ks,
		PublicName:        publicName,
		PublicCertificate: &pubCert,
		Logger:            slog.New(recordHandler{d.records}),
	}
	routes := []router.Route{
		{Name: "secret", ServerNames: []string{tlsName}, Mode: router.ModePassthrough, Backend: tlsLn.Addr().String()},
		{Name: "mail", ServerNames: []string{plainName}, Mode: router.ModeTerminate, Backend: plainLn.Addr().String(),
			Certificate: &mailCert, ProxyProtocol: true},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	d.addr = ln.Addr().String()
	go r.Serve(ln, routes)
	cleanups = append(cleanups, func() { r.Close() })
	// Its QUIC side: the same keys, on a UDP socket.
	qp, err := r.QUICProxy(router.QUICListener{Listener: router.Listener{Routes: []router.Route{
		{Name: "secret-h3", ServerNames: []string{tlsName}, ALPN: []string{http3.NextProtoH3}, Mode: router.ModePassthrough, Backend: h3Addr.String()},
	}}})
	if err != nil {
		return fail(err)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	d.udpAddr = pc.LocalAddr().String()
	go qp.Serve(pc)
	cleanups = append(cleanups, func() { qp.Close() })

	c, _ := ech.ParseConfig(key.Config)
	fmt.Fprintf(w, "ECH split-mode demo: everything runs in this process, on 127.0.0.1.\n\n")
	fmt.Fprintf(w, "  ECH key      %s\n", c)
	fmt.Fprintf(w, "  DNS record   %s\n", d.list.HTTPSRecord(tlsName, 5*time.Minute))
	fmt.Fprintf(w, "  router       %s, serves %s itself (retry configs, %s)\n", d.addr, publicName, router.WellKnownPath)
	fmt.Fprintf(w, "  route        %-15s passthrough -> %s, an ECH-aware crypto/tls server at %s\n", tlsName, tlsBackend, tlsLn.Addr())
	fmt.Fprintf(w, "  route        %-15s terminate   -> %s, a plaintext TCP service at %s (PROXY v2)\n", plainName, plainBackend, plainLn.Addr())
	fmt.Fprintf(w, "  router QUIC  udp %s, the same keys\n", d.udpAddr)
	fmt.Fprintf(w, "  route        %-15s passthrough -> %s, an HTTP/3 server (quic-go, no ECH keys) at udp %s\n\n", tlsName, h3Backend, h3Addr)
	return d, cleanup, nil
}

// recordHandler sends the router's connection log lines to a channel.
type recordHandler struct{ c chan<- map[string]string }

func (h recordHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h recordHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "connection" {
		return nil
	}
	m := make(map[string]string)
	var line strings.Builder
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		fmt.Fprintf(&line, " %s", a)
		return true
	})
	if *verbose {
		fmt.Fprintf(os.Stderr, "router: %s%s\n", r.Message, line.String())
	}
	h.c <- m
	return nil
}

func (h recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h recordHandler) WithGroup(string) slog.Handler      { return h }

// connections returns the router's log lines of the next n connections.
func (d *demo) connections(n int) ([]map[string]string, error) {
	var out []map[string]string
	timeout := time.After(5 * time.Second)
	for len(out) < n {
		select {
		case m := <-d.records:
			out = append(out, m)
		case <-timeout:
			return out, fmt.Errorf("router logged %d connections, want %d", len(out), n)
		}
	}
	return out, nil
}

// fill sets the row from the router's log lines of the row's n
// connections, which may come in any order: the name on the wire and the
// inner name of the one that reached a route, and its ECH outcome, after
// "rejected" if a connection before it was rejected.
func (d *demo) fill(r *row, n int) {
	recs, err := d.connections(n)
	if err != nil && r.err == nil {
		r.err = err
	}
	var main map[string]string
	rejected := false
	for _, m := range recs {
		if m["route"] != "public" || main == nil {
			main = m
		}
		rejected = rejected || m["ech"] == "rejected"
		if m["error"] != "" && r.err == nil {
			r.err = fmt.Errorf("router: %s", m["error"])
		}
	}
	if main == nil {
		return
	}
	r.got.wire, r.got.inner, r.got.ech = main["outer_sni"], main["inner_sni"], main["ech"]
	if r.got.inner == "" {
		r.got.inner = "-"
	}
	if rejected {
		r.got.ech = "rejected, retried: " + r.got.ech
	}
}

// backendOf names the backend from its greeting.
func backendOf(greeting string) string {
	for _, b := range []string{tlsBackend, plainBackend, h3Backend} {
		if strings.Contains(greeting, b+":") {
			return b
		}
	}
	if greeting == "" {
		return "none"
	}
	return "?"
}

func (d *demo) goClient(label, name string, list ech.ConfigList, w want) *row {
	r := &row{client: label, want: w}
	cfg := &tls.Config{ServerName: name, RootCAs: d.ca.Pool, EncryptedClientHelloConfigList: list}
	conns := 1
	greeting, state, err := d.goDial(cfg)
	var rej *tls.ECHRejectionError
	if errors.As(err, &rej) && len(rej.RetryConfigList) > 0 {
		// RFC 9849, Section 6.1.6: the public name's server sent retry
		// configs; use them on a new connection.
		cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
		conns++
		greeting, state, err = d.goDial(cfg)
	}
	r.err = err
	if err == nil && list != nil && !state.ECHAccepted {
		r.err = errors.New("client: ECH not accepted")
	}
	r.got.backend = backendOf(greeting)
	d.fill(r, conns)
	return r
}

func (d *demo) goDial(cfg *tls.Config) (string, tls.ConnectionState, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", d.addr, cfg)
	if err != nil {
		return "", tls.ConnectionState{}, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	return strings.TrimSpace(string(b)), conn.ConnectionState(), err
}

// h3Client does an HTTP/3 GET with quic-go and ECH through the router's
// QUIC side.
func (d *demo) h3Client(label string, w want) *row {
	r := &row{client: label, want: w}
	var state tls.ConnectionState
	cfg := &tls.Config{
		ServerName:                     tlsName,
		RootCAs:                        d.ca.Pool,
		EncryptedClientHelloConfigList: d.list,
		VerifyConnection:               func(cs tls.ConnectionState) error { state = cs; return nil },
	}
	tr := &http3.Transport{
		TLSClientConfig: cfg,
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, d.udpAddr, tlsCfg, qcfg)
		},
	}
	defer tr.Close()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: tr}
	var body string
	resp, err := hc.Get("https://" + tlsName + "/")
	if err == nil {
		var b []byte
		b, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		body = strings.TrimSpace(string(b))
	}
	r.err = err
	if err == nil && !state.ECHAccepted {
		r.err = errors.New("client: ECH not accepted")
	}
	r.got.backend = backendOf(body)
	d.fill(r, 1)
	return r
}

// goWellKnown fetches the ECHConfigList from the public name over HTTPS, as
// a client without DNS HTTPS records does, then connects with it.
func (d *demo) goWellKnown(w want) *row {
	r := &row{client: "Go, config from " + router.WellKnownPath, want: w}
	hc := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: d.ca.Pool},
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, d.addr)
			},
		},
	}
	list, err := echclient.FetchConfigList(context.Background(), hc, "https://"+publicName+router.WellKnownPath)
	if err != nil {
		r.err = err
		d.fill(r, 1)
		return r
	}
	greeting, state, err := d.goDial(&tls.Config{ServerName: plainName, RootCAs: d.ca.Pool, EncryptedClientHelloConfigList: list})
	r.err = err
	if err == nil && !state.ECHAccepted {
		r.err = errors.New("client: ECH not accepted")
	}
	r.got.backend = backendOf(greeting)
	d.fill(r, 2)
	return r
}

// bssl runs BoringSSL's client with the binary ECHConfigList in a file.
func (d *demo) bssl(path string, w want) *row {
	r := &row{client: "bssl-tool (BoringSSL), ECH", want: w}
	listFile := filepath.Join(d.tmp, "echconfiglist.bin")
	caFile := filepath.Join(d.tmp, "ca.pem")
	if err := os.WriteFile(listFile, d.list, 0o600); err != nil {
		r.err = err
		return r
	}
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d.ca.Cert.Raw}), 0o600); err != nil {
		r.err = err
		return r
	}
	out, err := runTool(path, "client", "-connect", d.addr, "-server-name", tlsName,
		"-ech-config-list", listFile, "-root-certs", caFile)
	r.got.backend = backendOf(out)
	if err != nil {
		r.err = err
	} else if !strings.Contains(out, "Encrypted ClientHello: yes") {
		r.err = errors.New("bssl-tool does not report ECH accepted")
	}
	d.fill(r, 1)
	return r
}

// tstclnt runs NSS's client, trusting the demo CA through an NSS database.
func (d *demo) tstclnt(path string, w want) *row {
	r := &row{client: "tstclnt (NSS), ECH", want: w}
	db := filepath.Join(d.tmp, "nssdb")
	caFile := filepath.Join(d.tmp, "ca.pem")
	err := os.MkdirAll(db, 0o700)
	if err == nil {
		err = os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d.ca.Cert.Raw}), 0o600)
	}
	if err == nil {
		_, err = runTool("certutil", "-N", "-d", "sql:"+db, "--empty-password")
	}
	if err == nil {
		_, err = runTool("certutil", "-A", "-d", "sql:"+db, "-n", "ech-demo-ca", "-t", "C,,", "-i", caFile)
	}
	if err != nil {
		r.err = fmt.Errorf("making the NSS database: %w", err)
		return r
	}
	host, port, _ := net.SplitHostPort(d.addr)
	out, err := runTool(path, "-h", host, "-p", port, "-a", plainName, "-d", "sql:"+db, "-N", d.list.String())
	r.got.backend = backendOf(out)
	if err != nil {
		r.err = err
	} else if !strings.Contains(out, "subject DN: CN="+plainName) {
		// NSS prints no ECH status; a certificate for the inner name
		// shows that the handshake was the inner one.
		r.err = errors.New("tstclnt did not authenticate " + plainName)
	}
	d.fill(r, 1)
	return r
}

// runTool runs an external program with no input, for at most ten seconds,
// and returns its standard output and error.
func runTool(path string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	out, err := cmd.CombinedOutput()
	if *verbose {
		fmt.Fprintf(os.Stderr, "$ %s %s\n%s\n", path, strings.Join(args, " "), out)
	}
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", filepath.Base(path), err, lastLine(string(out)))
	}
	return string(out), nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// serveTLSBackend starts an ECH-aware backend: a crypto/tls server, which
// confirms ECH acceptance by itself when it reads a ClientHelloInner. It
// greets each client with the name it asked for.
func serveTLSBackend(ca *testpki.CA) (net.Listener, error) {
	cert, err := ca.Leaf(tlsName)
	if err != nil {
		return nil, err
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, err
	}
	go acceptLoop(ln, func(c net.Conn) {
		tc := c.(*tls.Conn)
		if tc.Handshake() != nil {
			return
		}
		fmt.Fprintf(tc, "%s: hello, %s\n", tlsBackend, tc.ConnectionState().ServerName)
		tc.CloseWrite()
		tc.NetConn().(*net.TCPConn).CloseWrite()
		lingerClose(tc)
	})
	return ln, nil
}

// serveH3Backend starts an HTTP/3 server of quic-go with no ECH keys: it
// completes the handshake of the ClientHelloInner the router forwards,
// and confirms ECH acceptance by itself, as crypto/tls does on TCP. It
// greets each client with the name it asked for.
func serveH3Backend(ca *testpki.CA) (*http3.Server, net.Addr, error) {
	cert, err := ca.Leaf(tlsName)
	if err != nil {
		return nil, nil, err
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	srv := &http3.Server{
		TLSConfig: http3.ConfigureTLSConfig(&tls.Config{Certificates: []tls.Certificate{cert}}),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s: hello, %s\n", h3Backend, r.TLS.ServerName)
		}),
	}
	go func() {
		srv.Serve(pc)
		pc.Close()
	}()
	return srv, pc.LocalAddr(), nil
}

// servePlain starts a plaintext TCP service that reads the PROXY v2 header
// the router sends and greets the client with its address.
func servePlain() (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go acceptLoop(ln, func(c net.Conn) {
		client, err := readProxyV2(bufio.NewReader(c))
		if err != nil {
			fmt.Fprintf(c, "%s: bad PROXY header: %v\n", plainBackend, err)
			return
		}
		fmt.Fprintf(c, "%s: hello, client %s\n", plainBackend, client)
		c.(*net.TCPConn).CloseWrite()
		lingerClose(c)
	})
	return ln, nil
}

// lingerClose reads until the client closes its side, after the backend
// has closed its own: closing a socket with the client's last bytes unread
// would reset the connection.
func lingerClose(r io.Reader) {
	io.Copy(io.Discard, r)
}

func acceptLoop(ln net.Listener, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			serve(c)
		}()
	}
}

// readProxyV2 reads a PROXY protocol v2 header for TCP over IPv4 and
// returns the client's address.
func readProxyV2(r io.Reader) (netip.AddrPort, error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return netip.AddrPort{}, err
	}
	if string(hdr[:12]) != "\r\n\r\n\x00\r\nQUIT\n" || hdr[12] != 0x21 {
		return netip.AddrPort{}, errors.New("not a PROXY v2 PROXY header")
	}
	rest := make([]byte, binary.BigEndian.Uint16(hdr[14:]))
	if _, err := io.ReadFull(r, rest); err != nil {
		return netip.AddrPort{}, err
	}
	if hdr[13] != 0x11 || len(rest) < 12 {
		return netip.AddrPort{}, errors.New("not TCP over IPv4")
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(rest[:4])), binary.BigEndian.Uint16(rest[8:])), nil
}
