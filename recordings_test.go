package ech_test

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// TLS codepoints the recording tests read on the wire (RFC 8446, RFC 9849).
const (
	recTypeChangeCipherSpec uint8 = 20
	recTypeHandshake        uint8 = 22

	recHandshakeClientHello uint8 = 1
	recHandshakeServerHello uint8 = 2
	recHandshakeMessageHash uint8 = 254

	recExtServerName uint16 = 0
	recExtALPN       uint16 = 16
	recExtECH        uint16 = 0xfe0d

	recECHTypeOuter uint8 = 0
	recECHTypeInner uint8 = 1

	recHeaderLen          = 5
	recHandshakeHeaderLen = 4
)

// recordingsDir holds handshakes recorded from independent clients (see
// its README.md).
var recordingsDir = filepath.Join("testdata", "recordings")

// recordingConfigID is the config_id of the recordings' key.
const recordingConfigID uint8 = 0x2a

// recordingCase is what a recorded handshake must give.
type recordingCase struct {
	status ech.Status
	hrr    bool     // the server answered with a HelloRetryRequest
	alpn   []string // ALPN of the hello the Conn replays
}

// recordingCases covers every NAME.c2s.bin in testdata/recordings;
// TestRecordings fails on a recording missing here.
var recordingCases = map[string]recordingCase{
	"bssl-tool_basic":       {status: ech.StatusAccepted, alpn: []string{"h2", "http/1.1"}},
	"bssl-tool_hrr":         {status: ech.StatusAccepted, hrr: true},
	"bssl-tool_grease":      {status: ech.StatusRejected},
	"nss-tstclnt_basic":     {status: ech.StatusAccepted},
	"nss-tstclnt_hrr":       {status: ech.StatusAccepted, hrr: true},
	"nss-tstclnt_grease":    {status: ech.StatusRejected},
	"utls-chrome120":        {status: ech.StatusAccepted, alpn: []string{"h2", "http/1.1"}},
	"utls-chrome133":        {status: ech.StatusAccepted, alpn: []string{"h2", "http/1.1"}},
	"utls-firefox120":       {status: ech.StatusAccepted, alpn: []string{"h2", "http/1.1"}},
	"gostd-cryptotls_basic": {status: ech.StatusAccepted, alpn: []string{"h2"}},
}

// recordingNames returns the names of the recordings in testdata/recordings.
func recordingNames(t testing.TB) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(recordingsDir, "*.c2s.bin"))
	require.NoError(t, err)
	require.NotEmpty(t, files, "no recordings in %s", recordingsDir)
	names := make([]string, 0, len(files))
	for _, f := range files {
		names = append(names, strings.TrimSuffix(filepath.Base(f), ".c2s.bin"))
	}
	return names
}

// readRecording returns the client's and the server's bytes of a recording.
func readRecording(t testing.TB, name string) (c2s, s2c []byte) {
	t.Helper()
	c2s, err := os.ReadFile(filepath.Join(recordingsDir, name+".c2s.bin"))
	require.NoError(t, err)
	s2c, err = os.ReadFile(filepath.Join(recordingsDir, name+".s2c.bin"))
	require.NoError(t, err)
	return c2s, s2c
}

// recordingKeySet returns a KeySet holding the recordings' key, read from
// its RFC 9934 PEM file.
func recordingKeySet(t testing.TB) *ech.KeySet {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(recordingsDir, "ech.pem"))
	require.NoError(t, err)
	f, err := ech.ParsePEM(data)
	require.NoError(t, err)
	k, err := f.Key()
	require.NoError(t, err)
	ks, err := ech.NewKeySet(k)
	require.NoError(t, err)
	return ks
}

