package ech_test

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// handOver is the backend as a proxy's copy sees it: ReadFrom is called by
// io.Copy once WriteTo copies from the client's own connection.
type handOver struct {
	net.Conn
	called chan struct{}
}

func (h handOver) ReadFrom(r io.Reader) (int64, error) {
	close(h.called)
	return io.Copy(h.Conn, r)
}

// noCCS drops the client's change_cipher_spec record (RFC 8446, Appendix
// D.4, which a server ignores), as clients not in middlebox compatibility
// mode do: its Finished is then its last handshake record.
type noCCS struct{ net.Conn }

func (c noCCS) Write(b []byte) (int, error) {
	if ccs := []byte{20, 3, 3, 0, 1, 1}; len(b) >= len(ccs) && string(b[:len(ccs)]) == string(ccs) {
		n, err := c.Conn.Write(b[len(ccs):])
		return n + len(ccs), err
	}
	return c.Conn.Write(b)
}

// TestWriteToHandsOverAfterHandshake checks that WriteTo hands the copy to
// io.Copy on the client's connection (where a proxy gets splice, or takes
// the socket over) once the handshake is through, before the client sends
// anything more: a client that waits for the server before it speaks
// again, or an idle one, does not hold a handshake buffer.
func TestWriteToHandsOverAfterHandshake(t *testing.T) {
	t.Parallel()
	s := newListenerServer(t)
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer backendLn.Close()
	go func() {
		c, err := backendLn.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := tls.Server(c, &tls.Config{
			GetCertificate:              s.ca.GetCertificate,
			GetEncryptedClientHelloKeys: s.ks.GetEncryptedClientHelloKeys,
		})
		io.Copy(tc, tc) // an echo
	}()

	called := make(chan struct{})
	go func() {
		conn, err := s.ln.Accept()
		if err != nil {
			return
		}
		c := conn.(*ech.Conn)
		defer c.Close()
		backend, err := net.Dial("tcp", backendLn.Addr().String())
		if err != nil {
			return
		}
		defer backend.Close()
		go c.ReadFrom(backend)
		c.WriteTo(handOver{backend, called})
	}()

	raw, err := net.Dial("tcp", s.ln.Addr().String())
	require.NoError(t, err)
	client := tls.Client(noCCS{raw}, s.clientConfig(t))
	defer client.Close()
	require.NoError(t, client.Handshake())
	require.True(t, client.ConnectionState().ECHAccepted)
	select {
	case <-called:
	case <-time.After(testTimeout):
		t.Fatal("WriteTo did not hand over before the client's next bytes")
	}
	// The bytes that follow go through.
	client.SetDeadline(time.Now().Add(testTimeout))
	_, err = io.WriteString(client, "ping")
	require.NoError(t, err)
	b := make([]byte, 4)
	_, err = io.ReadFull(client, b)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(b))
}
