//go:build linux && !386

package router

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"github.com/echkit/ech"
)

// A passthrough connection with nothing left to watch of its handshake (no
// ECH, or a hello whose ECH did not decrypt and is routed by its outer
// name) needs no goroutine once routed: a loop connects to the backend
// itself, with a non-blocking socket that only its epoll set knows, writes
// the hello (and the PROXY header) as soon as the socket takes it, and
// forwards from then on. Go's dialer would register the socket in Go's
// poller, park the routing goroutine until it is connected, ask the system
// for both addresses, and take the socket out of the poller again at the
// hand-off: on this path, the router's connection rate was limited by its
// CPU (see internal/perf/haproxy).

// passthroughInLoop forwards c to rt's backend as passthrough does, and
// calls end once, if a loop can connect to the backend (see loopable). It
// reports whether it took c; if not, the caller forwards c as before, and
// nothing of c was read. Once it took c, nothing it does waits.
func (r *Router) passthroughInLoop(c *ech.Conn, name string, rt *Route, end func(in, out int64, err error)) bool {
	ap, ok := loopable(c, rt)
	if !ok {
		return false
	}
	l, err := loopFor()
	if err != nil {
		return false
	}
	p := r.newPipe(c, c.NetConn(), nil, rt)
	pend := loopBufs.Get().(*[]byte)
	*pend = (*pend)[:0]
	fail := func(err error) bool {
		if pend != nil {
			putLoopBuf(pend)
		}
		abort(c.NetConn()) // the client gets a reset, as when a dial fails
		end(0, 0, err)
		return true
	}
	if rt.ProxyProtocol {
		hdr, err := appendProxyHeader(*pend, c.RemoteAddr(), c.LocalAddr(), name, "", 0)
		if err != nil {
			return fail(fmt.Errorf("router: PROXY header: %w", err))
		}
		*pend = hdr
	}
	header := len(*pend)

	// What ech.Conn holds of the client's bytes (the hello), which its
	// WriteTo replays before it hands the TCP connection to io.Copy.
	hc := &helloCapture{b: *pend}
	_, err = c.WriteTo(hc)
	*pend = hc.b
	if !errors.Is(err, errHandedOff) {
		return fail(err)
	}
	clientFD, err := socketFD(c.NetConn())
	if err != nil {
		return fail(err)
	}
	fd, err := rawConnect(ap)
	if err != nil {
		return fail(fmt.Errorf("%w: %w", errBackend, dialError(ap, err)))
	}
	p.backend = &rawSocket{fd: fd, addr: ap}
	p.done = end
	p.active.Store(time.Now().UnixNano())
	// At a shutdown from now on, p is closed with the client's connection
	// (before the loop has it, by Close, which closes both sockets).
	if !r.closeWith(c.NetConn(), p) {
		p.backend.Close()
		return fail(nil)
	}
	s := &loopState{l: l, fd: [2]int{clientFD, fd}, inLoop: [2]bool{true, true}}
	s.dir[0].n = -int64(header) // the bytes forwarded are the client's
	p.mu.Lock()
	if p.closed {
		// A shutdown closed both sockets meanwhile.
		p.mu.Unlock()
		putLoopBuf(pend)
		end(0, 0, nil)
		return true
	}
	p.resolved = [2]bool{true, true} // no goroutine copies
	// A backend on the same host has mostly accepted the connection when
	// connect returns: the client's bytes go at once, and the loop is
	// first woken by the backend's answer, not by the socket getting
	// writable. Otherwise (EAGAIN), or with bytes left, they wait for that
	// (see waitsFor).
	n, _, err := writeAll(fd, *pend)
	if err != nil {
		p.closed = true
		p.backend.Close()
		p.mu.Unlock()
		return fail(fmt.Errorf("%w: %w", errBackend, connectError(ap, err)))
	}
	s.dir[0].n += int64(n)
	timeout := p.idle
	switch {
	case n == len(*pend):
		putLoopBuf(pend)
	case n > 0:
		s.dir[0].pend, s.dir[0].off, s.blocked[0] = pend, n, true
	default:
		s.dir[0].pend, s.connecting = pend, true
		timeout = orDefault(r.DialTimeout, DefaultDialTimeout) // the dial timeout
	}
	if err := p.register(s); err != nil {
		p.closed = true
		p.backend.Close()
		p.mu.Unlock()
		if s.dir[0].pend == nil {
			pend = nil // back in the pool
		}
		return fail(err)
	}
	p.leaveGoPoller()
	s.idleT = time.AfterFunc(timeout, p.onIdle)
	p.mu.Unlock()
	return true
}

// loopable returns the address a loop connects to for c on route rt, if
// one can: rt is a passthrough to an IP address and port (a host name is
// for Go's resolver, a scoped address for Go's dialer), c's handshake has
// nothing to watch (its ECH was not accepted), c is over TCP, and the
// loops run.
func loopable(c *ech.Conn, rt *Route) (netip.AddrPort, bool) {
	ap, err := netip.ParseAddrPort(rt.Backend)
	return ap, err == nil && ap.Addr().Zone() == "" && rt.Mode == ModePassthrough && !c.ECHAccepted() &&
		isTCP(c.NetConn()) && useLoops.Load() && haveLoops()
}

