//go:build linux && !386

package router

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// loopDialResult is what a connection's end reported, or what its client
// counted.
type loopDialResult struct {
	in, out int64
	err     error
}

// startLoopDial runs passthroughInLoop with rt on the router's side of a
// connection from a crypto/tls client with cfg, which greets, sends
// "ping", and reads the echo. It returns whether passthroughInLoop took the
// connection, the client's result (the bytes it wrote and read on TCP), and
// the end's.
func startLoopDial(t *testing.T, e *env, cfg *tls.Config, rt Route) (took bool, client <-chan loopDialResult, ended chan loopDialResult, c *ech.Conn) {
	t.Helper()
	conn, clientConn := tcpPair(t)
	errc := make(chan loopDialResult, 1)
	go func() {
		var err error
		cc := &countingConn{Conn: clientConn}
		defer func() { errc <- loopDialResult{cc.written.Load(), cc.read.Load(), err} }()
		defer clientConn.Close()
		clientConn.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Client(cc, cfg)
		if err = tc.Handshake(); err != nil {
			return
		}
		// The backends greet, then echo.
		br := bufio.NewReader(tc)
		if _, err = br.ReadString('\n'); err != nil {
			return
		}
		io.WriteString(tc, "ping\n")
		tc.CloseWrite()
		var echo []byte
		if echo, err = io.ReadAll(br); err == nil && string(echo) != "ping\n" {
			err = io.ErrUnexpectedEOF
		}
	}()
	c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(e.ks))
	require.NoError(t, err)
	endc := make(chan loopDialResult, 1)
	took = e.r.passthroughInLoop(c, strings.TrimSuffix(c.ServerName(), "."), &rt, func(in, out int64, err error) {
		endc <- loopDialResult{in, out, err}
	})
	return took, errc, endc, c
}

// TestPassthroughInLoop checks which connections a loop connects to their
// backend itself, and that such a connection is forwarded whole, its PROXY
// header first.
func TestPassthroughInLoop(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	noECH := e.clientConfig(tlsName, nil)

	t.Run("no ECH", func(t *testing.T) {
		took, client, ended, _ := startLoopDial(t, e, noECH, Route{Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
		require.True(t, took)
		cr := <-client
		require.NoError(t, cr.err)
		r := <-ended
		assert.NoError(t, r.err)
		assert.Equal(t, cr.in, r.in, "all the client wrote")
		assert.Equal(t, cr.out, r.out, "all it read")
	})
	t.Run("PROXY header", func(t *testing.T) {
		proxied := make(chan proxyInfo, 1)
		took, client, ended, c := startLoopDial(t, e, noECH,
			Route{Mode: ModePassthrough, Backend: e.proxyTLSBackend(proxied), ProxyProtocol: true})
		require.True(t, took)
		cr := <-client
		require.NoError(t, cr.err)
		pi := <-proxied
		require.NoError(t, pi.err)
		assert.Equal(t, c.RemoteAddr().String(), pi.src.String())
		assert.Equal(t, c.LocalAddr().String(), pi.dst.String())
		assert.Equal(t, tlsName, pi.tlvs[pp2TypeAuthority])
		r := <-ended
		assert.NoError(t, r.err)
		assert.Equal(t, cr.in, r.in, "the client's bytes, not the header")
		assert.Equal(t, cr.out, r.out)
	})
	t.Run("ECH accepted", func(t *testing.T) {
		// The server's first message is to watch: goroutines forward.
		rt := Route{Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)}
		took, client, ended, c := startLoopDial(t, e, e.clientConfig(tlsName, e.list), rt)
		assert.False(t, took)
		// Nothing of the hello was read: the goroutines forward it all.
		e.r.passthrough(c, tlsName, &rt, func(in, out int64, err error) {
			ended <- loopDialResult{in, out, err}
		})
		require.NoError(t, (<-client).err)
		assert.NoError(t, (<-ended).err)
	})
	t.Run("backend by name", func(t *testing.T) {
		_, port, err := net.SplitHostPort(e.tlsBackend(tlsName))
		require.NoError(t, err)
		took, client, _, c := startLoopDial(t, e, noECH, Route{Mode: ModePassthrough, Backend: "localhost:" + port})
		assert.False(t, took, "Go's dialer resolves names")
		// Nothing of the hello was read: it is all still there.
		e.r.passthrough(c, tlsName, &Route{Mode: ModePassthrough, Backend: "localhost:" + port}, func(int64, int64, error) {})
		assert.NoError(t, (<-client).err)
	})
	t.Run("refused", func(t *testing.T) {
		dead := closedAddr(t)
		took, client, ended, _ := startLoopDial(t, e, noECH, Route{Mode: ModePassthrough, Backend: dead})
		require.True(t, took)
		assert.ErrorIs(t, (<-client).err, syscall.ECONNRESET, "the client gets a reset")
		r := <-ended
		assert.ErrorIs(t, r.err, errBackend)
		assert.ErrorIs(t, r.err, syscall.ECONNREFUSED)
		assert.Contains(t, r.err.Error(), "dial tcp "+dead+": connect: connection refused")
	})
}

// TestPassthroughInLoopDialTimeout checks that a loop gives up connecting
// to a backend that does not answer after the dial timeout, and resets the
// client.
func TestPassthroughInLoopDialTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.r.DialTimeout = 300 * time.Millisecond
	addr := silentAddr(t)
	start := time.Now()
	took, client, ended, _ := startLoopDial(t, e, e.clientConfig(tlsName, nil), Route{Mode: ModePassthrough, Backend: addr})
	require.True(t, took)
	assert.ErrorIs(t, (<-client).err, syscall.ECONNRESET, "the client gets a reset")
	r := <-ended
	assert.GreaterOrEqual(t, time.Since(start), e.r.DialTimeout)
	assert.ErrorIs(t, r.err, errBackend)
	assert.Contains(t, r.err.Error(), "dial tcp "+addr+": i/o timeout")
}

