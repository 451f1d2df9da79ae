package router

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// Codepoints the crafted hellos of these tests use (RFC 8446, RFC 9849).
const (
	testExtensionECH       uint16 = 0xfe0d
	testExtensionSNI       uint16 = 0
	testRecordHandshake    uint8  = 22
	testHandshakeHello     uint8  = 1
	testHandshakeCert      uint8  = 11
	testHandshakeHelloDone uint8  = 14
)

// captureHello returns the ClientHello record crypto/tls sends for cfg.
func captureHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	go tls.Client(c1, cfg).Handshake()
	c2.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [5]byte
	_, err := io.ReadFull(c2, hdr[:])
	require.NoError(t, err)
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	_, err = io.ReadFull(c2, body)
	require.NoError(t, err)
	return append(hdr[:], body...)
}

// editHello rebuilds the ClientHello record rec: edit gets each extension
// (type, body) and returns the extensions to write in its place; extra is
// appended at the end.
func editHello(t *testing.T, rec []byte, edit func(typ uint16, body []byte) [][2][]byte, extra ...[2][]byte) []byte {
	t.Helper()
	s := cryptobyte.String(rec[5:])
	var msgType uint8
	var msg, sessionID, suites, comp, exts cryptobyte.String
	var vers uint16
	var random []byte
	require.True(t, s.ReadUint8(&msgType) && msgType == testHandshakeHello)
	require.True(t, s.ReadUint24LengthPrefixed(&msg) && s.Empty())
	require.True(t, msg.ReadUint16(&vers) && msg.ReadBytes(&random, 32) &&
		msg.ReadUint8LengthPrefixed(&sessionID) && msg.ReadUint16LengthPrefixed(&suites) &&
		msg.ReadUint8LengthPrefixed(&comp) && msg.ReadUint16LengthPrefixed(&exts) && msg.Empty())
	var b cryptobyte.Builder
	b.AddUint8(testRecordHandshake)
	b.AddBytes(rec[1:3])
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint8(testHandshakeHello)
		b.AddUint24LengthPrefixed(func(b *cryptobyte.Builder) {
			b.AddUint16(vers)
			b.AddBytes(random)
			b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(sessionID) })
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(suites) })
			b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(comp) })
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
				add := func(e [2][]byte) {
					b.AddUint16(uint16(e[0][0])<<8 | uint16(e[0][1]))
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e[1]) })
				}
				for !exts.Empty() {
					var typ uint16
					var body cryptobyte.String
					require.True(t, exts.ReadUint16(&typ) && exts.ReadUint16LengthPrefixed(&body))
					for _, e := range edit(typ, body) {
						add(e)
					}
				}
				for _, e := range extra {
					add(e)
				}
			})
		})
	})
	return b.BytesOrPanic()
}

func ext(typ uint16, body []byte) [2][]byte { return [2][]byte{{byte(typ >> 8), byte(typ)}, body} }

// greaseECH returns the body of an outer encrypted_client_hello extension
// of random bytes, as a GREASE client sends it (RFC 9849, Section 6.2):
// HKDF-SHA256, AES-128-GCM, a random config_id, a 32-byte enc and a
// random payload.
func greaseECH() []byte {
	enc := make([]byte, 32)
	payload := make([]byte, 239)
	id := make([]byte, 1)
	rand.Read(enc)
	rand.Read(payload)
	rand.Read(id)
	var b cryptobyte.Builder
	b.AddUint8(0) // outer
	b.AddUint16(0x0001)
	b.AddUint16(0x0001)
	b.AddUint8(id[0])
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(enc) })
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(payload) })
	return b.BytesOrPanic()
}

// greaseHello returns a TLS 1.2 ClientHello made by crypto/tls for name
// with a GREASE encrypted_client_hello extension added. crypto/tls sends no
// GREASE ECH itself, and a hello it did not make cannot complete a
// handshake with it; TLS 1.2 shows the server's certificate in the clear.
func greaseHello(t *testing.T, name string) []byte {
	t.Helper()
	rec := captureHello(t, &tls.Config{ServerName: name, MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true})
	keep := func(typ uint16, body []byte) [][2][]byte { return [][2][]byte{ext(typ, body)} }
	return editHello(t, rec, keep, ext(testExtensionECH, greaseECH()))
}

