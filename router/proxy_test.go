package router

import (
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// cat concatenates byte strings, for writing expected headers field by field.
func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func TestProxyHeaderBytes(t *testing.T) {
	t.Parallel()
	src := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 40000}
	dst := &net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 993}
	sig := []byte("\r\n\r\n\x00\r\nQUIT\n")
	addrs := []byte{
		192, 0, 2, 7, // src_addr
		198, 51, 100, 1, // dst_addr
		0x9c, 0x40, // src_port 40000
		0x03, 0xe1, // dst_port 993
	}
	authority := cat([]byte{0x02, 0x00, 0x0c}, []byte("chat.example"))
	alpn := cat([]byte{0x01, 0x00, 0x04}, []byte("imap"))
	for _, tc := range []struct {
		name       string
		tlsVersion uint16
		want       []byte
	}{
		{"terminate TLS 1.3", tls.VersionTLS13, cat(sig,
			[]byte{0x21, 0x11, 0x00, 12 + 15 + 7 + 3 + 15}, // PROXY, TCP over IPv4, len
			addrs, authority, alpn,
			[]byte{
				0x20, 0x00, 0x0f, // PP2_TYPE_SSL, 15 bytes
				0x01,                   // client: PP2_CLIENT_SSL
				0x00, 0x00, 0x00, 0x00, // verify: 0
				0x21, 0x00, 0x07, // PP2_SUBTYPE_SSL_VERSION, 7 bytes
			},
			[]byte("TLSv1.3"))},
		{"terminate TLS 1.2", tls.VersionTLS12, cat(sig,
			[]byte{0x21, 0x11, 0x00, 12 + 15 + 7 + 3 + 15},
			addrs, authority, alpn,
			[]byte{0x20, 0x00, 0x0f, 0x01, 0x00, 0x00, 0x00, 0x00, 0x21, 0x00, 0x07},
			[]byte("TLSv1.2"))},
		{"passthrough", 0, cat(sig,
			[]byte{0x21, 0x11, 0x00, 12 + 15 + 7}, // no PP2_TYPE_SSL
			addrs, authority, alpn)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr, err := appendProxyHeader([]byte("prefix"), src, dst, "chat.example", "imap", tc.tlsVersion)
			require.NoError(t, err)
			require.True(t, strings.HasPrefix(string(hdr), "prefix"), "appends")
			hdr = hdr[len("prefix"):]
			assert.Equal(t, tc.want, hdr)

			// Walk it as a backend does.
			s := cryptobyte.String(hdr)
			var gotSig []byte
			var verCmd, fam uint8
			var body cryptobyte.String
			require.True(t, s.ReadBytes(&gotSig, 12) && s.ReadUint8(&verCmd) && s.ReadUint8(&fam) &&
				s.ReadUint16LengthPrefixed(&body) && s.Empty())
			require.Equal(t, sig, gotSig)
			require.Equal(t, proxyV2VersionProxy, verCmd)
			require.Equal(t, proxyFamTCP4, fam)
			require.True(t, body.Skip(12))
			tlvs := map[uint8]cryptobyte.String{}
			for !body.Empty() {
				var typ uint8
				var v cryptobyte.String
				require.True(t, body.ReadUint8(&typ) && body.ReadUint16LengthPrefixed(&v))
				require.NotContains(t, tlvs, typ, "TLV 0x%02x twice", typ)
				tlvs[typ] = v
			}
			assert.Equal(t, "chat.example", string(tlvs[pp2TypeAuthority]))
			assert.Equal(t, "imap", string(tlvs[pp2TypeALPN]))
			ssl, ok := tlvs[pp2TypeSSL]
			if tc.tlsVersion == 0 {
				assert.False(t, ok, "no PP2_TYPE_SSL when the router did not do TLS")
				return
			}
			require.True(t, ok)
			var client uint8
			var verify uint32
			require.True(t, ssl.ReadUint8(&client) && ssl.ReadUint32(&verify))
			assert.Equal(t, pp2ClientSSL, client)
			assert.Zero(t, verify)
			var sub uint8
			var version cryptobyte.String
			require.True(t, ssl.ReadUint8(&sub) && ssl.ReadUint16LengthPrefixed(&version) && ssl.Empty())
			assert.Equal(t, pp2SubtypeSSLVersion, sub)
			want, _ := sslVersionName(tc.tlsVersion)
			assert.Equal(t, want, string(version))
		})
	}
}

func TestProxyHeaderIPv6SSL(t *testing.T) {
	t.Parallel()
	src := &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 1}
	dst := &net.TCPAddr{IP: net.ParseIP("2001:db8::2"), Port: 2}
	hdr, err := appendProxyHeader(nil, src, dst, "", "", tls.VersionTLS13)
	require.NoError(t, err)
	want := cat([]byte("\r\n\r\n\x00\r\nQUIT\n"),
		[]byte{0x21, 0x21, 0x00, 36 + 3 + 15}, // PROXY, TCP over IPv6
		net.ParseIP("2001:db8::1"), net.ParseIP("2001:db8::2"),
		[]byte{0x00, 0x01, 0x00, 0x02},
		[]byte{0x20, 0x00, 0x0f, 0x01, 0x00, 0x00, 0x00, 0x00, 0x21, 0x00, 0x07}, []byte("TLSv1.3"))
	assert.Equal(t, want, hdr)
}