// silentAddr returns the address of a listener whose accept queue is full,
// for the test's duration: it drops the SYNs that come, a backend that
// never answers a connect.
func silentAddr(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { syscall.Close(fd) })
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	require.NoError(t, syscall.Listen(fd, 0))
	sa, err := syscall.Getsockname(fd)
	require.NoError(t, err)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	for n := 0; ; n++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr // the queue is full
		}
		t.Cleanup(func() { c.Close() })
		require.Less(t, n, 16, "the accept queue never filled")
	}
}

// TestPassthroughInLoopShutdown closes the router while a loop connects to
// a backend that does not answer: Close ends the connection at once, and
// it is logged without an error.
func TestPassthroughInLoopShutdown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.r.DialTimeout = time.Minute
	e.serve(Route{Name: "silent", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: silentAddr(t)})
	conn, err := net.Dial("tcp", e.addr)
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write(captureHello(t, e.clientConfig(tlsName, nil)))
	require.NoError(t, err)
	connecting := func() bool {
		e.r.mu.Lock()
		defer e.r.mu.Unlock()
		for _, closer := range e.r.conns {
			if p, ok := closer.(*pipe); ok {
				p.mu.Lock()
				c := p.loop != nil && p.loop.connecting
				p.mu.Unlock()
				return c
			}
		}
		return false
	}
	require.Eventually(t, connecting, 5*time.Second, time.Millisecond, "the loop connects")

	start := time.Now()
	require.NoError(t, e.r.Close())
	assert.Less(t, time.Since(start), 5*time.Second)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	require.Error(t, err)
	assert.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the client's connection is closed")
	l := e.log()
	assert.Equal(t, "silent", l["route"])
	assert.Empty(t, l["error"], "a shutdown is not the backend's failure")
}

// TestRoutesToLoop checks which connections the accepting goroutine routes
// itself: those a loop connects to their backend.
func TestRoutesToLoop(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	routes := []Route{
		{Name: "ip", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: "127.0.0.1:1"},
		{Name: "name", ServerNames: []string{"byname.example"}, Mode: ModePassthrough, Backend: "localhost:1"},
		{Name: "terminate", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: "127.0.0.1:1", Certificate: e.cert(plainName)},
	}
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		want bool
	}{
		{"passthrough to an IP address", e.clientConfig(tlsName, nil), true},
		{"ECH accepted", e.clientConfig(tlsName, e.list), false},
		{"passthrough to a host name", e.clientConfig("byname.example", nil), false},
		{"terminate", e.clientConfig(plainName, nil), false},
		{"public name", e.clientConfig(publicName, nil), false},
		{"no route", e.clientConfig("other.example", nil), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, client := tcpPair(t)
			_, err := client.Write(captureHello(t, tc.cfg))
			require.NoError(t, err)
			c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(e.ks))
			require.NoError(t, err)
			assert.Equal(t, tc.want, e.r.routesToLoop(c, routes, e.r.destOf(c, routes)))
		})
	}
}
