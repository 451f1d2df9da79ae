// Package router is a split-mode ECH client-facing server: it reads each
// ClientHello with [ech.NewConn] and sends the connection where its inner
// name (and, optionally, its ALPN) says.
//
//	client ──TLS, outer SNI = public name──▶ router ─┬─ passthrough ─▶ ECH-aware TLS backend
//	                                                  ├─ terminate ───▶ plaintext backend
//	                                                  └─ public name ─▶ router's own HTTPS
//
// A passthrough route forwards the rebuilt ClientHelloInner and the rest of
// the stream to a TLS server that implements the backend side of ECH (Go's
// crypto/tls does), which answers the client itself. A terminate route
// completes the handshake in the router, acting as the ECH backend with the
// route's certificate, and forwards plaintext to a server that knows
// nothing of ECH (Dovecot, Postfix). Either may send a PROXY protocol v2
// header first, so the backend sees the client's address.
//
// A hello whose ECH did not decrypt is routed by its outer name, as a hello
// without ECH: a GREASE client names the real server in the clear. The
// router serves the public name itself: a client with a stale config names
// the public name in the clear, completes its handshake there and gets
// retry configs, and the current ECHConfigList is published over HTTPS at
// /.well-known/origin-svcb and /ech-config-list.
//
// On Linux, a passthrough connection costs a goroutine per direction only
// through its handshake: then epoll loops, one per processor (at most 4),
// forward it with non-blocking reads and writes of at most 16 KiB, so that
// an idle connection holds no goroutine and no buffer. Terminate routes,
// and other systems, copy with two goroutines.
//
// [Router] is the engine, driven by Go values; [Config] and [Server] are the
// configuration file and the program around it (cmd/ech-router).
package router

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech"
)

// Mode is what a route does with a connection.
type Mode uint8

const (
	// ModePassthrough forwards the ClientHello the router replays and the
	// rest of the stream to a TLS backend, which completes the handshake.
	ModePassthrough Mode = iota + 1
	// ModeTerminate completes the handshake in the router with the route's
	// certificate and forwards plaintext to the backend.
	ModeTerminate
)

// String returns "passthrough" or "terminate".
func (m Mode) String() string {
	switch m {
	case ModePassthrough:
		return "passthrough"
	case ModeTerminate:
		return "terminate"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// Route says where connections for some names go.
type Route struct {
	// Name identifies the route in logs.
	Name string
	// ServerNames are the names the route serves, matched against the
	// server_name of the hello the router replays (the inner name when
	// ECH was accepted): an exact name, "*.example.com" for one more
	// label, or "*" for any name. Matching ignores case.
	ServerNames []string
	// ALPN, if not empty, restricts the route to hellos offering one of
	// these protocols. A terminate route also negotiates them, in this
	// order of preference.
	ALPN []string
	// Mode is ModePassthrough or ModeTerminate.
	Mode Mode
	// Backend is the backend's TCP address, host:port.
	Backend string
	// Certificate is the certificate a terminate route presents for
	// ServerNames.
	Certificate *tls.Certificate
	// GetCertificate, if not nil, is used instead of Certificate, as
	// [tls.Config.GetCertificate]: for a certificate that is reloaded.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// ProxyProtocol makes the router send a PROXY protocol v2 header to
	// the backend before any other byte.
	ProxyProtocol bool
	// IdleTimeout closes a forwarded connection on which nothing moved
	// either way for this long. Zero means the Router's.
	IdleTimeout time.Duration
	// FinTimeout closes a forwarded connection this long after one side
	// closed its half, if the other has not. Zero means the Router's.
	FinTimeout time.Duration
}

// Listener is what [Router.ServeListener] serves on one net.Listener.
type Listener struct {
	// Routes are tried in order, the first matching route winning.
	Routes []Route
	// MaxConnections caps the connections of the listener in progress at
	// once; beyond it a new connection is closed at once, and logged.
	// Zero means no cap.
	MaxConnections int
}

// matches reports whether r serves a hello for name offering alpn.
func (r *Route) matches(name string, alpn []string) bool {
	if len(r.ALPN) > 0 && !offersAny(alpn, r.ALPN) {
		return false
	}
	for _, pat := range r.ServerNames {
		if matchName(pat, name) {
			return true
		}
	}
	return false
}

func offersAny(offered, want []string) bool {
	for _, p := range offered {
		for _, w := range want {
			if p == w {
				return true
			}
		}
	}
	return false
}

// matchName matches name against an exact name, "*.suffix" (one label
// more) or "*".
func matchName(pattern, name string) bool {
	if pattern == "*" {
		return name != ""
	}
	if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
		label, rest, found := strings.Cut(name, ".")
		return found && label != "" && strings.EqualFold(rest, suffix)
	}
	return strings.EqualFold(pattern, name)
}

// Defaults of [Router]'s durations.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 10 * time.Second
	DefaultRegenInterval    = time.Hour
)

