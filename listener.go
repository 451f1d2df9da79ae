package ech

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"
)

// DefaultMaxPending is the number of pending connections a [Listener]
// holds unless [Listener.MaxPending] says otherwise.
const DefaultMaxPending = 1024

// Backoff after a temporary error of the wrapped listener, as net/http's
// Server does: 5 ms, doubling up to 1 s.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// errListenerClosed is what [Listener.Accept] returns after Close.
var errListenerClosed = fmt.Errorf("ech: accept: %w", net.ErrClosed)

// A Listener is a [net.Listener] whose Accept returns connections whose
// ClientHello has been read: each one is a [*Conn] made by [NewConn]. It
// reads the hellos concurrently, one goroutine per connection, so that a
// slow client does not hold up the others; a hello that takes longer than
// the handshake timeout ([WithHandshakeTimeout]) is refused.
//
// At most MaxPending connections are pending: taken from the wrapped
// listener and not yet returned by Accept. When that many are, the Listener
// stops taking connections from the wrapped listener (new clients then wait
// in the kernel's backlog) until Accept takes one or a hello fails.
//
// A server that routes each connection on a goroutine of its own sets
// Handle instead of calling Accept in a loop.
//
// Connections whose hello [NewConn] refused are closed (the client got the
// alert the error calls for) and given to OnError. Temporary errors of the
// wrapped listener, such as running out of file descriptors, are retried
// after a pause of 5 ms doubling up to 1 s, and logged once per run of
// errors to the logger of [WithLogger]; other errors end the Listener:
// Accept returns them once the pending connections are through.
//
// Set the fields before the first call to Accept; the Listener reads them
// then.
type Listener struct {
	// MaxPending caps the pending connections. Zero or less means
	// [DefaultMaxPending].
	MaxPending int

	// OnError, if not nil, is called with each connection whose hello
	// NewConn refused, after the connection was closed, and with NewConn's
	// error. It is not called for connections cut short by Close. It runs
	// on the goroutine that read the hello, which counts as pending until
	// OnError returns; Close waits for it.
	OnError func(conn net.Conn, err error)

	// Handle, if not nil, is called with each connection whose hello
	// NewConn accepted, on the goroutine that read the hello, instead of
	// the connection's being returned by Accept: a server saves a
	// goroutine and a hand-over per connection. The connection no longer
	// counts as pending, and Close does not wait for Handle to return.
	// Accept then only waits for the Listener to end.
	Handle func(c *Conn)

	// Inline, if not nil, is offered each connection whose whole
	// ClientHello, without ECH, is already in its socket when it is
	// accepted (on Linux; a peek tells). NewConn reads that hello on the
	// accepting goroutine, where it cannot wait, and Inline runs there
	// too, saving a goroutine and a hand-over to another thread. Inline
	// must not block, as the next accept waits for it: it returns false
	// to have the connection given to Handle (or Accept) as the others
	// are.
	Inline func(c *Conn) bool

	ln       net.Listener
	opts     []Option
	maxHello int      // NewConn's largest hello, for the peek
	inline   []Option // opts for a hello read inline: no deadline
	logger   *slog.Logger

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	ready  chan *Conn // hellos read, handed to Accept

	start   sync.Once
	slots   chan struct{} // one element per pending connection
	stopped chan struct{} // closed when the accept loop and all hellos are through
	err     error         // why the accept loop stopped, set before stopped is closed
	loop    sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

var _ net.Listener = (*Listener)(nil)

// NewListener returns a [Listener] that accepts connections from ln and
// runs [NewConn] with opts on each. The hello of a connection is read
// within the handshake timeout of opts ([DefaultHandshakeTimeout] unless
// [WithHandshakeTimeout] says otherwise), or until [Listener.Close].
// Closing the Listener closes ln.
func NewListener(ln net.Listener, opts ...Option) *Listener {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Listener{
		ln:       ln,
		opts:     opts,
		maxHello: o.maxHelloSize,
		// Nothing to wait for, and no ECH whose watch the handshake
		// timeout would bound: no deadline, whose timer would wake a
		// thread.
		inline:  append(slices.Clip(opts), WithHandshakeTimeout(0)),
		logger:  o.logger,
		ctx:     ctx,
		cancel:  cancel,
		ready:   make(chan *Conn),
		stopped: make(chan struct{}),
	}
}

// Accept waits for a connection whose ClientHello has been read and
// returns it; the [net.Conn] is a [*Conn]. After [Listener.Close], it
// returns an error wrapping [net.ErrClosed]. If the wrapped listener failed
// with an error that is not temporary, Accept returns an error wrapping it
// once the connections pending then have been returned.
func (l *Listener) Accept() (net.Conn, error) {
	l.start.Do(l.run)
	select {
	case <-l.ctx.Done():
		return nil, errListenerClosed
	default:
	}
	select {
	case c := <-l.ready:
		return c, nil
	case <-l.ctx.Done():
		return nil, errListenerClosed
	case <-l.stopped:
		return nil, l.err
	}
}

// Close closes the wrapped listener and every pending connection, and
// waits for the goroutines reading hellos to return. Connections already
// returned by Accept are the caller's and stay open. Close returns the
// error of closing the wrapped listener; calls after the first return nil.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		// After this, Accept does not start the accept loop.
		l.start.Do(func() {})
		l.cancel() // interrupts NewConn and ends Accept
		l.closeErr = l.ln.Close()
		l.loop.Wait()
	})
	return l.closeErr
}

