package ech_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	publicName = echtest.DefaultPublicName
	innerName  = "secret.example"

	// testTimeout bounds every step; generous for a loaded CI machine
	// running the race detector.
	testTimeout = 30 * time.Second
)

// greet is the backend of the tests' echtest servers: after the handshake
// it answers "hello <name>\n" with the server name it completed it for.
func greet(c *tls.Conn, info echtest.ConnInfo) { fmt.Fprintf(c, "hello %s\n", info.ServerName) }

// greeting reads what the backend wrote on c until it closed the connection.
func greeting(t testing.TB, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(testTimeout))
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

// clientHandshake runs a client handshake with cfg over conn, reads the
// greeting and closes conn: for the clients [echtest.Server.DialConfig]
// cannot make, over a wrapped conn or on goroutines of their own (it may
// call t.Fatal).
func clientHandshake(conn net.Conn, cfg *tls.Config) (tls.ConnectionState, string, error) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testTimeout))
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return tls.ConnectionState{}, "", err
	}
	line, err := io.ReadAll(tc)
	return tc.ConnectionState(), strings.TrimSpace(string(line)), err
}

func TestAcceptedEveryKEMAndSuite(t *testing.T) {
	t.Parallel()
	kems := []ech.KEMID{ech.KEMX25519, ech.KEMP256, ech.KEMP384, ech.KEMP521, ech.KEMXWing}
	suites := []ech.CipherSuite{
		{KDF: ech.KDFHKDFSHA256, AEAD: ech.AEADAES128GCM},
		{KDF: ech.KDFHKDFSHA256, AEAD: ech.AEADAES256GCM},
		{KDF: ech.KDFHKDFSHA256, AEAD: ech.AEADChaCha20Poly1305},
		{KDF: ech.KDFHKDFSHA384, AEAD: ech.AEADAES128GCM},
		{KDF: ech.KDFHKDFSHA512, AEAD: ech.AEADAES256GCM},
	}
	for _, kem := range kems {
		for _, cs := range suites {
			t.Run(kem.String()+"/"+cs.String(), func(t *testing.T) {
				t.Parallel()
				k, err := ech.GenerateKey(publicName, &ech.KeyOptions{KEM: kem, CipherSuites: []ech.CipherSuite{cs}})
				require.NoError(t, err)
				ks, err := ech.NewKeySet(k)
				require.NoError(t, err)
				srv := echtest.NewServer(t, greet, echtest.WithKeySet(ks))
				conn := srv.Dial(t, innerName)
				assert.True(t, conn.ConnectionState().ECHAccepted, "client sees ECH accepted")
				assert.Equal(t, "hello "+innerName, greeting(t, conn))
				r := srv.ConnInfo(t, conn)
				require.NoError(t, r.Err)
				assert.Equal(t, ech.StatusAccepted, r.Status)
				assert.Equal(t, innerName, r.ServerName)
				assert.Equal(t, publicName, r.OuterServerName)
				assert.True(t, r.ECHPresented)
			})
		}
	}
}

func TestNoECHClient(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet)
	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			cfg := srv.NoECHClientConfig(innerName)
			cfg.MinVersion, cfg.MaxVersion = v, v
			conn, err := srv.DialConfig(t, cfg)
			require.NoError(t, err)
			state := conn.ConnectionState()
			assert.False(t, state.ECHAccepted)
			assert.Equal(t, v, state.Version)
			assert.Equal(t, "hello "+innerName, greeting(t, conn))
			r := srv.ConnInfo(t, conn)
			require.NoError(t, r.Err)
			assert.Equal(t, ech.StatusNotOffered, r.Status)
			assert.False(t, r.ECHPresented)
			assert.Equal(t, innerName, r.ServerName)
		})
	}
}

func TestRejectedThenRetry(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet)
	cfg := srv.StaleClientConfig(innerName) // a key the server does not have
	_, err := srv.DialConfig(t, cfg)
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	require.NotEmpty(t, rej.RetryConfigList, "the public name's server sent retry configs")
	r := srv.WaitConns(t, 1)[0]
	assert.Equal(t, ech.StatusRejected, r.Status)
	assert.Equal(t, publicName, r.ServerName)
	assert.True(t, r.ECHPresented)

	cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
	conn, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	assert.True(t, conn.ConnectionState().ECHAccepted)
	assert.Equal(t, "hello "+innerName, greeting(t, conn))
	assert.Equal(t, ech.StatusAccepted, srv.ConnInfo(t, conn).Status)
}

func TestHelloRetryRequest(t *testing.T) {
	t.Parallel()
	// The client's first key share is X25519MLKEM768 / X25519; a backend
	// that only takes P-256 forces a HelloRetryRequest.
	srv := echtest.NewServer(t, greet, echtest.WithBackendConfig(func(c *tls.Config) { c.CurvePreferences = []tls.CurveID{tls.CurveP256} }))
	conn, err := srv.DialConfig(t, srv.ClientConfig(innerName))
	if err != nil {
		t.Logf("server: %+v", srv.Conns())
	}
	require.NoError(t, err)
	state := conn.ConnectionState()
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, tls.CurveP256, state.CurveID)
	assert.Equal(t, "hello "+innerName, greeting(t, conn))
	r := srv.ConnInfo(t, conn)
	require.NoError(t, r.Err)
	assert.Equal(t, ech.StatusAccepted, r.Status)
	assert.True(t, r.HelloRetryRequest)
}

// alertRecord is the fatal alert record the frontend sends.
func alertRecord(desc byte) []byte { return []byte{21, 3, 3, 0, 2, 2, desc} }

const (
	alertUnexpectedMessage = 10
	alertRecordOverflow    = 22
	alertIllegalParameter  = 47
	alertDecodeError       = 50
	alertDecryptError      = 51
	alertMissingExtension  = 109
)