// TestRecordingsKeyFiles checks that the recordings' key files agree: the PEM
// file holds the raw key, the raw config and the config list.
func TestRecordingsKeyFiles(t *testing.T) {
	t.Parallel()
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(recordingsDir, name))
		require.NoError(t, err)
		return b
	}
	f, err := ech.ParsePEM(read("ech.pem"))
	require.NoError(t, err)
	k, err := f.Key()
	require.NoError(t, err)
	assert.Equal(t, read("ech.key"), k.PrivateKey)
	assert.Equal(t, read("ech.config"), k.Config)
	assert.Equal(t, read("ech.configlist"), []byte(f.ConfigList))

	ks, err := ech.NewKeySet(ech.Key{Config: read("ech.config"), PrivateKey: read("ech.key")})
	require.NoError(t, err)
	assert.Equal(t, []uint8{recordingConfigID}, ks.ConfigIDs())
	list, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, read("ech.configlist"), []byte(list))
}

// TestRecordings feeds each recorded client byte stream through NewConn,
// plays the recorded server's first flight back through the Conn's Write,
// and checks what the Conn replays: the rebuilt ClientHelloInner (both of
// them after a HelloRetryRequest) or, for GREASE, the ClientHelloOuter as
// sent, then the rest of the client's bytes unchanged.
//
// The recorded server was crypto/tls in shared mode: it confirmed ECH
// acceptance with a hash of the inner hellos it rebuilt (RFC 9849, Section
// 7.2), and the client went on with the handshake. Recomputing that
// confirmation from the hellos the Conn replays proves them byte for byte
// equal to the client's own ClientHelloInner.
func TestRecordings(t *testing.T) {
	t.Parallel()
	ks := recordingKeySet(t)
	for _, name := range recordingNames(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			tc, ok := recordingCases[name]
			require.True(t, ok, "recording %s has no entry in recordingCases", name)
			c2s, s2c := readRecording(t, name)
			t.Run("as_recorded", func(t *testing.T) {
				t.Parallel()
				testRecording(t, ks, tc, c2s, s2c, false)
			})
			t.Run("fragmented", func(t *testing.T) {
				t.Parallel()
				testRecording(t, ks, tc, fragmentHandshakeRecords(t, c2s, 100), s2c, true)
			})
		})
	}
	for name := range recordingCases {
		_, err := os.Stat(filepath.Join(recordingsDir, name+".c2s.bin"))
		assert.NoError(t, err, "recordingCases names a missing recording")
	}
}

