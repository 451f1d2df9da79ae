package router

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"

	"github.com/echkit/ech"
)

// Server is a [Router] set up from a [Config]: its keys loaded and watched,
// its certificates loaded, its listeners open. It is what example/router
// runs.
type Server struct {
	// Router is the engine; its fields may be read but should not be
	// changed once Run has started.
	Router *Router
	// Keys reloads Router.Keys.
	Keys *KeyDir

	config    *Config
	logger    *slog.Logger
	listeners []Listener

	mu  sync.Mutex
	lns []net.Listener
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
	kd := &KeyDir{Dir: cfg.path(cfg.Keys.Dir), Set: ks, Logger: logger}
	if _, err := kd.Reload(); err != nil {
		return nil, err
	}
	certs := make(map[[2]string]*tls.Certificate)
	loadCert := func(certFile, keyFile string) (*tls.Certificate, error) {
		k := [2]string{cfg.path(certFile), cfg.path(keyFile)}
		if c, ok := certs[k]; ok {
			return c, nil
		}
		c, err := tls.LoadX509KeyPair(k[0], k[1])
		if err != nil {
			return nil, fmt.Errorf("router: certificate %s: %w", k[0], err)
		}
		certs[k] = &c
		return &c, nil
	}
	pub, err := loadCert(cfg.Public.Cert, cfg.Public.Key)
	if err != nil {
		return nil, err
	}
	if err := pub.Leaf.VerifyHostname(cfg.Public.Name); err != nil {
		return nil, fmt.Errorf("router: certificate %s is not for the public name: %w", cfg.path(cfg.Public.Cert), err)
	}
	s := &Server{
		Router: &Router{
			Keys:              ks,
			PublicName:        cfg.Public.Name,
			PublicCertificate: pub,
			RegenInterval:     cfg.reload,
			HandshakeTimeout:  cfg.handshakeTimeout,
			DialTimeout:       cfg.dialTimeout,
			Logger:            logger,
			HideInnerNames:    cfg.LogInnerNames != nil && !*cfg.LogInnerNames,
		},
		Keys:   kd,
		config: cfg,
		logger: logger,
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
				if rt.Certificate, err = loadCert(rc.Cert, rc.Key); err != nil {
					return nil, err
				}
				for _, n := range rc.ServerNames {
					if !strings.Contains(n, "*") && rt.Certificate.Leaf.VerifyHostname(n) != nil {
						return nil, fmt.Errorf("router: route %q: certificate %s is not for %s", rc.Name, cfg.path(rc.Cert), n)
					}
				}
			}
			routes = append(routes, rt)
		}
		s.listeners = append(s.listeners, Listener{Routes: routes, MaxConnections: l.MaxConnections})
	}
	if s.Router.RegenInterval == 0 {
		s.Router.RegenInterval = DefaultRegenInterval
	}
	return s, nil
}

// Listen opens every listener of the configuration.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lns != nil {
		return nil
	}
	for _, l := range s.config.Listeners {
		ln, err := net.Listen("tcp", l.Address)
		if err != nil {
			for _, o := range s.lns {
				o.Close()
			}
			s.lns = nil
			return fmt.Errorf("router: %w", err)
		}
		s.lns = append(s.lns, ln)
	}
	return nil
}

// Addrs returns the addresses of the open listeners, in the order of the
// configuration.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.lns))
	for i, ln := range s.lns {
		out[i] = ln.Addr()
	}
	return out
}

// Run listens (if [Server.Listen] has not been called), serves, and reloads
// the keys on the configured interval and whenever reload receives. When
// ctx is done it shuts down gracefully: it stops accepting and waits up to
// the configured shutdown_timeout for connections to end.
func (s *Server) Run(ctx context.Context, reload <-chan struct{}) error {
	if err := s.Listen(); err != nil {
		return err
	}
	s.mu.Lock()
	lns := s.lns
	s.mu.Unlock()

	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go s.Keys.Watch(watchCtx, s.config.reload, reload)

	errc := make(chan error, len(lns))
	for i, ln := range lns {
		s.logger.Info("listening", slog.String("address", ln.Addr().String()), slog.Int("routes", len(s.listeners[i].Routes)))
		go func() { errc <- s.Router.ServeListener(ln, s.listeners[i]) }()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		// A listener failed: stop them all.
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
