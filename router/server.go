package router

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echkeys"
	"github.com/echkit/ech/echquic"
)

// Server is a [Router] set up from a [Config]: its keys loaded and watched,
// its certificates loaded, its listeners open. It is what cmd/ech-router
// runs.
type Server struct {
	// Router is the engine; its fields may be read but should not be
	// changed once Run has started.
	Router *Router
	// Keys reloads Router.Keys.
	Keys *KeyDir

	certs map[[2]string]*certFile

	config    *Config
	logger    *slog.Logger
	listeners []Listener

	mu sync.Mutex
	// lns and pcs are the open listeners, in the order of the
	// configuration: lns[i] for TCP, pcs[i] for UDP, the other nil.
	lns       []net.Listener
	pcs       []net.PacketConn
	open      bool
	metricsLn net.Listener
}

// New loads the keys and certificates that cfg names and returns a Server
// ready to [Server.Listen].
func New(cfg *Config, logger *slog.Logger) (*Server, error) {
	if logger == nil {
		logger = slog.Default()
	}
	ks, err := ech.NewKeySet()
	if err != nil {
		return nil, err
	}
	kd := &KeyDir{Dir: cfg.path(cfg.Keys.Dir), Set: ks, Logger: logger, PublicName: cfg.Public.Name}
	if cfg.Keys.Auto != nil {
		if kd.Manager, err = newManager(cfg, ks, logger); err != nil {
			return nil, err
		}
	}
	if _, err := kd.Reload(); err != nil {
		return nil, err
	}
	s := &Server{Keys: kd, config: cfg, logger: logger, certs: make(map[[2]string]*certFile)}
	certFor := func(certPath, keyPath, name string) *certFile {
		k := [2]string{cfg.path(certPath), cfg.path(keyPath)}
		f := s.certs[k]
		if f == nil {
			f = &certFile{certPath: k[0], keyPath: k[1]}
			s.certs[k] = f
		}
		if !strings.Contains(name, "*") && !slices.Contains(f.names, name) {
			f.names = append(f.names, name)
		}
		return f
	}
	pub := certFor(cfg.Public.Cert, cfg.Public.Key, cfg.Public.Name)
	s.Router = &Router{
		Keys:                 ks,
		PublicName:           cfg.Public.Name,
		GetPublicCertificate: pub.get,
		RegenInterval:        cfg.reload,
		HandshakeTimeout:     cfg.handshakeTimeout,
		DialTimeout:          cfg.dialTimeout,
		Logger:               logger,
		HideInnerNames:       cfg.LogInnerNames != nil && !*cfg.LogInnerNames,
	}
	if cfg.Metrics != "" {
		s.Router.Metrics = NewMetrics()
		s.Router.Metrics.Keys(ks)
	}
	for _, l := range cfg.Listeners {
		var routes []Route
		for _, rc := range l.Routes {
			rt := Route{
				Name:          rc.Name,
				ServerNames:   rc.ServerNames,
				ALPN:          rc.ALPN,
				Mode:          ModePassthrough,
				Backend:       rc.Backend,
				ProxyProtocol: rc.ProxyProtocol,
				IdleTimeout:   rc.idleTimeout,
				FinTimeout:    rc.finTimeout,
			}
			if rc.Mode == "terminate" {
				rt.Mode = ModeTerminate
				var f *certFile
				for _, n := range rc.ServerNames {
					f = certFor(rc.Cert, rc.Key, n)
				}
				rt.GetCertificate = f.get
			}
			routes = append(routes, rt)
		}
		s.listeners = append(s.listeners, Listener{Routes: routes, MaxConnections: l.MaxConnections})
	}
	for _, f := range s.sortedCerts() {
		c, err := f.load(logger, time.Now())
		if err != nil {
			return nil, err
		}
		f.cert.Store(c)
		s.recordCert(f, c)
	}
	if s.Router.RegenInterval == 0 {
		s.Router.RegenInterval = DefaultRegenInterval
	}
	return s, nil
}