// testRecording runs one recording. With fragmented, the client's
// handshake records have been split (see fragmentHandshakeRecords) and the
// server's first flight is written in small pieces.
func testRecording(t *testing.T, ks *ech.KeySet, tc recordingCase, c2s, s2c []byte, fragmented bool) {
	client := bytes.NewReader(c2s)
	hello1, hello1Raw, err := readHandshakeMsg(client)
	require.NoError(t, err, "recorded client stream")
	server := bytes.NewReader(s2c)
	flight1, flight1Raw, err := readHandshakeMsg(server)
	require.NoError(t, err, "recorded server stream")

	conn := newRecordedConn(c2s)
	c, err := ech.NewConn(t.Context(), conn, ech.WithKeySet(ks))
	require.NoError(t, err)
	assert.Equal(t, tc.status, c.Status())
	assert.Equal(t, tc.status == ech.StatusAccepted, c.ECHAccepted())
	assert.True(t, c.ECHPresented())
	assert.Equal(t, publicName, c.OuterServerName())
	id, presented := c.ConfigID()
	assert.True(t, presented)

	replayed1, replayed1Raw, err := readHandshakeMsg(c)
	require.NoError(t, err, "replayed ClientHello")
	h1 := parseRecordedHello(t, replayed1)
	assert.Equal(t, h1.alpn, c.ALPNProtos(), "ALPNProtos describes the replayed hello")
	assert.Equal(t, tc.alpn, c.ALPNProtos())

	if tc.status != ech.StatusAccepted {
		// GREASE: the outer hello goes on as the client sent it.
		assert.Equal(t, hello1, replayed1, "the replay is the ClientHelloOuter")
		if !fragmented {
			assert.Equal(t, hello1Raw, replayed1Raw, "the replay keeps the client's record")
		}
		assert.Equal(t, publicName, c.ServerName())
		assert.Equal(t, publicName, h1.serverName)
		assert.Equal(t, int(recECHTypeOuter), h1.echType)
		assert.Equal(t, h1.echConfigID, id)
		assert.NotEqual(t, recordingConfigID, id, "GREASE names a config_id the key set lacks")
	} else {
		assert.Equal(t, recordingConfigID, id)
		assert.Equal(t, innerName, c.ServerName())
		checkInnerHello(t, h1)
	}

	// The backend answers: its first flight goes to the client unchanged.
	chunk := len(flight1Raw)
	if fragmented {
		chunk = 7
	}
	for p := flight1Raw; len(p) > 0; {
		n, err := c.Write(p[:min(chunk, len(p))])
		require.NoError(t, err)
		p = p[n:]
	}
	assert.Equal(t, flight1Raw, conn.written(), "Write passes the server's bytes through")

	sh := parseServerHello(t, flight1)
	if !tc.hrr {
		require.False(t, sh.hrr, "the recorded server did not send a HelloRetryRequest")
		if tc.status == ech.StatusAccepted {
			// RFC 9849, Section 7.2: ClientHelloInner...ServerHello.
			tr := sh.hash()
			tr.Write(replayed1)
			tr.Write(sh.zeroedConfirmation)
			assert.Equal(t, sh.confirmation, echConfirmation(sh.hash, h1.random, "ech accept confirmation", tr.Sum(nil)),
				"the ServerHello confirms ECH for the replayed ClientHelloInner")
		}
		rest, err := io.ReadAll(c)
		require.NoError(t, err)
		assert.Equal(t, c2s[len(hello1Raw):], rest, "the client's bytes after the hello pass through")
		return
	}

	require.True(t, sh.hrr, "the recorded server sent a HelloRetryRequest")
	require.NotNil(t, sh.confirmation, "the HelloRetryRequest confirms ECH")
	// RFC 9849, Section 7.2.1: message_hash(ClientHelloInner1), then the
	// HelloRetryRequest with its confirmation zeroed.
	tr := sh.hash()
	writeMessageHash(tr, sh.hash, replayed1)
	tr.Write(sh.zeroedConfirmation)
	assert.Equal(t, sh.confirmation, echConfirmation(sh.hash, h1.random, "hrr ech accept confirmation", tr.Sum(nil)),
		"the HelloRetryRequest confirms ECH for the replayed ClientHelloInner")

	// The client's records before its second hello: change_cipher_spec,
	// if the client sends one (RFC 8446, Appendix D.4).
	var preamble []byte
	for {
		typ, raw := peekRecord(t, client)
		if typ == recTypeHandshake {
			break
		}
		require.Equal(t, recTypeChangeCipherSpec, typ, "record before the second ClientHello")
		preamble = append(preamble, raw...)
		_, err := client.Seek(int64(len(raw)), io.SeekCurrent)
		require.NoError(t, err)
	}
	hello2, hello2Raw, err := readHandshakeMsg(client)
	require.NoError(t, err)
	require.Equal(t, recHandshakeClientHello, hello2[0])
	if len(preamble) > 0 {
		got := make([]byte, len(preamble))
		_, err := io.ReadFull(c, got)
		require.NoError(t, err)
		assert.Equal(t, preamble, got, "change_cipher_spec passes through")
	}
	replayed2, _, err := readHandshakeMsg(c)
	require.NoError(t, err, "replayed second ClientHello")
	require.NotEqual(t, hello2, replayed2, "the second ClientHello is decrypted")
	h2 := parseRecordedHello(t, replayed2)
	checkInnerHello(t, h2)
	assert.Equal(t, c.ALPNProtos(), h2.alpn)
	assert.Equal(t, h1.random, h2.random, "RFC 8446, Section 4.1.2: the second hello keeps the random")

	// The server's ServerHello completes the transcript over both inner
	// hellos: message_hash(CHI1), HRR, CHI2, ServerHello.
	for {
		typ, raw := peekRecord(t, server)
		if typ == recTypeHandshake {
			break
		}
		_, err := server.Seek(int64(len(raw)), io.SeekCurrent)
		require.NoError(t, err)
	}
	flight2, _, err := readHandshakeMsg(server)
	require.NoError(t, err)
	sh2 := parseServerHello(t, flight2)
	require.False(t, sh2.hrr)
	tr = sh2.hash()
	writeMessageHash(tr, sh2.hash, replayed1)
	tr.Write(flight1)
	tr.Write(replayed2)
	tr.Write(sh2.zeroedConfirmation)
	assert.Equal(t, sh2.confirmation, echConfirmation(sh2.hash, h2.random, "ech accept confirmation", tr.Sum(nil)),
		"the ServerHello confirms ECH for the replayed ClientHelloInners")

	rest, err := io.ReadAll(c)
	require.NoError(t, err)
	consumed := len(hello1Raw) + len(preamble) + len(hello2Raw)
	assert.Equal(t, c2s[consumed:], rest, "the client's bytes after the second hello pass through")
}