// ErrClosed is returned by [Router.Serve] after [Router.Shutdown] or
// [Router.Close].
var ErrClosed = errors.New("router: closed")

// errNoRoute is logged for a hello whose name no route serves.
var errNoRoute = errors.New("router: no route for this server name")

// Router accepts TLS connections, reads each ClientHello with
// [ech.NewConn], and routes the connection by its inner name and ALPN. Set
// its fields, then call [Router.Serve] for each listener. It logs one line
// per connection, at info level or, when the backend failed it (a dial
// error, a reset), at warn level.
type Router struct {
	// Keys are the ECH keys. Replacing them (see [KeyDir]) affects new
	// connections only.
	Keys *ech.KeySet
	// PublicName is the public_name of the keys' configs. The router
	// serves it: hellos for this name (with ECH that did not decrypt, a
	// stale config, they get retry configs) and hellos without
	// server_name complete their handshake here. A hello whose ECH did not
	// decrypt for another name is routed by that name.
	PublicName string
	// PublicCertificate is the certificate for PublicName. It must be one
	// that clients trust: they accept retry configs only from a server
	// that proves it is the public name (RFC 9849, Section 6.1.6).
	PublicCertificate *tls.Certificate
	// GetPublicCertificate, if not nil, is used instead of
	// PublicCertificate, as [tls.Config.GetCertificate]: for a
	// certificate that is reloaded.
	GetPublicCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// RegenInterval is the regeninterval published at
	// /.well-known/origin-svcb: how often the key set may change. Zero
	// means DefaultRegenInterval.
	RegenInterval time.Duration
	// HandshakeTimeout bounds reading the ClientHello and, for handshakes
	// the router completes, the handshake. Zero means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// DialTimeout bounds connecting to a backend. Zero means
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// IdleTimeout and FinTimeout are the defaults of the routes' (see
	// [Route]). Zero means DefaultIdleTimeout and DefaultFinTimeout.
	IdleTimeout, FinTimeout time.Duration
	// PublicTimeout bounds reading each request, headers and body, and
	// writing its response on the public name's HTTPS server; an idle
	// connection is closed after 6 times as long. Zero means
	// DefaultPublicTimeout.
	PublicTimeout time.Duration
	// Logger receives the connection log; nil means slog.Default().
	Logger *slog.Logger
	// HideInnerNames keeps the names a client sent encrypted out of the
	// log: the inner server_name of a hello whose ECH was accepted.
	HideInnerNames bool
	// Metrics, if not nil, records each connection (see [NewMetrics]).
	Metrics *Metrics

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]io.Closer // each with what closes it, or nil
	closing   bool                   // closeConns has run: no more pipes
	active    sync.WaitGroup
	web       *webServer // serves the public name, made by the first Serve
}

// Serve accepts connections on ln and routes each with routes, the first
// matching route winning. The ClientHellos are read concurrently by an
// [ech.Listener], so that a slow client holds up no other. It returns [ErrClosed] after [Router.Shutdown] or
// [Router.Close], else the error that stopped ln. ln is closed on return.
// Temporary accept errors (out of file descriptors) are retried.
func (r *Router) Serve(ln net.Listener, routes []Route) error {
	return r.ServeListener(ln, Listener{Routes: routes})
}

