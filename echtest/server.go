package echtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
)

// Bounds on the server's handshakes and on the helpers that wait for it,
// generous enough for -race on a loaded machine. A test that hits one has a
// bug; the bounds only keep it from hanging until the test binary's timeout.
const (
	handshakeTimeout = 30 * time.Second
	waitTimeout      = 30 * time.Second
)

// ConnInfo is what a [Server] recorded of one connection.
type ConnInfo struct {
	// Status is the outcome of ECH.
	Status ech.Status
	// ServerName is the server_name of the hello the server went on with:
	// the inner name when ECH was accepted, else the outer one.
	ServerName string
	// OuterServerName is the server_name of the ClientHelloOuter, the
	// name visible on the wire.
	OuterServerName string
	// ALPN is the ALPN protocols of the hello the server went on with, in
	// the client's order.
	ALPN []string
	// NegotiatedProtocol is the ALPN protocol the handshake settled on.
	// It is empty for a [PassthroughHandler] server, which does no
	// handshake.
	NegotiatedProtocol string
	// ECHPresented reports whether the client sent an outer ECH
	// extension, real or GREASE (see [ech.Conn.ECHPresented]).
	ECHPresented bool
	// ConfigID is the config_id the client named; it is meaningless when
	// ECHPresented is false.
	ConfigID uint8
	// HelloRetryRequest reports whether the server's handshake sent a
	// HelloRetryRequest, and CurveID is the key exchange it settled on. Like
	// NegotiatedProtocol, they are zero for a [PassthroughHandler] server
	// and for a handshake that failed.
	HelloRetryRequest bool
	CurveID           tls.CurveID
	// RemoteAddr is the client's address.
	RemoteAddr net.Addr
	// Err is the error of [ech.NewConn] or of the server's handshake. The
	// handler is not called for a connection with an error.
	Err error
}

func (i ConnInfo) clone() ConnInfo {
	i.ALPN = slices.Clone(i.ALPN)
	return i
}

// A Handler serves one connection of a terminating server (see
// [NewServer]), after the server completed the handshake. info says what
// ECH did; c.NetConn() is the [*ech.Conn]. (c.ConnectionState().ECHAccepted
// is false even when ECH was accepted: in split mode the backend's
// crypto/tls did not decrypt the hello itself.) When ECH was rejected the
// handler is called too, but a crypto/tls client then aborts with an
// ech_required alert, so reads fail. The server closes c when the handler
// returns.
//
// Handlers run on the server's goroutines: they report failures with
// t.Error or through channels, never with t.Fatal.
type Handler func(c *tls.Conn, info ConnInfo)

// A PassthroughHandler serves one connection of a passthrough server (see
// [NewPassthroughServer]) as a split-mode client-facing server does: it
// gets the [*ech.Conn] that replays the hello to route, and forwards it or
// completes the handshake itself (with [Server.BackendConfig], say). The
// server closes c when the handler returns.
type PassthroughHandler func(c *ech.Conn)

// Echo is a [Handler] that writes back what it reads until the client
// closes the connection or stops writing.
func Echo(c *tls.Conn, _ ConnInfo) { io.Copy(c, c) }

// Server is a loopback ECH server for one test: an [ech.Listener] in front
// of a handler. It records every connection (see [Server.Conns]) and makes
// client configurations for itself. Its methods are safe for concurrent
// use; those that take a testing.TB may fail it with tb.Fatal, so they must
// be called from the goroutine running the test (or subtest) tb belongs to.
type Server struct {
	// Addr is the address the server listens on, "127.0.0.1:port".
	Addr string
	// PublicName is the public_name of the server's first ECH key.
	PublicName string
	// Keys is the server's key set. The test may rotate it; the server
	// and [Server.ClientConfig] follow.
	Keys *ech.KeySet
	// CA is the CA that issues the server's certificates.
	CA *CA

	// Copies of the fields above, safe from a test that reassigns them.
	keys *ech.KeySet
	ca   *CA

	handler     Handler
	passthrough PassthroughHandler
	backend     []func(*tls.Config)
	stale       ech.ConfigList // a key for PublicName with a config_id the server lacks
	unknown     ech.ConfigList // a key for PublicName with the server's config_id

	ln     *ech.Listener
	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	active  map[net.Conn]struct{}
	conns   []ConnInfo
	changed chan struct{} // closed and replaced when conns grows
}