// fragmentHandshakeRecords returns the record stream b with each handshake
// record split into records of at most size bytes, as RFC 8446, Section
// 5.1 allows.
func fragmentHandshakeRecords(t testing.TB, b []byte, size int) []byte {
	t.Helper()
	var out []byte
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), recHeaderLen, "record header")
		n := int(b[3])<<8 | int(b[4])
		require.GreaterOrEqual(t, len(b), recHeaderLen+n, "record")
		hdr, frag := b[:recHeaderLen], b[recHeaderLen:recHeaderLen+n]
		b = b[recHeaderLen+n:]
		if hdr[0] != recTypeHandshake {
			out = append(out, hdr...)
			out = append(out, frag...)
			continue
		}
		for len(frag) > 0 {
			m := min(size, len(frag))
			out = append(out, hdr[0], hdr[1], hdr[2], byte(m>>8), byte(m))
			out = append(out, frag[:m]...)
			frag = frag[m:]
		}
	}
	return out
}

var updateRecordingSeeds = flag.Bool("update-recording-seeds", false,
	"write the fuzz seeds made from testdata/recordings (see TestRecordingsFuzzSeeds)")

// TestRecordingsFuzzSeeds keeps the fuzz seeds made from the recordings in
// step with them; -update-recording-seeds writes them. The seeds are
//
//   - testdata/fuzz/FuzzNewConn/NAME: the client's byte stream, what NewConn
//     reads;
//   - testdata/fuzz/FuzzParseClientHello/NAME.{inner,inner2,outer2}: the
//     bodies (no handshake header) of the hellos that FuzzParseClientHello
//     does not take from the recordings itself: the rebuilt
//     ClientHelloInners and, after a HelloRetryRequest, the second
//     ClientHelloOuter.
func TestRecordingsFuzzSeeds(t *testing.T) {
	ks := recordingKeySet(t)
	seeds := map[string][]byte{}
	for _, name := range recordingNames(t) {
		c2s, s2c := readRecording(t, name)
		seeds[filepath.Join("FuzzNewConn", name)] = c2s
		c, err := ech.NewConn(t.Context(), newRecordedConn(c2s), ech.WithKeySet(ks))
		require.NoError(t, err)
		if !c.ECHAccepted() {
			continue
		}
		inner, _, err := readHandshakeMsg(c)
		require.NoError(t, err)
		seeds[filepath.Join("FuzzParseClientHello", name+".inner")] = inner[recHandshakeHeaderLen:]
		server := bytes.NewReader(s2c)
		flight, flightRaw, err := readHandshakeMsg(server)
		require.NoError(t, err)
		if !parseServerHello(t, flight).hrr {
			continue
		}
		_, err = c.Write(flightRaw)
		require.NoError(t, err)
		inner2 := nextClientHello(t, c)
		seeds[filepath.Join("FuzzParseClientHello", name+".inner2")] = inner2[recHandshakeHeaderLen:]
		client := bytes.NewReader(c2s)
		_, _, err = readHandshakeMsg(client)
		require.NoError(t, err)
		outer2 := nextClientHello(t, client)
		seeds[filepath.Join("FuzzParseClientHello", name+".outer2")] = outer2[recHandshakeHeaderLen:]
	}
	for name, b := range seeds {
		path := filepath.Join("testdata", "fuzz", name)
		// The corpus file format of "go test" (testing.F).
		want := "go test fuzz v1\n[]byte(" + strconv.Quote(string(b)) + ")\n"
		if *updateRecordingSeeds {
			require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
			require.NoError(t, os.WriteFile(path, []byte(want), 0o644))
			continue
		}
		got, err := os.ReadFile(path)
		if assert.NoError(t, err, "run go test -run TestRecordingsFuzzSeeds -update-recording-seeds") {
			assert.Equal(t, want, string(got), "%s is out of date", path)
		}
	}
}

