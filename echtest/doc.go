// Package echtest provides ECH (RFC 9849) servers, keys and certificates
// for tests, as net/http/httptest does for HTTP: a project that routes
// connections by their inner server name tests its code with real ECH
// connections, without building PKI and keys by hand.
//
//	func TestSecret(t *testing.T) {
//		srv := echtest.NewServer(t, echtest.Echo)
//		conn := srv.Dial(t, "secret.example")
//		if !conn.ConnectionState().ECHAccepted {
//			t.Fatal("ECH not accepted")
//		}
//	}
//
// Everything is made fresh for each test and lives in memory: nothing is
// written to disk, and the test's cleanup closes servers and connections.
// Servers listen on the loopback interface. All of it is safe for parallel
// tests and for the race detector.
//
// # Servers
//
// A [Server] runs [ech.NewConn] on each connection, then hands it on in
// one of two styles:
//
//   - Terminating ([NewServer]): the server completes the handshake as the
//     ECH backend, with a certificate for the inner name (or, when ECH was
//     rejected, for the public name, sending retry configs), and calls a
//     [Handler] with the [tls.Conn] and a [ConnInfo].
//   - Passthrough ([NewPassthroughServer]): the server gives the
//     [ech.Conn] to a [PassthroughHandler], which routes it as a split-mode
//     client-facing server does: to a backend, say.
//
// Either way the server records each connection's ECH status, names, ALPN
// protocols and, when it completed the handshake, what the handshake
// settled on, for assertions: see [Server.Conns] and [Server.ConnInfo].
//
// # Clients
//
// [Server.ClientConfig] returns a [tls.Config] that trusts the server's
// [CA] and carries its ECHConfigList; [Server.Dial] dials with it. Variants
// exercise the other paths of a server: [Server.StaleClientConfig] and
// [Server.UnknownKeyClientConfig] (ECH rejected, retry configs sent) and
// [Server.NoECHClientConfig] (ECH not offered).
//
// # Keys and certificates
//
// [NewKeySet] and [NewCA] make the key material on their own, for tests
// that run their own servers, or that make a backend before the server (see
// [WithKeySet] and [WithCA]).
package echtest
