package echquic

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

// helloDatagrams returns a crypto/tls QUIC ClientHello with ECH for ks and
// the client Initial datagrams carrying it, two when it needs two.
func helloDatagrams(tb testing.TB, ks *ech.KeySet) (hello []byte, dgrams [][]byte) {
	tb.Helper()
	list, err := ks.ConfigList()
	require.NoError(tb, err)
	hello = quicHello(tb, &tls.Config{ServerName: "secret.example", EncryptedClientHelloConfigList: list, NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13})
	const chunk = 1100
	for off := 0; off < len(hello); off += chunk {
		end := min(off+chunk, len(hello))
		dgrams = append(dgrams, sealInitial(tb, version1, fuzzDCID, []byte{7, 7, 7, 7}, uint64(off/chunk), cryptoFrameBytes(uint64(off), hello[off:end]), minInitialSize))
	}
	return hello, dgrams
}

// BenchmarkNewConnection compares the Initial processing of a new
// connection (key derivation, unprotection, reassembly, decryption with
// ech.NewConn, rewriting and protection) with ech.NewConn alone on the same
// ClientHello.
func BenchmarkNewConnection(b *testing.B) {
	ks := echtest.NewKeySet(b, publicName)
	hello, dgrams := helloDatagrams(b, ks)
	opts := []ech.Option{ech.WithKeySet(ks)}
	b.Logf("ClientHello of %d bytes in %d Initial packets", len(hello), len(dgrams))

	b.Run("baseline=ech.NewConn", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 4096)
		for b.Loop() {
			mc := &memConn{}
			mc.serve(hello)
			c, err := ech.NewConn(context.Background(), mc, opts...)
			if err != nil || c.Status() != ech.StatusAccepted {
				b.Fatal(err)
			}
			if _, err := readMessage(c, buf[:0], 1<<16); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("initials", func(b *testing.B) {
		b.ReportAllocs()
		p := &Proxy{ECHOptions: opts}
		var out []byte
		for b.Loop() {
			h, err := parseLongHeader(dgrams[0])
			if err != nil {
				b.Fatal(err)
			}
			hs, err := newHandshake(&h, ech.DefaultMaxHelloSize)
			if err != nil {
				b.Fatal(err)
			}
			for _, d := range dgrams {
				if _, _, err := hs.feed(d); err != nil {
					b.Fatal(err)
				}
			}
			msg, err := hs.message()
			if err != nil || msg == nil {
				b.Fatal("incomplete hello", err)
			}
			if err := hs.firstHello(msg, nil, p); err != nil || !hs.accepted {
				b.Fatal(err)
			}
			for _, d := range dgrams {
				if out, err = hs.rewrite(out[:0], d); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

// BenchmarkNewConnectionFull measures a new connection through
// Proxy.handle: Initial processing, routing, the backend socket and its
// goroutine, and the forwarding of the rewritten Initials.
func BenchmarkNewConnectionFull(b *testing.B) {
	ks := echtest.NewKeySet(b, publicName)
	_, dgrams := helloDatagrams(b, ks)
	sink := sinkUDP(b)
	p := &Proxy{
		Route:      func(Info) (net.Addr, error) { return sink.LocalAddr(), nil },
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
	}
	p.init()
	defer p.Close()
	pc := sinkUDP(b)
	ap := netip.MustParseAddrPort("127.0.0.1:4433")
	b.ReportAllocs()
	for b.Loop() {
		for _, d := range dgrams {
			p.handle(pc, pc, ap, d)
		}
		p.mu.Lock()
		f := p.flows[ap]
		if f == nil || !f.routed.Load() {
			b.Fatal("not routed")
		}
		p.closeFlow(f)
		p.mu.Unlock()
	}
}

// echoUDP starts a UDP server on loopback that sends every datagram back.
func echoUDP(tb testing.TB) *net.UDPConn {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(tb, err)
	tb.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1<<16)
		for {
			n, ap, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			pc.WriteToUDPAddrPort(buf[:n], ap)
		}
	}()
	return pc
}

// proxiedFlow starts a Proxy on 127.0.0.1 routing to backend, opens a flow
// from a client socket with an ECH Initial, and returns the client socket,
// connected to the proxy, with the flow routed.
func proxiedFlow(tb testing.TB, backend net.Addr) (*Proxy, *net.UDPConn) {
	return proxiedFlowOn(tb, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, backend)
}

// proxiedFlowOn is proxiedFlow with the Proxy listening on listen.
func proxiedFlowOn(tb testing.TB, listen *net.UDPAddr, backend net.Addr) (*Proxy, *net.UDPConn) {
	ks := echtest.NewKeySet(tb, publicName)
	_, dgrams := helloDatagrams(tb, ks)
	p := &Proxy{
		Route:      func(Info) (net.Addr, error) { return backend, nil },
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
	}
	pc, err := net.ListenUDP("udp", listen)
	if err != nil {
		tb.Skipf("no socket on %s: %v", listen, err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(pc) }()
	tb.Cleanup(func() { p.Close(); <-done })
	c, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	require.NoError(tb, err)
	tb.Cleanup(func() { c.Close() })
	for _, d := range dgrams {
		_, err := c.Write(d)
		require.NoError(tb, err)
	}
	// The backend echoes the rewritten Initials: their arrival means the
	// flow is routed.
	buf := make([]byte, 2048)
	for range dgrams {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Read(buf)
		require.NoError(tb, err)
	}
	c.SetReadDeadline(time.Time{})
	return p, c
}

// pingPong sends n datagrams of size bytes on c in windows of w and reads
// the echoes. It returns how many came back.
func pingPong(c *net.UDPConn, n, size, w int) (int, error) {
	out := make([]byte, size)
	out[0] = 0x40 // a short header packet
	in := make([]byte, 2048)
	got := 0
	for sent := 0; sent < n; {
		k := min(w, n-sent)
		for range k {
			if _, err := c.Write(out); err != nil {
				return got, err
			}
		}
		sent += k
		for range k {
			c.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := c.Read(in); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break // lost: go on with the next window
				}
				return got, err
			}
			got++
		}
	}
	return got, nil
}

// TestForwardEcho sends datagrams of mixed sizes in windows through an
// established flow to a UDP echo server and checks that each comes back
// unchanged and in order: the batched forwarding in both directions, with
// and without UDP GSO, over IPv4 and IPv6.
func TestForwardEcho(t *testing.T) {
	for _, tc := range []struct {
		name   string
		listen *net.UDPAddr
	}{
		{"ipv4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}},
		{"ipv6", &net.UDPAddr{IP: net.IPv6loopback}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			echo := echoUDP(t)
			_, c := proxiedFlowOn(t, tc.listen, echo.LocalAddr())
			sizes := []int{1200, 1200, 1200, 1200, 1200, 1200, 1200, 400, 30, 1452, 1452, 1000, 1452, 2000, 1, 1200}
			in := make([]byte, 2048)
			for round := range 20 {
				var sent [][]byte
				for i, n := range sizes[:1+round%len(sizes)] {
					d := bytes.Repeat([]byte{byte(round), byte(i)}, n)[:n]
					d[0] = 0x40 | byte(i)&0x3f // a short header packet
					sent = append(sent, d)
					_, err := c.Write(d)
					require.NoError(t, err)
				}
				require.NoError(t, c.SetReadDeadline(time.Now().Add(5*time.Second)))
				for i, d := range sent {
					n, err := c.Read(in)
					require.NoError(t, err, "round %d datagram %d", round, i)
					require.Equal(t, d, in[:n], "round %d datagram %d", round, i)
				}
			}
		})
	}
}

// BenchmarkForward compares datagrams per second through the proxy, after
// the handshake, with the direct path to the same UDP echo server: 1200
// byte datagrams in windows of 16, each echoed.
func BenchmarkForward(b *testing.B) {
	echo := echoUDP(b)
	run := func(b *testing.B, c *net.UDPConn) {
		b.ReportAllocs()
		b.SetBytes(2 * 1200)
		start := time.Now()
		got, err := pingPong(c, b.N, 1200, 16)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(got)/time.Since(start).Seconds(), "dgrams/s")
		b.ReportMetric(float64(b.N-got)/float64(b.N), "lost/op")
	}
	b.Run("baseline=direct", func(b *testing.B) {
		c, err := net.DialUDP("udp", nil, echo.LocalAddr().(*net.UDPAddr))
		require.NoError(b, err)
		defer c.Close()
		run(b, c)
	})
	b.Run("proxy", func(b *testing.B) {
		_, c := proxiedFlow(b, echo.LocalAddr())
		run(b, c)
	})
}

// BenchmarkForwardFunc measures the proxy's work for one datagram of an
// established flow, in each direction, socket write included.
func BenchmarkForwardFunc(b *testing.B) {
	sink := sinkUDP(b)
	p, f, ap := establishedFlow(b, sink.LocalAddr())
	d := make([]byte, 1200)
	d[0] = 0x40
	b.Run("client-to-backend", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(d)))
		for b.Loop() {
			p.handle(f.pc, f.udp, ap, d)
		}
	})
	b.Run("backend-to-client", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(d)))
		for b.Loop() {
			p.forwardToClient(f, d)
		}
	})
}