// readAll reads what the frontend sent the client until it closes or the
// deadline passes.
func readAll(t testing.TB, c net.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	return b
}

func TestMalformedHellos(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	ks, err := ech.NewKeySet(key)
	require.NoError(t, err)
	// sealedEnc builds an accepted hello, with one part broken by the mutators.
	sealedEnc := func(t testing.TB, mutOuter func(*hello), mutInner func(*hello)) []byte {
		outer, inner := baseOuter(), baseInner()
		if mutInner != nil {
			mutInner(inner)
		}
		if mutOuter != nil {
			mutOuter(outer)
		}
		s := newSealer(t, key)
		return records(s.seal(outer, inner, s.enc, 7), 1<<14)
	}
	tests := []struct {
		name  string
		input func(t testing.TB) []byte
		opts  []ech.Option
		alert byte
		err   error
	}{
		{"not TLS", func(testing.TB) []byte { return []byte("GET / HTTP/1.1\r\n\r\n") }, nil, alertUnexpectedMessage, ech.ErrNotTLS},
		{"application data record", func(testing.TB) []byte { return []byte{23, 3, 3, 0, 1, 0} }, nil, alertUnexpectedMessage, ech.ErrNotTLS},
		{"not a ClientHello", func(testing.TB) []byte { return records([]byte{2, 0, 0, 1, 0}, 1<<14) }, nil, alertUnexpectedMessage, ech.ErrNotTLS},
		{"empty handshake record", func(testing.TB) []byte { return []byte{22, 3, 1, 0, 0} }, nil, alertDecodeError, ech.ErrDecodeError},
		{"record over 2^14", func(testing.TB) []byte { return []byte{22, 3, 1, 0x40, 0x01} }, nil, alertRecordOverflow, ech.ErrRecordOverflow},
		{"alert record inside a fragmented ClientHello", func(testing.TB) []byte {
			return append(records(baseOuter().message(), 50)[:55], 21, 3, 3, 0, 2, 2, 40)
		}, nil, alertUnexpectedMessage, ech.ErrUnexpectedMessage},
		{"truncated ClientHello body", func(testing.TB) []byte {
			m := baseOuter().message()
			m = m[:60]
			m[1], m[2], m[3] = 0, 0, 56
			return records(m, 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		// RFC 8446, Section 5.1: a ClientHello ends at a record boundary.
		{"data after ClientHello in its record", func(testing.TB) []byte {
			return records(append(baseOuter().message(), 0), 1<<14)
		}, nil, alertUnexpectedMessage, ech.ErrUnexpectedMessage},
		{"handshake message after ClientHello in its record", func(testing.TB) []byte {
			return records(append(baseOuter().message(), 0x14, 0, 0, 0x20), 1<<14)
		}, nil, alertUnexpectedMessage, ech.ErrUnexpectedMessage},
		{"hello over the size limit", func(testing.TB) []byte { return records(baseOuter().message(), 1<<14) },
			[]ech.Option{ech.WithMaxHelloSize(100)}, alertDecodeError, ech.ErrHelloTooLarge},
		{"duplicate outer extension", func(testing.TB) []byte {
			h := baseOuter()
			h.exts = append(h.exts, ext{tGroups, []byte{0, 2, 0, 0x17}})
			return records(h.message(), 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"duplicate inner extension", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.exts = append(h.exts, ext{tALPN, alpnExt("x")}) })
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"malformed server_name", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tSNI, []byte{0, 5, 0, 0, 9})
			return records(h.message(), 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"malformed ALPN", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tALPN, []byte{0, 3, 0, 1, 'x'})
			return records(h.message(), 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"ECH of type inner from the client", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tECH, []byte{1})
			return records(h.message(), 1<<14)
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"ECH of unknown type", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tECH, []byte{2})
			return records(h.message(), 1<<14)
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"truncated ECH extension", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tECH, []byte{0, 0, 1, 0, 1, 7, 0, 32})
			return records(h.message(), 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"ECH with empty payload", func(testing.TB) []byte {
			h := baseOuter()
			h.set(tECH, echOuterExt(1, 1, 7, make([]byte, 32), nil))
			return records(h.message(), 1<<14)
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"non-zero padding", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.padding[3] = 1 })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"inner legacy_session_id not empty", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.sessionID = []byte{1, 2, 3} })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"outer extension reference missing", func(t testing.TB) []byte {
			return sealedEnc(t, func(h *hello) { h.remove(tSigAlgs) }, nil)
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"outer extension references out of order", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tOuterExts, outerExtsExt(tSigAlgs, tGroups)) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"outer extension referenced twice", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tOuterExts, outerExtsExt(tGroups, tGroups)) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"outer extension references encrypted_client_hello", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tOuterExts, outerExtsExt(tGroups, tECH)) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		// RFC 9849, Section 5.1: ech_outer_extensions appears in neither
		// hello, so an outer one cannot be copied into the inner.
		{"outer extension references ech_outer_extensions", func(t testing.TB) []byte {
			return sealedEnc(t, func(h *hello) { h.set(tOuterExts, outerExtsExt(tGroups)) },
				func(h *hello) { h.set(tOuterExts, outerExtsExt(tGroups, tSigAlgs, tVersions, tKeyShare, tOuterExts)) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"ech_outer_extensions twice", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.exts = append(h.exts, ext{tOuterExts, outerExtsExt(tKeyShare)}) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"referenced extension also in inner", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.exts = append(h.exts, ext{tGroups, []byte{0, 2, 0, 0x17}}) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"malformed ech_outer_extensions", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tOuterExts, []byte{3, 0, 10, 0}) })
		}, nil, alertDecodeError, ech.ErrDecodeError},
		{"inner offers TLS 1.2", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) {
				h.set(tOuterExts, outerExtsExt(tGroups, tSigAlgs, tKeyShare))
				h.set(tVersions, versionsExt(0x0304, 0x0303))
			})
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"inner without supported_versions", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tOuterExts, outerExtsExt(tGroups, tSigAlgs, tKeyShare)) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"inner lacks the inner ECH extension", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.remove(tECH) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"inner ECH extension of type outer", func(t testing.TB) []byte {
			return sealedEnc(t, nil, func(h *hello) { h.set(tECH, echOuterExt(1, 1, 7, nil, []byte{1})) })
		}, nil, alertIllegalParameter, ech.ErrIllegalParameter},
		{"outer server_name is not the public name", func(t testing.TB) []byte {
			return sealedEnc(t, func(h *hello) { h.set(tSNI, sniExt("elsewhere.example")) }, nil)
		}, []ech.Option{ech.WithPublicNameCheck(true)}, alertIllegalParameter, ech.ErrIllegalParameter},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client, server := tcpPair(t)
			go client.Write(tc.input(t))
			opts := append([]ech.Option{ech.WithKeySet(ks)}, tc.opts...)
			c, err := ech.NewConn(t.Context(), server, opts...)
			require.ErrorIs(t, err, tc.err)
			assert.Nil(t, c)
			assert.True(t, strings.HasPrefix(err.Error(), "ech: "), "error %q starts with ech:", err)
			var ae tls.AlertError
			require.ErrorAs(t, err, &ae, "the alert sent, as crypto/tls reports it")
			assert.Equal(t, tls.AlertError(tc.alert), ae)
			server.Close()
			assert.Equal(t, alertRecord(tc.alert), readAll(t, client))
		})
	}
}

