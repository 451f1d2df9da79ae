package echtest

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"golang.org/x/crypto/cryptobyte"
)

// Backend is a loopback server that stands behind a frontend under test,
// such as a project's own router built on [ech.NewConn], and records what
// reached it: the PROXY header, and for a TLS backend the ClientHello the
// frontend passed on. Its handlers echo what they read.
//
// A TLS backend ([NewTLSBackend]) is a split-mode backend: crypto/tls with a
// certificate from its [CA] for any name, so it completes the handshake of
// the inner ClientHello a frontend replays and confirms ECH acceptance. A
// plain backend ([NewPlainBackend]) is what a terminating frontend forwards
// to.
type Backend struct {
	// Addr is the address the backend listens on.
	Addr string
	// CA issues the TLS backend's certificates.
	CA *CA

	tls    bool
	ln     net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []BackendConn
	active map[net.Conn]struct{}
	notify chan struct{}
}

// BackendConn is what a [Backend] recorded of one connection.
type BackendConn struct {
	// Proxy is the PROXY header that came first, or nil.
	Proxy *ProxyHeader
	// ServerName and ALPN are the server_name and the offered ALPN
	// protocols of the ClientHello a TLS backend read; NegotiatedProtocol
	// is the protocol its handshake settled on.
	ServerName         string
	ALPN               []string
	NegotiatedProtocol string
	// InnerHello reports a ClientHello with an inner
	// encrypted_client_hello extension: the frontend decrypted the
	// client's ECH and replayed the ClientHelloInner (split mode).
	// OuterECH reports one with an outer extension: the frontend passed on
	// a hello whose ECH it did not decrypt (GREASE or a stale config).
	InnerHello, OuterECH bool
	// RemoteAddr is the address of the frontend's connection.
	RemoteAddr net.Addr
	// Err is the error of reading the PROXY header or of the handshake.
	Err error
}

// NewTLSBackend starts a split-mode TLS [Backend] with a certificate from
// ca for any name (a fresh [CA] if ca is nil). tb's cleanup closes it.
func NewTLSBackend(tb testing.TB, ca *CA) *Backend {
	tb.Helper()
	if ca == nil {
		ca = NewCA(tb)
	}
	return newBackend(tb, ca, true)
}

// NewPlainBackend starts a plaintext [Backend]. tb's cleanup closes it.
func NewPlainBackend(tb testing.TB) *Backend {
	tb.Helper()
	return newBackend(tb, nil, false)
}

func newBackend(tb testing.TB, ca *CA, isTLS bool) *Backend {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("echtest: listening: %v", err)
	}
	b := &Backend{Addr: ln.Addr().String(), CA: ca, tls: isTLS, ln: ln,
		active: map[net.Conn]struct{}{}, notify: make(chan struct{})}
	b.wg.Go(b.accept)
	tb.Cleanup(b.Close)
	return b
}

func (b *Backend) accept() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		b.active[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Go(func() {
			defer func() {
				c.Close()
				b.mu.Lock()
				delete(b.active, c)
				b.mu.Unlock()
			}()
			b.serve(c)
		})
	}
}

// recordingConn keeps the first bytes a TLS backend reads, the ClientHello.
type recordingConn struct {
	net.Conn
	r   io.Reader
	buf []byte
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if len(c.buf) < 1<<17 {
		c.buf = append(c.buf, p[:n]...)
	}
	return n, err
}

func (b *Backend) serve(c net.Conn) {
	info := BackendConn{RemoteAddr: c.RemoteAddr()}
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	br := bufio.NewReader(c)
	info.Proxy, info.Err = readProxyHeader(br)
	if info.Err != nil {
		b.record(info)
		return
	}
	if !b.tls {
		b.record(info)
		c.SetDeadline(time.Time{})
		io.Copy(c, br)
		return
	}
	rc := &recordingConn{Conn: c, r: br}
	var cfg *tls.Config
	cfg = &tls.Config{
		GetCertificate: b.CA.GetCertificate,
		// Offer whatever the client offers, as a backend serving every
		// protocol would.
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			info.ServerName, info.ALPN = chi.ServerName, slices.Clone(chi.SupportedProtos)
			c := cfg.Clone()
			c.GetConfigForClient = nil
			c.NextProtos = chi.SupportedProtos
			return c, nil
		},
	}
	tc := tls.Server(rc, cfg)
	info.Err = tc.HandshakeContext(context.Background())
	info.InnerHello, info.OuterECH = echExtensionType(rc.buf)
	rc.buf = nil
	if info.Err == nil {
		info.NegotiatedProtocol = tc.ConnectionState().NegotiatedProtocol
	}
	b.record(info)
	if info.Err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	io.Copy(tc, tc)
}

