// Package ech brings TLS Encrypted Client Hello (ECH, RFC 9849) to Go
// servers in split mode.
//
// A client that knows a server's ECH configuration (from a DNS HTTPS record,
// RFC 9848, or delivered out of band) encrypts its real ClientHello, the
// ClientHelloInner with the true server name and ALPN, inside a
// ClientHelloOuter that shows only a public name. In split mode a
// client-facing server decrypts it, decides where the connection goes, and
// hands the inner hello to a backend TLS server, which completes the
// handshake and proves acceptance in ServerHello.random:
//
//	client ──ClientHelloOuter(public.example, ECH)──▶ client-facing server (NewConn)
//	                                                   │ decrypts, rebuilds
//	                                                   ▼
//	       ◀──────── TLS with secret.example ──────── backend (crypto/tls or a proxy target)
//
// [NewConn] is the client-facing server. It wraps an accepted [net.Conn],
// reads the ClientHello (in as many records as the client sends), decrypts
// its encrypted_client_hello extension with the server's keys, rebuilds the
// ClientHelloInner, and returns a [Conn] whose reads replay it. Route on
// [Conn.ServerName] and [Conn.ALPNProtos], then either run [crypto/tls.Server]
// on the Conn (crypto/tls acts as the ECH backend by itself) or copy its bytes
// to a backend that implements ECH. NewConn needs the server's keys,
// [WithKeySet] (parsed once, rotated in place) or [WithKeys]; without
// either it returns [ErrNoKeys] at once.
//
//	ks, _ := ech.NewKeySet(key)
//	for {
//		conn, _ := ln.Accept()
//		go func() {
//			c, err := ech.NewConn(ctx, conn, ech.WithKeySet(ks))
//			if err != nil {
//				conn.Close() // the client got an alert
//				return
//			}
//			switch c.ServerName() {
//			case "mail.example": proxy(c, "127.0.0.1:10993")
//			default: serveTLS(c) // tls.Server(c, cfg)
//			}
//		}()
//	}
//
// [NewListener] does the reading for a whole listener: its Accept returns
// connections whose hellos were read concurrently, so that a slow client
// holds up no other, with a cap on the connections pending. Refused
// connections are closed and reported to [Listener.OnError].
//
// A hello whose ECH does not decrypt (GREASE, a stale or unknown key) is not
// an error: the Conn replays the ClientHelloOuter and [Conn.ServerName] is
// the name the client sent in the clear. Route it by that name exactly like
// a hello without ECH (RFC 9849, Section 7.1): a client that has no config
// for a site (every browser, before it has learned one) sends GREASE ECH
// with the site's real name in the clear, and must reach that site. Only a
// hello that names the public name, from a client whose config is stale, is
// completed by the server of the public name, whose [crypto/tls.Config]
// comes from [KeySet.PublicNameConfig]: it sends the current configs as
// retry configs, so that the client reconnects with ECH, and never decrypts
// again.
//
// # Key management
//
// [GenerateKey] makes a key for a public name; [NewKeySet] parses keys once
// for all connections. A [KeySet] is safe for concurrent use and can be
// rotated while connections are in flight ([KeySet.Rotate]). Its
// [KeySet.ConfigList] is what to publish: [ConfigList.HTTPSRecord] gives the
// DNS record. Keys are stored in the RFC 9934 PEM format that OpenSSL-based
// servers use ([MarshalPEM], [ParsePEM], [LoadKeyDir]). A [Key] is a
// [crypto/tls.EncryptedClientHelloKey], so the same keys serve a crypto/tls
// server that does ECH itself.
//
// # Errors
//
// A ClientHello that breaks a rule of RFC 8446 or RFC 9849 gets the alert the
// RFC asks for, and [NewConn] (or, for a second ClientHello after a
// HelloRetryRequest, [Conn.Read]) returns an error wrapping one of the
// sentinels, such as [ErrIllegalParameter], for use with [errors.Is]. Error
// strings never hold key material or decrypted data.
//
// # Limits
//
// Reading the hello is bounded by the context, by [WithHandshakeTimeout] and
// by [WithMaxHelloSize]. At most [MaxKeysPerHello] keys are tried on one
// hello, so a client cannot make the server run many HPKE operations.
package ech