// TestMalformedHelloSanity checks that the hand-built hellos of
// TestMalformedHellos are accepted when nothing is broken, so that each
// row there fails for its own reason.
func TestMalformedHelloSanity(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	s := newSealer(t, key)
	client, server := tcpPair(t)
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
	c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key), ech.WithPublicNameCheck(true))
	require.NoError(t, err)
	assert.Equal(t, ech.StatusAccepted, c.Status())
	assert.Equal(t, innerName, c.ServerName())
	assert.Equal(t, publicName, c.OuterServerName())
	assert.Equal(t, []string{"imap"}, c.ALPNProtos())
	id, ok := c.ConfigID()
	assert.True(t, ok)
	assert.Equal(t, uint8(7), id)
}

// hrrRecord is a HelloRetryRequest as a backend would write it: only its
// first bytes matter to the frontend.
func hrrRecord() []byte {
	random := []byte{
		0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
		0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
	}
	body := append(append([]byte{3, 3}, random...), 0, 0x13, 0x01, 0, 0, 6, 0, 43, 0, 2, 3, 4)
	msg := append([]byte{2, 0, byte(len(body) >> 8), byte(len(body))}, body...)
	return append([]byte{22, 3, 3, 0, byte(len(msg))}, msg...)
}

var ccsRecord = []byte{20, 3, 3, 0, 1, 1}

// readMessage reads one handshake message from the replay of c.
func readMessage(t testing.TB, c net.Conn) []byte {
	t.Helper()
	var msg []byte
	for len(msg) < 4 || len(msg) < 4+(int(msg[1])<<16|int(msg[2])<<8|int(msg[3])) {
		var hdr [5]byte
		_, err := io.ReadFull(c, hdr[:])
		require.NoError(t, err)
		require.Equal(t, byte(22), hdr[0], "a handshake record")
		body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
		_, err = io.ReadFull(c, body)
		require.NoError(t, err)
		msg = append(msg, body...)
	}
	return msg
}