// nextClientHello reads records from r, skipping change_cipher_spec, until
// it has read a ClientHello, and returns it.
func nextClientHello(t testing.TB, r io.Reader) []byte {
	t.Helper()
	for {
		var hdr [recHeaderLen]byte
		_, err := io.ReadFull(r, hdr[:])
		require.NoError(t, err)
		if hdr[0] == recTypeChangeCipherSpec {
			_, err := io.CopyN(io.Discard, r, int64(hdr[3])<<8|int64(hdr[4]))
			require.NoError(t, err)
			continue
		}
		msg, _, err := readHandshakeMsg(io.MultiReader(bytes.NewReader(hdr[:]), r))
		require.NoError(t, err)
		require.Equal(t, recHandshakeClientHello, msg[0])
		return msg
	}
}

// checkInnerHello checks a replayed ClientHelloInner of the recordings.
func checkInnerHello(t *testing.T, h recordedHello) {
	t.Helper()
	assert.Equal(t, innerName, h.serverName)
	// RFC 9849, Section 5: the inner hello carries an inner ECH extension.
	assert.Equal(t, int(recECHTypeInner), h.echType, "ClientHelloInner has encrypted_client_hello of type inner")
}

// recordedHello is what the recording tests read from a ClientHello.
type recordedHello struct {
	random      []byte
	serverName  string
	alpn        []string
	echType     int // -1 without encrypted_client_hello
	echConfigID uint8
}

// parseRecordedHello parses a ClientHello handshake message, independently
// of the package's own parser.
func parseRecordedHello(t testing.TB, msg []byte) recordedHello {
	t.Helper()
	h := recordedHello{echType: -1}
	s := cryptobyte.String(msg)
	var typ uint8
	var body, random, sid, suites, comp, exts cryptobyte.String
	var vers uint16
	require.True(t, s.ReadUint8(&typ) && s.ReadUint24LengthPrefixed(&body) && s.Empty(), "handshake message framing")
	require.Equal(t, recHandshakeClientHello, typ, "handshake type")
	require.True(t, body.ReadUint16(&vers) && body.ReadBytes((*[]byte)(&random), 32) &&
		body.ReadUint8LengthPrefixed(&sid) && body.ReadUint16LengthPrefixed(&suites) &&
		body.ReadUint8LengthPrefixed(&comp) && body.ReadUint16LengthPrefixed(&exts) && body.Empty(),
		"ClientHello fields")
	h.random = random
	seen := map[uint16]bool{}
	for !exts.Empty() {
		var et uint16
		var data cryptobyte.String
		require.True(t, exts.ReadUint16(&et) && exts.ReadUint16LengthPrefixed(&data), "extension")
		require.False(t, seen[et], "duplicate extension 0x%04x", et)
		seen[et] = true
		switch et {
		case recExtServerName:
			var list, name cryptobyte.String
			var nameType uint8
			require.True(t, data.ReadUint16LengthPrefixed(&list) && list.ReadUint8(&nameType) &&
				list.ReadUint16LengthPrefixed(&name) && nameType == 0, "server_name")
			h.serverName = string(name)
		case recExtALPN:
			var list cryptobyte.String
			require.True(t, data.ReadUint16LengthPrefixed(&list) && data.Empty(), "ALPN")
			for !list.Empty() {
				var p cryptobyte.String
				require.True(t, list.ReadUint8LengthPrefixed(&p), "ALPN protocol")
				h.alpn = append(h.alpn, string(p))
			}
		case recExtECH:
			var echType uint8
			require.True(t, data.ReadUint8(&echType), "encrypted_client_hello")
			h.echType = int(echType)
			if echType == recECHTypeOuter {
				var kdf, aead uint16
				require.True(t, data.ReadUint16(&kdf) && data.ReadUint16(&aead) && data.ReadUint8(&h.echConfigID),
					"outer encrypted_client_hello")
			} else {
				require.True(t, data.Empty(), "inner encrypted_client_hello is empty")
			}
		}
	}
	return h
}