// serverCertificate sends hello to addr and returns the leaf certificate of
// the server's TLS 1.2 Certificate message.
func serverCertificate(t *testing.T, addr string, hello []byte) *x509.Certificate {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = conn.Write(hello)
	require.NoError(t, err)
	var msgs []byte
	for {
		var hdr [5]byte
		_, err := io.ReadFull(conn, hdr[:])
		require.NoError(t, err, "reading the server's flight")
		body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
		_, err = io.ReadFull(conn, body)
		require.NoError(t, err)
		require.Equal(t, testRecordHandshake, hdr[0], "record of type %d: %x", hdr[0], body)
		msgs = append(msgs, body...)
		s := cryptobyte.String(msgs)
		for !s.Empty() {
			var typ uint8
			var m cryptobyte.String
			if !s.ReadUint8(&typ) || !s.ReadUint24LengthPrefixed(&m) {
				break // the rest is in the next record
			}
			switch typ {
			case testHandshakeCert:
				var list, leaf cryptobyte.String
				require.True(t, m.ReadUint24LengthPrefixed(&list) && list.ReadUint24LengthPrefixed(&leaf))
				cert, err := x509.ParseCertificate(leaf)
				require.NoError(t, err)
				return cert
			case testHandshakeHelloDone:
				t.Fatal("no Certificate message")
			}
		}
	}
}

// greaseEnv is a router with a passthrough and a terminate route for names
// other than the public name.
func greaseEnv(t *testing.T) *env {
	e := newEnv(t)
	e.serve(
		Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)},
		Route{Name: "chat", ServerNames: []string{"chat.example"}, Mode: ModeTerminate, Backend: e.plainBackend("chat", nil),
			Certificate: e.cert("chat.example")},
	)
	return e
}

// TestGREASEHelloIsRoutedByOuterName sends hellos with GREASE ECH naming a
// routed server in the clear: RFC 9849, Section 7.1 says the server
// proceeds with the ClientHelloOuter, so the client gets the routed
// server's certificate, not the public name's.
func TestGREASEHelloIsRoutedByOuterName(t *testing.T) {
	t.Parallel()
	e := greaseEnv(t)
	for _, tc := range []struct{ name, route string }{
		{tlsName, "tls"},
		{"chat.example", "chat"},
		{publicName, "public"},
	} {
		t.Run(tc.route, func(t *testing.T) {
			cert := serverCertificate(t, e.addr, greaseHello(t, tc.name))
			assert.Equal(t, []string{tc.name}, cert.DNSNames)
			l := e.log()
			assert.Equal(t, "rejected", l["ech"])
			assert.Equal(t, tc.name, l["outer_sni"])
			assert.Equal(t, tc.route, l["route"])
		})
	}
}

// TestUnknownConfigIsRoutedByOuterName connects with crypto/tls and a
// config the router lacks whose public_name is a routed name: the hello is
// real ECH that does not decrypt, with that name in the clear. It reaches
// the route's server, whose certificate crypto/tls verifies for that name
// before it reports the rejection (with no retry configs: the backends do
// not know the keys).
func TestUnknownConfigIsRoutedByOuterName(t *testing.T) {
	t.Parallel()
	e := greaseEnv(t)
	for _, tc := range []struct{ name, route string }{
		{tlsName, "tls"},
		{"chat.example", "chat"},
	} {
		t.Run(tc.route, func(t *testing.T) {
			k, err := ech.GenerateKey(tc.name, nil)
			require.NoError(t, err)
			ks, err := ech.NewKeySet(k)
			require.NoError(t, err)
			list, err := ks.ConfigList()
			require.NoError(t, err)
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.addr, e.clientConfig(tc.name, list))
			if conn != nil {
				conn.Close()
			}
			var rej *tls.ECHRejectionError
			require.ErrorAs(t, err, &rej, "crypto/tls verified the certificate for %s", tc.name)
			assert.Empty(t, rej.RetryConfigList)
			l := e.log()
			assert.Equal(t, "rejected", l["ech"])
			assert.Equal(t, tc.name, l["outer_sni"])
			assert.Equal(t, tc.route, l["route"])
		})
	}
}

