//go:build linux && !386

package router

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// loopPair returns a pipe in a loop, both directions handed over, between
// the router's sockets of two TCP connections, and their peers: the client
// and the backend. ended receives the error the connection ends with.
func loopPair(t *testing.T) (p *pipe, client, backend *net.TCPConn, ended chan error) {
	t.Helper()
	clientSide, client := tcpPair(t)
	backendSide, backend := tcpPair(t)
	p = &pipe{client: clientSide, clientTCP: clientSide, backend: backendSide, idle: time.Minute, fin: time.Minute}
	ended = make(chan error, 1)
	p.done = func(in, out int64, err error) { ended <- err }
	p.active.Store(time.Now().UnixNano())
	p.resolve(0, dirResult{err: errHandedOff})
	p.resolve(1, dirResult{err: errHandedOff})
	p.mu.Lock()
	defer p.mu.Unlock()
	require.NotNil(t, p.loop)
	require.True(t, p.loop.inLoop[0] && p.loop.inLoop[1])
	t.Cleanup(func() { p.Close() })
	return p, client, backend, ended
}

// TestLoopBlockedSourceNotRead: while a backend does not read, the loop
// waits for the backend's socket to take more (EPOLLOUT), and no longer
// for the client's (EPOLLIN): edge triggered, each segment the client
// sent meanwhile would wake the loop for nothing, each wake-up an
// interrupt sent by the client's processor. Once the backend reads, the
// loop waits for the client again, and every byte arrives.
func TestLoopBlockedSourceNotRead(t *testing.T) {
	t.Parallel()
	p, client, backend, _ := loopPair(t)
	data := make([]byte, 16<<20) // more than the sockets hold
	rand.NewChaCha8([32]byte{2}).Read(data)
	written := make(chan error, 1)
	go func() {
		_, err := client.Write(data)
		if err == nil {
			err = client.CloseWrite()
		}
		written <- err
	}()
	p.mu.Lock()
	epfd, fds := p.loop.l.epfd, p.loop.fd
	p.mu.Unlock()
	const in, out = syscall.EPOLLIN, syscall.EPOLLOUT
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		blocked := p.loop.blocked[0]
		p.mu.Unlock()
		if blocked {
			break
		}
		require.True(t, time.Now().Before(deadline), "the client's direction never blocked on the backend")
		time.Sleep(time.Millisecond)
	}
	p.mu.Lock() // the registrations do not change under p.mu
	clientMask, ok0 := epollMask(epfd, fds[0])
	backendMask, ok1 := epollMask(epfd, fds[1])
	p.mu.Unlock()
	require.True(t, ok0 && ok1)
	assert.Zero(t, clientMask&in, "blocked, the client's socket is not read: %#x", clientMask)
	assert.NotZero(t, backendMask&out, "blocked, the loop waits for the backend's socket to take more: %#x", backendMask)
	assert.NotZero(t, backendMask&in, "the other direction still reads the backend: %#x", backendMask)

	backend.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(backend)
	require.NoError(t, err)
	require.NoError(t, <-written)
	assert.True(t, bytes.Equal(data, got), "got %d of %d bytes, or others", len(got), len(data))
	p.mu.Lock()
	clientMask, _ = epollMask(epfd, fds[0])
	backendMask, _ = epollMask(epfd, fds[1])
	p.mu.Unlock()
	assert.NotZero(t, clientMask&in, "unblocked, the client's socket is read again: %#x", clientMask)
	assert.Zero(t, backendMask&out, "unblocked: %#x", backendMask)
}

// TestLoopLeavesGoPoller: once both directions of a connection are the
// loop's, its sockets leave Go's poller, which would otherwise wake a
// thread for nothing at each segment; the connection still forwards both
// ways, and closes.
func TestLoopLeavesGoPoller(t *testing.T) {
	t.Parallel()
	p, client, backend, ended := loopPair(t)
	require.GreaterOrEqual(t, goEpfd, 0, "Go's epoll set not found")
	registered := func(fd int) bool {
		_, ok := epollMask(goEpfd, fd)
		return ok
	}
	rc, err := client.SyscallConn()
	require.NoError(t, err)
	rc.Control(func(fd uintptr) {
		assert.True(t, registered(int(fd)), "a socket read in Go is in Go's poller")
	})
	p.mu.Lock()
	fds := p.loop.fd
	p.mu.Unlock()
	echo := func(from, to *net.TCPConn, size int) {
		t.Helper()
		_, err := from.Write(make([]byte, size))
		require.NoError(t, err)
		to.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(to, make([]byte, size))
		require.NoError(t, err)
	}
	p.mu.Lock() // the registrations do not change under p.mu
	for _, fd := range fds {
		assert.False(t, registered(fd), "socket %d of a loop connection is in Go's poller", fd)
	}
	p.mu.Unlock()
	echo(client, backend, 100)
	echo(backend, client, 100)
	echo(client, backend, 1<<20)
	require.NoError(t, client.CloseWrite())
	require.NoError(t, backend.CloseWrite())
	for _, c := range []*net.TCPConn{client, backend} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		assert.Equal(t, io.EOF, err)
	}
	select {
	case err := <-ended:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not end after both half-closes")
	}
}

// TestLoopSlowLogReader: while reporting one connection's end waits (a
// log reader that does not read), the loop forwards other connections,
// and the ends that come meanwhile wait in the queue, each as an entry
// rather than a goroutine; all are reported once the log moves.
func TestLoopSlowLogReader(t *testing.T) {
	// Not parallel: it holds the one reporter of every loop.
	release := make(chan struct{})
	reported := make(chan error, 100)
	blocking := func(p *pipe) {
		p.mu.Lock()
		p.done = func(in, out int64, err error) {
			select {
			case <-release:
			case <-t.Context().Done(): // the test failed
			}
			reported <- err
		}
		p.mu.Unlock()
	}
	const n = 20
	mine := make(map[*pipe]bool)
	for i := range n {
		p, client, backend, _ := loopPair(t)
		mine[p] = true
		blocking(p)
		client.Close()
		backend.Close()
		if i == 0 {
			// The first end is in the reporter, waiting.
			time.Sleep(100 * time.Millisecond)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		queued := 0
		ends.Lock()
		for _, r := range ends.queue {
			if mine[r.p] {
				queued++
			}
		}
		ends.Unlock()
		if queued == n-1 {
			break
		}
		require.True(t, time.Now().Before(deadline), "%d of this test's ends queued, want %d", queued, n-1)
		time.Sleep(5 * time.Millisecond)
	}

	p, client, backend, _ := loopPair(t)
	blocking(p)
	for _, dir := range []struct{ from, to *net.TCPConn }{{client, backend}, {backend, client}} {
		_, err := dir.from.Write([]byte("ping"))
		require.NoError(t, err)
		dir.to.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(dir.to, make([]byte, 4))
		require.NoError(t, err, "the loop forwards while the log is stuck")
	}
	client.Close()
	backend.Close()
	close(release)
	for i := range n + 1 {
		select {
		case <-reported:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d ends reported once the log moved", i, n+1)
		}
	}
}
