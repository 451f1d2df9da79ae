package router

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/echkit/ech"
)

// Defaults of the timeouts of forwarded connections.
const (
	// DefaultIdleTimeout closes a forwarded connection on which nothing
	// moved either way for this long: long enough for IMAP IDLE, as
	// HAProxy's "timeout tunnel" is often set.
	DefaultIdleTimeout = time.Hour
	// DefaultFinTimeout closes a forwarded connection this long after one
	// side has closed its half while the other has not (HAProxy's "timeout
	// client-fin" and "timeout server-fin").
	DefaultFinTimeout = 30 * time.Second
)

var (
	// errBackend marks the errors of a connection that its backend failed:
	// a dial error, a reset. They are logged at warn level.
	errBackend = errors.New("router: backend")
	// errIdleTimeout ends a connection idle for its idle timeout.
	errIdleTimeout = errors.New("router: idle timeout")
	// errFinTimeout ends a connection whose second side did not close
	// within the fin timeout of the first.
	errFinTimeout = errors.New("router: fin timeout")
)

// pipe forwards between a client and a backend connection, as below.
type pipe struct {
	client, backend net.Conn
	// clientTCP is the client's TCP connection under client (the same, or
	// under a TLS layer): a backend reset is passed on to it as a reset.
	clientTCP net.Conn
	idle, fin time.Duration

	active  atomic.Int64    // when bytes last moved, UnixNano
	reports [2]atomic.Int64 // windows ended, per direction
	finAt   atomic.Int64    // when the fin timeout ends, UnixNano; 0 before

	done func(in, out int64, err error)

	// Each direction is copied by a goroutine through the handshake.
	// Where the system has loops (see loop_linux.go), and the client is an
	// [ech.Conn] over TCP and the backend a TCP connection, each direction
	// is handed to a loop once past the handshake, and its goroutine ends.
	mu       sync.Mutex // guards the fields below, and the sockets once in a loop
	closed   bool
	reported bool         // done was called
	res      [2]dirResult // what each direction's goroutine ended with
	resolved [2]bool      // which have
	loop     *loopState   // set once a direction is handed to a loop
}

// dirResult is how one direction's goroutine ended.
type dirResult struct {
	n           int64
	err         error
	fromBackend bool // the error is the backend's
}

// errHandedOff ends a direction's goroutine that handed its direction to a
// loop.
var errHandedOff = errors.New("router: handed to a loop")

// start copies between client and backend until both directions are done,
// forwarding a half-close each way, and closes both; then it calls done
// with the bytes forwarded each way and the error that ended the
// connection. One direction is copied in the calling goroutine, the other
// in a new one; once both are past the handshake they may be handed to a
// loop, and start returns before done is called. io.Copy between the
// connections lets a passthrough route use the kernel's splice once
// [ech.Conn] has replayed the hello where there are no loops.
//
// A direction that copies nothing for idle while the other copies nothing
// either ends the connection; so does the second side's not closing within
// fin of the first. An error in one direction ends both: a backend that
// fails (a reset) is passed on to the client as a reset, not as a clean
// end, and the error wraps errBackend; a client that fails is passed on to
// the backend as a reset.
func (p *pipe) start(done func(in, out int64, err error)) {
	p.done = done
	p.active.Store(time.Now().UnixNano())
	c, passthrough := p.client.(*ech.Conn) // not under a TLS layer
	handoff := useLoops.Load() && passthrough && isTCP(p.clientTCP) && isTCP(p.backend)
	if handoff && !c.ECHAccepted() {
		// No goroutine for a direction with nothing to watch (only the
		// server's answer to an accepted ECH hello is): the loop's from
		// the start.
		p.resolve(1, dirResult{err: errHandedOff})
	} else {
		go p.direction(1, 0, handoff)
	}
	p.direction(0, 0, handoff)
}

func isTCP(c net.Conn) bool {
	_, ok := c.(*net.TCPConn)
	return ok
}

