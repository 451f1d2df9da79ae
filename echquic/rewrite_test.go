package echquic

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

// TestRewriteInitials rewrites the Initials of a crypto/tls ClientHello
// with ECH: same sizes, the same bytes for a retransmission, and CRYPTO
// frames that reassemble into the inner hello.
func TestRewriteInitials(t *testing.T) {
	ks := echtest.NewKeySet(t, publicName)
	hello, dgrams := helloDatagrams(t, ks)
	require.GreaterOrEqual(t, len(dgrams), 2)
	h, err := parseLongHeader(dgrams[0])
	require.NoError(t, err)
	hs, err := newHandshake(&h, ech.DefaultMaxHelloSize)
	require.NoError(t, err)
	for _, d := range dgrams {
		_, _, err := hs.feed(d)
		require.NoError(t, err)
	}
	msg, err := hs.message()
	require.NoError(t, err)
	require.Equal(t, hello, msg)
	require.NoError(t, hs.firstHello(msg, nil, &Proxy{ECHOptions: []ech.Option{ech.WithKeySet(ks)}}))
	require.True(t, hs.accepted)
	assert.Less(t, len(hs.inner), len(hello), "the inner hello is shorter than the outer")

	check, err := newHandshake(&h, ech.DefaultMaxHelloSize)
	require.NoError(t, err)
	for _, d := range dgrams {
		out, err := hs.rewrite(nil, d)
		require.NoError(t, err)
		assert.Len(t, out, len(d), "the datagram keeps its size")
		again, err := hs.rewrite(nil, d)
		require.NoError(t, err)
		assert.Equal(t, out, again, "a retransmission is rewritten identically")
		assert.NotEqual(t, d, out)
		_, _, err = check.feed(out)
		require.NoError(t, err)
	}
	got, err := check.message()
	require.NoError(t, err)
	assert.Equal(t, hs.inner, got, "the rewritten Initials carry the inner hello")
}

func TestAppendMapped(t *testing.T) {
	inner := make([]byte, 300)
	for i := range inner {
		inner[i] = byte(i)
	}
	type frame struct{ off, end uint64 }
	for _, tc := range []struct {
		name           string
		o1, i1, o2, i2 uint64
		phase          int
		in             frame
		want           []frame
	}{
		{"inside the first hello", 100, 80, 0, 0, phaseHello2, frame{10, 50}, []frame{{10, 50}}},
		{"clipped to the inner length", 100, 80, 0, 0, phaseHello2, frame{50, 90}, []frame{{50, 80}}},
		{"end of the outer carries the end of the inner", 100, 80, 0, 0, phaseHello2, frame{60, 100}, []frame{{60, 80}}},
		{"past the inner length", 100, 80, 0, 0, phaseHello2, frame{85, 95}, nil},
		{"inner longer than outer", 100, 120, 0, 0, phaseHello2, frame{60, 100}, []frame{{60, 120}}},
		{"second hello translated", 100, 80, 50, 40, phaseDone, frame{100, 150}, []frame{{80, 120}}},
		{"second hello middle", 100, 80, 50, 40, phaseDone, frame{110, 130}, []frame{{90, 110}}},
		{"across both hellos", 100, 80, 50, 60, phaseDone, frame{90, 150}, []frame{{90, 80}, {80, 140}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hs := &handshake{o1: tc.o1, i1: tc.i1, o2: tc.o2, i2: tc.i2, phase: tc.phase, inner: inner[:tc.i1+tc.i2]}
			data := make([]byte, tc.in.end-tc.in.off)
			out := hs.appendMapped(nil, cryptoFrame{off: tc.in.off, data: data})
			var fr initialFrames
			var got []frame
			if len(out) > 0 {
				require.NoError(t, parseInitialFrames(out, &fr))
			}
			for _, cf := range fr.cryptoFrames() {
				got = append(got, frame{cf.off, cf.off + uint64(len(cf.data))})
				assert.True(t, bytes.Equal(cf.data, inner[cf.off:cf.off+uint64(len(cf.data))]))
			}
			var want []frame
			for _, w := range tc.want {
				if w.off < w.end {
					want = append(want, w)
				}
			}
			assert.Equal(t, want, got)
		})
	}
}

// TestNotAcceptedGoesOn sends the Initials of a ClientHello without ECH
// through a Proxy twice, as a client retransmits them: the backend gets
// them unchanged both times, and the hello is read and routed only once.
func TestNotAcceptedGoesOn(t *testing.T) {
	ks := echtest.NewKeySet(t, publicName)
	hello := quicHello(t, &tls.Config{ServerName: "plain.example", NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13})
	var dgrams [][]byte
	const chunk = 700
	for off := 0; off < len(hello); off += chunk {
		end := min(off+chunk, len(hello))
		dgrams = append(dgrams, sealInitial(t, version1, fuzzDCID, []byte{7, 7, 7, 7}, uint64(off/chunk), cryptoFrameBytes(uint64(off), hello[off:end]), minInitialSize))
	}
	require.GreaterOrEqual(t, len(dgrams), 2)

	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer backend.Close()
	var routed atomic.Int32
	p := &Proxy{
		Route: func(info Info) (net.Addr, error) {
			routed.Add(1)
			assert.Equal(t, ech.StatusNotOffered, info.Status)
			assert.Equal(t, "plain.example", info.ServerName)
			return backend.LocalAddr(), nil
		},
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
	}
	p.init()
	defer p.Close()
	pc := sinkUDP(t)
	ap := netip.MustParseAddrPort("127.0.0.1:4433")
	buf := make([]byte, 2048)
	var conn *ech.Conn
	for round := range 2 {
		for _, d := range dgrams {
			p.handle(pc, pc, ap, d)
		}
		p.mu.RLock()
		f := p.flows[ap]
		p.mu.RUnlock()
		require.NotNil(t, f)
		assert.Equal(t, phaseDone, f.hs.phase)
		assert.False(t, f.hs.accepted)
		if round == 0 {
			conn = f.hs.hello.conn
		}
		assert.True(t, conn == f.hs.hello.conn, "the hello is not read again")
		require.NoError(t, backend.SetReadDeadline(time.Now().Add(5*time.Second)))
		for i, d := range dgrams {
			n, err := backend.Read(buf)
			require.NoError(t, err)
			assert.Equal(t, d, buf[:n], "round %d, datagram %d", round, i)
		}
	}
	assert.Equal(t, int32(1), routed.Load())
}