// sinkUDP returns a UDP socket on loopback that drops what it gets.
func sinkUDP(tb testing.TB) *net.UDPConn {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(tb, err)
	tb.Cleanup(func() { pc.Close() })
	go io.Copy(io.Discard, pc)
	return pc
}

// establishedFlow returns a proxy with one routed flow to backend, from a
// client whose datagrams the test hands to p.handle itself.
func establishedFlow(tb testing.TB, backend net.Addr) (*Proxy, *flow, netip.AddrPort) {
	ks := echtest.NewKeySet(tb, publicName)
	_, dgrams := helloDatagrams(tb, ks)
	p := &Proxy{
		Route:      func(Info) (net.Addr, error) { return backend, nil },
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
	}
	p.init()
	tb.Cleanup(func() { p.Close() })
	pc := sinkUDP(tb) // the proxy's socket: answers to the client go nowhere
	client := sinkUDP(tb)
	ap := client.LocalAddr().(*net.UDPAddr).AddrPort()
	for _, d := range dgrams {
		p.handle(pc, pc, ap, d)
	}
	p.mu.RLock()
	f := p.flows[ap]
	p.mu.RUnlock()
	require.NotNil(tb, f)
	require.True(tb, f.routed.Load())
	require.True(tb, f.hs.accepted)
	return p, f, ap
}

func TestForwardAllocs(t *testing.T) {
	sink := sinkUDP(t)
	p, f, ap := establishedFlow(t, sink.LocalAddr())
	d := make([]byte, 1200)
	d[0] = 0x40
	require.Zero(t, testing.AllocsPerRun(100, func() { p.handle(f.pc, f.udp, ap, d) }), "client to backend")
	require.Zero(t, testing.AllocsPerRun(100, func() { p.forwardToClient(f, d) }), "backend to client")
}
