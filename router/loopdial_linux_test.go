//go:build linux

package router

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
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
func startLoopDial(t *testing.T, e *env, cfg *tls.Config, rt Route) (took bool, client <-chan loopDialResult, ended <-chan loopDialResult, c *ech.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	errc := make(chan loopDialResult, 1)
	go func() {
		conn, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			errc <- loopDialResult{err: err}
			return
		}
		cc := &countingConn{Conn: conn}
		defer func() { errc <- loopDialResult{cc.written.Load(), cc.read.Load(), err} }()
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
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
	conn, err := ln.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	c, err = ech.NewConn(context.Background(), conn, ech.WithKeySet(e.ks))
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
		took, client, _, c := startLoopDial(t, e, e.clientConfig(tlsName, e.list), Route{Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
		assert.False(t, took)
		c.Close()
		assert.Error(t, (<-client).err)
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
	// A listener whose accept queue is full drops the SYNs that come: a
	// backend that never answers.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer syscall.Close(fd)
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	require.NoError(t, syscall.Listen(fd, 0))
	sa, err := syscall.Getsockname(fd)
	require.NoError(t, err)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	var fill []net.Conn
	defer func() {
		for _, c := range fill {
			c.Close()
		}
	}()
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break // the queue is full
		}
		fill = append(fill, c)
		require.Less(t, len(fill), 16, "the accept queue never filled")
	}

	start := time.Now()
	took, client, ended, _ := startLoopDial(t, e, e.clientConfig(tlsName, nil), Route{Mode: ModePassthrough, Backend: addr})
	require.True(t, took)
	assert.ErrorIs(t, (<-client).err, syscall.ECONNRESET, "the client gets a reset")
	r := <-ended
	assert.GreaterOrEqual(t, time.Since(start), e.r.DialTimeout)
	assert.ErrorIs(t, r.err, errBackend)
	assert.Contains(t, r.err.Error(), "dial tcp "+addr+": i/o timeout")
}
