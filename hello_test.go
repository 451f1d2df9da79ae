package ech

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// firstHello returns the first handshake message of a recorded client
// stream, reassembled from its records.
func firstHello(t testing.TB, stream []byte) []byte {
	t.Helper()
	var msg []byte
	for len(stream) >= recordHeaderLen {
		n := int(stream[3])<<8 | int(stream[4])
		require.LessOrEqual(t, recordHeaderLen+n, len(stream))
		msg = append(msg, stream[recordHeaderLen:recordHeaderLen+n]...)
		stream = stream[recordHeaderLen+n:]
		if len(msg) >= handshakeHeaderLen && len(msg) >= handshakeHeaderLen+(int(msg[1])<<16|int(msg[2])<<8|int(msg[3])) {
			break
		}
	}
	return msg
}

func recordedHellos(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/recordings/*.c2s.bin")
	require.NoError(t, err)
	require.NotEmpty(t, files, "recordings in testdata/recordings")
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		out[filepath.Base(f)] = firstHello(t, b)
	}
	return out
}

func TestParseRecordedHellos(t *testing.T) {
	for name, msg := range recordedHellos(t) {
		t.Run(name, func(t *testing.T) {
			ch := new(clientHello)
			require.NoError(t, parseClientHello(ch, msg[handshakeHeaderLen:]))
			assert.Equal(t, "public.example", string(ch.serverName))
			require.True(t, ch.hasECH)
			typ, e, err := parseECHExtension(ch.ech)
			require.NoError(t, err)
			assert.Equal(t, echTypeOuter, typ)
			if !strings.Contains(name, "grease") {
				assert.Equal(t, uint8(0x2a), e.configID)
			}
			assert.NotEmpty(t, e.payload)
		})
	}
}

// TestParseTruncatedHellos checks that every strict prefix of a recorded
// hello body fails to parse, cleanly, except the one that ends right before
// the extensions: that is a valid ClientHello without extensions.
func TestParseTruncatedHellos(t *testing.T) {
	for name, msg := range recordedHellos(t) {
		body := msg[handshakeHeaderLen:]
		full := new(clientHello)
		require.NoError(t, parseClientHello(full, body))
		noExts := 2 + 32 + 1 + len(full.sessionID) + 2 + len(full.cipherSuites) + 1 + len(full.compression)
		for i := range body {
			ch := new(clientHello)
			err := parseClientHello(ch, body[:i])
			if i == noExts {
				require.NoError(t, err, "%s: hello without extensions", name)
				assert.Empty(t, ch.exts)
				continue
			}
			require.ErrorIs(t, err, ErrDecodeError, "%s: prefix of %d bytes", name, i)
		}
	}
}

func TestExtensionSet(t *testing.T) {
	var s extensionSet
	for _, typ := range []uint16{0, 1, 63, 64, 0xfe0d, 0xffff} {
		assert.False(t, s.add(typ), "first 0x%04x", typ)
		assert.True(t, s.add(typ), "second 0x%04x", typ)
	}
}

// FuzzParseClientHello feeds arbitrary bytes to the ClientHello parser and
// to the inner hello decoder, as a body and as an EncodedClientHelloInner
// against each recorded outer hello.
func FuzzParseClientHello(f *testing.F) {
	hellos := recordedHellos(f)
	var outers []*clientHello
	for _, msg := range hellos {
		f.Add(msg[handshakeHeaderLen:])
		ch := new(clientHello)
		require.NoError(f, parseClientHello(ch, msg[handshakeHeaderLen:]))
		outers = append(outers, ch)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if ch := new(clientHello); parseClientHello(ch, b) == nil {
			ch.alpn()
			ch.offersOnlyTLS13()
			if ch.hasECH {
				parseECHExtension(ch.ech)
			}
		}
		for _, outer := range outers {
			var enc, inner clientHello
			out, err := appendInnerHello(nil, outer, b, &enc, &inner)
			if err != nil {
				continue
			}
			// A rebuilt hello is a well-formed ClientHello with an inner
			// ECH extension.
			again := new(clientHello)
			require.NoError(t, parseClientHello(again, out[handshakeHeaderLen:]))
			require.Equal(t, inner.serverName, again.serverName)
			require.True(t, again.hasECH)
		}
	})
}
