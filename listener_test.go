package ech_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countingListener counts the connections its wrapped listener returned.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// listenerServer is a loopback Listener with one ECH key and a CA for
// backend certificates.
type listenerServer struct {
	raw *countingListener
	ln  *ech.Listener
	ks  *ech.KeySet
	ca  *echtest.CA
}

func newListenerServer(t *testing.T, opts ...ech.Option) *listenerServer {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &listenerServer{raw: &countingListener{Listener: raw}, ks: echtest.NewKeySet(t, publicName), ca: echtest.NewCA(t)}
	s.ln = ech.NewListener(s.raw, append([]ech.Option{ech.WithKeySet(s.ks)}, opts...)...)
	t.Cleanup(func() { s.ln.Close() })
	return s
}

func (s *listenerServer) clientConfig(t *testing.T) *tls.Config {
	t.Helper()
	list, err := s.ks.ConfigList()
	require.NoError(t, err)
	return &tls.Config{ServerName: innerName, RootCAs: s.ca.Pool(), EncryptedClientHelloConfigList: list}
}

// dial runs a crypto/tls client with ECH against the listener on its own
// goroutine; the channel gets its outcome.
func (s *listenerServer) dial(t *testing.T) <-chan error {
	t.Helper()
	cfg := s.clientConfig(t)
	out := make(chan error, 1)
	go func() {
		conn, err := net.Dial("tcp", s.ln.Addr().String())
		if err != nil {
			out <- err
			return
		}
		state, line, err := clientHandshake(conn, cfg)
		if err == nil && (!state.ECHAccepted || line != "hello "+innerName) {
			err = errors.New("ECH not accepted or wrong greeting: " + line)
		}
		out <- err
	}()
	return out
}

// serve completes the handshake of an accepted connection as the ECH
// backend and greets the client with the name.
func (s *listenerServer) serve(c *ech.Conn) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(testTimeout))
	tc := tls.Server(c, &tls.Config{
		GetCertificate:              s.ca.GetCertificate,
		GetEncryptedClientHelloKeys: s.ks.GetEncryptedClientHelloKeys,
	})
	if err := tc.Handshake(); err != nil {
		return err
	}
	_, err := io.WriteString(tc, "hello "+tc.ConnectionState().ServerName+"\n")
	tc.Close()
	return err
}

// accept calls Accept on a goroutine of its own, bounded by testTimeout.
func accept(t *testing.T, ln net.Listener) *ech.Conn {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	out := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		out <- result{c, err}
	}()
	select {
	case r := <-out:
		require.NoError(t, r.err)
		c, ok := r.c.(*ech.Conn)
		require.True(t, ok, "Accept returned a %T", r.c)
		return c
	case <-time.After(testTimeout):
		t.Fatal("Accept did not return")
		return nil
	}
}

func waitErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(testTimeout):
		t.Fatal("the client did not finish")
		return nil
	}
}

func TestListenerAccepted(t *testing.T) {
	t.Parallel()
	s := newListenerServer(t)
	done := s.dial(t)
	c := accept(t, s.ln)
	assert.Equal(t, ech.StatusAccepted, c.Status())
	assert.Equal(t, innerName, c.ServerName())
	assert.Equal(t, publicName, c.OuterServerName())
	require.NoError(t, s.serve(c))
	require.NoError(t, waitErr(t, done))
}

// TestListenerSlowClient checks that a client that sends nothing does not
// hold up one that came after it.
func TestListenerSlowClient(t *testing.T) {
	t.Parallel()
	s := newListenerServer(t)
	var refused sync.WaitGroup
	refused.Add(1)
	s.ln.OnError = func(net.Conn, error) { refused.Done() }
	fast := make(chan *ech.Conn, 1)
	go func() {
		c, err := s.ln.Accept()
		if err == nil {
			fast <- c.(*ech.Conn)
		}
	}()

	slow, err := net.Dial("tcp", s.ln.Addr().String())
	require.NoError(t, err)
	defer slow.Close()
	require.Eventually(t, func() bool { return s.raw.accepted.Load() == 1 }, testTimeout, time.Millisecond,
		"the listener did not take the slow client")

	done := s.dial(t)
	select {
	case c := <-fast:
		assert.Equal(t, innerName, c.ServerName())
		require.NoError(t, s.serve(c))
	case <-time.After(testTimeout):
		t.Fatal("Accept did not return the fast client")
	}
	require.NoError(t, waitErr(t, done))

	// The slow client is still pending: closing it ends its hello, which
	// is then reported.
	slow.Close()
	refused.Wait()
}