// TestGREASEBoringSSL runs BoringSSL's bssl-tool with -ech-grease for a
// routed name: it must reach that route's server.
func TestGREASEBoringSSL(t *testing.T) {
	t.Parallel()
	bssl, err := exec.LookPath("bssl-tool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("bssl-tool is not installed (Debian package android-boringssl) and CI is set")
		}
		t.Skip("bssl-tool is not installed (Debian package android-boringssl)")
	}
	e := greaseEnv(t)
	dir := t.TempDir()
	caPEM := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.ca.Cert.Raw}), 0o600))
	for _, tc := range []struct{ name, route, greeting string }{
		{tlsName, "tls", "tls " + tlsName},
		{"chat.example", "chat", "plain chat"},
	} {
		t.Run(tc.route, func(t *testing.T) {
			in := filepath.Join(t.TempDir(), "stdin")
			require.NoError(t, os.WriteFile(in, []byte("ping\n"), 0o600))
			f, err := os.Open(in)
			require.NoError(t, err)
			defer f.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bssl, "client", "-connect", e.addr, "-server-name", tc.name,
				"-ech-grease", "-root-certs", caPEM)
			var stdout, stderr bytes.Buffer
			cmd.Stdin, cmd.Stdout, cmd.Stderr = f, &stdout, &stderr
			cmd.WaitDelay = 2 * time.Second
			err = cmd.Run()
			require.NoError(t, ctx.Err(), "bssl-tool timed out\nstdout:\n%s\nstderr:\n%s", &stdout, &stderr)
			var exitErr *exec.ExitError
			if err != nil && !errors.As(err, &exitErr) {
				t.Fatal(err)
			}
			assert.Contains(t, stderr.String(), "Encrypted ClientHello: no", "stderr:\n%s", &stderr)
			assert.Contains(t, stderr.String(), "Cert subject: CN = "+tc.name, "the routed server's certificate")
			assert.True(t, strings.HasPrefix(stdout.String(), tc.greeting), "stdout:\n%s", &stdout)
			l := e.log()
			assert.Equal(t, "rejected", l["ech"])
			assert.Equal(t, tc.name, l["outer_sni"])
			assert.Equal(t, tc.route, l["route"])
		})
	}
}

// TestPublicNameNeverDecrypts connects with a config the router has but
// NewConn does not try: the router holds more than MaxKeysPerHello keys
// with its config_id, and NewConn stops at the cap. The public name's
// server must not decrypt it after NewConn has decided: the client gets
// the rejection and the retry configs, never ECH accepted on that path.
func TestPublicNameNeverDecrypts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var keys []ech.Key
	for range ech.MaxKeysPerHello + 1 {
		k, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 9})
		require.NoError(t, err)
		keys = append(keys, k)
	}
	require.NoError(t, e.ks.Replace(keys...))
	all, err := e.ks.ConfigList()
	require.NoError(t, err)
	last, err := ech.NewKeySet(keys[len(keys)-1])
	require.NoError(t, err)
	lastList, err := last.ConfigList()
	require.NoError(t, err)
	addr := e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})

	_, _, state, err := exchange(addr, e.clientConfig(tlsName, lastList))
	assert.False(t, state.ECHAccepted)
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	assert.Equal(t, []byte(all), rej.RetryConfigList)
	l := e.log()
	assert.Equal(t, "rejected", l["ech"])
	assert.Equal(t, "public", l["route"])
	assert.Equal(t, "9", l["config_id"])
}

// sniExtension is the body of a server_name extension naming name
// (RFC 6066, Section 3).
func sniExtension(name string) []byte {
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint8(0) // host_name
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(name)) })
	})
	return b.BytesOrPanic()
}

