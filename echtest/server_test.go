package echtest_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestThreeLines is the whole of a downstream test that needs an accepted
// ECH connection.
func TestThreeLines(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, echtest.Echo)
	conn := srv.Dial(t, "secret.example")
	require.True(t, conn.ConnectionState().ECHAccepted)
}

// router is the code a downstream project tests: it sends each connection
// to the handler for its inner server name.
type router map[string]func(c *tls.Conn)

func (r router) serve(c *tls.Conn, info echtest.ConnInfo) {
	if h, ok := r[info.ServerName]; ok {
		h(c)
	}
}

func greeter(greeting string) func(*tls.Conn) {
	return func(c *tls.Conn) { io.WriteString(c, greeting) }
}

func TestRouter(t *testing.T) {
	t.Parallel()
	r := router{
		"mail.example": greeter("220 mail.example ESMTP"),
		"web.example":  greeter("HTTP/1.1 200 OK"),
	}
	srv := echtest.NewServer(t, r.serve)
	for name, want := range map[string]string{
		"mail.example": "220 mail.example ESMTP",
		"web.example":  "HTTP/1.1 200 OK",
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			conn := srv.Dial(t, name)
			got, err := io.ReadAll(conn)
			require.NoError(t, err)
			assert.Equal(t, want, string(got))
			assert.True(t, conn.ConnectionState().ECHAccepted)
			info := srv.ConnInfo(t, conn)
			assert.Equal(t, ech.StatusAccepted, info.Status)
			assert.Equal(t, name, info.ServerName)
			assert.Equal(t, srv.PublicName, info.OuterServerName)
		})
	}
}

func TestAccepted(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, echtest.Echo)
	conn := srv.Dial(t, "secret.example")
	state := conn.ConnectionState()
	require.True(t, state.ECHAccepted)
	assert.Equal(t, "secret.example", state.ServerName)
	assert.Equal(t, uint16(tls.VersionTLS13), state.Version)

	_, err := io.WriteString(conn, "ping")
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf))

	conns := srv.Conns()
	require.Len(t, conns, 1, "Dial returns once the server recorded the connection")
	info := conns[0]
	assert.NoError(t, info.Err)
	assert.Equal(t, ech.StatusAccepted, info.Status)
	assert.Equal(t, "secret.example", info.ServerName)
	assert.Equal(t, echtest.DefaultPublicName, info.OuterServerName)
	assert.True(t, info.ECHPresented)
	assert.Equal(t, srv.Keys.ConfigIDs()[0], info.ConfigID)
	assert.False(t, info.HelloRetryRequest)
	assert.Equal(t, state.CurveID, info.CurveID)
	assert.Equal(t, conn.LocalAddr().String(), info.RemoteAddr.String())
	assert.Equal(t, info, srv.ConnInfo(t, conn))
}

func TestStaleConfigRetry(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	cfg := srv.StaleClientConfig("secret.example")
	_, err := srv.DialConfig(t, cfg)
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	require.NotEmpty(t, rej.RetryConfigList)
	list, err := srv.Keys.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, []byte(list), rej.RetryConfigList, "the retry configs are the server's")

	info := srv.WaitConns(t, 1)[0]
	assert.Equal(t, ech.StatusRejected, info.Status)
	assert.Equal(t, srv.PublicName, info.ServerName, "the handshake was for the public name")
	assert.NotEqual(t, srv.Keys.ConfigIDs()[0], info.ConfigID, "a stale config_id")

	cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
	conn, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	assert.True(t, conn.ConnectionState().ECHAccepted)
	assert.Equal(t, ech.StatusAccepted, srv.ConnInfo(t, conn).Status)
}

func TestUnknownKeyRejected(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	_, err := srv.DialConfig(t, srv.UnknownKeyClientConfig("secret.example"))
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	assert.NotEmpty(t, rej.RetryConfigList)
	info := srv.WaitConns(t, 1)[0]
	assert.Equal(t, ech.StatusRejected, info.Status)
	assert.True(t, info.ECHPresented)
	assert.Equal(t, srv.Keys.ConfigIDs()[0], info.ConfigID, "the server's config_id, another key")
	assert.Equal(t, srv.PublicName, info.OuterServerName)
}

func TestNoECH(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	conn, err := srv.DialConfig(t, srv.NoECHClientConfig("secret.example"))
	require.NoError(t, err)
	assert.False(t, conn.ConnectionState().ECHAccepted)
	info := srv.ConnInfo(t, conn)
	assert.Equal(t, ech.StatusNotOffered, info.Status)
	assert.False(t, info.ECHPresented)
	assert.Equal(t, "secret.example", info.ServerName)
	assert.Equal(t, "secret.example", info.OuterServerName)
}

func TestNoServerName(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	// crypto/tls verifies the IP address of srv.Addr and sends no
	// server_name: the certificate is for the IP address.
	conn, err := srv.DialConfig(t, srv.NoECHClientConfig(""))
	require.NoError(t, err)
	assert.Empty(t, srv.ConnInfo(t, conn).ServerName)
}