func TestListenerRefused(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		input []byte
		alert byte
		want  error
	}{
		// A ClientHello whose body is four zero bytes.
		{"decode error", []byte{22, 3, 1, 0, 8, 1, 0, 0, 4, 0, 0, 0, 0}, alertDecodeError, ech.ErrDecodeError},
		{"not TLS", []byte("GET / HTTP/1.1\r\n\r\n"), alertUnexpectedMessage, ech.ErrNotTLS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newListenerServer(t)
			type report struct {
				addr string
				err  error
			}
			reports := make(chan report, 1)
			s.ln.OnError = func(conn net.Conn, err error) {
				// The connection is closed: a write fails.
				_, werr := conn.Write([]byte{0})
				if werr == nil {
					err = errors.New("the connection was not closed")
				}
				reports <- report{conn.RemoteAddr().String(), err}
			}
			accepted := make(chan net.Conn, 1)
			go func() {
				if c, err := s.ln.Accept(); err == nil {
					accepted <- c
				}
			}()

			client, err := net.Dial("tcp", s.ln.Addr().String())
			require.NoError(t, err)
			defer client.Close()
			_, err = client.Write(tc.input)
			require.NoError(t, err)
			assert.Equal(t, alertRecord(tc.alert), readAll(t, client), "the alert, then the end of the connection")
			select {
			case r := <-reports:
				assert.Equal(t, client.LocalAddr().String(), r.addr)
				assert.ErrorIs(t, r.err, tc.want)
			case <-time.After(testTimeout):
				t.Fatal("OnError was not called")
			}

			// The refused connection is not accepted; the next one is.
			done := s.dial(t)
			select {
			case c := <-accepted:
				assert.Equal(t, innerName, c.(*ech.Conn).ServerName())
				require.NoError(t, s.serve(c.(*ech.Conn)))
			case <-time.After(testTimeout):
				t.Fatal("Accept did not return the good client")
			}
			require.NoError(t, waitErr(t, done))
		})
	}
}

// TestListenerClose checks that Close closes the pending connections,
// returns, and leaves no goroutine behind.
func TestListenerClose(t *testing.T) {
	// Not parallel: it counts goroutines.
	before := runtime.NumGoroutine()
	func() {
		// Pending hellos would wait an hour: Close must cut them short.
		s := newListenerServer(t, ech.WithHandshakeTimeout(time.Hour))
		s.ln.OnError = func(_ net.Conn, err error) { t.Errorf("OnError called on Close: %v", err) }
		done := s.dial(t)
		c := accept(t, s.ln)
		require.NoError(t, s.serve(c))
		require.NoError(t, waitErr(t, done))

		// Clients whose hellos are being read, and one whose hello was
		// read and is waiting for Accept.
		var idle []net.Conn
		for range 5 {
			conn, err := net.Dial("tcp", s.ln.Addr().String())
			require.NoError(t, err)
			defer conn.Close()
			idle = append(idle, conn)
		}
		waiting := s.dial(t)
		require.Eventually(t, func() bool { return s.raw.accepted.Load() == 7 }, testTimeout, time.Millisecond,
			"the listener did not take the clients")

		closeBounded(t, s.ln, "Close did not return")
		for _, conn := range idle {
			conn.SetReadDeadline(time.Now().Add(testTimeout))
			n, err := conn.Read(make([]byte, 1))
			assert.Zero(t, n)
			assert.ErrorIs(t, err, io.EOF, "the pending connection was closed")
		}
		assert.Error(t, waitErr(t, waiting), "the connection waiting for Accept was closed")

		_, err := s.ln.Accept()
		require.ErrorIs(t, err, net.ErrClosed)
		assert.NoError(t, s.ln.Close(), "a second Close")
		_, err = s.raw.Accept()
		assert.ErrorIs(t, err, net.ErrClosed, "the wrapped listener is closed")
	}()
	// Not require.Eventually: it runs the condition on a goroutine of its own.
	deadline := time.Now().Add(testTimeout)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), before, "goroutines left behind")
}

