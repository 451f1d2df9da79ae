package ech_test

import (
	"context"
	"crypto/tls"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestListenerInline checks which connections Listener.Inline is offered,
// and that it runs on the accepting goroutine: a whole hello without ECH
// is; one with ECH, or one that has not all come, goes to Handle; one
// Inline declines goes to Handle too.
func TestListenerInline(t *testing.T) {
	t.Parallel()
	// Accepted once the first bytes have come, as the router's are.
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		rc.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT, 1)
		})
		return err
	}}
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	require.NoError(t, err)
	raw := &countingListener{Listener: l}
	ks := echtest.NewKeySet(t, publicName)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	ln := ech.NewListener(raw, ech.WithKeySet(ks))
	t.Cleanup(func() { ln.Close() })

	inlined := make(chan *ech.Conn, 4)
	handled := make(chan *ech.Conn, 4)
	release := make(chan struct{})
	ln.Inline = func(c *ech.Conn) bool {
		inlined <- c
		if c.ServerName() == "decline.example" {
			return false
		}
		<-release // holds the accepting goroutine
		c.Close()
		return true
	}
	ln.Handle = func(c *ech.Conn) {
		handled <- c
		c.Close()
	}
	go ln.Accept()

	send := func(b []byte) net.Conn {
		conn, err := net.Dial("tcp", ln.Addr().String())
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		_, err = conn.Write(b)
		require.NoError(t, err)
		return conn
	}
	next := func(ch <-chan *ech.Conn, what string) *ech.Conn {
		t.Helper()
		select {
		case c := <-ch:
			return c
		case <-time.After(testTimeout):
			t.Fatalf("no connection %s", what)
			return nil
		}
	}

	send(captureHello(t, &tls.Config{ServerName: "inline.example"}))
	c := next(inlined, "inlined")
	assert.Equal(t, "inline.example", c.ServerName())
	assert.Equal(t, ech.StatusNotOffered, c.Status())

	// While Inline runs, the next connection waits to be accepted.
	send(captureHello(t, &tls.Config{ServerName: innerName, EncryptedClientHelloConfigList: list, MinVersion: tls.VersionTLS13}))
	select {
	case <-handled:
		t.Fatal("a connection was accepted while Inline ran")
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	c = next(handled, "with ECH handled")
	assert.Equal(t, ech.StatusAccepted, c.Status(), "a hello with ECH is never inlined")

	hello := captureHello(t, &tls.Config{ServerName: "split.example"})
	conn := send(hello[:len(hello)/2])
	// Accepted with half its hello, and looked at: the peek follows the
	// accept on the same goroutine.
	require.Eventually(t, func() bool { return raw.accepted.Load() == 3 }, testTimeout, time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	_, err = conn.Write(hello[len(hello)/2:])
	require.NoError(t, err)
	assert.Equal(t, "split.example", next(handled, "split handled").ServerName())

	send(captureHello(t, &tls.Config{ServerName: "decline.example"}))
	assert.Equal(t, "decline.example", next(inlined, "offered").ServerName())
	assert.Equal(t, "decline.example", next(handled, "declined handled").ServerName())
	assert.Empty(t, inlined, "only the whole hellos without ECH were offered")
}