// TestPassthroughProxy routes an ech.Conn's bytes to a crypto/tls backend,
// as a split-mode client-facing server does.
func TestPassthroughProxy(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	ks := echtest.NewKeySet(t, "front.example")
	backend := startBackend(t, &tls.Config{
		GetCertificate:              ca.GetCertificate,
		GetEncryptedClientHelloKeys: ks.GetEncryptedClientHelloKeys,
	})
	proxy := func(c *ech.Conn) {
		b, err := net.Dial("tcp", backend)
		if err != nil {
			t.Error(err)
			return
		}
		defer b.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			io.Copy(b, c)
			b.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(c, b)
		c.Close()
		<-done
	}
	srv := echtest.NewPassthroughServer(t, proxy, echtest.WithCA(ca), echtest.WithKeySet(ks))

	conn := srv.Dial(t, "secret.example")
	got, err := io.ReadAll(conn)
	require.NoError(t, err)
	assert.Equal(t, "backend for secret.example", string(got))
	assert.True(t, conn.ConnectionState().ECHAccepted)
	info := srv.ConnInfo(t, conn)
	assert.Equal(t, ech.StatusAccepted, info.Status)
	assert.Equal(t, "secret.example", info.ServerName)
	assert.Equal(t, "front.example", info.OuterServerName)
	assert.Empty(t, info.NegotiatedProtocol, "a passthrough server does no handshake")
	assert.Zero(t, info.CurveID)

	// Rejection goes through too: the backend sends the retry configs.
	cfg := srv.StaleClientConfig("secret.example")
	_, err = srv.DialConfig(t, cfg)
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
	conn, err = srv.DialConfig(t, cfg)
	require.NoError(t, err)
	assert.True(t, conn.ConnectionState().ECHAccepted)
}

// startBackend starts a crypto/tls server that greets each client with the
// server name it completed the handshake for.
func startBackend(t *testing.T, cfg *tls.Config) string {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() == nil {
					io.WriteString(tc, "backend for "+tc.ConnectionState().ServerName)
				}
			})
		}
	})
	return ln.Addr().String()
}

func TestParallelDials(t *testing.T) {
	t.Parallel()
	const n = 50
	srv := echtest.NewServer(t, echtest.Echo)
	t.Run("group", func(t *testing.T) {
		for i := range n {
			name := fmt.Sprintf("host%d.example", i)
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				conn := srv.Dial(t, name)
				require.True(t, conn.ConnectionState().ECHAccepted)
				_, err := io.WriteString(conn, name)
				require.NoError(t, err)
				buf := make([]byte, len(name))
				_, err = io.ReadFull(conn, buf)
				require.NoError(t, err)
				assert.Equal(t, name, string(buf))
				assert.Equal(t, name, srv.ConnInfo(t, conn).ServerName)
			})
		}
	})
	conns := srv.Conns()
	require.Len(t, conns, n)
	names := make(map[string]bool)
	for _, c := range conns {
		assert.Equal(t, ech.StatusAccepted, c.Status)
		names[c.ServerName] = true
	}
	assert.Len(t, names, n)
}

func TestNewConnError(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	c, err := net.Dial("tcp", srv.Addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "EHLO client.example\r\n")
	require.NoError(t, err)
	info := srv.ConnInfo(t, c)
	assert.ErrorIs(t, info.Err, ech.ErrNotTLS)
}

func TestConnsAreCopies(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	cfg := srv.ClientConfig("secret.example")
	cfg.NextProtos = []string{"h2"}
	_, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	srv.Conns()[0].ALPN[0] = "changed"
	assert.Equal(t, []string{"h2"}, srv.Conns()[0].ALPN)
}

func TestClose(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{})
	srv := echtest.NewServer(t, func(c *tls.Conn, _ echtest.ConnInfo) {
		close(entered)
		io.ReadAll(c) // until Close closes the connection
	})
	conn := srv.Dial(t, "secret.example")
	<-entered
	srv.Close() // returns: the blocked handler was released
	srv.Close()
	io.ReadAll(conn) // returns: Close closed the server's end
	_, err := srv.DialConfig(t, srv.ClientConfig("secret.example"))
	assert.Error(t, err)
}

func TestClientConfigsAreNew(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil)
	a, b := srv.ClientConfig("a.example"), srv.ClientConfig("a.example")
	require.NotSame(t, a, b)
	a.EncryptedClientHelloConfigList[0] ^= 0xff
	assert.NotEqual(t, a.EncryptedClientHelloConfigList, b.EncryptedClientHelloConfigList)
	for _, cfg := range []*tls.Config{
		srv.ClientConfig("a.example"),
		srv.StaleClientConfig("a.example"),
		srv.UnknownKeyClientConfig("a.example"),
	} {
		assert.Equal(t, uint16(tls.VersionTLS13), cfg.MinVersion)
		assert.NotEmpty(t, cfg.EncryptedClientHelloConfigList)
		assert.Equal(t, "a.example", cfg.ServerName)
	}
	assert.Empty(t, srv.NoECHClientConfig("a.example").EncryptedClientHelloConfigList)
}

func TestNewServerEmptyKeySet(t *testing.T) {
	t.Parallel()
	ks, err := ech.NewKeySet()
	require.NoError(t, err)
	assert.PanicsWithValue(t, "echtest: the server's key set is empty", func() {
		runAsTest(func(t testing.TB) { echtest.NewServer(t, nil, echtest.WithKeySet(ks)) })
	})
}
