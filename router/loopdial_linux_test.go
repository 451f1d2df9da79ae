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
	"slices"
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

// fragment reframes the handshake bytes of the hello record rec into
// records of at most size bytes.
func fragment(rec []byte, size int) []byte {
	var out []byte
	for body := rec[5:]; len(body) > 0; {
		n := min(size, len(body))
		out = append(out, 22, 3, 1, byte(n>>8), byte(n))
		out = append(out, body[:n]...)
		body = body[n:]
	}
	return out
}

func TestHelloMessage(t *testing.T) {
	t.Parallel()
	hello := captureHello(t, &tls.Config{ServerName: tlsName})
	third := (len(hello)-5)/3 + 1
	in3 := fragment(hello, third)
	last := 5 + (len(hello) - 5 - 2*third) // the third record, framed
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"whole", hello, true},
		{"whole, more after", append(slices.Clone(hello), 23, 3, 3, 0, 1, 0), true},
		{"a byte short", hello[:len(hello)-1], false},
		{"header only", hello[:5], false},
		{"message header split", fragment(hello, 2), true},
		{"in three records", in3, true},
		{"two of three records", in3[:len(in3)-last], false},
		{"not a handshake record", append([]byte{23}, hello[1:]...), false},
		{"nothing", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg, ok := helloMessage(tc.b)
			require.Equal(t, tc.want, ok)
			if ok {
				assert.Equal(t, hello[5:], msg)
			}
		})
	}
}

func TestOffersECH(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	plain := captureHello(t, &tls.Config{ServerName: tlsName})
	withECH := captureHello(t, e.clientConfig(tlsName, e.list))
	assert.False(t, offersECH(plain[5:]))
	assert.True(t, offersECH(withECH[5:]))
	assert.True(t, offersECH(plain[5:60]), "cut short: NewConn is to judge it")
	tls12 := captureHello(t, &tls.Config{ServerName: tlsName, MaxVersion: tls.VersionTLS12, InsecureSkipVerify: true})
	assert.False(t, offersECH(tls12[5:]))
}

// errWouldBlock is what a stalledConn's reads return once its bytes are
// read.
var errWouldBlock = errors.New("would block")

// stalledConn is a connection whose peer sent b, then nothing: a read
// past b would block.
type stalledConn struct {
	net.Conn // nil: not called
	b        []byte
}

func (c *stalledConn) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		return 0, errWouldBlock
	}
	n := copy(p, c.b)
	c.b = c.b[n:]
	return n, nil
}

func (c *stalledConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *stalledConn) Close() error                     { return nil }
func (c *stalledConn) SetDeadline(time.Time) error      { return nil }
func (c *stalledConn) SetReadDeadline(time.Time) error  { return nil }
func (c *stalledConn) SetWriteDeadline(time.Time) error { return nil }
func (c *stalledConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *stalledConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }

// FuzzHelloMessage checks the promise the accepting goroutine relies on:
// when helloMessage says the bytes hold a whole hello, NewConn reads it,
// or refuses it, without waiting for more bytes (which would hold up
// every connection behind it); and offersECH does not panic.
func FuzzHelloMessage(f *testing.F) {
	ks, err := ech.NewKeySet(newKey(f))
	require.NoError(f, err)
	list, err := ks.ConfigList()
	require.NoError(f, err)
	for _, cfg := range []*tls.Config{
		{ServerName: tlsName},
		{ServerName: tlsName, EncryptedClientHelloConfigList: list, MinVersion: tls.VersionTLS13},
	} {
		hello := captureHello(f, cfg)
		f.Add(hello)
		f.Add(fragment(hello, 1))
		f.Add(fragment(hello, 100))
		f.Add(hello[:len(hello)-1])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, ok := helloMessage(b)
		if !ok {
			return
		}
		offersECH(msg)
		_, err := ech.NewConn(context.Background(), &stalledConn{b: b}, ech.WithKeySet(ks))
		assert.NotErrorIs(t, err, errWouldBlock, "NewConn wanted more than a complete hello")
	})
}

// TestHelloArrived checks helloArrived on a real socket: false until the
// whole hello has come, and the hello still there to read after.
func TestHelloArrived(t *testing.T) {
	t.Parallel()
	hello := captureHello(t, &tls.Config{ServerName: tlsName})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	server, err := ln.Accept()
	require.NoError(t, err)
	defer server.Close()

	assert.False(t, helloArrived(server), "nothing yet")
	_, err = client.Write(hello[:len(hello)/2])
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)
	assert.False(t, helloArrived(server), "half")
	_, err = client.Write(hello[len(hello)/2:])
	require.NoError(t, err)
	require.Eventually(t, func() bool { return helloArrived(server) }, 5*time.Second, time.Millisecond)
	got := make([]byte, len(hello))
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadFull(server, got)
	require.NoError(t, err)
	assert.Equal(t, hello, got, "helloArrived read nothing")

	// A hello with ECH is for the goroutines, which decrypt.
	e := newEnv(t)
	_, err = client.Write(captureHello(t, e.clientConfig(tlsName, e.list)))
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)
	assert.False(t, helloArrived(server), "with ECH")
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
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			defer ln.Close()
			client, err := net.Dial("tcp", ln.Addr().String())
			require.NoError(t, err)
			defer client.Close()
			_, err = client.Write(captureHello(t, tc.cfg))
			require.NoError(t, err)
			conn, err := ln.Accept()
			require.NoError(t, err)
			defer conn.Close()
			c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(e.ks))
			require.NoError(t, err)
			assert.Equal(t, tc.want, e.r.routesToLoop(c, routes))
		})
	}
}
