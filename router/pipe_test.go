package router

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawBackend starts a TCP backend that runs serve on each connection.
func (e *env) rawBackend(serve func(net.Conn)) string {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(e.t, err)
	e.t.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, serve)
	return ln.Addr().String()
}

// tlsRawBackend starts a crypto/tls backend for tlsName that runs serve on
// each connection after the handshake.
func (e *env) tlsRawBackend(serve func(*tls.Conn)) string {
	e.t.Helper()
	cfg := &tls.Config{Certificates: []tls.Certificate{*e.cert(tlsName)}}
	return e.rawBackend(func(c net.Conn) {
		tc := tls.Server(c, cfg)
		if tc.Handshake() == nil {
			serve(tc)
		}
	})
}

// dialTLS connects to the router with ECH.
func (e *env) dialTLS(t *testing.T, name string) *tls.Conn {
	t.Helper()
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.addr, e.clientConfig(name, e.list))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	require.True(t, conn.ConnectionState().ECHAccepted)
	return conn
}

// TestIdleTimeout checks that a forwarded connection on which nothing moves
// is closed after its idle timeout, and that one on which bytes move one
// way only is not.
func TestIdleTimeout(t *testing.T) {
	t.Parallel()
	// A short timeout where nothing moves; a longer one where the test
	// must not see a pause of the backend's writes (which a loaded
	// machine stretches) as idleness.
	const idle, oneWayIdle = 300 * time.Millisecond, 2 * time.Second
	e := newEnv(t)
	silent := e.rawBackend(func(c net.Conn) { io.Copy(io.Discard, c) })
	talker := e.tlsRawBackend(func(c *tls.Conn) {
		for i := range 60 {
			fmt.Fprintf(c, "line %d\n", i)
			time.Sleep(oneWayIdle / 40)
		}
	})
	e.serve(
		Route{Name: "silent", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: silent,
			Certificate: e.cert(plainName), IdleTimeout: idle},
		Route{Name: "talker", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: talker, IdleTimeout: oneWayIdle},
	)

	t.Run("idle", func(t *testing.T) {
		conn := e.dialTLS(t, plainName)
		_, err := conn.Read(make([]byte, 1))
		assert.ErrorIs(t, err, io.EOF, "the router closed the idle connection")
		l := e.log()
		assert.Equal(t, "silent", l["route"])
		assert.Equal(t, errIdleTimeout.Error(), l["error"])
		assert.Equal(t, "INFO", l["level"])
	})
	t.Run("one way", func(t *testing.T) {
		// The backend writes 60 lines in 1.5 idle timeouts; the client
		// writes nothing.
		conn := e.dialTLS(t, tlsName)
		lines, err := io.ReadAll(conn)
		require.NoError(t, err)
		assert.Equal(t, 60, strings.Count(string(lines), "\n"))
		conn.Close()
		l := e.log()
		assert.Equal(t, "talker", l["route"])
		assert.Empty(t, l["error"])
	})
}

// TestFinTimeout checks that after the client closes its half, a backend
// that never closes its own is closed after the fin timeout.
func TestFinTimeout(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	backend := e.rawBackend(func(c net.Conn) {
		io.Copy(io.Discard, c) // until the client's half-close
		time.Sleep(20 * time.Second)
	})
	e.serve(Route{Name: "plain", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: backend,
		Certificate: e.cert(plainName), FinTimeout: 200 * time.Millisecond})
	conn := e.dialTLS(t, plainName)
	_, err := io.WriteString(conn, "bye\n")
	require.NoError(t, err)
	require.NoError(t, conn.CloseWrite())
	_, err = io.ReadAll(conn)
	assert.NoError(t, err, "the client sees the end")
	l := e.log()
	assert.Equal(t, errFinTimeout.Error(), l["error"])
	assert.Equal(t, "4", l["bytes_in"])
}