// direction copies one direction in the calling goroutine: 0 from the
// client to the backend, 1 back. n is what it copied before. With handoff,
// the direction ends with errHandedOff once past the handshake.
func (p *pipe) direction(dir int, n int64, handoff bool) {
	var (
		err error
		r   dirResult
	)
	backend := p.backend
	if handoff {
		backend = handoffConn{p.backend, p}
	}
	if dir == 0 {
		err = p.copy(0, backend, p.client, &n)
		r = dirResult{n, err, errors.Is(err, syscall.EPIPE)}
	} else {
		err = p.copy(1, p.client, backend, &n)
		r = dirResult{n, err, !errors.Is(err, syscall.EPIPE)}
	}
	p.resolve(dir, r)
}

// handoffConn is the backend as the copies of a pipe that may be handed to
// a loop see it. [ech.Conn]'s WriteTo and ReadFrom copy the handshake
// through Read and Write, then call io.Copy with the client's TCP
// connection: io.Copy then calls ReadFrom (client to backend) or WriteTo
// (backend to client) below, which end the copy with errHandedOff.
type handoffConn struct {
	net.Conn
	p *pipe
}

// ReadFrom is called with the client's TCP connection once its direction
// is past the handshake.
func (h handoffConn) ReadFrom(io.Reader) (int64, error) { return 0, errHandedOff }

// WriteTo is called first with the client's ech.Conn, whose ReadFrom then
// copies the handshake, then with the client's TCP connection.
func (h handoffConn) WriteTo(w io.Writer) (int64, error) {
	switch w {
	case h.p.client:
		return h.p.client.(io.ReaderFrom).ReadFrom(h)
	case h.p.clientTCP:
		return 0, errHandedOff
	}
	return io.Copy(w, h.Conn)
}