func TestListenerCloseBeforeAccept(t *testing.T) {
	t.Parallel()
	s := newListenerServer(t)
	require.NoError(t, s.ln.Close())
	_, err := s.ln.Accept()
	require.ErrorIs(t, err, net.ErrClosed)
	assert.Zero(t, s.raw.accepted.Load())
}

// pipeListener is a fake listener whose Accept follows a script: an error,
// or a connection given by the test through conns.
type pipeListener struct {
	script []error // nil: take a connection from conns
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once

	mu    sync.Mutex
	calls []time.Time // when Accept was called
}

func newPipeListener(script ...error) *pipeListener {
	return &pipeListener{script: script, conns: make(chan net.Conn, 16), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.calls = append(l.calls, time.Now())
	var err error
	if len(l.script) > 0 {
		err, l.script = l.script[0], l.script[1:]
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, &net.OpError{Op: "accept", Net: "pipe", Err: net.ErrClosed}
	}
}

// dial returns the client end of a new connection the listener will return.
func (l *pipeListener) dial() net.Conn {
	client, server := net.Pipe()
	l.conns <- server
	return client
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

func (l *pipeListener) callTimes() []time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.calls
}

func (l *pipeListener) acceptCalls() int { return len(l.callTimes()) }

func (l *pipeListener) isClosed() bool {
	select {
	case <-l.closed:
		return true
	default:
		return false
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// TestListenerMaxPending checks that no more than MaxPending connections
// are taken from the wrapped listener while their hellos are read.
func TestListenerMaxPending(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ks := echtest.NewKeySet(t, publicName)
		fl := newPipeListener()
		l := ech.NewListener(fl, ech.WithKeySet(ks))
		l.MaxPending = 2
		var refused atomic.Int32
		l.OnError = func(net.Conn, error) { refused.Add(1) }
		go l.Accept()

		var clients []net.Conn
		for range 4 {
			clients = append(clients, fl.dial())
		}
		synctest.Wait()
		assert.Equal(t, 2, fl.acceptCalls(), "two connections taken, then no Accept until a slot frees")
		assert.Len(t, fl.conns, 2, "two connections left in the backlog")

		// A client goes away: its hello fails, and its slot goes to the
		// next connection.
		clients[0].Close()
		synctest.Wait()
		assert.Equal(t, int32(1), refused.Load())
		assert.Equal(t, 3, fl.acceptCalls())
		assert.Len(t, fl.conns, 1)

		require.NoError(t, l.Close())
		for _, c := range clients {
			c.Close()
		}
	})
}

// countHandler counts the log records at warning level or above.
type countHandler struct{ n *atomic.Int32 }

func (h countHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h countHandler) Handle(context.Context, slog.Record) error    { h.n.Add(1); return nil }
func (h countHandler) WithAttrs([]slog.Attr) slog.Handler           { return h }
func (h countHandler) WithGroup(string) slog.Handler                { return h }

// TestListenerTemporaryErrors checks that temporary errors of the wrapped
// listener are retried with backoff and logged once per run, and that a
// permanent one ends the listener.
func TestListenerTemporaryErrors(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept", syscall.EMFILE)}
		enobufs := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept", syscall.ENOBUFS)}
		permanent := errors.New("permanent failure")
		var script []error
		for range 10 {
			script = append(script, emfile)
		}
		script = append(script, nil, enobufs, enobufs, nil, permanent)
		fl := newPipeListener(script...)

		ks := echtest.NewKeySet(t, publicName)
		ca := echtest.NewCA(t)
		list, err := ks.ConfigList()
		require.NoError(t, err)
		var warnings atomic.Int32
		l := ech.NewListener(fl, ech.WithKeySet(ks), ech.WithLogger(slog.New(countHandler{&warnings})))
		defer l.Close()

		for range 2 {
			client := tls.Client(fl.dial(), &tls.Config{ServerName: innerName, RootCAs: ca.Pool(), EncryptedClientHelloConfigList: list})
			handshake := make(chan error, 1)
			go func() { handshake <- client.Handshake(); client.Close() }()
			c, err := l.Accept()
			require.NoError(t, err)
			assert.Equal(t, innerName, c.(*ech.Conn).ServerName())
			tc := tls.Server(c, &tls.Config{GetCertificate: ca.GetCertificate, GetEncryptedClientHelloKeys: ks.GetEncryptedClientHelloKeys})
			require.NoError(t, tc.Handshake())
			require.NoError(t, <-handshake)
			assert.True(t, client.ConnectionState().ECHAccepted)
			tc.Close()
		}
		_, err = l.Accept()
		require.ErrorIs(t, err, permanent)
		_, err = l.Accept()
		require.ErrorIs(t, err, permanent, "again")

		calls := fl.callTimes()
		require.Len(t, calls, len(script))
		var delays []time.Duration
		for i := 1; i < len(calls); i++ {
			if script[i-1] != nil {
				delays = append(delays, calls[i].Sub(calls[i-1]))
			}
		}
		ms := time.Millisecond
		assert.Equal(t, []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, 1000 * ms, 1000 * ms,
			5 * ms, 10 * ms}, delays)
		assert.Equal(t, int32(2), warnings.Load(), "one warning per run of errors")
	})
}