// NewServer starts a terminating [Server]: for each connection it runs
// [ech.NewConn], completes the handshake with [tls.Server] and
// [Server.BackendConfig] as the ECH backend (or, when ECH was not accepted,
// as the public name's server, which sends retry configs), records the
// connection and calls h. A nil h means [Echo].
//
// Unless options say otherwise, the server has a fresh key for
// [DefaultPublicName] from [NewKeySet] and a fresh [CA]. tb's cleanup closes
// it.
func NewServer(tb testing.TB, h Handler, opts ...ServerOption) *Server {
	tb.Helper()
	if h == nil {
		h = Echo
	}
	return newServer(tb, h, nil, opts)
}

// NewPassthroughServer starts a passthrough [Server]: for each connection
// it runs [ech.NewConn], records the connection and gives the [ech.Conn] to
// h. Otherwise it is as [NewServer].
func NewPassthroughServer(tb testing.TB, h PassthroughHandler, opts ...ServerOption) *Server {
	tb.Helper()
	if h == nil {
		tb.Fatalf("echtest: NewPassthroughServer needs a handler")
	}
	return newServer(tb, nil, h, opts)
}

func newServer(tb testing.TB, h Handler, p PassthroughHandler, opts []ServerOption) *Server {
	tb.Helper()
	o := serverOptions{publicName: DefaultPublicName}
	for _, opt := range opts {
		opt(&o)
	}
	if o.keys == nil {
		o.keys = NewKeySet(tb, o.publicName)
	}
	if o.ca == nil {
		o.ca = NewCA(tb)
	}
	keys := o.keys.Keys()
	if len(keys) == 0 {
		tb.Fatalf("echtest: the server's key set is empty")
	}
	cur, err := ech.KeyConfig(keys[0])
	if err != nil {
		tb.Fatalf("echtest: %v", err)
	}
	stale := foreignConfig(tb, cur.PublicName, o.keys.ConfigIDs())
	unknown := foreignConfig(tb, cur.PublicName, nil)
	unknown.ConfigID = cur.ConfigID
	s := &Server{
		PublicName:  cur.PublicName,
		Keys:        o.keys,
		CA:          o.ca,
		keys:        o.keys,
		ca:          o.ca,
		handler:     h,
		passthrough: p,
		backend:     o.backend,
		stale:       marshalList(tb, stale),
		unknown:     marshalList(tb, unknown),
		active:      make(map[net.Conn]struct{}),
		changed:     make(chan struct{}),
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("echtest: listening: %v", err)
	}
	connOpts := append([]ech.Option{ech.WithKeySet(o.keys), ech.WithHandshakeTimeout(handshakeTimeout)}, o.connOpts...)
	s.ln, s.Addr = ech.NewListener(ln, connOpts...), ln.Addr().String()
	s.ln.OnError = func(conn net.Conn, err error) {
		s.record(ConnInfo{RemoteAddr: conn.RemoteAddr(), Err: err})
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Go(s.accept)
	tb.Cleanup(s.Close)
	return s
}

// foreignConfig returns the config of a fresh key for publicName, one no
// server has, with a config_id not in avoid.
func foreignConfig(tb testing.TB, publicName string, avoid []uint8) *ech.Config {
	tb.Helper()
	k, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: avoid})
	if err != nil {
		tb.Fatalf("echtest: generating ECH key: %v", err)
	}
	c, err := ech.KeyConfig(k)
	if err != nil {
		tb.Fatalf("echtest: %v", err)
	}
	return c
}

