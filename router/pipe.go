package router

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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

	active    atomic.Int64    // when bytes last moved, UnixNano
	reports   [2]atomic.Int64 // windows ended, per direction
	finAt     atomic.Int64    // when the fin timeout ends, UnixNano; 0 before
	closeOnce sync.Once
}

// run copies between client and backend until both directions are done,
// forwarding a half-close each way, and closes both. It returns the bytes
// forwarded each way. io.Copy between the connections lets a passthrough
// route use the kernel's splice once [ech.Conn] has replayed the hello.
//
// A direction that copies nothing for idle while the other copies nothing
// either ends the connection; so does the second side's not closing within
// fin of the first. An error in one direction ends both: a backend that
// fails (a reset) is passed on to the client as a reset, not as a clean
// end, and the error wraps errBackend; a client that fails is passed on to
// the backend as a reset.
func (p *pipe) run() (in, out int64, err error) {
	p.active.Store(time.Now().UnixNano())
	type result struct {
		err         error
		fromBackend bool
	}
	done := make(chan result, 1)
	go func() {
		err := p.copy(1, p.client, p.backend, &out)
		done <- result{err, !errors.Is(err, syscall.EPIPE)}
	}()
	// One direction in this goroutine: an idle connection holds two.
	err = p.copy(0, p.backend, p.client, &in)
	first := result{err, errors.Is(err, syscall.EPIPE)}
	second := <-done
	p.close(nil)
	r := first
	if r.err == nil || errors.Is(r.err, net.ErrClosed) {
		r = second
	}
	switch {
	case r.err == nil, errors.Is(r.err, net.ErrClosed):
		return in, out, nil
	case errors.Is(r.err, errIdleTimeout), errors.Is(r.err, errFinTimeout):
		return in, out, r.err
	case r.fromBackend:
		return in, out, errors.Join(errBackend, r.err)
	}
	return in, out, r.err
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
	p.closeOnce.Do(func() {
		switch failed {
		case p.client:
			abort(p.backend)
			p.client.Close()
		case p.backend:
			abort(p.clientTCP)
			p.backend.Close()
		}
		p.client.Close()
		p.backend.Close()
	})
}

// abort closes c so that its peer gets a TCP reset.
func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
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