// Addr returns the wrapped listener's address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// run starts the accept loop, with the fields as they are now.
func (l *Listener) run() {
	n := l.MaxPending
	if n <= 0 {
		n = DefaultMaxPending
	}
	l.slots = make(chan struct{}, n)
	onError, handle, inline := l.OnError, l.Handle, l.Inline
	l.loop.Go(func() { l.acceptLoop(onError, handle, inline) })
}

func (l *Listener) acceptLoop(onError func(net.Conn, error), handle func(*Conn), inline func(*Conn) bool) {
	var hellos sync.WaitGroup
	defer func() {
		hellos.Wait()
		close(l.stopped)
	}()
	var delay time.Duration
	for {
		select {
		case l.slots <- struct{}{}:
		case <-l.ctx.Done():
			l.err = errListenerClosed
			return
		}
		conn, err := l.ln.Accept()
		if err != nil {
			<-l.slots
			if !temporaryAcceptError(err) {
				l.err = fmt.Errorf("ech: accept: %w", err)
				return
			}
			if delay == 0 {
				delay = acceptBackoffMin
				if l.logger != nil {
					l.logger.LogAttrs(l.ctx, slog.LevelWarn, "ech: accept failed, retrying",
						slog.String("error", err.Error()), slog.Duration("first_delay", delay))
				}
			} else {
				delay = min(2*delay, acceptBackoffMax)
			}
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.ctx.Done():
				t.Stop()
				l.err = errListenerClosed
				return
			}
			continue
		}
		delay = 0
		hellos.Add(1)
		if inline != nil && arrivedWithoutECH(conn, l.maxHello) {
			if c := l.readHello(conn, onError, l.inline); c != nil && !inline(c) {
				go l.deliver(c, handle, &hellos)
			} else {
				l.deliver(nil, handle, &hellos) // refused, or taken by inline
			}
			continue
		}
		go func() { l.deliver(l.readHello(conn, onError, l.opts), handle, &hellos) }()
	}
}

// deliver gives c, unless nil, to handle, or to Accept if handle is nil,
// and ends its time as a pending connection, which hellos counts.
func (l *Listener) deliver(c *Conn, handle func(*Conn), hellos *sync.WaitGroup) {
	if c != nil && handle == nil {
		select {
		case l.ready <- c: // for Accept
		case <-l.ctx.Done():
			c.Close()
		}
		c = nil
	}
	<-l.slots
	hellos.Done()
	if c != nil {
		handle(c)
	}
}

// readHello runs NewConn on conn with opts, and returns the Conn, or nil
// if NewConn failed (conn is closed, and the error reported to onError) or
// the Listener was closed meanwhile. Close interrupts it, even a read
// inline, which has no deadline: it should not wait, the hello having
// arrived, but nothing else would bound it if it did.
func (l *Listener) readHello(conn net.Conn, onError func(net.Conn, error), opts []Option) *Conn {
	c, err := NewConn(l.ctx, conn, opts...)
	if err != nil {
		conn.Close()
		if onError != nil && l.ctx.Err() == nil {
			onError(conn, err)
		}
		return nil
	}
	if l.ctx.Err() != nil {
		c.Close()
		return nil
	}
	return c
}

// temporaryAcceptError reports whether err, from the wrapped listener's
// Accept, is worth retrying: the process or system is out of file
// descriptors or buffers, or the client went away before the accept.
func temporaryAcceptError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ECONNABORTED)
}
