package echquic

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

// quicHello returns the ClientHello crypto/tls sends as a QUIC client with
// cfg: the CRYPTO data of its first Initial packets.
func quicHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	q := tls.QUICClient(&tls.QUICConfig{TLSConfig: cfg})
	q.SetTransportParameters([]byte{})
	require.NoError(t, q.Start(t.Context()))
	defer q.Close()
	var hello []byte
	for ev := q.NextEvent(); ev.Kind != tls.QUICNoEvent; ev = q.NextEvent() {
		if ev.Kind == tls.QUICWriteData && ev.Level == tls.QUICEncryptionLevelInitial {
			hello = append(hello, ev.Data...)
		}
	}
	require.NotEmpty(t, hello)
	return hello
}

func cryptoFrameBytes(off uint64, data []byte) []byte {
	return appendCrypto(nil, off, data)
}

// sealInitial returns a client Initial packet with payload, padded so that
// the packet is at least size bytes, protected with the client's keys.
func sealInitial(t testing.TB, version uint32, dcid, scid []byte, pn uint64, payload []byte, size int) []byte {
	t.Helper()
	keys, err := newInitialKeys(version, dcid, false)
	require.NoError(t, err)
	typeBits := byte(0)
	if version == version2 {
		typeBits = 1
	}
	hdr := []byte{headerFormLong | headerFixedBit | typeBits<<4 | 1} // 2-byte packet number
	hdr = append(hdr, byte(version>>24), byte(version>>16), byte(version>>8), byte(version))
	hdr = append(hdr, byte(len(dcid)))
	hdr = append(hdr, dcid...)
	hdr = append(hdr, byte(len(scid)))
	hdr = append(hdr, scid...)
	hdr = append(hdr, 0) // token
	fixed := len(hdr) + 2 + 2 + aeadTagLen
	if pad := size - fixed - len(payload); pad > 0 {
		payload = append(payload, make([]byte, pad)...)
	}
	length := 2 + len(payload) + aeadTagLen
	hdr = append(hdr, 0x40|byte(length>>8), byte(length))
	pnOff := len(hdr)
	pkt := append(hdr, byte(pn>>8), byte(pn))
	pkt = append(pkt, payload...)
	pkt = append(pkt, make([]byte, aeadTagLen)...)
	keys.protect(pkt, pnOff, 2, pn)
	return pkt
}

// recordingConn is a net.PacketConn that keeps what is written to it.
type recordingConn struct {
	net.PacketConn
	mu     sync.Mutex
	writes [][]byte
}

func (r *recordingConn) WriteTo(b []byte, _ net.Addr) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = append(r.writes, bytes.Clone(b))
	return len(b), nil
}

func (r *recordingConn) got() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.writes
}

// closeCode decodes the server Initial pkt sent to a client whose first
// Destination Connection ID was dcid, and returns the error code of its
// CONNECTION_CLOSE frame.
func closeCode(t *testing.T, pkt, dcid []byte) uint64 {
	t.Helper()
	h, err := parseLongHeader(pkt)
	require.NoError(t, err)
	require.Equal(t, packetInitial, h.typ)
	keys, err := newInitialKeys(h.version, dcid, true)
	require.NoError(t, err)
	_, _, payload, err := keys.unprotect(bytes.Clone(pkt[:h.end]), h.pnOff, -1)
	require.NoError(t, err)
	require.Equal(t, byte(frameConnectionClose), payload[0])
	code, n := readVarint(payload[1:])
	require.NotZero(t, n)
	return code
}

// withInnerECH returns hello with its encrypted_client_hello extension
// replaced by one of type inner, which only a backend may get.
func withInnerECH(t *testing.T, hello []byte) []byte {
	t.Helper()
	i := handshakeHeaderLen + 2 + 32
	i += 1 + int(hello[i])                        // legacy_session_id
	i += 2 + (int(hello[i])<<8 | int(hello[i+1])) // cipher_suites
	i += 1 + int(hello[i])                        // legacy_compression_methods
	exts := hello[i+2:]
	var out []byte
	for len(exts) >= 4 {
		n := 4 + (int(exts[2])<<8 | int(exts[3]))
		if exts[0] == 0xfe && exts[1] == 0x0d {
			out = append(out, 0xfe, 0x0d, 0, 1, 1) // ECHClientHello type inner
		} else {
			out = append(out, exts[:n]...)
		}
		exts = exts[n:]
	}
	msg := append(bytes.Clone(hello[:i]), byte(len(out)>>8), byte(len(out)))
	msg = append(msg, out...)
	l := len(msg) - handshakeHeaderLen
	msg[1], msg[2], msg[3] = byte(l>>16), byte(l>>8), byte(l)
	return msg
}