// checkPublic reports a missing field that serving the public name needs.
func (r *Router) checkPublic() error {
	if r.Keys == nil || r.PublicCertificate == nil && r.GetPublicCertificate == nil || r.PublicName == "" {
		return errors.New("router: Keys, PublicName and PublicCertificate are required")
	}
	return nil
}

// ServeListener is [Router.Serve] with the settings of l.
func (r *Router) ServeListener(ln net.Listener, l Listener) error {
	routes := l.Routes
	if err := r.checkPublic(); err != nil {
		ln.Close()
		return err
	}
	for i, rt := range routes {
		if rt.Mode == ModeTerminate && rt.Certificate == nil && rt.GetCertificate == nil {
			ln.Close()
			return fmt.Errorf("router: route %q: terminate needs a certificate", rt.Name)
		}
		if rt.Mode != ModeTerminate && rt.Mode != ModePassthrough {
			ln.Close()
			return fmt.Errorf("router: route %d: bad mode %v", i, rt.Mode)
		}
	}
	if !r.track(ln) {
		ln.Close()
		return ErrClosed
	}
	defer r.untrack(ln)
	addr := ln.Addr().String()
	var inFlight atomic.Int64 // connections of ln in progress, hellos included
	g := &gate{Listener: ln, r: r, addr: addr, max: l.MaxConnections, inFlight: &inFlight}
	// ech.NewListener reads the hellos concurrently, so that a slow client
	// never holds up the others, and backs off on temporary accept errors;
	// the gate under it admits connections (max_connections) and logs
	// those errors.
	el := ech.NewListener(g, ech.WithKeySet(r.Keys),
		ech.WithHandshakeTimeout(orDefault(r.HandshakeTimeout, DefaultHandshakeTimeout)))
	el.OnError = func(conn net.Conn, err error) {
		l := &connLog{start: g.acceptedAt(conn), listener: addr, client: conn.RemoteAddr().String(),
			configID: -1, refused: true, err: err}
		l.hello = time.Since(l.start)
		if he := (*ech.HelloError)(nil); errors.As(err, &he) && he.Parsed {
			l.helloParsed, l.helloECH, l.outerName = true, he.ECHPresented, he.OuterServerName
		}
		// Its place under max_connections is free before the line is
		// logged: whoever reads the log may connect again at once.
		g.done(conn)
		r.log(l)
	}
	// serve forwards c to d, and frees its place when it has ended.
	serve := func(c *ech.Conn, d dest) {
		if !r.trackConn(c.NetConn()) {
			c.Close()
			g.done(c.NetConn())
			return
		}
		r.handle(c, addr, g.acceptedAt(c.NetConn()), routes, d, func() {
			r.untrackConn(c.NetConn())
			g.done(c.NetConn())
		})
	}
	// Each connection is routed on the goroutine that read its hello.
	el.Handle = func(c *ech.Conn) { serve(c, r.destOf(c, routes)) }
	// A connection whose whole hello, without ECH, has come when it is
	// accepted (as usual: TCP_DEFER_ACCEPT) is read on the accepting
	// goroutine, and routed there if its route is a loop's from the
	// start: 227 µs against 300 µs for a short passthrough connection
	// (BenchmarkRouterNewConnection).
	el.Inline = func(c *ech.Conn) bool {
		d := r.destOf(c, routes)
		if !r.routesToLoop(c, routes, d) {
			return false
		}
		serve(c, d)
		return true
	}
	defer el.Close()
	_, err := el.Accept() // until the listener ends
	if r.isClosed() || errors.Is(err, net.ErrClosed) {
		return ErrClosed
	}
	return err
}