func TestProxyHeaderBadVersion(t *testing.T) {
	t.Parallel()
	src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	_, err := appendProxyHeader(nil, src, src, "chat.example", "", 0x0300) // SSL 3.0
	require.ErrorContains(t, err, "unknown TLS version 0x0300")
}

func TestProxyHeaderAuthority(t *testing.T) {
	t.Parallel()
	label63 := strings.Repeat("a", 63)
	name253 := strings.Repeat(label63+".", 3) + strings.Repeat("b", 61) // 3*64 + 61
	require.Len(t, name253, 253)
	src := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	for _, name := range []string{
		"chat.example", "a", "A-1.b2", "xn--bcher-kva.example", "123.example", label63 + ".example", name253,
	} {
		hdr, err := appendProxyHeader(nil, src, src, name, "", 0)
		if assert.NoError(t, err, name) {
			assert.Contains(t, string(hdr), name)
		}
	}
	for _, name := range []string{
		"a\r\nb.example", "a\nb.example", "a\x00b.example", "a b.example", "a_b.example", "*.example",
		"b\xc3\xbccher.example", "-a.example", "a-.example", "a..example", ".example", "example.",
		"chat.example\r\n", label63 + "a.example", name253 + "b", "a:993",
	} {
		_, err := appendProxyHeader(nil, src, src, name, "", tls.VersionTLS13)
		if assert.ErrorIs(t, err, ErrInvalidServerName, "%q", name) {
			assert.NotContains(t, err.Error(), name, "the error does not quote the name")
			assert.True(t, strings.HasPrefix(err.Error(), "router: "))
		}
	}
}

// TestProxySSLThroughRouter checks what a backend behind a terminate route
// and behind a passthrough route learns from the router: the first gets
// PP2_TYPE_SSL with the version the client negotiated, the second none.
func TestProxySSLThroughRouter(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	proxied := make(chan proxyInfo, 10)
	addr := e.serve(
		Route{Name: "imaps", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: e.plainBackend("imap", proxied),
			Certificate: e.cert(plainName), ProxyProtocol: true},
		Route{Name: "https", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.proxyTLSBackend(proxied), ProxyProtocol: true},
	)

	greeting, _, state, err := exchange(addr, e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	assert.Equal(t, "tls", greeting)
	assert.True(t, state.ECHAccepted)
	pi := <-proxied
	require.NoError(t, pi.err)
	assert.NotContains(t, pi.tlvs, pp2TypeSSL, "passthrough: the router did not do TLS")
	assert.Equal(t, tlsName, pi.tlvs[pp2TypeAuthority])
	e.log()

	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		cfg := e.clientConfig(plainName, e.list)
		cfg.MaxVersion = v
		if v == tls.VersionTLS12 {
			// A TLS 1.2 client cannot offer ECH (RFC 9849, Section 6.1).
			cfg.EncryptedClientHelloConfigList = nil
		}
		greeting, _, state, err := exchange(addr, cfg)
		require.NoError(t, err)
		assert.Equal(t, "plain imap", greeting)
		assert.Equal(t, v, state.Version)
		pi := <-proxied
		require.NoError(t, pi.err)
		want, _ := sslVersionName(v)
		assert.Equal(t, "\x01\x00\x00\x00\x00\x21\x00\x07"+want, pi.tlvs[pp2TypeSSL], "PP2_CLIENT_SSL, verify 0, %s", want)
		assert.Equal(t, plainName, pi.tlvs[pp2TypeAuthority])
		e.log()
	}
}

// TestProxyRefusesBadAuthority sends inner names with bytes outside LDH
// through a wildcard route: the backend must never get them in a PROXY
// header.
func TestProxyRefusesBadAuthority(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	proxied := make(chan proxyInfo, 10)
	addr := e.serve(Route{Name: "any", ServerNames: []string{"*.example"}, Mode: ModeTerminate,
		Backend: e.plainBackend("mail", proxied), Certificate: e.cert("*.example"), ProxyProtocol: true})
	for i, name := range []string{"a\r\nb.example", "a_b.example", "a b.example"} {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			cfg := e.clientConfig(name, e.list)
			cfg.InsecureSkipVerify = true // the certificate cannot name it
			_, _, _, err := exchange(addr, cfg)
			require.Error(t, err, "the client gets no greeting")
			l := e.log()
			assert.Equal(t, "accepted", l["ech"])
			assert.Contains(t, l["error"], ErrInvalidServerName.Error())
		})
	}
	// A good name last: every header the backend got up to it must be
	// for it, or none (the router closed the connection before a header).
	greeting, _, _, err := exchange(addr, e.clientConfig("ok.example", e.list))
	require.NoError(t, err)
	assert.Equal(t, "plain mail", greeting)
	for pi := range proxied {
		if pi.err == nil {
			require.Equal(t, "ok.example", pi.tlvs[pp2TypeAuthority])
			break
		}
		assert.Empty(t, pi.tlvs)
	}
	e.log()
}