func marshalList(tb testing.TB, c *ech.Config) ech.ConfigList {
	tb.Helper()
	l, err := ech.MarshalConfigList(c)
	if err != nil {
		tb.Fatalf("echtest: %v", err)
	}
	return l
}

func (s *Server) accept() {
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			return // closed
		}
		c := conn.(*ech.Conn)
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Go(func() {
			defer s.untrack(c)
			s.serve(c)
		})
	}
}

// track adds conn to the connections Close closes, unless the server is
// closed.
func (s *Server) track(conn net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.active[conn] = struct{}{}
	return true
}

func (s *Server) untrack(conn net.Conn) {
	s.mu.Lock()
	delete(s.active, conn)
	s.mu.Unlock()
	conn.Close()
}

// serve serves a connection whose hello the listener has read.
func (s *Server) serve(c *ech.Conn) {
	info := ConnInfo{
		Status:          c.Status(),
		ServerName:      c.ServerName(),
		OuterServerName: c.OuterServerName(),
		ALPN:            c.ALPNProtos(),
		ECHPresented:    c.ECHPresented(),
		RemoteAddr:      c.RemoteAddr(),
	}
	info.ConfigID, _ = c.ConfigID()
	if s.passthrough != nil {
		s.record(info)
		s.passthrough(c)
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, handshakeTimeout)
	defer cancel()
	tc := tls.Server(c, s.BackendConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		info.Err = err
		s.record(info)
		return
	}
	state := tc.ConnectionState()
	info.NegotiatedProtocol = state.NegotiatedProtocol
	info.HelloRetryRequest, info.CurveID = state.HelloRetryRequest, state.CurveID
	s.record(info)
	s.handler(tc, info.clone())
	tc.Close()
}

func (s *Server) record(info ConnInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns = append(s.conns, info)
	close(s.changed)
	s.changed = make(chan struct{})
}

// Close stops the server: it closes the listener and every connection, and
// waits for the handlers to return. tb's cleanup calls it; a test may call
// it sooner. Close may be called more than once.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.active {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.ln.Close()
	s.wg.Wait()
}

// BackendConfig returns a new server configuration for the server's names:
// certificates from the server's CA for whatever name the client asks for,
// and, through [ech.KeySet.PublicNameConfig], the server's configs as retry
// configs for a handshake whose ECH was not accepted, while one whose ECH
// was accepted (the hello has an inner ECH extension) confirms it. It never
// decrypts: [ech.NewConn] did. The options of [WithBackendConfig] have been
// applied.
//
// A terminating server completes its handshakes with it; a
// [PassthroughHandler] may give it to [tls.Server] or to a backend.
func (s *Server) BackendConfig() *tls.Config {
	cfg := &tls.Config{GetCertificate: s.ca.GetCertificate}
	for _, f := range s.backend {
		f(cfg)
	}
	return s.keys.PublicNameConfig(cfg)
}

// ClientConfig returns a new client configuration for serverName with ECH:
// the CA's roots, the server's current ECHConfigList (see
// [ech.KeySet.ConfigList]) and TLS 1.3 at least, as ECH requires. The
// server accepts ECH from it. It panics if the server's key set is empty.
func (s *Server) ClientConfig(serverName string) *tls.Config {
	list, err := s.keys.ConfigList()
	if err != nil {
		panic(fmt.Sprintf("echtest: no ECH configs to give: %v", err))
	}
	return s.echClientConfig(serverName, list)
}

// StaleClientConfig is as [Server.ClientConfig] with the ECHConfigList of
// an older key for the server's public name, one the server no longer has,
// under another config_id: like a client that cached an HTTPS record
// across a key rotation. The server rejects ECH and completes
// the handshake for the public name with retry configs, so crypto/tls
// returns a [*tls.ECHRejectionError] whose RetryConfigList the server
// accepts.
func (s *Server) StaleClientConfig(serverName string) *tls.Config {
	return s.echClientConfig(serverName, s.stale)
}