// gate is the net.Listener under a router's ech.Listener: it refuses
// connections over max_connections before their hello is read, logs bursts
// of temporary accept errors (the ech.Listener backs off), and remembers
// when each connection was accepted, for the log and the metrics.
type gate struct {
	net.Listener
	r        *Router
	addr     string
	max      int
	inFlight *atomic.Int64
	failures int   // accept errors in this burst; only the accept loop uses it
	refused  int64 // connections refused over max
	accepted sync.Map
}

func (g *gate) Accept() (net.Conn, error) {
	for {
		conn, err := g.Listener.Accept()
		if err != nil {
			if !g.r.isClosed() {
				// One log line per burst. ech.Listener decides: it retries
				// a temporary error after 5 ms, doubling up to 1 s, as
				// net/http's Server does, and ends on any other, which
				// Serve then returns.
				if g.failures == 0 {
					g.r.logger().Warn("accept failed", slog.String("address", g.addr),
						slog.String("error", err.Error()))
				}
				g.failures++
			}
			return nil, err
		}
		if g.failures > 0 {
			g.r.logger().Info("accepting again", slog.String("address", g.addr), slog.Int("failed_accepts", g.failures))
			g.failures = 0
		}
		if g.max > 0 && g.inFlight.Load() >= int64(g.max) {
			g.refused++
			g.r.Metrics.Refused(g.addr, "max_connections")
			g.r.logger().Warn("connection refused: max_connections reached",
				slog.String("address", g.addr), slog.String("client", conn.RemoteAddr().String()),
				slog.Int("max_connections", g.max), slog.Int64("refused", g.refused))
			conn.Close()
			continue
		}
		g.inFlight.Add(1)
		g.r.Metrics.Active(g.addr, 1)
		g.accepted.Store(conn, time.Now())
		return conn, nil
	}
}

// acceptedAt returns when conn was accepted.
func (g *gate) acceptedAt(conn net.Conn) time.Time {
	if t, ok := g.accepted.Load(conn); ok {
		return t.(time.Time)
	}
	return time.Now()
}

// done records the end of conn, refused or routed.
func (g *gate) done(conn net.Conn) {
	if _, ok := g.accepted.LoadAndDelete(conn); ok {
		g.inFlight.Add(-1)
		g.r.Metrics.Active(g.addr, -1)
	}
}

func (r *Router) track(ln net.Listener) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	if r.listeners == nil {
		r.listeners = make(map[net.Listener]struct{})
	}
	r.listeners[ln] = struct{}{}
	if r.web == nil {
		r.web = newWebServer(r.Handler(), ln.Addr(), orDefault(r.PublicTimeout, DefaultPublicTimeout), r.logger())
	}
	return true
}

func (r *Router) untrack(ln net.Listener) {
	r.mu.Lock()
	delete(r.listeners, ln)
	r.mu.Unlock()
	ln.Close()
}

func (r *Router) trackConn(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	if r.conns == nil {
		r.conns = make(map[net.Conn]io.Closer)
	}
	r.conns[c] = nil
	r.active.Add(1)
	return true
}

// listenConfig is how the router's TCP listeners are made. Without TCP
// keepalive on the connections accepted, as HAProxy and nginx do by
// default: Go's default (probes after 15 s) costs four system calls per
// connection, and idle_timeout already ends connections whose peer went
// away. Where the system has it (Linux's TCP_DEFER_ACCEPT), a connection is
// accepted once its first bytes, the ClientHello, have come: the read that
// follows finds them, and a client that connects and sends nothing costs
// the router nothing.
var listenConfig = net.ListenConfig{KeepAlive: -1, Control: deferAccept}

// closeWith has c closed by closer at a shutdown. It reports false when
// the connections are being closed already: closer then closes itself.
func (r *Router) closeWith(c net.Conn, closer io.Closer) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return false
	}
	if _, ok := r.conns[c]; ok {
		r.conns[c] = closer
	}
	return true
}

func (r *Router) untrackConn(c net.Conn) {
	c.Close()
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
	r.active.Done()
}

