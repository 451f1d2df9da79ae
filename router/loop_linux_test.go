//go:build linux && !386

package router

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// inLoop reports whether the connection of the client at addr is
// forwarded by a loop.
func inLoop(addr string) bool {
	loopFor() // the loops are started
	for _, l := range loops.l {
		l.mu.Lock()
		for _, p := range l.pipes {
			if p.clientTCP.RemoteAddr().String() == addr {
				l.mu.Unlock()
				return true
			}
		}
		l.mu.Unlock()
	}
	return false
}

// waitInLoop waits until conn's connection is in a loop.
func waitInLoop(t *testing.T, conn net.Conn) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !inLoop(conn.LocalAddr().String()) {
		require.True(t, time.Now().Before(deadline), "the connection never reached a loop")
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLoopForwards checks that a passthrough connection is handed to a
// loop after the handshake, with no byte lost on the way, and is forwarded
// both ways from there.
func TestLoopForwards(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	conn := e.dialTLS(t, tlsName)
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	require.NoError(t, err)
	assert.Contains(t, string(buf[:n]), "tls "+tlsName, "the greeting")
	waitInLoop(t, conn)
	for i := range 20 {
		msg := []byte(string(rune('a'+i)) + "\n")
		_, err := conn.Write(msg)
		require.NoError(t, err)
		_, err = io.ReadFull(conn, buf[:len(msg)])
		require.NoError(t, err)
		assert.Equal(t, msg, buf[:len(msg)])
	}
	conn.Close()
	l := e.log()
	assert.Equal(t, "tls", l["route"])
	// The backend's close_notify may meet the client's reset, as the
	// client closed both halves: that is the client's doing.
	assert.Equal(t, "INFO", l["level"], l["error"])
	assert.NotEqual(t, "0", l["bytes_in"])
	assert.NotEqual(t, "0", l["bytes_out"])
}

// TestLoopIdleAndFinTimeouts checks the idle and fin timeouts of
// connections in a loop.
func TestLoopIdleAndFinTimeouts(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	silent := e.tlsRawBackend(func(c *tls.Conn) { io.Copy(io.Discard, c) })
	const other = "other.example"
	otherCfg := &tls.Config{Certificates: []tls.Certificate{*e.cert(other)}}
	lingering := e.rawBackend(func(c net.Conn) {
		tc := tls.Server(c, otherCfg)
		io.Copy(io.Discard, tc) // until the client's half-close
		time.Sleep(20 * time.Second)
	})
	e.serve(
		Route{Name: "silent", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: silent, IdleTimeout: 300 * time.Millisecond},
		Route{Name: "lingering", ServerNames: []string{other}, Mode: ModePassthrough, Backend: lingering, FinTimeout: 300 * time.Millisecond},
	)
	t.Run("idle", func(t *testing.T) {
		conn := e.dialTLS(t, tlsName)
		start := time.Now()
		_, err := conn.Read(make([]byte, 1))
		assert.Error(t, err, "the router closed the idle connection")
		assert.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond)
		l := e.log()
		assert.Equal(t, "silent", l["route"])
		assert.Equal(t, errIdleTimeout.Error(), l["error"])
		assert.Equal(t, "INFO", l["level"])
	})
	t.Run("fin", func(t *testing.T) {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", e.addr, e.clientConfig(other, e.list))
		require.NoError(t, err)
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		waitInLoop(t, conn)
		_, err = io.WriteString(conn, "bye\n")
		require.NoError(t, err)
		require.NoError(t, conn.CloseWrite())                          // close_notify
		require.NoError(t, conn.NetConn().(*net.TCPConn).CloseWrite()) // and the TCP half-close
		_, err = io.ReadAll(conn)
		assert.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the router closes the connection: %v", err)
		l := e.log()
		assert.Equal(t, "lingering", l["route"])
		assert.Equal(t, errFinTimeout.Error(), l["error"])
	})
}

