//go:build linux && !386

package router

import (
	"crypto/tls"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// helloThenFIN forwards the client's first write (its ClientHello) and
// half-closes right after; its reads never return.
type helloThenFIN struct {
	*net.TCPConn
	stop chan struct{}
}

func (c helloThenFIN) Write(b []byte) (int, error) {
	n, err := c.TCPConn.Write(b)
	c.TCPConn.CloseWrite()
	return n, err
}
func (c helloThenFIN) Read([]byte) (int, error) { <-c.stop; return 0, io.EOF }

// shPrefix is the length of a ServerHello record up to its random's end.
const shPrefix = 5 + 4 + 2 + 32

// TestLoopEOFBeforeHandoff: the client sends an ECH hello and half-closes
// before the backend answers. Direction 0 ends (EOF) as a goroutine before
// any loop exists; direction 1 is then handed to a loop, and its EOF must
// end the connection (or the fin timeout must). (Found in review: the
// connection lived on until its idle timeout.)
func TestLoopEOFBeforeHandoff(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	backend := e.rawBackend(func(c net.Conn) {
		time.Sleep(300 * time.Millisecond) // the client's FIN comes first
		c.Read(make([]byte, 4096))
		sh := make([]byte, shPrefix)
		copy(sh, []byte{22, 3, 3, 0, 60, 2, 0, 0, 56, 3, 3})
		sh[shPrefix-1] = 1 // not the HRR random
		c.Write(sh)
		time.Sleep(100 * time.Millisecond)
		c.Write([]byte("data"))
		time.Sleep(100 * time.Millisecond)
		c.Close()
	})
	e.serve(Route{Name: "r", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend,
		IdleTimeout: 8 * time.Second, FinTimeout: 2 * time.Second})
	raw, err := net.Dial("tcp", e.addr)
	require.NoError(t, err)
	defer raw.Close()
	stop := make(chan struct{})
	defer close(stop)
	go tls.Client(helloThenFIN{raw.(*net.TCPConn), stop}, e.clientConfig(tlsName, e.list)).Handshake()
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(raw)
	assert.Contains(t, string(got), "data")
	start := time.Now()
	select {
	case l := <-e.logs:
		t.Logf("logged after %v: %v", time.Since(start), l)
		assert.NotEqual(t, "0", l["bytes_in"], "the hello was forwarded")
	case <-time.After(3 * time.Second):
		t.Fatalf("both sides closed, fin timeout 2s, and the connection has not ended after 3s (idle timeout 8s)")
	}
}

// TestLoopLargeBursts: bursts of 4 MiB, far more than a loop reads at
// once, reach the router at once. A read that fills the buffer is not
// short, and must not be taken for a drained socket. (Found in review,
// when large bursts were spliced through pipes of 64 KiB: a full pipe
// left the rest of the burst in the socket.)
func TestLoopLargeBursts(t *testing.T) {
	const size = 4 << 20
	data := make([]byte, size)
	e := newEnv(t)
	backend := e.tlsRawBackend(func(c *tls.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		var cmd [1]byte
		for {
			if _, err := io.ReadFull(c, cmd[:]); err != nil {
				return
			}
			c.Write(data)
		}
	})
	e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend})
	conn := e.dialTLS(t, tlsName)
	waitInLoop(t, conn)
	for i := range 20 {
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err := conn.Write([]byte{'r'})
		require.NoError(t, err)
		_, err = io.ReadFull(conn, make([]byte, size))
		require.NoError(t, err, "round %d", i)
	}
}

type helloOnly struct {
	*net.TCPConn
	stop chan struct{}
}

func (c helloOnly) Read([]byte) (int, error) { <-c.stop; return 0, io.EOF }

// TestLoopHandshakeTimeoutEnds: an ECH hello whose backend never answers.
// ech.Conn's watching read hits NewConn's deadline, which ends the
// handshake for good: the connection ends, and is logged, at once. (Found
// in review: the error matched os.ErrDeadlineExceeded, which the copy took
// for the end of an idle window, and it read again, at 100% CPU, until
// the idle timeout.)
func TestLoopHandshakeTimeoutEnds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.r.HandshakeTimeout = 300 * time.Millisecond
	backend := e.rawBackend(func(c net.Conn) {
		io.Copy(io.Discard, c) // never answers
	})
	e.serve(Route{Name: "r", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend, IdleTimeout: time.Minute})
	raw, err := net.Dial("tcp", e.addr)
	require.NoError(t, err)
	defer raw.Close()
	stop := make(chan struct{})
	defer close(stop)
	go tls.Client(helloOnly{raw.(*net.TCPConn), stop}, e.clientConfig(tlsName, e.list)).Handshake()
	select {
	case l := <-e.logs:
		assert.Contains(t, l["error"], "handshake timed out")
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not end at the handshake timeout")
	}
}

func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	s, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { c.Close(); s.Close() })
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

func forceBuf(t *testing.T, c *net.TCPConn, opt int) {
	rc, _ := c.SyscallConn()
	rc.Control(func(fd uintptr) {
		require.NoError(t, syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, 8<<20))
	})
}

// TestLoopHandOffWithMuchQueued: a direction handed over with more than
// loopBudget already queued in its socket, and nothing arriving after,
// must be forwarded whole. (Found in review: the pump off the loop's
// goroutine stopped at the budget and queued the rest for a loop that
// nothing woke.)
func TestLoopHandOffWithMuchQueued(t *testing.T) {
	client, clientPeer := tcpPair(t) // client: the router's side
	backend, backendPeer := tcpPair(t)
	forceBuf(t, client, syscall.SO_RCVBUFFORCE)
	forceBuf(t, backend, syscall.SO_SNDBUFFORCE)
	forceBuf(t, backendPeer, syscall.SO_RCVBUFFORCE)
	p := &pipe{client: client, clientTCP: client, backend: backend, idle: time.Minute, fin: time.Minute}
	p.done = func(in, out int64, err error) {}
	p.active.Store(time.Now().UnixNano())
	p.mu.Lock()
	require.NoError(t, p.handToLoop(0))
	p.mu.Unlock()
	const size = 3 << 20
	_, err := clientPeer.Write(make([]byte, size))
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond) // all queued in client's socket
	p.mu.Lock()
	p.resolveInLoop(0, dirResult{err: errHandedOff}, true) // unlocks
	backendPeer.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := io.ReadFull(backendPeer, make([]byte, size))
	assert.NoError(t, err, "got %d of %d bytes", n, size)
	p.Close()
}