// routesToLoop reports whether c, whose hello was read, goes to a loop
// from the start when forwarded to d among routes, through
// passthroughInLoop: nothing on its way blocks the goroutine that routes
// it. A hello for the public name does not, nor one refused.
func (r *Router) routesToLoop(c *ech.Conn, routes []Route, d dest) bool {
	if d.err != nil || d.i < 0 {
		return false
	}
	_, ok := loopable(c, &routes[d.i])
	return ok
}

// helloCapture is the writer passthroughInLoop gives ech.Conn's WriteTo:
// it keeps what WriteTo replays through Write, and ends the copy when
// WriteTo hands the client's TCP connection (wrapped by net.TCPConn's
// own WriteTo) to io.Copy, which calls ReadFrom.
type helloCapture struct{ b []byte }

func (h *helloCapture) Write(p []byte) (int, error) {
	h.b = append(h.b, p...)
	return len(p), nil
}

func (h *helloCapture) ReadFrom(io.Reader) (int64, error) { return 0, errHandedOff }

// connected notes that the backend's socket took its first bytes: it is
// connected, and the connection is idle from now on only after its idle
// timeout. p.mu is held.
func (p *pipe) connected() {
	s := p.loop
	s.connecting = false
	s.idleT.Reset(p.idle)
}

// connectError is the error of a first write to a backend's socket that
// found it not connected (refused, reset): a failed connect to ap.
func connectError(ap netip.AddrPort, err error) error {
	return dialError(ap, os.NewSyscallError("connect", err))
}

// dialError is the error of a failed connect to ap, as Go's dialer words
// it.
func dialError(ap netip.AddrPort, err error) error {
	return &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(ap), Err: err}
}

// rawSocket is a backend socket a loop connected: outside Go's poller,
// read and written only by the loop. The pipe closes it as it closes a
// net.Conn, and sets its linger for a reset (see abort); nothing else of
// net.Conn is called.
type rawSocket struct {
	net.Conn // nil: not called
	fd       int
	addr     netip.AddrPort
	closed   bool // the pipe's mutex guards it
}

func (s *rawSocket) Close() error {
	if s.closed {
		return net.ErrClosed
	}
	s.closed = true
	_, err := rawSyscall(syscall.SYS_CLOSE, s.fd, 0, 0)
	return err
}

func (s *rawSocket) SetLinger(sec int) error {
	l := syscall.Linger{Onoff: 1, Linger: int32(sec)}
	return setsockopt(s.fd, syscall.SOL_SOCKET, syscall.SO_LINGER, unsafe.Pointer(&l), unsafe.Sizeof(l))
}

// rawConnect starts connecting a new non-blocking TCP socket to ap, with
// TCP_NODELAY as Go's dialer sets it, and returns the socket.
func rawConnect(ap netip.AddrPort) (int, error) {
	var (
		family = syscall.AF_INET6
		sa     unsafe.Pointer
		salen  uintptr
		sa4    syscall.RawSockaddrInet4
		sa6    syscall.RawSockaddrInet6
	)
	port := (*[2]byte)(unsafe.Pointer(&sa4.Port))
	if a := ap.Addr().Unmap(); a.Is4() {
		family = syscall.AF_INET
		sa4 = syscall.RawSockaddrInet4{Family: syscall.AF_INET, Addr: a.As4()}
		sa, salen = unsafe.Pointer(&sa4), unsafe.Sizeof(sa4)
	} else {
		sa6 = syscall.RawSockaddrInet6{Family: syscall.AF_INET6, Addr: a.As16()}
		port = (*[2]byte)(unsafe.Pointer(&sa6.Port))
		sa, salen = unsafe.Pointer(&sa6), unsafe.Sizeof(sa6)
	}
	port[0], port[1] = byte(ap.Port()>>8), byte(ap.Port()) // network order
	fd, _, errno := syscall.RawSyscall(syscall.SYS_SOCKET, uintptr(family),
		syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if errno != 0 {
		return -1, os.NewSyscallError("socket", errno)
	}
	one := int32(1)
	err := setsockopt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY, unsafe.Pointer(&one), unsafe.Sizeof(one))
	if err != nil {
		err = os.NewSyscallError("setsockopt", err)
	} else {
		_, _, errno = syscall.RawSyscall(syscall.SYS_CONNECT, fd, uintptr(sa), salen)
		switch errno {
		case 0, syscall.EINPROGRESS, syscall.EINTR:
			// Connected, or its end is an EPOLLOUT of the loop.
			return int(fd), nil
		}
		err = os.NewSyscallError("connect", errno)
	}
	rawSyscall(syscall.SYS_CLOSE, int(fd), 0, 0)
	return -1, err
}

func setsockopt(fd, level, opt int, v unsafe.Pointer, n uintptr) error {
	_, _, errno := syscall.RawSyscall6(syscall.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(v), n, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
