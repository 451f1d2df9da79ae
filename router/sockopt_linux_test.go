package router

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestListenDefersAccept checks that the router's listeners accept a
// connection once its first bytes have come, and set no TCP keepalive.
func TestListenDefersAccept(t *testing.T) {
	t.Parallel()
	ln, err := listenConfig.Listen(context.Background(), "tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	select {
	case <-accepted:
		t.Fatal("accepted before the client sent anything")
	case <-time.After(300 * time.Millisecond):
	}
	_, err = client.Write([]byte{22})
	require.NoError(t, err)
	select {
	case c := <-accepted:
		defer c.Close()
		raw, err := c.(*net.TCPConn).SyscallConn()
		require.NoError(t, err)
		var keepAlive int
		require.NoError(t, raw.Control(func(fd uintptr) {
			keepAlive, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
		}))
		require.NoError(t, err)
		assert.Zero(t, keepAlive, "no TCP keepalive")
	case <-time.After(10 * time.Second):
		t.Fatal("not accepted after the client's first byte")
	}
}