// TestListenerCloseDuringBackoff checks that Close interrupts the pause
// after a temporary error.
func TestListenerCloseDuringBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept", syscall.EMFILE)}
		fl := newPipeListener(emfile, emfile, emfile)
		l := ech.NewListener(fl, ech.WithKeySet(echtest.NewKeySet(t, publicName)))
		accepted := make(chan error, 1)
		go func() { _, err := l.Accept(); accepted <- err }()
		time.Sleep(7 * time.Millisecond) // in the second pause
		synctest.Wait()
		start := time.Now()
		require.NoError(t, l.Close())
		assert.Zero(t, time.Since(start), "Close did not wait for the pause to end")
		require.ErrorIs(t, <-accepted, net.ErrClosed)
		assert.Equal(t, 2, fl.acceptCalls())
		assert.True(t, fl.isClosed())
	})
}

// TestListenerHandle checks that Handle gets each accepted connection on
// the goroutine that read its hello, while refused ones still go to
// OnError, that Close neither waits for Handle nor lets Accept return a
// connection, and that Accept returns once the Listener is closed.
func TestListenerHandle(t *testing.T) {
	t.Parallel()
	s := newListenerServer(t)
	refused := make(chan error, 1)
	s.ln.OnError = func(_ net.Conn, err error) { refused <- err }
	handled := make(chan *ech.Conn, 2)
	release := make(chan struct{})
	s.ln.Handle = func(c *ech.Conn) {
		handled <- c
		<-release // a long connection: Close must not wait for it
	}
	acceptErr := make(chan error, 1)
	go func() {
		c, err := s.ln.Accept()
		if c != nil {
			err = errors.New("Accept returned a connection although Handle is set")
		}
		acceptErr <- err
	}()

	done := s.dial(t)
	var c *ech.Conn
	select {
	case c = <-handled:
	case <-time.After(testTimeout):
		t.Fatal("Handle was not called")
	}
	assert.Equal(t, ech.StatusAccepted, c.Status())
	assert.Equal(t, innerName, c.ServerName())
	require.NoError(t, s.serve(c))
	require.NoError(t, waitErr(t, done))

	bad, err := net.Dial("tcp", s.ln.Addr().String())
	require.NoError(t, err)
	defer bad.Close()
	_, err = bad.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	require.NoError(t, err)
	select {
	case err := <-refused:
		assert.ErrorIs(t, err, ech.ErrNotTLS)
	case <-time.After(testTimeout):
		t.Fatal("OnError was not called")
	}

	closeBounded(t, s.ln, "Close waited for Handle")
	select {
	case err := <-acceptErr:
		assert.ErrorIs(t, err, net.ErrClosed)
	case <-time.After(testTimeout):
		t.Fatal("Accept did not return after Close")
	}
	close(release)
}

// closeBounded closes ln and fails with msg unless Close returns, without
// an error, within testTimeout.
func closeBounded(t *testing.T, ln *ech.Listener, msg string) {
	t.Helper()
	closed := make(chan error, 1)
	go func() { closed <- ln.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(testTimeout):
		t.Fatal(msg)
	}
}