func TestSecondHelloRules(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	tests := []struct {
		name   string
		second func(s *sealer) []byte // the second ClientHello message
		alert  byte
		err    error
		// inOneRecord: the case is about the record the hello ends in, so
		// it is not run with the hello cut into records of one byte.
		inOneRecord bool
	}{
		{"accepted", func(s *sealer) []byte { return s.seal(baseOuter(), baseInner(), nil, 7) }, 0, nil, false},
		{"no ECH", func(s *sealer) []byte { return baseOuter().message() }, alertMissingExtension, ech.ErrMissingExtension, false},
		{"config_id changed", func(s *sealer) []byte { return s.seal(baseOuter(), baseInner(), nil, 8) }, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"enc not empty", func(s *sealer) []byte { return s.seal(baseOuter(), baseInner(), s.enc, 7) }, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"cipher suite changed", func(s *sealer) []byte {
			h := baseOuter()
			h.set(tECH, echOuterExt(1, 2, 7, nil, make([]byte, 64)))
			return h.message()
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"ECH of type inner", func(s *sealer) []byte {
			h := baseOuter()
			h.set(tECH, []byte{1})
			return h.message()
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"does not decrypt", func(s *sealer) []byte {
			h := baseOuter()
			h.set(tECH, echOuterExt(1, 1, 7, nil, make([]byte, 64)))
			return h.message()
		}, alertDecryptError, ech.ErrDecryptError, false},
		{"bad outer extension reference", func(s *sealer) []byte {
			inner := baseInner()
			inner.set(tOuterExts, outerExtsExt(tSigAlgs, tGroups))
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		// The second ClientHelloInner gets the checks of the first.
		{"inner with malformed ALPN", func(s *sealer) []byte {
			inner := baseInner()
			inner.set(tALPN, []byte{0, 3, 0, 1, 'x'})
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertDecodeError, ech.ErrDecodeError, false},
		{"inner offers TLS 1.2", func(s *sealer) []byte {
			inner := baseInner()
			inner.set(tOuterExts, outerExtsExt(tGroups, tSigAlgs, tKeyShare))
			inner.set(tVersions, versionsExt(0x0304, 0x0303))
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		// The route was chosen by the first hello's name and ALPN
		// (RFC 8446, Section 4.1.2 lists what may change).
		{"inner server_name changed", func(s *sealer) []byte {
			inner := baseInner()
			inner.set(tSNI, sniExt("other.example"))
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"inner ALPN changed", func(s *sealer) []byte {
			inner := baseInner()
			inner.set(tALPN, alpnExt("imap", "smtp"))
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		{"inner ALPN dropped", func(s *sealer) []byte {
			inner := baseInner()
			inner.remove(tALPN)
			return s.seal(baseOuter(), inner, nil, 7)
		}, alertIllegalParameter, ech.ErrIllegalParameter, false},
		// RFC 8446, Section 5.1: the second ClientHello also ends at a
		// record boundary.
		{"handshake message after it in its record", func(s *sealer) []byte {
			return append(s.seal(baseOuter(), baseInner(), nil, 7), 0x14, 0, 0, 0x20)
		}, alertUnexpectedMessage, ech.ErrUnexpectedMessage, true},
	}
	for _, tc := range tests {
		for _, frag := range []int{1 << 14, 1} {
			if tc.inOneRecord && frag == 1 {
				continue
			}
			t.Run(fmt.Sprintf("%s/records of %d", tc.name, frag), func(t *testing.T) {
				t.Parallel()
				client, server := tcpPair(t)
				s := newSealer(t, key)
				go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
				c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key))
				require.NoError(t, err)
				require.True(t, c.ECHAccepted())
				first := readMessage(t, c)
				require.Equal(t, byte(1), first[0])

				_, err = c.Write(hrrRecord())
				require.NoError(t, err)
				go client.Write(append(slices.Clone(ccsRecord), records(tc.second(s), frag)...))

				var hdr [6]byte
				_, err = io.ReadFull(c, hdr[:])
				require.NoError(t, err)
				require.Equal(t, ccsRecord, hdr[:], "change_cipher_spec passes through")
				if tc.err == nil {
					second := readMessage(t, c)
					assert.Equal(t, byte(1), second[0])
					assert.Contains(t, string(second), innerName)
					return
				}
				_, err = c.Read(make([]byte, 100))
				require.ErrorIs(t, err, tc.err)
				var ae tls.AlertError
				require.ErrorAs(t, err, &ae)
				assert.Equal(t, tls.AlertError(tc.alert), ae)
				_, again := c.Read(make([]byte, 100))
				assert.Equal(t, err, again, "the handshake stays failed")
				server.Close()
				got := readAll(t, client)
				require.Equal(t, hrrRecord(), got[:len(hrrRecord())])
				assert.Equal(t, alertRecord(tc.alert), got[len(hrrRecord()):])
			})
		}
	}
}

// TestSecondHelloTimeout checks that the wait for a second ClientHello
// after a HelloRetryRequest is bounded by NewConn's deadline (here
// WithHandshakeTimeout), and that the bound is lifted once the hello is
// through.
func TestSecondHelloTimeout(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	const timeout = 300 * time.Millisecond
	// hrr runs NewConn on an accepted hello, reads its inner hello and
	// answers with a HelloRetryRequest.
	hrr := func(t *testing.T) (client net.Conn, c *ech.Conn, s *sealer) {
		client, server := tcpPair(t)
		s = newSealer(t, key)
		go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
		c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key), ech.WithHandshakeTimeout(timeout))
		require.NoError(t, err)
		require.True(t, c.ECHAccepted())
		readMessage(t, c)
		_, err = c.Write(hrrRecord())
		require.NoError(t, err)
		return client, c, s
	}
	t.Run("client never sends it", func(t *testing.T) {
		t.Parallel()
		client, c, _ := hrr(t)
		go client.Write(ccsRecord) // a change_cipher_spec, then nothing
		errs := make(chan error, 1)
		go func() {
			_, err := io.ReadFull(c, make([]byte, len(ccsRecord)))
			if err == nil {
				_, err = c.Read(make([]byte, 100))
			}
			errs <- err
		}()
		select {
		case err := <-errs:
			require.ErrorIs(t, err, os.ErrDeadlineExceeded)
			assert.True(t, strings.HasPrefix(err.Error(), "ech: "), "error %q starts with ech:", err)
			var ne net.Error
			require.ErrorAs(t, err, &ne)
			assert.True(t, ne.Timeout())
			// The handshake is over: later reads fail at once, and do
			// not look like a deadline to read again after.
			_, err = c.Read(make([]byte, 1))
			require.ErrorIs(t, err, context.DeadlineExceeded)
			assert.NotErrorIs(t, err, os.ErrDeadlineExceeded)
		case <-time.After(testTimeout):
			t.Fatal("Read waited for the second ClientHello past the handshake timeout")
		}
	})
	t.Run("bound lifted after it", func(t *testing.T) {
		t.Parallel()
		client, c, s := hrr(t)
		go client.Write(records(s.seal(baseOuter(), baseInner(), nil, 7), 1<<14))
		second := readMessage(t, c)
		assert.Contains(t, string(second), innerName)
		time.Sleep(2 * timeout) // past NewConn's deadline
		go client.Write([]byte("x"))
		_, err := c.Read(make([]byte, 1))
		require.NoError(t, err, "the handshake timeout no longer applies")
	})
	t.Run("an earlier deadline of the caller wins", func(t *testing.T) {
		t.Parallel()
		_, c, _ := hrr(t)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(-time.Second)))
		_, err := c.Read(make([]byte, 1))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	})
}

// TestSecondHelloAfterRejection checks that after a first hello that did not
// decrypt, the second hello passes through untouched (RFC 9849,
// Section 7.1.1).
func TestSecondHelloAfterRejection(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	other, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	client, server := tcpPair(t)
	s := newSealer(t, other) // same config_id, key the server lacks
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
	c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key))
	require.NoError(t, err)
	require.Equal(t, ech.StatusRejected, c.Status())
	assert.Equal(t, publicName, c.ServerName())
	readMessage(t, c)
	_, err = c.Write(hrrRecord())
	require.NoError(t, err)
	second := records(s.seal(baseOuter(), baseInner(), nil, 7), 1<<14)
	go client.Write(second)
	got := make([]byte, len(second))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	assert.Equal(t, second, got)
}

// fragmenter re-frames the client's first flight (its ClientHello) into
// records of at most size bytes.
type fragmenter struct {
	net.Conn
	size int
	done bool
}

func (f *fragmenter) Write(p []byte) (int, error) {
	if f.done {
		return f.Conn.Write(p)
	}
	f.done = true
	var msg []byte
	for rest := p; len(rest) >= 5; {
		n := int(rest[3])<<8 | int(rest[4])
		msg = append(msg, rest[5:5+n]...)
		rest = rest[5+n:]
	}
	if _, err := f.Conn.Write(records(msg, f.size)); err != nil {
		return 0, err
	}
	return len(p), nil
}

func TestFragmentedClientHello(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet)
	for _, size := range []int{1, 2, 100, 600} {
		t.Run(fmt.Sprintf("records of %d", size), func(t *testing.T) {
			raw, err := net.Dial("tcp", srv.Addr)
			require.NoError(t, err)
			conn := &fragmenter{Conn: raw, size: size}
			state, greeting, err := clientHandshake(conn, srv.ClientConfig(innerName))
			require.NoError(t, err)
			assert.True(t, state.ECHAccepted)
			assert.Equal(t, "hello "+innerName, greeting)
			assert.Equal(t, ech.StatusAccepted, srv.ConnInfo(t, conn).Status)
		})
	}
}

func TestInnerHelloOver16KiB(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet, echtest.WithBackendConfig(func(c *tls.Config) { c.NextProtos = []string{"proto-0999"} }))
	cfg := srv.ClientConfig(innerName)
	for i := range 1000 {
		cfg.NextProtos = append(cfg.NextProtos, fmt.Sprintf("proto-%04d", i))
	}
	conn, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	state := conn.ConnectionState()
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, "proto-0999", state.NegotiatedProtocol)
	assert.Equal(t, "hello "+innerName, greeting(t, conn))
	r := srv.ConnInfo(t, conn)
	require.NoError(t, r.Err)
	assert.Len(t, r.ALPN, 1000)
	assert.Equal(t, "proto-0999", r.NegotiatedProtocol)
}