// certFile is a certificate and its key, in PEM files reloaded with the
// keys.
type certFile struct {
	certPath, keyPath string
	names             []string // the names it must be valid for
	cert              atomic.Pointer[tls.Certificate]
}

// certExpiryWarning is how long before its expiry a certificate is warned
// about.
const certExpiryWarning = 14 * 24 * time.Hour

// load reads the files and checks the certificate is for f.names. It logs
// warnings for a certificate that expires within certExpiryWarning of now
// (or has expired) and for a key file anyone may read.
func (f *certFile) load(logger *slog.Logger, now time.Time) (*tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(f.certPath, f.keyPath)
	if err != nil {
		return nil, fmt.Errorf("router: certificate %s: %w", f.certPath, err)
	}
	for _, n := range f.names {
		if err := c.Leaf.VerifyHostname(n); err != nil {
			return nil, fmt.Errorf("router: certificate %s is not for %s: %w", f.certPath, n, err)
		}
	}
	switch left := c.Leaf.NotAfter.Sub(now); {
	case left <= 0:
		logger.Warn("certificate has expired", slog.String("file", f.certPath), slog.Time("not_after", c.Leaf.NotAfter))
	case left < certExpiryWarning:
		logger.Warn("certificate expires soon", slog.String("file", f.certPath), slog.Time("not_after", c.Leaf.NotAfter))
	}
	warnIfWorldReadable(logger, f.keyPath)
	return &c, nil
}

func (f *certFile) get(*tls.ClientHelloInfo) (*tls.Certificate, error) { return f.cert.Load(), nil }

func (s *Server) sortedCerts() []*certFile {
	out := make([]*certFile, 0, len(s.certs))
	for _, f := range s.certs {
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b *certFile) int { return strings.Compare(a.certPath, b.certPath) })
	return out
}

// Reload loads the keys and the certificates again. A file that fails to
// load is logged as an error and the one loaded before stays in use.
func (s *Server) Reload() {
	ok := true
	if _, err := s.Keys.Reload(); err != nil {
		ok = false
		s.logger.Error("keys not reloaded", slog.String("dir", s.Keys.Dir), slog.String("error", err.Error()))
	}
	for _, f := range s.sortedCerts() {
		c, err := f.load(s.logger, time.Now())
		if err != nil {
			ok = false
			s.logger.Error("certificate not reloaded", slog.String("file", f.certPath), slog.String("error", err.Error()))
			continue
		}
		if old := f.cert.Swap(c); !slices.EqualFunc(old.Certificate, c.Certificate, bytes.Equal) {
			s.logger.Info("certificate loaded", slog.String("file", f.certPath), slog.Time("not_after", c.Leaf.NotAfter))
		}
		s.recordCert(f, c)
	}
	s.Router.Metrics.Reload(ok)
	s.Router.Metrics.Keys(s.Router.Keys)
}

// recordCert gives the metrics the expiry of c under each name of f.
func (s *Server) recordCert(f *certFile, c *tls.Certificate) {
	for _, n := range f.names {
		s.Router.Metrics.Certificate(n, c.Leaf)
	}
}

// serveMetrics serves the metrics on the configured address until ctx is
// done. The server is bounded like the public name's.
func (s *Server) serveMetrics(ctx context.Context, ln net.Listener) {
	m := s.Router.Metrics
	m.SetReady(func() bool {
		s.mu.Lock()
		up := s.open
		s.mu.Unlock()
		return up && s.Router.Keys.Len() > 0
	})
	srv := &http.Server{
		Handler:           m.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug),
	}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	s.logger.Info("metrics", slog.String("address", ln.Addr().String()))
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		s.logger.Error("metrics server stopped", slog.String("error", err.Error()))
	}
}

// MetricsAddr returns the address the metrics server listens on, once
// [Server.Listen] has opened it, or nil.
func (s *Server) MetricsAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.metricsLn == nil {
		return nil
	}
	return s.metricsLn.Addr()
}