// resolve records how direction dir's goroutine ended. A direction past
// the handshake goes to a loop at once, whatever the other does: the rest
// of the server's first flight may be what the client waits for before it
// ends its own handshake. Without loops, the second to end ends the
// connection.
func (p *pipe) resolve(dir int, r dirResult) {
	p.mu.Lock()
	p.res[dir] = r
	p.resolved[dir] = true
	handed := errors.Is(r.err, errHandedOff)
	if handed && p.loop == nil && !p.closed {
		if err := p.handToLoop(dir); err != nil {
			// No loop: this direction copies on as if there were none
			// (the other may still hand off, and try again).
			p.resolved[dir] = false
			go p.direction(dir, r.n, false)
			p.mu.Unlock()
			return
		}
	}
	if p.loop != nil {
		p.resolveInLoop(dir, r, handed) // unlocks
		return
	}
	if !p.bothResolved() {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.closeConns(nil)
	p.mu.Unlock()
	p.done(p.result())
}

// bothResolved reports whether both directions' goroutines have ended.
// p.mu is held.
func (p *pipe) bothResolved() bool { return p.resolved[0] && p.resolved[1] }

// result returns what the connection ended with: the first error of a
// direction that is not a close by the other.
func (p *pipe) result() (in, out int64, err error) {
	in, out = p.res[0].n, p.res[1].n
	r := p.res[0]
	if r.err == nil || errors.Is(r.err, net.ErrClosed) || errors.Is(r.err, errHandedOff) {
		r = p.res[1]
	}
	switch {
	case r.err == nil, errors.Is(r.err, net.ErrClosed), errors.Is(r.err, errHandedOff):
		return in, out, nil
	case errors.Is(r.err, errIdleTimeout), errors.Is(r.err, errFinTimeout):
		return in, out, r.err
	case r.fromBackend:
		return in, out, fmt.Errorf("%w: %w", errBackend, r.err)
	}
	return in, out, r.err
}

// Close ends the connection at once, as at a shutdown: done then reports
// no error.
func (p *pipe) Close() error {
	p.mu.Lock()
	switch {
	case p.loop != nil && !p.closed:
		p.endLoop(-1, nil, false) // unlocks
		return nil
	case !p.closed:
		// The goroutines end, and report (a direction that hands off
		// now finds p closed).
		p.closed = true
		p.closeConns(nil)
	}
	p.mu.Unlock()
	return nil
}

// copy copies src to dst until EOF, then half-closes dst. On an error it
// closes both connections, resetting the peer of the side that did not
// fail. dir is 0 or 1, the other direction 1 - dir.
//
// io.Copy tells how many bytes moved only when it returns, so each
// direction copies in windows of a quarter of the idle timeout, ended by a
// read deadline, and records when bytes last moved. A direction that finds
// nothing moved for the idle timeout ends the other's window (by its read
// deadline: its source is this direction's destination) and looks again
// once that one has reported, or has not for an idle timeout: then it is
// stuck in a write to a peer that does not read.
func (p *pipe) copy(dir int, dst, src net.Conn, n *int64) error {
	window := max(p.idle/4, time.Millisecond)
	var (
		suspectAt      time.Time // when the connection looked idle
		suspectReports int64     // the other direction's windows then
	)
	for {
		rd := time.Now().Add(window)
		if f := p.finAt.Load(); f != 0 {
			rd = minTime(rd, time.Unix(0, f))
		}
		src.SetReadDeadline(rd)
		if f := p.finAt.Load(); f != 0 && time.Unix(0, f).Before(rd) {
			// The other direction ended while the deadline was set.
			src.SetReadDeadline(time.Unix(0, f))
		}
		m, err := io.Copy(dst, src)
		*n += m
		if errors.Is(err, errHandedOff) {
			return err
		}
		now := time.Now()
		if m > 0 {
			p.active.Store(now.UnixNano())
		}
		p.reports[dir].Add(1)
		if err == nil {
			// EOF: pass the half-close on and give the other side the
			// fin timeout.
			if cw, ok := dst.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
			p.startFin(now)
			return nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			// NOTE: the error is blamed on src, whose read usually sees
			// a reset first, except EPIPE, which is a write's.
			failed := src
			if errors.Is(err, syscall.EPIPE) {
				failed = dst
			}
			if h, ok := failed.(handoffConn); ok {
				failed = h.Conn
			}
			p.close(failed)
			return err
		}
		other := p.reports[1-dir].Load()
		switch {
		case p.finAt.Load() != 0 && !now.Before(time.Unix(0, p.finAt.Load())):
			// Also a write stuck past the fin timeout: startFin set the
			// write deadlines.
			err = errFinTimeout
		case now.Sub(time.Unix(0, p.active.Load())) < p.idle:
			suspectAt = time.Time{}
			continue // the read deadline of one window passed
		case suspectAt.IsZero():
			suspectAt, suspectReports = now, other
			dst.SetReadDeadline(aLongTimeAgo)
			continue
		case other == suspectReports && now.Sub(suspectAt) < p.idle:
			continue // the other direction has not reported yet
		default:
			err = errIdleTimeout
		}
		p.close(nil)
		return err
	}
}

// startFin starts the fin timeout, once, and cuts the other direction's
// deadlines to it.
func (p *pipe) startFin(now time.Time) {
	f := now.Add(p.fin)
	if !p.finAt.CompareAndSwap(0, f.UnixNano()) {
		// Both directions are done.
		return
	}
	p.client.SetDeadline(f)
	p.backend.SetDeadline(f)
}

// close closes both connections, once. If failed is one of them, the peer
// of the other gets a reset: that side's TCP connection is closed with
// SO_LINGER 0.
func (p *pipe) close(failed net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	p.closeConns(failed)
}

// closeConns closes both connections, resetting the peer of the one that
// did not fail. p.mu is held.
func (p *pipe) closeConns(failed net.Conn) {
	switch failed {
	case p.client:
		abort(p.backend)
	case p.backend:
		abort(p.clientTCP)
	}
	p.client.Close()
	p.backend.Close()
}

// abort closes c so that its peer gets a TCP reset.
func abort(c net.Conn) {
	if lc, ok := c.(interface{ SetLinger(int) error }); ok {
		lc.SetLinger(0)
	}
	c.Close()
}

// aLongTimeAgo is a deadline in the past, to interrupt a blocked read.
var aLongTimeAgo = time.Unix(1, 0)

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