func TestALPN(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet, echtest.WithBackendConfig(func(c *tls.Config) { c.NextProtos = []string{"h2", "http/1.1"} }))
	cfg := srv.ClientConfig(innerName)
	cfg.NextProtos = []string{"h2", "http/1.1"}
	conn, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	assert.Equal(t, "hello "+innerName, greeting(t, conn))
	assert.Equal(t, "h2", conn.ConnectionState().NegotiatedProtocol)
	r := srv.ConnInfo(t, conn)
	assert.Equal(t, []string{"h2", "http/1.1"}, r.ALPN)
	assert.Equal(t, "h2", r.NegotiatedProtocol)
}

// TestRouting routes two inner names to two backends, each a crypto/tls
// server with its own certificate, by proxying the Conn's bytes.
func TestRouting(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	names := []string{"mail.example", "web.example"}
	backends := map[string]string{}
	for _, name := range names {
		backends[name] = tlsBackend(t, &tls.Config{Certificates: []tls.Certificate{ca.Certificate(name)}}, func(c net.Conn) {
			fmt.Fprintf(c, "backend %s\n", name)
		})
	}
	srv := echtest.NewPassthroughServer(t, func(c *ech.Conn) {
		if c.ECHAccepted() {
			proxy(c, backends[c.ServerName()])
		}
	}, echtest.WithCA(ca))
	for _, name := range names {
		conn := srv.Dial(t, name)
		state := conn.ConnectionState()
		assert.True(t, state.ECHAccepted)
		assert.Equal(t, "backend "+name, greeting(t, conn))
		assert.Equal(t, name, state.PeerCertificates[0].Subject.CommonName)
	}
}

func TestConcurrentHandshakes(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, greet)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			name := innerName
			cfg := srv.ClientConfig(name)
			if i%4 == 3 {
				cfg.EncryptedClientHelloConfigList = nil // some clients without ECH
			}
			conn, err := net.DialTimeout("tcp", srv.Addr, testTimeout)
			if err != nil {
				errs <- err
				return
			}
			state, greeting, err := clientHandshake(conn, cfg)
			switch {
			case err != nil:
				errs <- err
			case greeting != "hello "+name:
				errs <- fmt.Errorf("greeting %q", greeting)
			case state.ECHAccepted != (i%4 != 3):
				errs <- fmt.Errorf("client %d: ECHAccepted %v", i, state.ECHAccepted)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	accepted := 0
	for _, r := range srv.WaitConns(t, n) {
		require.NoError(t, r.Err)
		if r.Status == ech.StatusAccepted {
			accepted++
		}
	}
	assert.Equal(t, n-n/4, accepted)
}