// TestLoopSlowPeers sends 16 MiB each way to a peer that starts reading
// late, so that the loop holds what the peer does not take and stops
// reading until it does, and compares hashes at both ends.
func TestLoopSlowPeers(t *testing.T) {
	t.Parallel()
	const size = 16 << 20
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{1}).Read(data)
	sum := sha256.Sum256(data)
	e := newEnv(t)
	backend := e.tlsRawBackend(func(c *tls.Conn) {
		c.SetDeadline(time.Now().Add(60 * time.Second))
		var cmd [1]byte
		if _, err := io.ReadFull(c, cmd[:]); err != nil {
			return
		}
		if cmd[0] == 'r' {
			// Send, to a client that reads late.
			c.Write(data)
			c.Close()
			return
		}
		// Receive, late, and answer with the hash.
		time.Sleep(500 * time.Millisecond)
		h := sha256.New()
		io.Copy(h, c)
		io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
		c.Close()
	})
	e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend})

	t.Run("to the client", func(t *testing.T) {
		conn := e.dialTLS(t, tlsName)
		conn.SetDeadline(time.Now().Add(60 * time.Second))
		_, err := conn.Write([]byte{'r'})
		require.NoError(t, err)
		waitInLoop(t, conn)
		time.Sleep(500 * time.Millisecond)
		got, err := io.ReadAll(conn)
		require.NoError(t, err)
		require.Len(t, got, size)
		assert.Equal(t, sum, sha256.Sum256(got))
		conn.Close()
		l := e.log()
		assert.Empty(t, l["error"])
	})
	t.Run("to the backend", func(t *testing.T) {
		conn := e.dialTLS(t, tlsName)
		conn.SetDeadline(time.Now().Add(60 * time.Second))
		_, err := conn.Write([]byte{'w'})
		require.NoError(t, err)
		_, err = io.Copy(conn, bytes.NewReader(data))
		require.NoError(t, err)
		require.NoError(t, conn.CloseWrite())
		require.NoError(t, conn.NetConn().(*net.TCPConn).CloseWrite())
		got, err := io.ReadAll(conn)
		require.NoError(t, err)
		assert.Equal(t, hex.EncodeToString(sum[:]), string(got))
		conn.Close()
		l := e.log()
		assert.Empty(t, l["error"])
	})
}

// TestLoopShutdown checks that closing the router ends the connections in
// loops at once, each logged without an error.
func TestLoopShutdown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.serve(Route{Name: "tls", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: e.tlsBackend(tlsName)})
	conns := make([]*tls.Conn, 3)
	for i := range conns {
		conns[i] = e.dialTLS(t, tlsName)
		_, err := conns[i].Read(make([]byte, 64))
		require.NoError(t, err)
		waitInLoop(t, conns[i])
	}
	closed := make(chan struct{})
	go func() { e.r.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end the connections in loops")
	}
	for _, c := range conns {
		_, err := c.Read(make([]byte, 1))
		assert.Error(t, err)
		assert.False(t, inLoop(c.LocalAddr().String()))
		l := e.log()
		assert.Empty(t, l["error"])
	}
}

// splitConn writes each buffer in two parts, the second after a pause, as
// a backend far away or with a large certificate chain has its first flight
// arrive in several reads.
type splitConn struct{ net.Conn }

func (c splitConn) Write(b []byte) (int, error) {
	if len(b) < 100 {
		return c.Conn.Write(b)
	}
	n, err := c.Conn.Write(b[:50])
	if err != nil {
		return n, err
	}
	time.Sleep(50 * time.Millisecond)
	m, err := c.Conn.Write(b[50:])
	return n + m, err
}

// TestLoopSplitServerFlight checks that a server's first flight that
// reaches the router in parts reaches the client whole while the client's
// side is still in its handshake: the client needs all of it to end its
// own.
func TestLoopSplitServerFlight(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{*e.cert(tlsName)}}
	backend := e.rawBackend(func(c net.Conn) {
		tc := tls.Server(splitConn{c}, cfg)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		echoBackend(tc, "split")
	})
	e.serve(Route{Name: "split", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend})
	conn := e.dialTLS(t, tlsName) // fails if the flight never arrives whole
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "split\n", string(buf[:n]))
	_, err = io.WriteString(conn, "ping\n")
	require.NoError(t, err)
	_, err = io.ReadFull(conn, buf[:5])
	require.NoError(t, err)
	assert.Equal(t, "ping\n", string(buf[:5]))
	waitInLoop(t, conn)
}