// helloNaming returns a TLS 1.2 ClientHello made by crypto/tls whose
// server_name is replaced by name, which crypto/tls would not send.
func helloNaming(t *testing.T, name string) []byte {
	t.Helper()
	rec := captureHello(t, &tls.Config{ServerName: "placeholder.example", MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true})
	return editHello(t, rec, func(typ uint16, body []byte) [][2][]byte {
		if typ == testExtensionSNI {
			return [][2][]byte{ext(typ, sniExtension(name))}
		}
		return [][2][]byte{ext(typ, body)}
	})
}

// TestServerNameMustBeLDH checks that a hello whose server_name is not a
// DNS name is refused before routing, even by a wildcard route, and that
// a final dot is dropped before routing.
func TestServerNameMustBeLDH(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var dialed atomic.Int32
	wild := e.rawBackend(func(c net.Conn) { dialed.Add(1) })
	e.serve(
		Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)},
		Route{Name: "wild", ServerNames: []string{"*.example"}, Mode: ModePassthrough, Backend: wild},
	)
	for _, name := range []string{"a\r\nb.example", "a b.example", "a\x00.example", "a_b.example", "a..example", ".example"} {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			conn, err := net.Dial("tcp", e.addr)
			require.NoError(t, err)
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = conn.Write(helloNaming(t, name))
			require.NoError(t, err)
			resp, err := io.ReadAll(conn)
			require.NoError(t, err)
			assert.Equal(t, []byte{recordTypeAlert, 3, 3, 0, 2, alertLevelFatal, alertUnrecognizedName}, resp)
			l := e.log()
			assert.Contains(t, l["error"], ErrInvalidServerName.Error())
			assert.Empty(t, l["route"])
		})
	}
	t.Run("inner", func(t *testing.T) {
		// crypto/tls sends this name encrypted in its ClientHelloInner.
		_, _, _, err := exchange(e.addr, e.clientConfig("a\r\nb.example", e.list))
		require.ErrorContains(t, err, "unrecognized name")
		l := e.log()
		assert.Equal(t, "accepted", l["ech"])
		assert.Contains(t, l["error"], ErrInvalidServerName.Error())
	})
	assert.Zero(t, dialed.Load(), "no bad name reached the wildcard route's backend")

	t.Run("final dot", func(t *testing.T) {
		// Routed as the name without it; crypto/tls, behind, refuses
		// the name with decode_error (RFC 6066, Section 3).
		for _, tc := range []struct{ name, route string }{
			{tlsName + ".", "tls"},
			{publicName + ".", "public"},
		} {
			conn, err := net.Dial("tcp", e.addr)
			require.NoError(t, err)
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = conn.Write(helloNaming(t, tc.name))
			require.NoError(t, err)
			resp, _ := io.ReadAll(conn)
			conn.Close()
			require.Len(t, resp, 7)
			assert.Equal(t, []byte{recordTypeAlert, alertLevelFatal, 50}, []byte{resp[0], resp[5], resp[6]}, "decode_error")
			l := e.log()
			assert.Equal(t, tc.route, l["route"])
			assert.NotContains(t, l["error"], ErrInvalidServerName.Error())
		}
	})
}

func TestCheckServerName(t *testing.T) {
	t.Parallel()
	for name, want := range map[string]bool{
		"chat.example": true, "a-1.B.example": true, "x": true,
		"": false, "a\r\nb.example": false, "a_b.example": false, "a..b": false, "a.": false,
		"-a.example": false, "a-.example": false,
		strings.Repeat("a", 63) + ".example": true, strings.Repeat("a", 64) + ".example": false,
		strings.Repeat("a.", 127) + "a": false, "é.example": false,
	} {
		err := checkServerName(name)
		assert.Equal(t, want, err == nil, "%q: %v", name, err)
		if err != nil {
			assert.ErrorIs(t, err, ErrInvalidServerName)
			if name != "" {
				assert.NotContains(t, err.Error(), name, "the error does not quote the name")
			}
		}
	}
}
