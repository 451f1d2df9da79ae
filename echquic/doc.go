// Package echquic is a split-mode client-facing server for QUIC: it routes
// HTTP/3 and other QUIC connections by the name in their encrypted
// ClientHello (RFC 9849), as [ech.NewConn] does for TLS over TCP.
//
//	client ──QUIC──▶ Proxy (ECH keys) ──UDP──▶ backend (QUIC server, no ECH keys)
//	                  reads the Initials, decrypts the ClientHelloOuter,
//	                  rewrites the Initials with the ClientHelloInner
//
// A [Proxy] serves a [net.PacketConn]. For the first datagrams of a new
// connection it removes the Initial packet protection (RFC 9001, Section 5;
// QUIC v1 and v2, RFC 9369), reassembles the ClientHello from the CRYPTO
// frames of as many Initial packets as it spans, in any order, and gives it
// to [ech.NewConn], with the same keys, checks and limits as on TCP. Then it
// calls [Proxy.Route] with the inner server name and ALPN protocols, opens a
// UDP socket to the backend for the flow, and forwards the client's
// datagrams with the CRYPTO frames of their Initial packets carrying the
// ClientHelloInner, protected with the same keys and packet numbers, padded
// to the same sizes. The backend (crypto/tls as a QUIC server, in quic-go
// for example) completes the handshake for the inner name and confirms ECH
// acceptance itself. All later datagrams, in both directions, are forwarded
// unchanged, without allocation. On Linux, when the [net.PacketConn] is a
// [*net.UDPConn], they are read and written in batches: recvmmsg(2),
// sendmmsg(2), and UDP generic segmentation offload when the datagrams of a
// batch allow it.
//
// A ClientHello whose ECH does not decrypt (GREASE, an unknown config, a
// stale key) is routed by its server_name in the clear and forwarded
// unchanged. Route the public name to a QUIC server configured with
// [ech.KeySet.PublicNameConfig]: it sends retry configs to clients with a
// stale config.
//
// # Rules
//
// A ClientHello that breaks RFC 8446 or RFC 9849 is answered with a
// CONNECTION_CLOSE of type 0x1c in an Initial packet, with error code
// 0x100 plus the TLS alert the TCP path sends (RFC 9001, Section 4.8):
// illegal_parameter, decode_error and so on. A HelloRetryRequest is handled
// as on TCP: the second ClientHello is decrypted with the same HPKE context
// and its CRYPTO offsets translated. A backend's Retry passes through, and
// the client's next Initials, under a new connection ID, are read afresh.
// Version Negotiation, 0-RTT, Handshake and 1-RTT packets pass through
// untouched; the proxy decrypts only the client's Initial packets.
//
// # Limits
//
// Flows are keyed by the client's address and port: one QUIC connection per
// client socket at a time (a new Initial from the same socket replaces the
// flow), and no connection migration. A backend's datagrams of more than
// 4095 bytes are dropped (QUIC stacks send at most about 1500 bytes). A
// ClientHelloInner longer than the ClientHelloOuter, which the encryption
// overhead makes rare, must fit in the padding of the Initial packet that
// ends the outer hello.
package echquic