func TestNewConnBounded(t *testing.T) {
	t.Parallel()
	ks := echtest.NewKeySet(t, publicName)
	t.Run("context cancel ends a silent client", func(t *testing.T) {
		t.Parallel()
		_, server := tcpPair(t)
		ctx, cancel := context.WithCancel(t.Context())
		time.AfterFunc(50*time.Millisecond, cancel)
		start := time.Now()
		_, err := ech.NewConn(ctx, server, ech.WithKeySet(ks))
		require.ErrorIs(t, err, context.Canceled)
		assert.Less(t, time.Since(start), 5*time.Second)
	})
	t.Run("context deadline ends a slow client", func(t *testing.T) {
		t.Parallel()
		client, server := tcpPair(t)
		go client.Write([]byte{22, 3, 1, 0}) // half a record header, then nothing
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		_, err := ech.NewConn(ctx, server, ech.WithKeySet(ks))
		require.ErrorIs(t, err, context.DeadlineExceeded)
	})
	t.Run("handshake timeout without a context deadline", func(t *testing.T) {
		t.Parallel()
		_, server := tcpPair(t)
		_, err := ech.NewConn(context.Background(), server, ech.WithKeySet(ks), ech.WithHandshakeTimeout(50*time.Millisecond))
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout())
	})
	t.Run("client closes mid-hello", func(t *testing.T) {
		t.Parallel()
		client, server := tcpPair(t)
		msg := records(baseOuter().message(), 1<<14)
		client.Write(msg[:len(msg)/2])
		client.Close()
		_, err := ech.NewConn(t.Context(), server, ech.WithKeySet(ks))
		require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	})
	t.Run("deadlines cleared after NewConn", func(t *testing.T) {
		t.Parallel()
		client, server := tcpPair(t)
		go client.Write(records(baseOuter().message(), 1<<14))
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		c, err := ech.NewConn(ctx, server, ech.WithKeySet(ks))
		require.NoError(t, err)
		readMessage(t, c)
		time.Sleep(150 * time.Millisecond) // past the context's deadline
		go client.Write([]byte("x"))
		var b [1]byte
		_, err = c.Read(b[:])
		require.NoError(t, err, "the context deadline no longer applies")
	})
}

// TestNoKeys checks that NewConn without keys fails at the call, before it
// reads anything, rather than refusing every hello's ECH in silence.
func TestNoKeys(t *testing.T) {
	t.Parallel()
	for name, opts := range map[string][]ech.Option{
		"no key option":   nil,
		"WithKeys()":      {ech.WithKeys()},
		"nil WithKeySet":  {ech.WithKeySet(nil)},
		"only the logger": {ech.WithLogger(slog.New(slog.DiscardHandler))},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			client, server := tcpPair(t)
			c, err := ech.NewConn(t.Context(), server, opts...)
			require.ErrorIs(t, err, ech.ErrNoKeys)
			assert.Nil(t, c)
			assert.True(t, strings.HasPrefix(err.Error(), "ech: "), "error %q starts with ech:", err)
			server.Close()
			assert.Empty(t, readAll(t, client), "no alert: the client was not at fault")
		})
	}
	// An empty KeySet is a key option: keys may be added later.
	client, server := tcpPair(t)
	go client.Write(records(baseOuter().message(), 1<<14))
	ks, err := ech.NewKeySet()
	require.NoError(t, err)
	c, err := ech.NewConn(t.Context(), server, ech.WithKeySet(ks))
	require.NoError(t, err)
	assert.Equal(t, ech.StatusNotOffered, c.Status())
}

// TestNoAllocsAfterHandshake checks that once the handshake messages are
// through (the server's ServerHello written, for an accepted hello), Read
// and Write are direct calls on the wrapped conn.
func TestNoAllocsAfterHandshake(t *testing.T) {
	key, err := ech.GenerateKey(publicName, nil)
	require.NoError(t, err)
	s := newSealer(t, key)
	serverHello := hrrRecord()
	serverHello[11] ^= 0xff // not the HelloRetryRequest random
	for _, accepted := range []bool{false, true} {
		t.Run(map[bool]string{false: "not offered", true: "accepted"}[accepted], func(t *testing.T) {
			client, server := tcpPair(t)
			hello := baseOuter().message()
			if accepted {
				hello = s.seal(baseOuter(), baseInner(), s.enc, key.Config[4])
			}
			go client.Write(records(hello, 1<<14))
			c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key))
			require.NoError(t, err)
			require.Equal(t, accepted, c.ECHAccepted())
			readMessage(t, c)
			_, err = c.Write(serverHello)
			require.NoError(t, err)
			go func() {
				io.ReadFull(client, make([]byte, len(serverHello)))
				io.Copy(client, client) // echo
			}()
			buf := make([]byte, 64)
			allocs := testing.AllocsPerRun(100, func() {
				if _, err := c.Write(buf); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					t.Fatal(err)
				}
			})
			assert.Zero(t, allocs)
		})
	}
}

// TestKeysTriedPerHello checks the cap on trial decryption: of several keys
// sharing a config_id, only the first MaxKeysPerHello are tried.
func TestKeysTriedPerHello(t *testing.T) {
	t.Parallel()
	var keys []ech.Key
	for range ech.MaxKeysPerHello + 1 {
		k, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 9})
		require.NoError(t, err)
		keys = append(keys, k)
	}
	ks, err := ech.NewKeySet(keys...)
	require.NoError(t, err)
	for i, k := range keys {
		client, server := tcpPair(t)
		s := newSealer(t, k)
		go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 9), 1<<14))
		c, err := ech.NewConn(t.Context(), server, ech.WithKeySet(ks))
		require.NoError(t, err)
		want := ech.StatusAccepted
		if i >= ech.MaxKeysPerHello {
			want = ech.StatusRejected
		}
		assert.Equal(t, want, c.Status(), "key %d", i)
	}
}

