package ech_test

// Hand-built ClientHellos for the malformed-input tests. The well-formed
// paths are tested with real clients (crypto/tls, BoringSSL, NSS); these
// hellos exist to break one rule at a time. They are sealed with Go's
// crypto/hpke, an HPKE implementation independent of the one under test.

import (
	"crypto/hpke"
	"net"
	"testing"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

type ext struct {
	typ  uint16
	data []byte
}

// hello is a ClientHello in parts.
type hello struct {
	vers      uint16
	random    []byte
	sessionID []byte
	suites    []uint16
	comp      []byte
	exts      []ext
	noExts    bool   // omit the extensions block entirely
	padding   []byte // after the structure (EncodedClientHelloInner only)
}

func (h *hello) body() []byte {
	var b cryptobyte.Builder
	b.AddUint16(h.vers)
	b.AddBytes(h.random)
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(h.sessionID) })
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, s := range h.suites {
			b.AddUint16(s)
		}
	})
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(h.comp) })
	if !h.noExts {
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			for _, e := range h.exts {
				b.AddUint16(e.typ)
				b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e.data) })
			}
		})
	}
	b.AddBytes(h.padding)
	return b.BytesOrPanic()
}

// message returns the hello as a handshake message.
func (h *hello) message() []byte {
	body := h.body()
	return append([]byte{1, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

func (h *hello) set(typ uint16, data []byte) {
	for i := range h.exts {
		if h.exts[i].typ == typ {
			h.exts[i].data = data
			return
		}
	}
	h.exts = append(h.exts, ext{typ, data})
}

func (h *hello) remove(typ uint16) {
	for i := range h.exts {
		if h.exts[i].typ == typ {
			h.exts = append(h.exts[:i], h.exts[i+1:]...)
			return
		}
	}
}

func sniExt(name string) []byte {
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint8(0)
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(name)) })
	})
	return b.BytesOrPanic()
}

func alpnExt(protos ...string) []byte {
	var b cryptobyte.Builder
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, p := range protos {
			b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(p)) })
		}
	})
	return b.BytesOrPanic()
}

func versionsExt(vs ...uint16) []byte {
	var b cryptobyte.Builder
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, v := range vs {
			b.AddUint16(v)
		}
	})
	return b.BytesOrPanic()
}

func outerExtsExt(types ...uint16) []byte {
	var b cryptobyte.Builder
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, t := range types {
			b.AddUint16(t)
		}
	})
	return b.BytesOrPanic()
}

func echOuterExt(kdf, aead uint16, id uint8, enc, payload []byte) []byte {
	var b cryptobyte.Builder
	b.AddUint8(0)
	b.AddUint16(kdf)
	b.AddUint16(aead)
	b.AddUint8(id)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(enc) })
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(payload) })
	return b.BytesOrPanic()
}

const (
	tSNI       = 0
	tGroups    = 10
	tSigAlgs   = 13
	tALPN      = 16
	tVersions  = 43
	tKeyShare  = 51
	tOuterExts = 0xfd00
	tECH       = 0xfe0d
)

// baseOuter returns an outer hello for publicName without ECH.
func baseOuter() *hello {
	return &hello{
		vers:      0x0303,
		random:    make([]byte, 32),
		sessionID: make([]byte, 32),
		suites:    []uint16{0x1301},
		comp:      []byte{0},
		exts: []ext{
			{tSNI, sniExt(publicName)},
			{tGroups, []byte{0, 2, 0, 0x1d}},
			{tSigAlgs, []byte{0, 2, 4, 3}},
			{tALPN, alpnExt("h2", "http/1.1")},
			{tVersions, versionsExt(0x0304)},
			{tKeyShare, append([]byte{0, 36, 0, 0x1d, 0, 32}, make([]byte, 32)...)},
		},
	}
}

// baseInner returns an EncodedClientHelloInner for innerName that takes
// groups, sigalgs, versions and key_share from the outer hello.
func baseInner() *hello {
	return &hello{
		vers:   0x0303,
		random: []byte("inner random, thirty-two bytes!!"),
		suites: []uint16{0x1301},
		comp:   []byte{0},
		exts: []ext{
			{tSNI, sniExt(innerName)},
			{tOuterExts, outerExtsExt(tGroups, tSigAlgs, tVersions, tKeyShare)},
			{tALPN, alpnExt("imap")},
			{tECH, []byte{1}},
		},
		padding: make([]byte, 16),
	}
}

// sealer seals EncodedClientHelloInners for one ECH key.
type sealer struct {
	t      testing.TB
	config *ech.Config
	sender *hpke.Sender
	enc    []byte
}

func newSealer(t testing.TB, k ech.Key) *sealer {
	t.Helper()
	c, err := ech.KeyConfig(k)
	require.NoError(t, err)
	kem, err := hpke.NewKEM(uint16(c.KEM))
	require.NoError(t, err)
	pub, err := kem.NewPublicKey(c.PublicKey)
	require.NoError(t, err)
	kdf, err := hpke.NewKDF(uint16(c.CipherSuites[0].KDF))
	require.NoError(t, err)
	aead, err := hpke.NewAEAD(uint16(c.CipherSuites[0].AEAD))
	require.NoError(t, err)
	enc, sender, err := hpke.NewSender(pub, kdf, aead, append([]byte("tls ech\x00"), k.Config...))
	require.NoError(t, err)
	return &sealer{t: t, config: c, sender: sender, enc: enc}
}

// seal returns outer with an ECH extension carrying inner, encrypted with
// the AAD rule of RFC 9849, Section 5.2. enc is the sealer's unless
// overridden (the second hello after HRR sends an empty enc).
func (s *sealer) seal(outer, inner *hello, enc []byte, configID uint8) []byte {
	s.t.Helper()
	encoded := inner.body()
	cs := s.config.CipherSuites[0]
	zeros := make([]byte, len(encoded)+16)
	outer.set(tECH, echOuterExt(uint16(cs.KDF), uint16(cs.AEAD), configID, enc, zeros))
	aad := outer.body()
	ct, err := s.sender.Seal(aad, encoded)
	require.NoError(s.t, err)
	outer.set(tECH, echOuterExt(uint16(cs.KDF), uint16(cs.AEAD), configID, enc, ct))
	return outer.message()
}

// records frames a handshake message as records of at most size bytes.
func records(msg []byte, size int) []byte {
	var out []byte
	for len(msg) > 0 {
		n := min(len(msg), size)
		out = append(out, 22, 3, 1, byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}