// watch reloads every interval (if positive) and whenever trigger
// receives, until ctx is done.
func (s *Server) watch(ctx context.Context, interval time.Duration, trigger <-chan struct{}) {
	// A failed run of keys.auto (a peer or the zone did not answer) is
	// tried again sooner than the next reload: after retryMin, doubling up
	// to the interval (or retryMax without one).
	var retry time.Duration
	if s.Keys.TickFailed() { // the run of New failed
		retry = retryMin
		s.logger.Info("keys.auto: trying again", slog.Duration("in", retry))
	}
	for {
		wait := interval
		if retry > 0 && (wait <= 0 || retry < wait) {
			wait = retry
		}
		var tick <-chan time.Time
		var t *time.Timer
		if wait > 0 {
			t = time.NewTimer(wait)
			tick = t.C
		}
		select {
		case <-ctx.Done():
		case <-tick:
		case <-trigger:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		s.Reload()
		if !s.Keys.TickFailed() {
			retry = 0
			continue
		}
		limit := interval
		if limit <= 0 {
			limit = retryMax
		}
		retry = min(max(2*retry, retryMin), limit)
		s.logger.Info("keys.auto: trying again", slog.Duration("in", retry))
	}
}

// The backoff of a failed keys.auto run; variables for the tests.
var (
	retryMin = 5 * time.Second
	retryMax = 10 * time.Minute
)

// CheckFiles reports every file cfg names that cannot be read: the key
// directory and the certificate and key files.
func CheckFiles(cfg *Config) error {
	var errs []error
	check := func(what, p string, dir bool) {
		fi, err := os.Stat(cfg.path(p))
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		case fi.IsDir() != dir:
			errs = append(errs, fmt.Errorf("%s: %s is not a %s", what, cfg.path(p), map[bool]string{true: "directory", false: "file"}[dir]))
		}
	}
	check("keys.dir", cfg.Keys.Dir, true)
	check("public.cert", cfg.Public.Cert, false)
	check("public.key", cfg.Public.Key, false)
	for i, l := range cfg.Listeners {
		for j, r := range l.Routes {
			if r.Mode == "terminate" {
				check(fmt.Sprintf("listeners[%d].routes[%d].cert", i, j), r.Cert, false)
				check(fmt.Sprintf("listeners[%d].routes[%d].key", i, j), r.Key, false)
			}
		}
	}
	return errors.Join(errs...)
}

// Listen opens every listener of the configuration: a TCP listener, or a
// UDP socket for a listener with "network": "udp".
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open {
		return nil
	}
	closeAll := func() {
		for i := range s.lns {
			if s.lns[i] != nil {
				s.lns[i].Close()
			}
			if s.pcs[i] != nil {
				s.pcs[i].Close()
			}
		}
		s.lns, s.pcs = nil, nil
	}
	for _, l := range s.config.Listeners {
		var (
			ln  net.Listener
			pc  net.PacketConn
			err error
		)
		if l.Network == "udp" {
			pc, err = net.ListenPacket("udp", l.Address)
		} else {
			ln, err = listenConfig.Listen(context.Background(), "tcp", l.Address)
		}
		if err != nil {
			closeAll()
			return fmt.Errorf("router: %w", err)
		}
		s.lns = append(s.lns, ln)
		s.pcs = append(s.pcs, pc)
	}
	if s.config.Metrics != "" {
		ln, err := net.Listen("tcp", s.config.Metrics)
		if err != nil {
			closeAll()
			return fmt.Errorf("router: metrics: %w", err)
		}
		s.metricsLn = ln
	}
	s.open = true
	return nil
}

// Addrs returns the addresses of the open listeners, in the order of the
// configuration: a [*net.TCPAddr] for TCP, a [*net.UDPAddr] for UDP.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.lns))
	for i, ln := range s.lns {
		if ln != nil {
			out[i] = ln.Addr()
		} else {
			out[i] = s.pcs[i].LocalAddr()
		}
	}
	return out
}