// TestWithKeysParsesOnlyCandidates checks that WithKeys parses only the
// keys a hello may decrypt with (config_id and suite match): a broken key
// that is no candidate costs nothing and is not reported; one that is a
// candidate is.
func TestWithKeysParsesOnlyCandidates(t *testing.T) {
	t.Parallel()
	good, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	// broken returns a key whose private key is another's.
	broken := func(opts *ech.KeyOptions) ech.Key {
		k, err := ech.GenerateKey(publicName, opts)
		require.NoError(t, err)
		k.PrivateKey = good.PrivateKey
		return k
	}
	otherID := broken(&ech.KeyOptions{ConfigID: 8})
	otherSuite := broken(&ech.KeyOptions{ConfigID: 7, CipherSuites: []ech.CipherSuite{{KDF: ech.KDFHKDFSHA384, AEAD: ech.AEADChaCha20Poly1305}}})
	keys := ech.WithKeys(otherID, otherSuite, good)

	client, server := tcpPair(t)
	s := newSealer(t, good)
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
	c, err := ech.NewConn(t.Context(), server, keys)
	require.NoError(t, err)
	assert.Equal(t, ech.StatusAccepted, c.Status())

	// A hello naming config_id 8 makes the broken key a candidate.
	client, server = tcpPair(t)
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 8), 1<<14))
	_, err = ech.NewConn(t.Context(), server, keys)
	require.ErrorIs(t, err, ech.ErrInvalidKey)
	server.Close()
	assert.Equal(t, alertRecord(80), readAll(t, client), "internal_error")
}

func TestLogger(t *testing.T) {
	t.Parallel()
	var buf strings.Builder
	var mu sync.Mutex
	logger := slog.New(slog.NewJSONHandler(&lockedWriter{w: &buf, mu: &mu}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	s := newSealer(t, key)
	client, server := tcpPair(t)
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
	_, err = ech.NewConn(t.Context(), server, ech.WithKeys(key), ech.WithLogger(logger))
	require.NoError(t, err)
	client2, server2 := tcpPair(t)
	go client2.Write([]byte{22, 3, 1, 0, 0})
	_, err = ech.NewConn(t.Context(), server2, ech.WithKeys(key), ech.WithLogger(logger))
	require.Error(t, err)
	mu.Lock()
	out := buf.String()
	mu.Unlock()
	assert.Contains(t, out, `"ech":"accepted"`)
	assert.Contains(t, out, `"config_id":7`)
	assert.Contains(t, out, `"sni":"secret.example"`)
	assert.Contains(t, out, `"outer_sni":"public.example"`)
	assert.Contains(t, out, `ClientHello refused`)
	assert.NotContains(t, out, fmt.Sprintf("%x", key.PrivateKey[:8]))
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestSecondHelloCut checks a stream that ends, or carries another record,
// inside a fragmented second ClientHello.
func TestSecondHelloCut(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	for _, tc := range []struct {
		name  string
		tail  []byte // after the first record of the second hello
		err   error
		alert []byte
	}{
		{"end of stream", nil, io.ErrUnexpectedEOF, nil},
		{"alert record", []byte{21, 3, 3, 0, 2, 1, 0}, ech.ErrUnexpectedMessage, alertRecord(alertUnexpectedMessage)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			client, server := tcpPair(t)
			s := newSealer(t, key)
			go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, 7), 1<<14))
			c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key))
			require.NoError(t, err)
			readMessage(t, c)
			_, err = c.Write(hrrRecord())
			require.NoError(t, err)
			second := records(s.seal(baseOuter(), baseInner(), nil, 7), 100)
			go func() {
				client.Write(append(second[:105:105], tc.tail...))
				if tc.tail == nil {
					client.(*net.TCPConn).CloseWrite()
				}
			}()
			_, err = c.Read(make([]byte, 100))
			require.ErrorIs(t, err, tc.err)
			server.Close()
			got := readAll(t, client)
			assert.Equal(t, append(hrrRecord(), tc.alert...), got)
		})
	}
}

// TestConcurrentReadsAndWrites uses a Conn from several goroutines during
// the handshake, as net.Conn allows; the race detector checks it.
func TestConcurrentReadsAndWrites(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, nil)
	require.NoError(t, err)
	client, server := tcpPair(t)
	s := newSealer(t, key)
	go client.Write(records(s.seal(baseOuter(), baseInner(), s.enc, key.Config[4]), 1<<14))
	c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key))
	require.NoError(t, err)
	go io.Copy(io.Discard, client)
	go client.Write(make([]byte, 4096))
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			c.Write(hrrRecord()[:20])
			c.Read(make([]byte, 64))
		})
	}
	wg.Wait()
}

func TestPublicNameCheckIgnoresCase(t *testing.T) {
	t.Parallel()
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	for _, name := range []string{"Public.Example", "public.example."} {
		client, server := tcpPair(t)
		s := newSealer(t, key)
		outer := baseOuter()
		outer.set(tSNI, sniExt(name))
		go client.Write(records(s.seal(outer, baseInner(), s.enc, 7), 1<<14))
		c, err := ech.NewConn(t.Context(), server, ech.WithKeys(key), ech.WithPublicNameCheck(true))
		require.NoError(t, err, name)
		assert.True(t, c.ECHAccepted(), name)
	}
}

// cancelOnClear cancels a context when NewConn clears the deadline, the
// latest moment a context can end inside NewConn.
type cancelOnClear struct {
	net.Conn
	cancel context.CancelFunc
}

func (c *cancelOnClear) SetDeadline(t time.Time) error {
	if t.IsZero() {
		c.cancel()
	}
	return c.Conn.SetDeadline(t)
}