// recordedServerHello is a ServerHello or HelloRetryRequest with what an
// ECH confirmation check needs.
type recordedServerHello struct {
	hrr  bool
	hash func() hash.Hash
	// confirmation is the 8 bytes of ECH confirmation: the end of random
	// in a ServerHello, the encrypted_client_hello extension in a
	// HelloRetryRequest (nil if it has none).
	confirmation []byte
	// zeroedConfirmation is the message with confirmation zeroed.
	zeroedConfirmation []byte
}

// recHRRRandom is the random of a HelloRetryRequest (RFC 8446, Section 4.1.3).
var recHRRRandom = []byte{
	0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
	0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
}

func parseServerHello(t testing.TB, msg []byte) recordedServerHello {
	t.Helper()
	s := cryptobyte.String(msg)
	var typ, compression uint8
	var vers, suite uint16
	var body, random, sid, exts cryptobyte.String
	require.True(t, s.ReadUint8(&typ) && s.ReadUint24LengthPrefixed(&body) && s.Empty(), "handshake message framing")
	require.Equal(t, recHandshakeServerHello, typ)
	require.True(t, body.ReadUint16(&vers) && body.ReadBytes((*[]byte)(&random), 32) &&
		body.ReadUint8LengthPrefixed(&sid) && body.ReadUint16(&suite) && body.ReadUint8(&compression) &&
		body.ReadUint16LengthPrefixed(&exts) && body.Empty(), "ServerHello fields")
	sh := recordedServerHello{hrr: bytes.Equal(random, recHRRRandom)}
	switch suite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_CHACHA20_POLY1305_SHA256:
		sh.hash = sha256.New
	case tls.TLS_AES_256_GCM_SHA384:
		sh.hash = sha512.New384
	default:
		t.Fatalf("ServerHello cipher suite 0x%04x", suite)
	}
	sh.zeroedConfirmation = slices.Clone(msg)
	if !sh.hrr {
		// RFC 9849, Section 7.2: the last 8 bytes of ServerHello.random.
		off := recHandshakeHeaderLen + 2 + 32 - 8
		sh.confirmation = msg[off : off+8]
		clear(sh.zeroedConfirmation[off : off+8])
		return sh
	}
	for !exts.Empty() {
		var et uint16
		var data cryptobyte.String
		require.True(t, exts.ReadUint16(&et) && exts.ReadUint16LengthPrefixed(&data), "extension")
		if et == recExtECH {
			// RFC 9849, Section 7.2.1: the extension holds the 8 bytes.
			require.Len(t, data, 8, "HelloRetryRequest encrypted_client_hello")
			off := len(msg) - len(exts) - len(data)
			sh.confirmation = msg[off : off+8]
			clear(sh.zeroedConfirmation[off : off+8])
		}
	}
	return sh
}