func (r *Router) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// Shutdown stops accepting, then waits for the connections in progress to
// end by themselves until ctx is done, when it closes those left. It
// returns ctx's error if it had to close any.
func (r *Router) Shutdown(ctx context.Context) error {
	r.stop()
	done := make(chan struct{})
	go func() { r.active.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		r.closeConns()
		<-done
		return ctx.Err()
	}
}

// Close stops accepting and closes every connection at once.
func (r *Router) Close() error {
	r.stop()
	r.closeConns()
	r.active.Wait()
	return nil
}

// stop closes the listeners and the public name's idle connections.
func (r *Router) stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for ln := range r.listeners {
		ln.Close()
	}
	r.web.close()
}

func (r *Router) closeConns() {
	r.mu.Lock()
	r.closing = true // a pipe not yet in r.conns closes itself
	closers := make([]io.Closer, 0, len(r.conns))
	for c, closer := range r.conns {
		if closer == nil {
			closer = c
		}
		closers = append(closers, closer) // a pipe owns c once in a loop
	}
	r.mu.Unlock()
	// Unlocked: a pipe closed reports its end, which untracks c.
	for _, c := range closers {
		c.Close()
	}
}

func (r *Router) logger() *slog.Logger {
	if r.Logger != nil {
		return r.Logger
	}
	return slog.Default()
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// connLog is what the log line of one connection says.
type connLog struct {
	start    time.Time
	hello    time.Duration // from accepting to the hello read
	listener string
	client   string
	status   ech.Status
	configID int  // -1 when the client sent no ECH
	refused  bool // NewConn refused the hello
	// helloParsed and helloECH say, for a refused hello, whether its
	// ClientHelloOuter parsed and whether it offered ECH.
	helloParsed, helloECH bool
	outerName             string
	innerName             string
	alpn                  []string
	negotiated            string
	route                 string
	mode                  string
	in, out               int64 // bytes forwarded from and to the client
	err                   error
}

func (r *Router) log(l *connLog) {
	status := l.status.String()
	if l.refused {
		// What NewConn learned of the hello before refusing it.
		status = "unknown" // it did not parse
		if l.helloParsed {
			status = "offered"
			if !l.helloECH {
				status = "not offered"
			}
		}
	}
	attrs := make([]slog.Attr, 0, 16) // room for every attribute: one allocation
	attrs = append(attrs,
		slog.String("client", l.client),
		slog.String("ech", status),
	)
	if l.configID >= 0 {
		attrs = append(attrs, slog.Int("config_id", l.configID))
	}
	attrs = append(attrs,
		slog.String("outer_sni", l.outerName),
	)
	if !r.HideInnerNames {
		attrs = append(attrs, slog.String("inner_sni", l.innerName))
	}
	attrs = append(attrs, slog.String("alpn", strings.Join(l.alpn, ",")))
	if l.negotiated != "" {
		attrs = append(attrs, slog.String("alpn_negotiated", l.negotiated))
	}
	attrs = append(attrs,
		slog.String("route", l.route),
		slog.String("mode", l.mode),
		slog.Int64("bytes_in", l.in),
		slog.Int64("bytes_out", l.out),
		slog.Duration("duration", time.Since(l.start)),
	)
	r.logConnection(attrs, l.route, l.err)
	if r.Metrics != nil {
		label := echRefused
		if !l.refused {
			label = echLabel(l.status, l.outerName, r.PublicName)
		}
		r.Metrics.Connection(l.listener, l.route, label, l.hello, l.in, l.out)
	}
}

// logConnection logs the "connection" line with attrs and err, at warn
// level when the backend failed the client (the operator should know), and
// counts that failure for route.
func (r *Router) logConnection(attrs []slog.Attr, route string, err error) {
	level := slog.LevelInfo
	if err != nil {
		attrs = append(attrs, slog.String("error", err.Error()))
		if errors.Is(err, errBackend) {
			level = slog.LevelWarn
			if r.Metrics != nil {
				r.Metrics.DialFailure(route)
			}
		}
	}
	r.logger().LogAttrs(context.Background(), level, "connection", attrs...)
}

// handle forwards c, whose ClientHello the ech.Listener read, accepted at
// start, to d, and calls finish once when the connection has ended and been
// logged: maybe after handle has returned, when a loop forwards it.
func (r *Router) handle(c *ech.Conn, listener string, start time.Time, routes []Route, d dest, finish func()) {
	l := &connLog{start: start, hello: time.Since(start), listener: listener, client: c.RemoteAddr().String(), configID: -1}
	forwarded := false
	defer func() {
		if !forwarded {
			r.log(l)
			finish()
		}
	}()
	l.status, l.outerName, l.alpn = c.Status(), c.OuterServerName(), c.ALPNProtos()
	if id, ok := c.ConfigID(); ok {
		l.configID = int(id)
	}
	if c.ECHAccepted() {
		l.innerName = c.ServerName()
	}

	name, i := d.name, d.i
	switch {
	case d.err != nil:
		sendAlert(c, alertUnrecognizedName)
		l.err = d.err
		return
	case i == routePublic:
		l.route, l.mode = "public", "terminate"
		cc := &countingConn{Conn: c}
		l.negotiated, l.err = r.servePublic(c, cc)
		l.in, l.out = cc.read.Load(), cc.written.Load()
		return
	case i >= 0:
		rt := &routes[i]
		l.route, l.mode = rt.Name, rt.Mode.String()
		forwarded = true
		end := func(in, out int64, err error) {
			l.in, l.out, l.err = in, out, err
			r.log(l)
			finish()
		}
		if rt.Mode == ModePassthrough {
			r.passthrough(c, name, rt, end)
		} else {
			r.terminate(c, name, rt, l, end)
		}
		return
	}
	sendAlert(c, alertUnrecognizedName)
	l.err = errNoRoute
}

// dest is where a hello goes: see destination.
type dest struct {
	name string
	i    int
	err  error
}

// destOf returns where c goes among routes: by the name it was read for
// (the inner name when ECH was accepted) and its ALPN.
func (r *Router) destOf(c *ech.Conn, routes []Route) dest {
	name, i, err := r.destination(c.ServerName(), routes, c.ALPNProtos())
	return dest{name, i, err}
}

// Where destination sends a hello that no route takes.
const (
	routeNone   = -1 // no route serves the name
	routePublic = -2 // the public name's server
)

// destination returns where a hello naming serverName (in the clear, or
// inside when ECH was accepted) and offering alpn goes: the index of the
// first of routes for it, routePublic or routeNone; and the name, without
// a final dot (RFC 6066, Section 3, forbids it; some clients send it). The
// name goes to backends in PROXY headers, so one that is not a DNS name is
// refused with an error.
//
// RFC 9849, Section 7.1: a hello whose ECH did not decrypt (GREASE, an
// unknown config_id, a stale key) is routed by its outer name exactly like
// a hello without ECH. A GREASE client has no config and names the real
// server in the clear; only a hello for the public name (a client with a
// stale config) or for no name is served by the public name's server,
// which sends retry configs (Section 6.1.6). No route may take the public
// name, not even "*".
func (r *Router) destination(serverName string, routes []Route, alpn []string) (name string, i int, err error) {
	name = strings.TrimSuffix(serverName, ".")
	if serverName != "" {
		if err := checkServerName(name); err != nil {
			return name, routeNone, err
		}
	}
	if isPublicName(name, r.PublicName) {
		return name, routePublic, nil
	}
	for i := range routes {
		if routes[i].matches(name, alpn) {
			return name, i, nil
		}
	}
	return name, routeNone, nil
}

// TLS alerts the router writes itself (RFC 8446, Section 6).
const (
	recordTypeAlert       uint8 = 21
	alertLevelFatal       uint8 = 2
	alertUnrecognizedName uint8 = 112
)

// sendAlert writes a fatal alert record, with TLS 1.2's record version as
// before a version is negotiated.
func sendAlert(w io.Writer, desc uint8) {
	w.Write([]byte{recordTypeAlert, 3, 3, 0, 2, alertLevelFatal, desc})
}

// dial connects to a route's backend and sends the PROXY header if the
// route asks for one.
func (r *Router) dial(c *ech.Conn, name string, rt *Route, alpn string, tlsVersion uint16) (net.Conn, error) {
	// No TCP keepalive, as for the client's side (see listenConfig).
	d := net.Dialer{Timeout: orDefault(r.DialTimeout, DefaultDialTimeout), KeepAlive: -1}
	backend, err := d.Dial("tcp", rt.Backend)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBackend, err)
	}
	if rt.ProxyProtocol {
		hdr, err := appendProxyHeader(nil, c.RemoteAddr(), c.LocalAddr(), name, alpn, tlsVersion)
		if err == nil {
			_, err = backend.Write(hdr)
		}
		if err != nil {
			backend.Close()
			return nil, fmt.Errorf("router: PROXY header: %w", err)
		}
	}
	return backend, nil
}

