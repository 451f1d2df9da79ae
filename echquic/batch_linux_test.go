//go:build linux

package echquic

import (
	"bytes"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// listenPair returns a socket listening on addr, as the proxy's, and a
// peer socket connected to it, or skips when the network is missing.
func listenPair(t *testing.T, listen, dial string) (*net.UDPConn, *net.UDPConn) {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(listen)))
	if err != nil {
		t.Skipf("no %s socket: %v", listen, err)
	}
	t.Cleanup(func() { pc.Close() })
	to := netip.AddrPortFrom(netip.MustParseAddr(dial), pc.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	peer, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Skipf("no route to %s: %v", to, err)
	}
	t.Cleanup(func() { peer.Close() })
	return pc, peer
}

// readBatch reads n datagrams from rc into b, in one or more batches, and
// returns copies of them with their source addresses.
func readBatch(t *testing.T, pc *net.UDPConn, b *batch, n int) (got [][]byte, from []netip.AddrPort) {
	t.Helper()
	rc, err := pc.SyscallConn()
	require.NoError(t, err)
	require.NoError(t, pc.SetReadDeadline(time.Now().Add(5*time.Second)))
	defer pc.SetReadDeadline(time.Time{})
	for len(got) < n {
		k, err := b.read(rc)
		require.NoError(t, err)
		for i := range k {
			got = append(got, bytes.Clone(b.datagram(i)))
			from = append(from, b.addr(i))
		}
	}
	return got, from
}

// datagrams returns datagrams of the given sizes, each filled with its index.
func datagrams(sizes ...int) [][]byte {
	var ds [][]byte
	for i, n := range sizes {
		ds = append(ds, bytes.Repeat([]byte{byte(i + 1)}, n))
	}
	return ds
}

// TestBatchRoundTrip reads datagrams from a peer with recvmmsg(2) and sends
// datagrams back to the address read, with sendmmsg(2) and with UDP GSO,
// over IPv4, IPv6 and a dual-stack socket; the peer must get them in order
// and unchanged, and the addresses must be those the net package reads.
func TestBatchRoundTrip(t *testing.T) {
	for _, tc := range []struct{ name, listen, dial string }{
		{"ipv4", "127.0.0.1:0", "127.0.0.1"},
		{"ipv6", "[::1]:0", "::1"},
		{"dual-stack", "[::]:0", "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, peer := listenPair(t, tc.listen, tc.dial)
			// The address as the net package reads it.
			_, err := peer.Write([]byte{0})
			require.NoError(t, err)
			require.NoError(t, pc.SetReadDeadline(time.Now().Add(5*time.Second)))
			_, want, err := pc.ReadFromUDPAddrPort(make([]byte, 16))
			require.NoError(t, err)

			b := newBatch(maxDatagramSize)
			for _, sizes := range [][]int{
				{1200, 1200, 1200, 1200, 500}, // one GSO send
				{1200, 1200, 1200},
				{100, 1200, 300}, // not one size: sendmmsg
				{1200, 1200, 1300},
				{700},
				{maxDatagramSize - 1, maxDatagramSize - 1, maxDatagramSize - 1},
				{1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200, 1200},
			} {
				sent := datagrams(sizes...)
				for _, d := range sent {
					_, err := peer.Write(d)
					require.NoError(t, err)
				}
				got, from := readBatch(t, pc, b, len(sent))
				require.Equal(t, sent, got, "read %v", sizes)
				for _, a := range from {
					require.Equal(t, want, a)
				}

				for _, gso := range []bool{true, false} {
					rc, err := pc.SyscallConn()
					require.NoError(t, err)
					var on atomic.Bool
					on.Store(gso)
					name := newSockName(from[0])
					for _, d := range got {
						b.queue(d, name)
					}
					b.flush(rc, &on)
					require.NoError(t, peer.SetReadDeadline(time.Now().Add(5*time.Second)))
					for i, d := range sent {
						buf := make([]byte, maxDatagramSize+1)
						n, err := peer.Read(buf)
						require.NoError(t, err, "datagram %d of %v, gso %v", i, sizes, gso)
						require.Equal(t, d, buf[:n], "datagram %d of %v, gso %v", i, sizes, gso)
					}
					if gso && !on.Load() {
						t.Logf("UDP GSO refused for %v: sent with sendmmsg", sizes)
					}
				}
			}
		})
	}
}

// TestBatchTruncated checks that a datagram larger than the batch slots is
// dropped, and the datagrams around it are not.
func TestBatchTruncated(t *testing.T) {
	pc, peer := listenPair(t, "127.0.0.1:0", "127.0.0.1")
	sent := datagrams(100, maxDatagramSize+1, 200)
	for _, d := range sent {
		_, err := peer.Write(d)
		require.NoError(t, err)
	}
	b := newBatch(maxDatagramSize)
	var kept [][]byte
	got, _ := readBatch(t, pc, b, len(sent))
	for _, d := range got {
		if d != nil {
			kept = append(kept, d)
		}
	}
	assert.Equal(t, [][]byte{sent[0], sent[2]}, kept)

	// The batch of serveBatches reads any datagram, as serveEach does.
	sent = datagrams(100, 20000, 200)
	for _, d := range sent {
		_, err := peer.Write(d)
		require.NoError(t, err)
	}
	got, _ = readBatch(t, pc, newBatch(1<<16), len(sent))
	assert.Equal(t, sent, got)
}

// TestBatchSendToConnected sends a batch on a connected socket, as the
// proxy does to a backend, and checks a refused datagram does not stop the
// others.
func TestBatchSendToConnected(t *testing.T) {
	pc, peer := listenPair(t, "127.0.0.1:0", "127.0.0.1")
	rc, err := peer.SyscallConn()
	require.NoError(t, err)
	b := newBatch(maxDatagramSize)
	sent := datagrams(1200, 1200, 1200)
	for _, gso := range []bool{true, false} {
		var on atomic.Bool
		on.Store(gso)
		for _, d := range sent {
			b.queue(d, nil)
		}
		b.flush(rc, &on)
		got, _ := readBatch(t, pc, b, len(sent))
		require.Equal(t, sent, got)
	}

	// A closed port: ICMP port unreachable makes a later send fail with
	// ECONNREFUSED; flush drops what fails and returns.
	closed, peer2 := listenPair(t, "127.0.0.1:0", "127.0.0.1")
	closed.Close()
	rc2, err := peer2.SyscallConn()
	require.NoError(t, err)
	var on atomic.Bool
	for range 3 {
		for _, d := range sent {
			b.queue(d, nil)
		}
		b.flush(rc2, &on)
		require.Zero(t, b.nout)
	}
}

func TestBatchAllocs(t *testing.T) {
	pc, peer := listenPair(t, "127.0.0.1:0", "127.0.0.1")
	rc, err := pc.SyscallConn()
	require.NoError(t, err)
	prc, err := peer.SyscallConn()
	require.NoError(t, err)
	b := newBatch(maxDatagramSize)
	d := make([]byte, 1200)
	var gso atomic.Bool
	gso.Store(true)
	// The peer sends a window in a batch, the socket reads it in a batch
	// and sends it back with GSO.
	allocs := testing.AllocsPerRun(100, func() {
		for range 8 {
			b.queue(d, nil)
		}
		b.flush(prc, &gso)
		n := 0
		for n < 8 {
			k, err := b.read(rc)
			if err != nil {
				panic(err)
			}
			n += k
		}
	})
	assert.Zero(t, allocs)
}