// writeMessageHash writes to tr the message_hash that stands for the first
// ClientHello after a HelloRetryRequest (RFC 8446, Section 4.4.1).
func writeMessageHash(tr hash.Hash, h func() hash.Hash, hello []byte) {
	ch := h()
	ch.Write(hello)
	sum := ch.Sum(nil)
	tr.Write([]byte{recHandshakeMessageHash, 0, 0, byte(len(sum))})
	tr.Write(sum)
}

// echConfirmation computes (RFC 9849, Section 7.2)
//
//	HKDF-Expand-Label(HKDF-Extract(0, ClientHelloInner.random), label, transcript, 8)
func echConfirmation(h func() hash.Hash, innerRandom []byte, label string, transcript []byte) []byte {
	prk, err := hkdf.Extract(h, innerRandom, nil)
	if err != nil {
		panic(err)
	}
	// RFC 8446, Section 7.1: HkdfLabel.
	var b cryptobyte.Builder
	b.AddUint16(8)
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte("tls13 " + label)) })
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(transcript) })
	out, err := hkdf.Expand(h, prk, string(b.BytesOrPanic()), 8)
	if err != nil {
		panic(err)
	}
	return out
}

// readHandshakeMsg reads records from r until they hold one whole
// handshake message, and returns the message and the records' bytes.
func readHandshakeMsg(r io.Reader) (msg, raw []byte, err error) {
	for {
		var hdr [recHeaderLen]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, nil, fmt.Errorf("record header: %w", err)
		}
		if hdr[0] != recTypeHandshake {
			return nil, nil, fmt.Errorf("record type %d, want handshake", hdr[0])
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		frag := make([]byte, n)
		if _, err := io.ReadFull(r, frag); err != nil {
			return nil, nil, fmt.Errorf("record of %d bytes: %w", n, err)
		}
		raw = append(append(raw, hdr[:]...), frag...)
		msg = append(msg, frag...)
		if len(msg) < recHandshakeHeaderLen {
			continue
		}
		switch msgLen := recHandshakeHeaderLen + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])); {
		case len(msg) == msgLen:
			return msg, raw, nil
		case len(msg) > msgLen:
			return nil, nil, errors.New("data after the handshake message in its record")
		}
	}
}

// peekRecord returns the type and bytes of the next record of r without
// consuming it.
func peekRecord(t testing.TB, r *bytes.Reader) (uint8, []byte) {
	t.Helper()
	pos, err := r.Seek(0, io.SeekCurrent)
	require.NoError(t, err)
	var hdr [recHeaderLen]byte
	_, err = r.ReadAt(hdr[:], pos)
	require.NoError(t, err, "record header")
	raw := make([]byte, recHeaderLen+(int(hdr[3])<<8|int(hdr[4])))
	_, err = r.ReadAt(raw, pos)
	require.NoError(t, err, "record")
	return hdr[0], raw
}

// recordedConn is a net.Conn whose reads come from a recorded client byte
// stream (then io.EOF) and whose writes are kept. It never blocks.
type recordedConn struct {
	r  *bytes.Reader
	mu sync.Mutex
	w  bytes.Buffer
}

func newRecordedConn(c2s []byte) *recordedConn { return &recordedConn{r: bytes.NewReader(c2s)} }

func (c *recordedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (c *recordedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.w.Write(p)
}

// written returns a copy of the bytes written so far.
func (c *recordedConn) written() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.w.Bytes())
}

func (c *recordedConn) Close() error                     { return nil }
func (c *recordedConn) LocalAddr() net.Addr              { return recordedAddr{} }
func (c *recordedConn) RemoteAddr() net.Addr             { return recordedAddr{} }
func (c *recordedConn) SetDeadline(time.Time) error      { return nil }
func (c *recordedConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordedConn) SetWriteDeadline(time.Time) error { return nil }

type recordedAddr struct{}

func (recordedAddr) Network() string { return "recording" }
func (recordedAddr) String() string  { return "recording" }