// UnknownKeyClientConfig is as [Server.ClientConfig] with the ECHConfigList
// of a key the server never had, under the config_id of the server's first
// key: the server tries its key, fails to decrypt and rejects ECH, as for
// [Server.StaleClientConfig].
func (s *Server) UnknownKeyClientConfig(serverName string) *tls.Config {
	return s.echClientConfig(serverName, s.unknown)
}

func (s *Server) echClientConfig(serverName string, list ech.ConfigList) *tls.Config {
	return &tls.Config{
		ServerName:                     serverName,
		RootCAs:                        s.ca.Pool(),
		MinVersion:                     tls.VersionTLS13,
		EncryptedClientHelloConfigList: slices.Clone(list),
	}
}

// NoECHClientConfig returns a new client configuration for serverName
// without ECH: the CA's roots and nothing else. The server records
// [ech.StatusNotOffered].
func (s *Server) NoECHClientConfig(serverName string) *tls.Config {
	return &tls.Config{ServerName: serverName, RootCAs: s.ca.Pool()}
}

// Dial connects to the server with [Server.ClientConfig] for serverName
// and completes the handshake, failing tb on error. It returns once the
// server has recorded the connection, so [Server.Conns] includes it. tb's
// cleanup closes the connection.
func (s *Server) Dial(tb testing.TB, serverName string) *tls.Conn {
	tb.Helper()
	c, err := s.DialConfig(tb, s.ClientConfig(serverName))
	if err != nil {
		tb.Fatalf("echtest: dialing %s for %q: %v", s.Addr, serverName, err)
	}
	return c
}

// DialConfig connects to the server with cfg and completes the handshake.
// A handshake error is returned, not reported to tb: a test expecting a
// [*tls.ECHRejectionError] gets it here. On success, DialConfig returns
// once the server has recorded the connection, and tb's cleanup closes it.
func (s *Server) DialConfig(tb testing.TB, cfg *tls.Config) (*tls.Conn, error) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(tb.Context(), handshakeTimeout)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return nil, err
	}
	tc := conn.(*tls.Conn)
	tb.Cleanup(func() { tc.Close() })
	s.ConnInfo(tb, tc)
	return tc, nil
}

// ConnInfo returns what the server recorded of the connection whose client
// end is c, waiting for the server to record it. It fails tb if the server
// records no such connection in time.
func (s *Server) ConnInfo(tb testing.TB, c net.Conn) ConnInfo {
	tb.Helper()
	addr := c.LocalAddr().String()
	var info ConnInfo
	ok := s.wait(func(conns []ConnInfo) bool {
		for _, ci := range slices.Backward(conns) {
			if ci.RemoteAddr != nil && ci.RemoteAddr.String() == addr {
				info = ci.clone()
				return true
			}
		}
		return false
	})
	if !ok {
		tb.Fatalf("echtest: the server recorded no connection from %s", addr)
	}
	return info
}

// Conns returns a copy of what the server recorded of its connections so
// far, in the order recorded: a terminating server records a connection
// when its handshake ends, a passthrough server when [ech.NewConn] returns.
func (s *Server) Conns() []ConnInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ConnInfo, len(s.conns))
	for i, ci := range s.conns {
		out[i] = ci.clone()
	}
	return out
}

// WaitConns waits until the server has recorded at least n connections and
// returns them as [Server.Conns] does. It fails tb if that does not happen
// in time. It is how a test finds what the server saw of a connection whose
// handshake failed on the client's side.
func (s *Server) WaitConns(tb testing.TB, n int) []ConnInfo {
	tb.Helper()
	if !s.wait(func(conns []ConnInfo) bool { return len(conns) >= n }) {
		tb.Fatalf("echtest: the server recorded %d connections, want %d", len(s.Conns()), n)
	}
	return s.Conns()
}

// wait waits until done holds of the recorded connections, and reports
// whether it did in time. done is called with s.mu held.
func (s *Server) wait(done func([]ConnInfo) bool) bool {
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		ok, changed := done(s.conns), s.changed
		s.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-changed:
		case <-timer.C:
			return false
		}
	}
}
