package router

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// extensionECH is the encrypted_client_hello extension (RFC 9849,
// Section 5), seen in [tls.ClientHelloInfo.Extensions].
const extensionECH uint16 = 0xfe0d

// Limits of the public name's QUIC server, beside those it shares with
// the TCP one (see [DefaultPublicTimeout]).
const (
	// publicQUICStreams caps the requests in flight on one connection, and
	// publicQUICUniStreams the client's unidirectional streams: HTTP/3
	// needs three (control, QPACK encoder and decoder; RFC 9114, Section
	// 6.2), a few more leave room for GREASE streams.
	publicQUICStreams    = 8
	publicQUICUniStreams = 8
	// publicQUICStreamWindow and publicQUICConnWindow cap what a client
	// may send before it is read: the handlers read no body.
	publicQUICStreamWindow = 64 << 10
	publicQUICConnWindow   = 256 << 10
)

// publicQUICALPNReason is the reason phrase that closes a connection to
// the public name's QUIC server that agreed on another protocol than
// HTTP/3.
const publicQUICALPNReason = "router: the public name serves h3 only"

// publicQUIC is the router's own QUIC server for the public name, the
// QUIC side of [Router.servePublic]: a quic-go server on a loopback UDP
// socket, to which a [Router.QUICProxy] forwards the QUIC connections for
// the public name. Its TLS config comes from [ech.KeySet.PublicNameConfig]
// on r.Keys: it sends the current configs as retry configs to a client
// whose ECH did not decrypt, and it never decrypts. It serves
// [Router.Handler] over HTTP/3.
type publicQUIC struct {
	pc  net.PacketConn
	tr  *quic.Transport
	ln  *quic.Listener
	srv *http3.Server

	conns sync.WaitGroup // the accept loop and the connections it serves
	once  sync.Once
}

// listenPublicQUIC starts the public name's QUIC server on a new UDP
// socket at addr, such as "127.0.0.1:0". The caller closes it with
// [publicQUIC.close].
func (r *Router) listenPublicQUIC(addr string) (*publicQUIC, error) {
	if err := r.checkPublic(); err != nil {
		return nil, err
	}
	base := &tls.Config{
		MinVersion:     tls.VersionTLS13, // RFC 9001, Section 4.2
		GetCertificate: r.GetPublicCertificate,
		NextProtos:     []string{http3.NextProtoH3},
	}
	if base.GetCertificate == nil {
		base.Certificates = []tls.Certificate{*r.PublicCertificate}
	}
	other := base.Clone()
	base.GetConfigForClient = func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		if len(chi.SupportedProtos) == 0 || slices.Contains(chi.SupportedProtos, http3.NextProtoH3) ||
			!slices.Contains(chi.Extensions, extensionECH) {
			return nil, nil
		}
		// As on TCP (see servePublic): a client whose ECH was rejected
		// must complete the handshake to get the retry configs, whatever
		// protocol it asked for; QUIC requires one (RFC 9001, Section
		// 8.1), so its first is agreed to. The connection is closed once
		// the handshake is done, if the client goes on at all.
		c := other.Clone()
		c.NextProtos = chi.SupportedProtos[:1]
		return c, nil
	}
	timeout := orDefault(r.PublicTimeout, DefaultPublicTimeout)
	qcfg := &quic.Config{
		HandshakeIdleTimeout:           orDefault(r.HandshakeTimeout, DefaultHandshakeTimeout),
		MaxIdleTimeout:                 timeout,
		MaxIncomingStreams:             publicQUICStreams,
		MaxIncomingUniStreams:          publicQUICUniStreams,
		InitialStreamReceiveWindow:     publicQUICStreamWindow,
		MaxStreamReceiveWindow:         publicQUICStreamWindow,
		InitialConnectionReceiveWindow: publicQUICConnWindow,
		MaxConnectionReceiveWindow:     publicQUICConnWindow,
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("router: public QUIC server: %w", err)
	}
	tr := &quic.Transport{Conn: pc}
	// NewConn has decided before the proxy forwards: this server only
	// sends retry configs and never decrypts.
	ln, err := tr.Listen(r.Keys.PublicNameConfig(base), qcfg)
	if err != nil {
		tr.Close()
		pc.Close()
		return nil, fmt.Errorf("router: public QUIC server: %w", err)
	}
	p := &publicQUIC{
		pc: pc,
		tr: tr,
		ln: ln,
		srv: &http3.Server{
			Handler:        http.MaxBytesHandler(r.Handler(), publicMaxBodyBytes),
			MaxHeaderBytes: publicMaxHeaderBytes,
			IdleTimeout:    6 * timeout,
			Logger:         r.logger(),
		},
	}
	p.conns.Go(p.serve)
	return p, nil
}

// addr returns the address of the server's UDP socket.
func (p *publicQUIC) addr() net.Addr { return p.pc.LocalAddr() }

// serve accepts connections until the listener is closed and serves
// HTTP/3 on each.
func (p *publicQUIC) serve() {
	for {
		c, err := p.ln.Accept(context.Background())
		if err != nil {
			return
		}
		if c.ConnectionState().TLS.NegotiatedProtocol != http3.NextProtoH3 {
			c.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), publicQUICALPNReason)
			continue
		}
		p.conns.Go(func() {
			p.srv.ServeQUICConn(c)
			// Closed already unless the server was closed before it
			// could serve c.
			c.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
		})
	}
}

// close stops the server: it closes its connections, sending each a
// CONNECTION_CLOSE, and its socket, and waits for its goroutines. It may
// be called more than once.
func (p *publicQUIC) close() {
	p.once.Do(func() {
		p.ln.Close()
		p.srv.Close()
		p.tr.Close() // the connections still in their handshake
		p.pc.Close()
		p.conns.Wait()
	})
}