// passthrough forwards c to rt's backend as it is, and calls end once.
func (r *Router) passthrough(c *ech.Conn, name string, rt *Route, end func(in, out int64, err error)) {
	if r.passthroughInLoop(c, name, rt, end) {
		return
	}
	backend, err := r.dial(c, name, rt, "", 0)
	if err != nil {
		abort(c.NetConn()) // the backend failed: the client gets a reset
		end(0, 0, err)
		return
	}
	r.pipe(c, c.NetConn(), backend, rt, end)
}

// terminate completes c's handshake and forwards the plaintext to rt's
// backend, noting the protocol negotiated in l, and calls end once.
func (r *Router) terminate(c *ech.Conn, name string, rt *Route, l *connLog, end func(in, out int64, err error)) {
	cfg := &tls.Config{
		NextProtos:     rt.ALPN,
		MinVersion:     tls.VersionTLS12,
		GetCertificate: rt.GetCertificate,
	}
	if cfg.GetCertificate == nil {
		cfg.Certificates = []tls.Certificate{*rt.Certificate}
	}
	tc := tls.Server(c, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), orDefault(r.HandshakeTimeout, DefaultHandshakeTimeout))
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		end(0, 0, err)
		return
	}
	l.negotiated = tc.ConnectionState().NegotiatedProtocol
	backend, err := r.dial(c, name, rt, l.negotiated, tc.ConnectionState().Version)
	if err != nil {
		abort(c.NetConn()) // the backend failed: the client gets a reset
		end(0, 0, err)
		return
	}
	r.pipe(tc, c.NetConn(), backend, rt, end)
}