// TestNoDeadlineLeftBehind checks that a context ending as NewConn returns
// does not leave a past deadline on the returned Conn.
func TestNoDeadlineLeftBehind(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	go client.Write(records(baseOuter().message(), 1<<14))
	ctx, cancel := context.WithCancel(t.Context())
	c, err := ech.NewConn(ctx, &cancelOnClear{Conn: server, cancel: cancel}, ech.WithKeySet(echtest.NewKeySet(t, publicName)))
	require.NoError(t, err)
	readMessage(t, c)
	go client.Write([]byte("x"))
	_, err = c.Read(make([]byte, 1))
	require.NoError(t, err)
}

// TestProxyCopy proxies a Conn to a crypto/tls backend with io.Copy both
// ways (so through WriteTo and ReadFrom), with a HelloRetryRequest, and
// echoes 1 MiB through it.
func TestProxyCopy(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	backend := tlsBackend(t, &tls.Config{
		Certificates:     []tls.Certificate{ca.Certificate(innerName)},
		CurvePreferences: []tls.CurveID{tls.CurveP256}, // forces a HelloRetryRequest
	}, func(c net.Conn) { io.Copy(c, c) }) // echo
	srv := echtest.NewPassthroughServer(t, func(c *ech.Conn) { proxy(c, backend) }, echtest.WithCA(ca))
	conn := srv.Dial(t, innerName)
	state := conn.ConnectionState()
	require.True(t, state.ECHAccepted)
	require.True(t, state.HelloRetryRequest)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	go func() {
		conn.Write(data)
		conn.CloseWrite()
	}()
	conn.SetReadDeadline(time.Now().Add(testTimeout))
	got, err := io.ReadAll(conn)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, got), "1 MiB echoed intact")
}

// tlsBackend starts a crypto/tls server on loopback that runs handle on each
// connection, and returns its address.
func tlsBackend(t testing.TB, cfg *tls.Config, handle func(net.Conn)) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

// proxy copies c to and from a new connection to addr, with io.Copy both
// ways (so through Conn's WriteTo and ReadFrom).
func proxy(c *ech.Conn, addr string) {
	b, err := net.Dial("tcp", addr)
	if err != nil {
		return
	}
	defer b.Close()
	go func() { io.Copy(b, c); b.(*net.TCPConn).CloseWrite() }()
	io.Copy(c, b)
}

// countingReader signals done once n bytes have been read from the conn.
type countingReader struct {
	net.Conn
	n    int
	done chan struct{}
}

func (c *countingReader) Read(p []byte) (int, error) {
	m, err := c.Conn.Read(p)
	if c.n -= m; c.n <= 0 && m > 0 {
		close(c.done)
	}
	return m, err
}

// TestPendingHelloMemory measures the heap NewConn holds per connection
// while it waits for the rest of a ClientHello: a client that sent only a
// record header (announcing 2^14 bytes) must cost under 4 KiB, one that sent
// all of a hello but its last byte under 1.5 times the hello's size, or
// 4 KiB for a small hello, where the Conn and the context's callback weigh
// more than the hello. It holds many pending NewConn calls over loopback
// and reads the heap of the process, less what the same number of
// goroutines blocked in a plain read of the conn hold. It is not parallel,
// so no other test allocates meanwhile.
func TestPendingHelloMemory(t *testing.T) {
	ks := echtest.NewKeySet(t, publicName)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	small, medium, large := helloOfSize(t, list, 0), helloOfSize(t, list, 16<<10), helloOfSize(t, list, 60<<10)
	header := []byte{22, 3, 1, 0x40, 0}
	newConn := func(t *testing.T, c net.Conn) {
		_, err := ech.NewConn(t.Context(), c, ech.WithKeySet(ks))
		assert.Error(t, err)
	}
	// The harness alone: a goroutine blocked reading the conn under a
	// deadline, as NewConn does.
	plainRead := func(t *testing.T, c net.Conn) {
		c.SetDeadline(time.Now().Add(time.Hour))
		var b [recordHeaderLen]byte
		io.ReadFull(c, b[:])
		c.Read(b[:])
	}
	pendingHeap(t, header, plainRead) // the goroutines, made once, then reused
	base := pendingHeap(t, header, plainRead)
	tests := []struct {
		name  string
		sent  []byte
		limit float64
	}{
		{"record header only", header, 4 << 10},
		{"Go's hello but its last byte", small[:len(small)-1], max(4<<10, 1.5*float64(len(small)))},
		{"16 KiB hello but its last byte", medium[:len(medium)-1], 1.5 * float64(len(medium))},
		{"60 KiB hello but its last byte", large[:len(large)-1], 1.5 * float64(len(large))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			perConn := pendingHeap(t, tc.sent, newConn) - base
			t.Logf("sent %d bytes: NewConn holds %.0f B of heap (limit %.0f; the harness %.0f B)",
				len(tc.sent), perConn, tc.limit, base)
			assert.Less(t, perConn, tc.limit)
		})
	}
}

const recordHeaderLen = 5

// pendingHeap returns the heap held per connection by pending calls of fn
// on conns whose client sent the bytes sent.
func pendingHeap(t *testing.T, sent []byte, fn func(*testing.T, net.Conn)) float64 {
	const n = 64
	conns := make([]*countingReader, n)
	for i := range conns {
		client, server := tcpPair(t)
		go client.Write(sent)
		conns[i] = &countingReader{Conn: server, n: len(sent), done: make(chan struct{})}
	}
	// Two collections empty the sync.Pools, so that every buffer held
	// is counted.
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { fn(t, c) })
	}
	for _, c := range conns {
		select {
		case <-c.done:
		case <-time.After(testTimeout):
			t.Fatal("the client's bytes were not read")
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	for _, c := range conns {
		c.Close()
	}
	wg.Wait()
	return float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / n
}