// TestBackendResetReachesClient checks that a backend's reset reaches the
// client as a reset, not as a clean end, and is logged at warn level.
func TestBackendResetReachesClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	reset := func(c net.Conn) {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	// The backend greets, waits for a byte, then resets: a reset
	// discards what the router has not read yet.
	plain := e.rawBackend(func(c net.Conn) {
		fmt.Fprintln(c, "hello")
		c.Read(make([]byte, 1))
		reset(c)
	})
	tlsBackend := e.tlsRawBackend(func(c *tls.Conn) {
		fmt.Fprintln(c, "hello")
		c.Read(make([]byte, 1))
		reset(c.NetConn())
	})
	e.serve(
		Route{Name: "plain", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: plain, Certificate: e.cert(plainName)},
		Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: tlsBackend},
	)
	for _, name := range []string{plainName, tlsName} {
		t.Run(name, func(t *testing.T) {
			conn := e.dialTLS(t, name)
			br := bufio.NewReader(conn)
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, "hello\n", line)
			_, err = io.WriteString(conn, "x")
			require.NoError(t, err)
			_, err = io.ReadAll(br)
			assert.ErrorIs(t, err, syscall.ECONNRESET)
			l := e.log()
			assert.Equal(t, "WARN", l["level"])
			assert.Contains(t, l["error"], errBackend.Error())
			assert.Contains(t, l["error"], syscall.ECONNRESET.Error())
		})
	}
}

// TestMaxConnections checks that a listener refuses connections beyond
// its cap, logs them, and serves again once under it.
func TestMaxConnections(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	e.addr = ln.Addr().String()
	go e.r.ServeListener(ln, Listener{MaxConnections: 1, Routes: []Route{
		{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)},
	}})

	// One connection that sends no hello holds the only place.
	first, err := net.Dial("tcp", e.addr)
	require.NoError(t, err)
	second, err := net.Dial("tcp", e.addr)
	require.NoError(t, err)
	defer second.Close()
	second.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = second.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "the second connection is closed at once")
	assert.Len(t, e.all.matching("WARN connection refused: max_connections reached", "max_connections=1", "refused=1"), 1, e.all.text())

	first.Close()
	e.log() // the first one, refused by NewConn
	greeting, _, _, err := exchange(e.addr, e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	assert.Equal(t, "tls "+tlsName+" ", greeting+" ")
}

// TestPublicNameHTTPLimits checks the timeouts and size limits of the
// public name's HTTPS server.
func TestPublicNameHTTPLimits(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.r.PublicTimeout = time.Second
	e.serve()
	dial := func(t *testing.T) *tls.Conn {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.addr,
			&tls.Config{ServerName: publicName, RootCAs: e.ca.Pool, NextProtos: []string{"http/1.1"}})
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		return conn
	}
	for _, tc := range []struct{ name, request, status string }{
		{"headers never end", "GET / HTTP/1.1\r\nHost: cover.example\r\n", ""},
		// The server reads the body before it answers 405, and gives up
		// at the read timeout.
		{"body never sent", "POST / HTTP/1.1\r\nHost: cover.example\r\nContent-Length: 100\r\n\r\n", ""},
		{"headers too large", "GET / HTTP/1.1\r\nHost: cover.example\r\nX-Big: " + strings.Repeat("a", 64<<10) + "\r\n\r\n", "HTTP/1.1 431 "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := dial(t)
			_, err := io.WriteString(conn, tc.request)
			require.NoError(t, err)
			resp, err := io.ReadAll(conn)
			var ne net.Error
			require.False(t, errors.As(err, &ne) && ne.Timeout(), "the router closes the connection")
			assert.True(t, strings.HasPrefix(string(resp), tc.status), "%q", resp)
		})
	}
}

// TestBackendDownResetsClient checks that a backend that cannot be reached
// fails the client with a reset, logged at warn level.
func TestBackendDownResetsClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dead := closedAddr(t)
	e.serve(Route{Name: "plain", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: dead, Certificate: e.cert(plainName)})
	conn := e.dialTLS(t, plainName)
	_, err := io.ReadAll(conn)
	assert.ErrorIs(t, err, syscall.ECONNRESET)
	l := e.log()
	assert.Equal(t, "WARN", l["level"])
	assert.Contains(t, l["error"], errBackend.Error())
}
