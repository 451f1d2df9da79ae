// Package echclient connects to a server with TLS Encrypted Client Hello
// (RFC 9849) the way a browser does: it finds the server's ECHConfigList in
// its DNS HTTPS records (RFC 9460, RFC 9848), hands it to crypto/tls, and
// handles the server's rejection.
//
// crypto/tls sends ECH when [tls.Config.EncryptedClientHelloConfigList] is
// set, but leaves finding the list, and retrying when the server rejects it,
// to the program. This package does both, in one call:
//
//	d := &echclient.Dialer{Policy: echclient.RequireECH}
//	c, err := d.DialContext(ctx, "tcp", "secret.example:443")
//	// c.(*tls.Conn).ConnectionState().ECHAccepted is true
//
// or, for HTTP, with an [http.Client] that is otherwise unchanged:
//
//	client := &http.Client{Transport: echclient.NewTransport(d)}
//	resp, err := client.Get("https://secret.example/")
//	// resp.TLS.ECHAccepted reports whether this request used ECH
//
// # Lookup
//
// [Resolver.Lookup] asks for the HTTPS records (type 65) of an origin: the
// host itself for port 443, "_PORT._https.HOST" for other ports
// ([QueryName]). It asks over classic DNS, UDP with a retry over TCP when
// the answer is truncated, the system's servers or [Resolver.Server]; or over
// DNS-over-HTTPS (RFC 8484) when [Resolver.DoHURL] is set. It follows
// AliasMode records (at most 8) and CNAMEs, skips records that are malformed
// or need a parameter it does not know, and returns the ServiceMode records
// in order of priority, their ech, alpn, no-default-alpn, port, ipv4hint and
// ipv6hint parameters parsed into a [Record]. Every step honours the
// context and [Resolver.Timeout]; a malformed answer is an error wrapping
// [ErrMalformedResponse] or [ErrMalformedRecord], never a panic.
//
// # Dial
//
// [Dialer.DialContext] looks up the records of the address, takes them in
// order (those with a usable ech parameter only, when any has one, and
// those that offer one of the client's ALPN protocols), connects to the
// record's port and address hints, else to its target's addresses, and runs
// the TLS handshake with the record's ECHConfigList. When the server rejects
// ECH and sends retry configs, the Dialer retries once with them (RFC 9849,
// Section 6.1.6), and caches them in place of the published config. Records
// are cached per name for their TTL.
//
// The [Policy] decides what happens when ECH is not possible.
// [Opportunistic], the default, connects with plain TLS when no config is
// published, the lookup fails, or the server disables ECH securely (rejects
// it without retry configs, after proving it holds the public name's
// certificate). [RequireECH] fails instead, with an error wrapping
// [ErrECHRequired] or [ErrECHRejected] and the reason, such as
// [ErrNoRecord] or [ErrNoECHConfig]. Under both policies, a server that
// rejects the retry configs too fails the dial.
//
// # DNS library
//
// DNS messages are built and parsed with golang.org/x/net/dns/dnsmessage.
// It is maintained by the Go team alongside the standard library (whose
// resolver uses a copy of it), has no dependencies, parses without
// reflection or panics and is fuzzed upstream, and since v0.62.0 reads and
// writes SVCB and HTTPS records (RFC 9460, Section 2.2), checking the
// RDATA framing: the TargetName, strictly increasing SvcParamKeys, and
// every value's length. github.com/miekg/dns, the other common choice,
// brings a client, a server and zone-file parsing this package does not
// need. The values of the SvcParams are parsed here, bounds checked with
// golang.org/x/crypto/cryptobyte, and fuzzed (FuzzParseResponse).
package echclient
