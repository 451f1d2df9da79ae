//go:build linux

package router

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/echkit/ech"
)

// A passthrough connection with nothing left to watch of its handshake (no
// ECH, or a hello whose ECH did not decrypt and is routed by its outer
// name) needs no goroutine once routed: a loop connects to the backend
// itself, with a non-blocking socket that only its epoll set knows, writes
// the hello (and the PROXY header) when the socket is connected, and
// forwards from then on. Go's dialer would register the socket in Go's
// poller, park the routing goroutine until it is connected, ask the system
// for both addresses, and take the socket out of the poller again at the
// hand-off: on this path, the router's connection rate was limited by its
// CPU (see internal/perf/haproxy).

// passthroughInLoop forwards c to rt's backend as passthrough does, and
// calls end once, if a loop can connect to the backend: rt.Backend is an
// IP address, and c's handshake has nothing to watch. It reports whether
// it took c; if not, the caller forwards c as before, and nothing of c was
// read.
func (r *Router) passthroughInLoop(c *ech.Conn, name string, rt *Route, end func(in, out int64, err error)) bool {
	ap, ok := loopBackend(rt.Backend)
	if !ok || !useLoops.Load() || !isTCP(c.NetConn()) {
		return false
	}
	l, err := loopFor()
	if err != nil {
		return false
	}
	p := r.newPipe(c, c.NetConn(), nil, rt)
	if !p.settledToClient() {
		return false
	}
	pend := loopBufs.Get().(*[]byte)
	*pend = (*pend)[:0]
	if rt.ProxyProtocol {
		if *pend, err = appendProxyHeader(*pend, c.RemoteAddr(), c.LocalAddr(), name, "", 0); err != nil {
			loopBufs.Put(pend)
			return false // the caller's dial fails the same way, and says why
		}
	}
	header := len(*pend)

	// What ech.Conn holds of the client's bytes (the hello), which its
	// WriteTo replays before it hands the TCP connection to io.Copy.
	hc := &helloCapture{b: *pend}
	_, err = c.WriteTo(hc)
	*pend = hc.b
	if !errors.Is(err, errHandedOff) {
		putLoopBuf(pend)
		abort(c.NetConn())
		end(0, 0, err)
		return true
	}
	fd, err := rawConnect(ap)
	if err != nil {
		putLoopBuf(pend)
		abort(c.NetConn()) // the backend failed: the client gets a reset
		end(0, 0, errors.Join(errBackend, dialError(ap, os.NewSyscallError("connect", err))))
		return true
	}
	p.backend = &rawSocket{fd: fd, addr: ap}
	p.done = end
	p.active.Store(time.Now().UnixNano())
	// The client's bytes wait for the backend's socket to be connected
	// (see waitsFor).
	s := &loopState{l: l, inLoop: [2]bool{true, true}, connecting: true}
	s.dir[0].pend = pend
	s.dir[0].n = -int64(header) // the bytes forwarded are the client's
	if s.fd[0], err = socketFD(c.NetConn()); err == nil {
		s.fd[1] = fd
		p.mu.Lock()
		p.resolved = [2]bool{true, true} // no goroutine copies
		err = p.register(s)
		if err == nil {
			p.leaveGoPoller()
			s.idleT = time.AfterFunc(orDefault(r.DialTimeout, DefaultDialTimeout), p.onIdle)
		}
		p.mu.Unlock()
	}
	if err != nil {
		putLoopBuf(pend)
		p.backend.Close()
		abort(c.NetConn())
		end(0, 0, err)
		return true
	}
	if !r.closeWith(c.NetConn(), p) {
		p.Close() // a shutdown
	}
	return true
}

// loopBackend returns the address a loop connects to for backend: an IP
// address and port. A name is for Go's resolver, and a scoped address for
// Go's dialer.
func loopBackend(backend string) (netip.AddrPort, bool) {
	ap, err := netip.ParseAddrPort(backend)
	return ap, err == nil && ap.Addr().Zone() == ""
}

// routesToLoop reports whether c, whose hello was read, goes to a loop
// from the start, through passthroughInLoop: nothing on its way blocks the
// goroutine that routes it. A hello whose ECH was accepted is not (its
// server's first message is watched), nor one for the public name, nor
// one refused.
func (r *Router) routesToLoop(c *ech.Conn, routes []Route) bool {
	if c.ECHAccepted() || isPublicName(c.ServerName(), r.PublicName) || !useLoops.Load() || !isTCP(c.NetConn()) {
		return false
	}
	if _, err := loopFor(); err != nil {
		return false
	}
	name := strings.TrimSuffix(c.ServerName(), ".")
	if checkServerName(name) != nil {
		return false
	}
	rt := findRoute(routes, name, c.ALPNProtos())
	if rt == nil || rt.Mode != ModePassthrough {
		return false
	}
	_, ok := loopBackend(rt.Backend)
	return ok
}

// helloPeekSize is the most of a hello helloArrived looks at: more than a
// hello with a post-quantum key share and ECH. A larger hello is read on
// a goroutine of its own.
const helloPeekSize = 8 << 10

// helloArrived reports whether conn's socket holds a whole ClientHello
// already, without reading it: NewConn then reads it without waiting.
func helloArrived(conn net.Conn) bool {
	fd, err := socketFD(conn)
	if err != nil {
		return false
	}
	var buf [helloPeekSize]byte
	n, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)),
		syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	return errno == 0 && helloComplete(buf[:n])
}

// helloComplete reports whether b starts with a whole handshake message in
// handshake records: records of type 22 whose bodies add up to the four
// bytes of the message's header and the length it announces. NewConn then
// needs nothing more to read the message, or to refuse it.
func helloComplete(b []byte) bool {
	var hdr [4]byte // the message's header
	total := 0      // the message's bytes in the records so far
	for len(b) >= 5 && b[0] == 22 {
		n := int(b[3])<<8 | int(b[4])
		if len(b) < 5+n {
			return false
		}
		for i := 0; i < n && total+i < len(hdr); i++ {
			hdr[total+i] = b[5+i]
		}
		total += n
		if total >= len(hdr) && total >= len(hdr)+(int(hdr[1])<<16|int(hdr[2])<<8|int(hdr[3])) {
			return true
		}
		b = b[5+n:]
	}
	return false
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
		return -1, errno
	}
	one := int32(1)
	err := setsockopt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_NODELAY, unsafe.Pointer(&one), unsafe.Sizeof(one))
	if err == nil {
		_, _, errno = syscall.RawSyscall(syscall.SYS_CONNECT, fd, uintptr(sa), salen)
		switch errno {
		case 0, syscall.EINPROGRESS, syscall.EINTR:
			// Connected, or its end is an EPOLLOUT of the loop.
			return int(fd), nil
		}
		err = errno
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