func TestBrokenInitials(t *testing.T) {
	ks := echtest.NewKeySet(t, publicName)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	ca := echtest.NewCA(t)
	hello := quicHello(t, &tls.Config{ServerName: "secret.example", RootCAs: ca.Pool(), EncryptedClientHelloConfigList: list, NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13})
	dcid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	scid := []byte{9, 9, 9, 9}
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer backend.Close()

	valid := func(payload []byte) []byte { return sealInitial(t, version1, dcid, scid, 0, payload, minInitialSize) }
	half := hello[:len(hello)/2]
	wrongLen := bytes.Clone(hello)
	wrongLen[1], wrongLen[2], wrongLen[3] = 0, 0xff, 0xff // longer than what follows, under the limit
	garbage := append([]byte{typeClientHello, 0, 0, 40}, bytes.Repeat([]byte{0xee}, 40)...)

	const (
		drop   = iota // no answer, no flow
		closed        // a CONNECTION_CLOSE, no flow
		vn            // a Version Negotiation packet, no flow
		wait          // no answer, a pending flow
	)
	for _, tc := range []struct {
		name   string
		dgram  func() []byte
		expect int
		code   uint64
	}{
		{"empty long header", func() []byte { return []byte{0xc0} }, drop, 0},
		{"short header", func() []byte { return bytes.Repeat([]byte{0x40}, 1300) }, drop, 0},
		{"truncated header", func() []byte { return valid(cryptoFrameBytes(0, hello))[:12] }, drop, 0},
		{"datagram under 1200 bytes", func() []byte {
			return sealInitial(t, version1, dcid, scid, 0, cryptoFrameBytes(0, hello[:200]), 300)
		}, drop, 0},
		{"connection ID of 21 bytes", func() []byte {
			return sealInitial(t, version1, bytes.Repeat([]byte{1}, 21), scid, 0, cryptoFrameBytes(0, hello), minInitialSize)
		}, drop, 0},
		{"connection ID under 8 bytes", func() []byte {
			return sealInitial(t, version1, dcid[:4], scid, 0, cryptoFrameBytes(0, hello), minInitialSize)
		}, drop, 0},
		{"bad payload protection", func() []byte { b := valid(cryptoFrameBytes(0, hello)); b[len(b)-1] ^= 1; return b }, drop, 0},
		{"length beyond the datagram", func() []byte { b := valid(cryptoFrameBytes(0, hello)); return b[:len(b)-1] }, drop, 0},
		{"unknown version", func() []byte {
			b := valid(cryptoFrameBytes(0, hello))
			b[1], b[2], b[3], b[4] = 0x1a, 0x2a, 0x3a, 0x4a
			return b
		}, vn, 0},
		{"version negotiation from a client", func() []byte {
			b := valid(cryptoFrameBytes(0, hello))
			b[1], b[2], b[3], b[4] = 0, 0, 0, 0
			return b
		}, drop, 0},
		{"0-RTT first", func() []byte { b := valid(cryptoFrameBytes(0, hello)); b[0] = b[0]&^0x30 | 0x10; return b }, drop, 0},
		{"truncated CRYPTO frame", func() []byte {
			f := cryptoFrameBytes(0, hello)
			f[1] = 0x7f // a length larger than the payload
			return valid(f[:40])
		}, drop, 0},
		{"STREAM frame in an Initial", func() []byte { return valid(append([]byte{0x08, 0, 1, 'x'}, cryptoFrameBytes(0, hello)...)) }, drop, 0},
		{"only PADDING", func() []byte { return valid([]byte{framePadding}) }, wait, 0}, // valid; the hello has not begun
		{"hello never completes", func() []byte { return valid(cryptoFrameBytes(0, half)) }, wait, 0},
		{"not a ClientHello", func() []byte { h := bytes.Clone(hello); h[0] = typeServerHello; return valid(cryptoFrameBytes(0, h)) }, closed, 0x100 + alertUnexpectedMessage},
		{"ClientHello over the limit", func() []byte {
			h := bytes.Clone(hello)
			h[1] = 0x10 // 1 MiB and more
			return valid(cryptoFrameBytes(0, h))
		}, closed, 0x100 + alertDecodeError},
		{"malformed ClientHello", func() []byte { return valid(cryptoFrameBytes(0, garbage)) }, closed, 0x100 + alertDecodeError},
		{"inner ECH type from the client", func() []byte { return valid(cryptoFrameBytes(0, withInnerECH(t, hello))) }, closed, 0x100 + alertIllegalParameter},
		{"CRYPTO data beyond the limit", func() []byte { return valid(cryptoFrameBytes(1<<20, []byte("x"))) }, closed, transportCryptoBufferExceeded},
		{"length claims more data than sent", func() []byte { return valid(cryptoFrameBytes(0, wrongLen)) }, wait, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := &recordingConn{}
			p := &Proxy{
				Route:        func(Info) (net.Addr, error) { return backend.LocalAddr(), nil },
				ECHOptions:   []ech.Option{ech.WithKeySet(ks)},
				MaxHelloSize: 1 << 16,
			}
			p.init()
			defer p.Close()
			ap := netip.MustParseAddrPort("127.0.0.1:4433")
			b := tc.dgram()
			require.NotPanics(t, func() { p.handle(rc, nil, ap, b) })
			p.mu.RLock()
			f := p.flows[ap]
			p.mu.RUnlock()
			got := rc.got()
			switch tc.expect {
			case drop:
				assert.Empty(t, got)
				assert.Nil(t, f)
			case closed:
				require.Len(t, got, 1)
				assert.Equal(t, tc.code, closeCode(t, got[0], dcid))
				assert.Nil(t, f)
			case vn:
				require.Len(t, got, 1)
				assert.Equal(t, []byte{0, 0, 0, 0}, got[0][1:5], "Version Negotiation")
				assert.Contains(t, string(got[0]), string([]byte{0, 0, 0, 1}))
				assert.Nil(t, f)
			case wait:
				assert.Empty(t, got)
				require.NotNil(t, f)
				assert.False(t, f.routed.Load())
				// The janitor ends it after HandshakeTimeout.
				p.sweep(time.Now().Add(2 * DefaultHandshakeTimeout).UnixNano())
				p.mu.RLock()
				assert.Empty(t, p.flows)
				p.mu.RUnlock()
			}
		})
	}
}