// pipe forwards between client, whose TCP connection is clientTCP, and
// backend with rt's timeouts, and calls end once when both are closed.
func (r *Router) pipe(client, clientTCP, backend net.Conn, rt *Route, end func(in, out int64, err error)) {
	p := r.newPipe(client, clientTCP, backend, rt)
	if !r.closeWith(clientTCP, p) {
		p.Close() // a shutdown: the copies end at once
	}
	p.start(end)
}

// newPipe returns a pipe between client and backend with rt's timeouts.
func (r *Router) newPipe(client, clientTCP, backend net.Conn, rt *Route) *pipe {
	return &pipe{
		client: client, backend: backend, clientTCP: clientTCP,
		idle: orDefault(rt.IdleTimeout, orDefault(r.IdleTimeout, DefaultIdleTimeout)),
		fin:  orDefault(rt.FinTimeout, orDefault(r.FinTimeout, DefaultFinTimeout)),
	}
}

// countingConn counts the bytes read from and written to the client.
type countingConn struct {
	net.Conn
	read, written atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// CloseWrite half-closes the wrapped connection when it can.
func (c *countingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// isPublicName reports whether a hello naming name in the clear is the
// public name's to serve: no name, or the public name, with or without a
// final dot. Any other name routes, even when the hello's ECH did not
// decrypt (a GREASE client names the real server in the clear).
func isPublicName(name, public string) bool {
	name = strings.TrimSuffix(name, ".")
	return name == "" || strings.EqualFold(name, public)
}