// TLS codepoints echExtensionType reads (RFC 8446; RFC 9849, Section 5).
const (
	recordTypeHandshake                      uint8  = 22
	typeClientHello                          uint8  = 1
	extensionEncryptedClientHello            uint16 = 0xfe0d
	echClientHelloOuter, echClientHelloInner uint8  = 0, 1
)

// echExtensionType reports whether the ClientHello at the start of records
// has an inner or an outer encrypted_client_hello extension.
func echExtensionType(records []byte) (inner, outer bool) {
	var msg []byte
	s := cryptobyte.String(records)
	for !s.Empty() {
		var typ uint8
		var vers uint16
		var frag cryptobyte.String
		if !s.ReadUint8(&typ) || !s.ReadUint16(&vers) || !s.ReadUint16LengthPrefixed(&frag) || typ != recordTypeHandshake {
			break
		}
		msg = append(msg, frag...)
	}
	// ClientHello: the handshake header, legacy_version, random,
	// legacy_session_id, cipher_suites, legacy_compression_methods, then
	// the extensions.
	h := cryptobyte.String(msg)
	var body, skip, exts cryptobyte.String
	var msgType uint8
	if !h.ReadUint8(&msgType) || msgType != typeClientHello || !h.ReadUint24LengthPrefixed(&body) ||
		!body.Skip(2+32) || !body.ReadUint8LengthPrefixed(&skip) ||
		!body.ReadUint16LengthPrefixed(&skip) || !body.ReadUint8LengthPrefixed(&skip) ||
		!body.ReadUint16LengthPrefixed(&exts) {
		return false, false
	}
	for !exts.Empty() {
		var t uint16
		var data cryptobyte.String
		if !exts.ReadUint16(&t) || !exts.ReadUint16LengthPrefixed(&data) {
			return false, false
		}
		if t == extensionEncryptedClientHello && len(data) > 0 {
			return data[0] == echClientHelloInner, data[0] == echClientHelloOuter
		}
	}
	return false, false
}

func (b *Backend) record(info BackendConn) {
	b.mu.Lock()
	b.conns = append(b.conns, info)
	close(b.notify)
	b.notify = make(chan struct{})
	b.mu.Unlock()
}

// Conns returns what the backend recorded so far, in order.
func (b *Backend) Conns() []BackendConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.conns)
}

// WaitConns waits until the backend has recorded n connections and returns
// them, failing tb if that takes too long.
func (b *Backend) WaitConns(tb testing.TB, n int) []BackendConn {
	tb.Helper()
	deadline := time.After(waitTimeout)
	for {
		b.mu.Lock()
		conns, notify := slices.Clone(b.conns), b.notify
		b.mu.Unlock()
		if len(conns) >= n {
			return conns
		}
		select {
		case <-notify:
		case <-deadline:
			tb.Fatalf("echtest: backend %s recorded %d connections, want %d", b.Addr, len(conns), n)
		}
	}
}

// Close stops the backend and closes its connections.
func (b *Backend) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.active {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// ClientConfig returns a client configuration for serverName with ECH
// through a frontend that holds keys: their current ECHConfigList, the
// roots of ca (the CA of the backends, or of the frontend's certificate for
// the public name) and TLS 1.3 at least. It panics if keys is empty.
func ClientConfig(keys *ech.KeySet, ca *CA, serverName string) *tls.Config {
	list, err := keys.ConfigList()
	if err != nil {
		panic("echtest: no ECH configs to give: " + err.Error())
	}
	return &tls.Config{
		ServerName:                     serverName,
		RootCAs:                        ca.Pool(),
		MinVersion:                     tls.VersionTLS13,
		EncryptedClientHelloConfigList: list,
	}
}

// DialFrontend connects to a frontend at addr with cfg (see
// [ClientConfig]) and completes the handshake, failing tb on error. tb's
// cleanup closes the connection.
func DialFrontend(tb testing.TB, addr string, cfg *tls.Config) *tls.Conn {
	tb.Helper()
	ctx, cancel := context.WithTimeout(tb.Context(), handshakeTimeout)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		tb.Fatalf("echtest: dialing %s for %q: %v", addr, cfg.ServerName, err)
	}
	tc := c.(*tls.Conn)
	tb.Cleanup(func() { tc.Close() })
	return tc
}
