package router

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/echkit/ech"
)

// Paths at which the public name publishes the current ECHConfigList.
const (
	// WellKnownPath serves the JSON of draft-ietf-tls-wkech, Section 5:
	// {"regeninterval": N, "endpoints": [{"priority": 1, "params": {"ech": "<base64>"}}]}.
	// NOTE: the draft is not an RFC yet; the shape is that of its
	// version 12.
	WellKnownPath = "/.well-known/origin-svcb"
	// ConfigListPath serves the base64 ECHConfigList alone, one line of
	// text/plain, as the HTTPS record's ech parameter carries it.
	ConfigListPath = "/ech-config-list"
)

// OriginSVCB is the JSON published at [WellKnownPath].
type OriginSVCB struct {
	RegenInterval int64      `json:"regeninterval"`
	Endpoints     []Endpoint `json:"endpoints"`
}

// Endpoint is one element of [OriginSVCB.Endpoints]: a ServiceMode HTTPS
// record.
type Endpoint struct {
	Priority int            `json:"priority"`
	Params   EndpointParams `json:"params"`
}

// EndpointParams are an Endpoint's SvcParams.
type EndpointParams struct {
	// ECH is the base64 ECHConfigList (RFC 9848).
	ECH string `json:"ech"`
}

// Handler returns the HTTP handler of the public name: the ECHConfigList at
// [WellKnownPath] and [ConfigListPath], and a short text page at "/".
func (r *Router) Handler() http.Handler {
	mux := http.NewServeMux()
	maxAge := func() int64 { return int64(orDefault(r.RegenInterval, DefaultRegenInterval)/time.Second) / 2 }
	list := func(w http.ResponseWriter) (ech.ConfigList, bool) {
		l, err := r.Keys.ConfigList()
		if err != nil {
			http.Error(w, "no ECH keys", http.StatusServiceUnavailable)
			return nil, false
		}
		w.Header().Set("Cache-Control", fmt.Sprintf("max-age=%d", maxAge()))
		return l, true
	}
	mux.HandleFunc("GET "+WellKnownPath, func(w http.ResponseWriter, _ *http.Request) {
		l, ok := list(w)
		if !ok {
			return
		}
		body, _ := json.Marshal(OriginSVCB{
			RegenInterval: int64(orDefault(r.RegenInterval, DefaultRegenInterval) / time.Second),
			Endpoints:     []Endpoint{{Priority: 1, Params: EndpointParams{ECH: l.String()}}},
		})
		w.Header().Set("Content-Type", "application/json")
		w.Write(append(body, '\n'))
	})
	mux.HandleFunc("GET "+ConfigListPath, func(w http.ResponseWriter, _ *http.Request) {
		l, ok := list(w)
		if !ok {
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, l.String())
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintf(w, "%s: ECH client-facing server.\nECHConfigList: %s (JSON), %s (base64)\n",
			r.PublicName, WellKnownPath, ConfigListPath)
	})
	return mux
}

// servePublic completes the handshake for the public name on conn, which
// reads c, with retry configs for a client whose ECH did not decrypt, and
// serves [Router.Handler] on the connection. It returns when the connection
// is closed.
func (r *Router) servePublic(c *ech.Conn, conn net.Conn) (string, error) {
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: r.GetPublicCertificate,
	}
	if base.GetCertificate == nil {
		base.Certificates = []tls.Certificate{*r.PublicCertificate}
	}
	if slices.Contains(c.ALPNProtos(), "http/1.1") {
		// Offered only when the client wants it: a client whose ECH was
		// rejected while it asked for "imap" must still complete the
		// handshake to get the retry configs.
		base.NextProtos = []string{"http/1.1"}
	}
	// NewConn has decided: this server only sends retry configs and never
	// decrypts (crypto/tls given the keys would try every one of them).
	tc := tls.Server(conn, r.Keys.PublicNameConfig(base))
	tc.SetDeadline(time.Now().Add(orDefault(r.HandshakeTimeout, DefaultHandshakeTimeout)))
	if err := tc.Handshake(); err != nil {
		return "", err
	}
	tc.SetDeadline(time.Time{})
	proto := tc.ConnectionState().NegotiatedProtocol
	r.mu.Lock()
	web := r.web
	r.mu.Unlock()
	nc := &notifyConn{Conn: tc, done: make(chan struct{})}
	if !web.serve(nc) {
		tc.Close()
		return proto, ErrClosed
	}
	<-nc.done
	return proto, nil
}

// webServer is an http.Server fed with connections whose handshake the
// router has completed.
type webServer struct {
	srv *http.Server
	ln  *connListener
}

// Limits of the public name's HTTPS server.
const (
	// DefaultPublicTimeout is the default of [Router.PublicTimeout].
	DefaultPublicTimeout = 10 * time.Second
	// publicMaxHeaderBytes caps the request headers, publicMaxBodyBytes
	// the body of a request: the handlers read none.
	publicMaxHeaderBytes = 16 << 10
	publicMaxBodyBytes   = 16 << 10
)

func newWebServer(h http.Handler, addr net.Addr, timeout time.Duration, logger *slog.Logger) *webServer {
	w := &webServer{
		srv: &http.Server{
			Handler:           http.MaxBytesHandler(h, publicMaxBodyBytes),
			ReadHeaderTimeout: timeout,
			ReadTimeout:       timeout,
			WriteTimeout:      timeout,
			IdleTimeout:       6 * timeout,
			MaxHeaderBytes:    publicMaxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		},
		ln: &connListener{conns: make(chan net.Conn), closed: make(chan struct{}), addr: addr},
	}
	go w.srv.Serve(w.ln)
	return w
}

func (w *webServer) serve(c net.Conn) bool {
	select {
	case w.ln.conns <- c:
		return true
	case <-w.ln.closed:
		return false
	}
}

// close stops the server and closes its idle connections; the router closes
// the others. It may be called on a nil webServer.
func (w *webServer) close() {
	if w == nil {
		return
	}
	w.ln.Close()
	w.srv.SetKeepAlivesEnabled(false)
}

// connListener is a net.Listener whose connections are handed to it.
type connListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	addr   net.Addr
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }

// notifyConn closes done when it is closed.
type notifyConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (c *notifyConn) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}