// Run listens (if [Server.Listen] has not been called), serves, and reloads
// the keys and certificates (see [Server.Reload]) on the configured
// interval and whenever reload receives. If a UDP listener has no
// public_quic_backend, Run serves the public name's QUIC connections
// itself, as the TCP listeners do theirs: a QUIC server on a loopback UDP
// socket, with the public certificate, that sends the current configs as
// retry configs and serves [Router.Handler] over HTTP/3. When
// ctx is done it shuts down gracefully: it stops accepting and waits up to
// the configured shutdown_timeout for connections to end.
func (s *Server) Run(ctx context.Context, reload <-chan struct{}) error {
	if err := s.Listen(); err != nil {
		return err
	}
	s.mu.Lock()
	lns, pcs := s.lns, s.pcs
	s.mu.Unlock()

	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go s.watch(watchCtx, s.config.reload, reload)
	s.mu.Lock()
	metricsLn := s.metricsLn
	s.mu.Unlock()
	if metricsLn != nil {
		go s.serveMetrics(watchCtx, metricsLn)
	}

	// Every UDP listener's proxy, made before any listener is served. A
	// UDP listener without public_quic_backend sends the public name's
	// QUIC connections to the router's own server on loopback.
	closeAll := func() {
		for j := range lns {
			if lns[j] != nil {
				lns[j].Close()
			} else {
				pcs[j].Close()
			}
		}
	}
	var pub *publicQUIC
	defer func() {
		if pub != nil {
			pub.close()
		}
	}()
	proxies := make([]*echquic.Proxy, len(lns))
	for i, ln := range lns {
		if ln != nil {
			continue
		}
		lc := s.config.Listeners[i]
		backend := lc.PublicQUICBackend
		if backend == "" {
			if pub == nil {
				p, err := s.Router.listenPublicQUIC("127.0.0.1:0")
				if err != nil {
					closeAll()
					return err
				}
				pub = p
				s.logger.Info("public name's QUIC server", slog.String("address", pub.addr().String()))
			}
			backend = pub.addr().String()
		}
		p, err := s.Router.QUICProxy(QUICListener{
			Listener:      s.listeners[i],
			PublicBackend: backend,
			IdleTimeout:   lc.idleTimeout,
			Name:          "udp/" + pcs[i].LocalAddr().String(),
		})
		if err != nil {
			closeAll()
			return err
		}
		proxies[i] = p
	}
	errc := make(chan error, len(lns))
	for i, ln := range lns {
		if p := proxies[i]; p != nil {
			pc := pcs[i]
			s.logger.Info("listening", slog.String("address", pc.LocalAddr().String()), slog.String("network", "udp"), slog.Int("routes", len(s.listeners[i].Routes)))
			go func() { errc <- p.Serve(pc) }()
			continue
		}
		s.logger.Info("listening", slog.String("address", ln.Addr().String()), slog.Int("routes", len(s.listeners[i].Routes)))
		go func() { errc <- s.Router.ServeListener(ln, s.listeners[i]) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		// A listener failed: stop them all.
	}
	// NOTE: QUIC flows are cut at once, not drained: the proxy forwards
	// datagrams and cannot tell when a QUIC connection ends.
	for _, p := range proxies {
		if p != nil {
			p.Close()
		}
	}
	if pub != nil {
		pub.close() // nothing reaches it now
	}
	s.logger.Info("shutting down", slog.Duration("timeout", s.config.shutdownTimeout))
	sctx, cancel := context.WithTimeout(context.Background(), s.config.shutdownTimeout)
	defer cancel()
	if serr := s.Router.Shutdown(sctx); serr != nil {
		s.logger.Warn("connections closed at shutdown timeout")
	}
	if errors.Is(err, ErrClosed) {
		err = nil
	}
	return err
}

// newManager makes the [echkeys.Manager] of keys.auto and its Publisher of
// keys.publish.
func newManager(cfg *Config, ks *ech.KeySet, logger *slog.Logger) (*echkeys.Manager, error) {
	a := cfg.Keys.Auto
	m := &echkeys.Manager{
		Dir:         cfg.path(cfg.Keys.Dir),
		PublicName:  cfg.Public.Name,
		ReadOnly:    a.ReadOnly,
		Rotate:      cfg.rotate,
		Retire:      cfg.retire,
		Propagation: cfg.propagation,
		TTL:         cfg.ttl,
		LockTimeout: cfg.lockTimeout,
		Peers:       a.Peers,
		KeySet:      ks,
		Logger:      logger,
	}
	if a.PeerCA != "" {
		pemData, err := os.ReadFile(cfg.path(a.PeerCA))
		if err != nil {
			return nil, fmt.Errorf("router: keys.auto.peer_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			return nil, fmt.Errorf("router: keys.auto.peer_ca: no certificate in %s", cfg.path(a.PeerCA))
		}
		m.PeerTLSConfig = &tls.Config{RootCAs: pool}
	}
	p := cfg.Keys.Publish
	if p == nil {
		return m, nil
	}
	secret, err := os.ReadFile(cfg.path(p.RFC2136.SecretFile))
	if err != nil {
		return nil, fmt.Errorf("router: keys.publish.rfc2136.secret_file: %w", err)
	}
	pub := &echkeys.Publisher{
		Provider: &echkeys.RFC2136{
			Server:    p.RFC2136.Server,
			Zone:      p.RFC2136.Zone,
			KeyName:   p.RFC2136.KeyName,
			Secret:    strings.TrimSpace(string(secret)),
			Algorithm: p.RFC2136.Algorithm,
		},
		Logger: logger,
	}
	for _, n := range p.Names {
		pub.Names = append(pub.Names, echkeys.Name{Name: n.Name, ALPN: n.ALPN, Create: n.Create})
	}
	if len(p.Names) == 0 {
		// Every exact server name of the routes, with its route's ALPN.
		seen := make(map[string]bool)
		for _, l := range cfg.Listeners {
			for _, r := range l.Routes {
				for _, n := range r.ServerNames {
					if strings.Contains(n, "*") || seen[strings.ToLower(n)] {
						continue
					}
					seen[strings.ToLower(n)] = true
					pub.Names = append(pub.Names, echkeys.Name{Name: n, ALPN: r.ALPN})
				}
			}
		}
	}
	m.Publisher = pub
	return m, nil
}

// QUICListener is what a [Router.QUICProxy] serves on one UDP socket.
type QUICListener struct {
	// Listener has the routes, tried in order, the first matching route
	// winning; each must be ModePassthrough, its Backend a QUIC server's
	// UDP host:port, its ProxyProtocol false. Its MaxConnections caps the
	// flows at once (zero means [echquic.DefaultMaxFlows]).
	Listener
	// PublicBackend, if not empty, is the host:port of a QUIC server for
	// the public name (see [ech.KeySet.PublicNameConfig]): it gets the
	// connections whose server_name is the public name or empty, as a
	// client with a stale config sends. When empty they are refused with
	// unrecognized_name. ([Server] sets it to its own QUIC server for the
	// public name when public_quic_backend is not set.)
	PublicBackend string
	// IdleTimeout ends a flow that forwarded nothing for that long; zero
	// means [DefaultIdleTimeout].
	IdleTimeout time.Duration
	// Name is the listener's label in the metrics, such as "udp/:443".
	Name string
}

// errNoPublicQUIC is logged for a QUIC hello for the public name when no
// public QUIC backend is set.
var errNoPublicQUIC = errors.New("router: no QUIC backend for the public name")

// QUICProxy returns an [echquic.Proxy] that routes QUIC connections as
// [Router.ServeListener] routes TLS: with r.Keys (reloaded in place, so it
// follows rotations), by the inner server name and ALPN when ECH was
// accepted, else by the name in the clear; the public name, which no route
// takes, goes to l.PublicBackend. It logs one "connection" line per QUIC connection, when it is routed,
// with "network" "udp" and no byte counts. The caller serves the proxy with
// [echquic.Proxy.Serve] and closes it with [echquic.Proxy.Close]:
// [Router.Shutdown] and [Router.Close] do not.
func (r *Router) QUICProxy(l QUICListener) (*echquic.Proxy, error) {
	if r.Keys == nil || r.PublicName == "" {
		return nil, errors.New("router: Keys and PublicName are required")
	}
	var public *net.UDPAddr // nil for a host name, looked up each time
	if ap, err := netip.ParseAddrPort(l.PublicBackend); err == nil {
		public = net.UDPAddrFromAddrPort(ap)
	}
	backends := make([]*net.UDPAddr, len(l.Routes))
	for i, rt := range l.Routes {
		if rt.Mode != ModePassthrough {
			return nil, fmt.Errorf("router: route %q: a QUIC route is passthrough, not %v", rt.Name, rt.Mode)
		}
		if rt.ProxyProtocol {
			return nil, fmt.Errorf("router: route %q: a QUIC route has no PROXY header", rt.Name)
		}
		// An address needs no lookup; a host name is looked up for each
		// connection, so that it may change.
		if ap, err := netip.ParseAddrPort(rt.Backend); err == nil {
			backends[i] = net.UDPAddrFromAddrPort(ap)
		}
	}
	route := func(info echquic.Info) (net.Addr, error) {
		lg := &quicLog{info: info, listener: l.Name}
		defer r.logQUIC(lg)
		// As on TCP (see Router.destination).
		_, i, err := r.destination(info.ServerName, l.Routes, info.ALPNProtos)
		switch {
		case err != nil:
			lg.err = err
			return nil, err
		case i == routePublic:
			lg.route = "public"
			if l.PublicBackend == "" {
				lg.err = errNoPublicQUIC
				return nil, lg.err
			}
			if public != nil {
				return public, nil
			}
			a, err := net.ResolveUDPAddr("udp", l.PublicBackend)
			if err != nil {
				lg.err = fmt.Errorf("%w: %w", errBackend, err)
			}
			return a, lg.err
		case i >= 0:
			lg.route = l.Routes[i].Name
			if backends[i] != nil {
				return backends[i], nil
			}
			a, err := net.ResolveUDPAddr("udp", l.Routes[i].Backend)
			if err != nil {
				lg.err = fmt.Errorf("%w: %w", errBackend, err)
			}
			return a, lg.err
		}
		lg.err = errNoRoute
		return nil, errNoRoute
	}
	return &echquic.Proxy{
		Route:            route,
		ECHOptions:       []ech.Option{ech.WithKeySet(r.Keys)},
		IdleTimeout:      l.IdleTimeout,
		HandshakeTimeout: orDefault(r.HandshakeTimeout, DefaultHandshakeTimeout),
		MaxFlows:         l.MaxConnections,
		Logger:           r.logger(),
	}, nil
}

// quicLog is what the log line of one QUIC connection says.
type quicLog struct {
	info     echquic.Info
	listener string
	route    string
	err      error
}

// logQUIC logs a routed or refused QUIC connection with the attributes of
// a TCP connection's line, those it knows.
func (r *Router) logQUIC(l *quicLog) {
	client := ""
	if l.info.RemoteAddr != nil {
		client = l.info.RemoteAddr.String()
	}
	attrs := []slog.Attr{
		slog.String("client", client),
		slog.String("network", "udp"),
		slog.String("ech", l.info.Status.String()),
		slog.String("outer_sni", l.info.OuterServerName),
	}
	if !r.HideInnerNames {
		inner := ""
		if l.info.Status == ech.StatusAccepted {
			inner = l.info.ServerName
		}
		attrs = append(attrs, slog.String("inner_sni", inner))
	}
	attrs = append(attrs,
		slog.String("alpn", strings.Join(l.info.ALPNProtos, ",")),
		slog.String("route", l.route),
		slog.String("mode", ModePassthrough.String()),
	)
	r.logConnection(attrs, l.route, l.err)
	if r.Metrics != nil {
		r.Metrics.QUICConnection(l.listener, l.route, echLabel(l.info.Status, l.info.OuterServerName, r.PublicName))
	}
}
