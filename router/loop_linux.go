//go:build linux && !386

package router

import (
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/echkit/ech/internal/sysmonhold"
)

// A forwarded connection spends most of its life idle: an IMAP client in
// IDLE, a browser's keep-alive connection. Two goroutines blocked in
// io.Copy hold two stacks for as long as it lasts. Once both directions of
// a passthrough connection are past the handshake, they are handed to an
// event loop instead, as HAProxy and nginx do: the loop waits on an epoll
// set for every such connection, and moves bytes with read and write
// through one buffer of its own, so an idle connection holds no goroutine
// and no buffer, only its pipe and the two sockets. A direction whose
// destination does not take all it read keeps the rest in a buffer of its
// own and stops reading until the destination is writable again (see
// block).

const (
	// loopBufSize is the most a loop reads at once, and the most a
	// direction holds when its destination is slow: 16 KiB, a TLS record
	// and HAProxy's default. Reads of 16 KiB pass each record on as it
	// comes, and keep the endpoints of a bulk transfer busy; larger reads,
	// and splice through pipes of 1 MiB, forward in bursts that cost the
	// endpoints more wake-ups than they spare the router (measured with
	// internal/perf/haproxy -pin: 398 MB/s with 16 KiB reads, 390 with
	// 32 KiB, 309 with splice, against 419 direct and 407 for HAProxy).
	loopBufSize = 16 << 10
	// loopBudget is how many bytes one direction moves before the loop
	// turns to the other ready connections.
	loopBudget = 1 << 20
	loopEvents = 128
	// epollET asks for edge-triggered events (EPOLLET, which package
	// syscall gives as a negative int).
	epollET = 1 << 31
)

// loop is one event loop: one goroutine, which waits for its epoll set in
// Go's poller (an epoll set is readable when one of its sockets is ready),
// never in a blocking system call, which would make the runtime hand its
// processor to another thread each time.
type loop struct {
	epfd int
	ep   syscall.RawConn // epfd in Go's poller
	buf  []byte          // the read buffer of pumps on the loop's goroutine

	mu    sync.Mutex
	pipes map[uint32]*pipe // by id, the epoll data
	next  uint32
	ready []loopReady // directions cut by their budget, to go on
}

// loopReady is a direction to go on with when the loop has served the
// others.
type loopReady struct {
	id  uint32
	dir int
}

var loops struct {
	once sync.Once
	l    []*loop
	err  error
	rr   atomic.Uint32
}

// loopFor returns a loop to hand a connection to, starting the loops the
// first time (see haveLoops).
func loopFor() (*loop, error) {
	if !haveLoops() {
		return nil, loops.err
	}
	return loops.l[int(loops.rr.Add(1))%len(loops.l)], nil
}

// haveLoops reports whether the loops run, starting them the first time:
// one per processor the runtime uses (but one sysmonhold holds), at most
// 4.
func haveLoops() bool {
	loops.once.Do(func() {
		for range min(max(runtime.GOMAXPROCS(0)-sysmonhold.Held(), 1), 4) {
			fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
			if err == nil {
				err = syscall.SetNonblock(fd, true) // for Go's poller
			}
			var ep syscall.RawConn
			if err == nil {
				ep, err = os.NewFile(uintptr(fd), "epoll").SyscallConn()
			}
			if err != nil {
				loops.err = err
				return
			}
			if goEpfd < 0 {
				goEpfd = findGoEpoll(fd)
			}
			l := &loop{epfd: fd, ep: ep, buf: make([]byte, loopBufSize), pipes: make(map[uint32]*pipe)}
			loops.l = append(loops.l, l)
			go l.run()
		}
	})
	return len(loops.l) > 0
}

// goEpfd is the epoll set of Go's poller, or -1 if it could not be found.
// A socket stays in it while the loop forwards it, and each segment would
// then also wake a thread waiting in Go's poller, for nothing: in a bulk
// transfer with the router on a processor of its own, 16,000 interrupts
// in 2 s sent to the router's processor by the endpoints', against 1,000
// with its sockets out. So the loop takes the sockets out of that set
// (see leaveGoPoller). Go does not look at the result of taking them out
// again when it closes them.
var goEpfd = -1

// findGoEpoll returns the epoll set of Go's poller, found as the one that
// holds epfd (a loop's set, registered in Go's poller by os.NewFile), or -1.
func findGoEpoll(epfd int) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd == epfd {
			continue
		}
		if link, _ := os.Readlink("/proc/self/fd/" + e.Name()); link != "anon_inode:[eventpoll]" {
			continue
		}
		if _, ok := epollMask(fd, epfd); ok {
			return fd
		}
	}
	return -1
}

// epollMask returns the events fd is registered for in the epoll set epfd,
// as /proc tells them, and whether it is registered at all.
func epollMask(epfd, fd int) (uint32, bool) {
	info, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", epfd))
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(info)) {
		var tfd int
		var mask uint32
		if n, _ := fmt.Sscanf(line, "tfd: %d events: %x", &tfd, &mask); n == 2 && tfd == fd {
			return mask, true
		}
	}
	return 0, false
}

// loopState is a pipe's state once handed to a loop. The pipe's mutex
// guards it.
type loopState struct {
	l       *loop
	id      uint32
	fd      [2]int // 0 the client's socket, 1 the backend's
	dir     [2]loopDir
	inLoop  [2]bool // whether direction i is the loop's, its goroutine gone
	blocked [2]bool // whether direction i waits for its destination: see block
	// connecting says that the loop connects the backend's socket itself
	// (see passthroughInLoop), and it has not taken a byte yet.
	connecting bool
	idleT      *time.Timer
	finT       *time.Timer
}

// loopDir is one direction, from side i to side 1-i.
type loopDir struct {
	pend   *[]byte // bytes read and not yet written, from off
	off    int
	srcEOF bool  // the source ended
	ended  bool  // and the end was passed on: the direction is done
	n      int64 // bytes forwarded, by the loop and before by the goroutine
}

// useLoops says that passthrough connections go to loops once past the
// handshake; benchmarks clear it for their baseline.
var useLoops atomic.Bool

func init() { useLoops.Store(true) }

// handToLoop registers p's sockets with a loop, which forwards none of
// its directions yet (see resolveInLoop), as direction dir hands off: the
// client and the backend are TCP connections. The other direction may have
// ended already, by EOF (its goroutine passed the half-close on). It fails
// when no loop can take them: the caller then forwards as before. p.mu is
// held.
func (p *pipe) handToLoop(dir int) error {
	l, err := loopFor()
	if err != nil {
		return err
	}
	s := &loopState{l: l}
	if other := 1 - dir; p.resolved[other] {
		// Its end is the loop's to know: it came before the loop.
		s.dir[other].srcEOF, s.dir[other].ended = true, true
		s.dir[other].n = p.res[other].n
	}
	for i, c := range [2]net.Conn{p.clientTCP, p.backend} {
		if s.fd[i], err = socketFD(c); err != nil {
			return err
		}
	}
	// The handshake is over: the sockets now belong to the loop. Go's
	// poller keeps them registered, and ignores their events, as nobody
	// waits on them.
	if err := p.register(s); err != nil {
		return err
	}
	s.idleT = time.AfterFunc(p.idle, p.onIdle)
	p.armFin() // the other direction's EOF may have started the fin timeout
	return nil
}

// socketFD returns the descriptor of c's socket.
func socketFD(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, errors.New("router: not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// register gives p, in state s, to s's loop, with both sockets, and sets
// p.loop. p.mu is held: an event from now on waits for it, and finds
// p.loop set.
func (p *pipe) register(s *loopState) error {
	l := s.l
	l.mu.Lock()
	l.next++
	for l.pipes[l.next] != nil || l.next == 0 {
		l.next++
	}
	s.id = l.next
	l.pipes[s.id] = p
	l.mu.Unlock()
	for i, fd := range s.fd {
		ev := s.interest(i)
		if err := epollCtl(l.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
			if i == 1 {
				epollCtl(l.epfd, syscall.EPOLL_CTL_DEL, s.fd[0], &ev)
			}
			l.mu.Lock()
			delete(l.pipes, s.id)
			l.mu.Unlock()
			return err
		}
	}
	p.loop = s
	return nil
}

func (l *loop) run() {
	events := make([]syscall.EpollEvent, loopEvents)
	var ready []loopReady // the directions to go on with, swapped with l.ready
	// serve serves the events and the directions queued until it has
	// taken every event there was, and nothing is queued: it then waits
	// in Go's poller, which calls it again once the epoll set is readable
	// (readable anew since serve's last poll: the set wakes its pollers at
	// each socket that gets ready, even during a poll, and Go's poller
	// has it edge triggered). All of it runs in one call of RawRead,
	// which clears a readiness that came before only when it starts: a
	// loop that called RawRead for each wake-up would have to poll once
	// more each time, to learn whether one came while it served.
	serve := func(fd uintptr) bool {
		for {
			n, err := epollPoll(int(fd), events)
			if err != nil && err != syscall.EINTR {
				return true // not recoverable (EBADF, EFAULT, EINVAL)
			}
			for _, ev := range events[:n] {
				l.event(uint32(ev.Fd), int(ev.Pad), ev.Events)
			}
			l.mu.Lock()
			ready, l.ready = l.ready, ready[:0]
			l.mu.Unlock()
			for _, r := range ready {
				l.event(r.id, r.dir, syscall.EPOLLIN|syscall.EPOLLRDHUP) // read on until EAGAIN
			}
			l.mu.Lock()
			more := len(l.ready) > 0
			l.mu.Unlock()
			if n < len(events) && err == nil && !more {
				return false // wait in Go's poller
			}
		}
	}
	// Returns only on an error: the connections end at their idle
	// timeout.
	l.ep.Read(serve)
}

// event serves the events of side of pipe id: side's reads when readable
// (or ended), writes into side when writable.
func (l *loop) event(id uint32, side int, events uint32) {
	l.mu.Lock()
	p := l.pipes[id]
	l.mu.Unlock()
	if p == nil {
		return // closed since
	}
	p.mu.Lock()
	s := p.loop
	if s == nil || p.closed {
		p.mu.Unlock()
		return
	}
	const readable = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLHUP | syscall.EPOLLERR
	const writable = syscall.EPOLLOUT | syscall.EPOLLHUP | syscall.EPOLLERR
	var err error
	if events&writable != 0 && s.waitsFor(1-side) && s.inLoop[1-side] {
		err = p.pump(1-side, true, l.buf, loopBudget)
	}
	// A direction still with its goroutine reads in Go.
	if err == nil && events&readable != 0 && s.inLoop[side] {
		// After the peer's end or an error, read until EOF: they were
		// signalled once, maybe with bytes before them.
		err = p.pump(side, events&(syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0, l.buf, loopBudget)
	}
	p.afterPump(err, true)
}

// resolveInLoop records the end of direction dir's goroutine once p has
// a loop: a direction handed off is the loop's from now on, and is pumped
// once (its events were ignored until now); one that ended is done, with
// the error that ends the connection, unless that was already reported.
// p.mu is held, and released.
func (p *pipe) resolveInLoop(dir int, r dirResult, handed bool) {
	s := p.loop
	s.dir[dir].n += r.n // what its goroutine forwarded
	closedByOther := p.closed && (handed || r.err == nil) || errors.Is(r.err, net.ErrClosed)
	switch {
	case p.reported:
		p.mu.Unlock()
	case closedByOther:
		// By the other direction's goroutine, which reports why when it
		// ends, unless it has.
		if !p.bothResolved() {
			p.mu.Unlock()
			return
		}
		p.endLoop(-1, nil, false)
	case handed:
		s.inLoop[dir] = true
		p.leaveGoPoller()
		// Not on the loop's goroutine: a buffer of its own, and no
		// budget, as nothing would wake the loop to go on with it.
		b := loopBufs.Get().(*[]byte)
		err := p.pump(dir, true, (*b)[:loopBufSize], math.MaxInt)
		loopBufs.Put(b)
		p.afterPump(err, false)
	case r.err == nil:
		// EOF: the goroutine passed the half-close on and started the fin
		// timeout.
		s.dir[dir].srcEOF, s.dir[dir].ended = true, true
		p.leaveGoPoller()
		p.armFin()
		p.afterPump(nil, false)
	case errors.Is(r.err, errIdleTimeout), errors.Is(r.err, errFinTimeout):
		p.endLoop(-1, r.err, false)
	default:
		// The goroutine's copy failed, and closed both connections.
		failed := 0
		if r.fromBackend {
			failed = 1
		}
		p.endLoop(failed, r.err, false)
	}
}

// leaveGoPoller takes p's sockets out of Go's poller (see goEpfd) once
// neither direction's goroutine reads them: when the second direction is
// resolved, which happens once. Even for a connection that
// exchanges a few small messages, that costs less than it spares: the
// round trip of one byte through the router took 64-92 µs with the
// sockets out, against 104-124 µs with them left in until the connection
// moved bulk, for about the same CPU per connection. p.mu is held.
func (p *pipe) leaveGoPoller() {
	if goEpfd >= 0 && p.bothResolved() {
		for i, fd := range p.loop.fd {
			if _, raw := p.backend.(*rawSocket); i == 0 || !raw {
				epollCtl(goEpfd, syscall.EPOLL_CTL_DEL, fd, &syscall.EpollEvent{})
			}
		}
	}
}

// afterPump ends p if err is not nil or both directions are done; async
// is endLoop's. p.mu is held, and released.
func (p *pipe) afterPump(err error, async bool) {
	s := p.loop
	var failed *loopError
	switch {
	case errors.As(err, &failed):
		p.endLoop(failed.side, err, async)
	case err != nil:
		p.endLoop(-1, err, async)
	case s.dir[0].ended && s.dir[1].ended:
		p.endLoop(-1, nil, async)
	default:
		p.mu.Unlock()
	}
}

// loopError is an error of a socket: side 0 the client's, 1 the backend's.
type loopError struct {
	side int
	err  error
}

func (e *loopError) Error() string { return e.err.Error() }
func (e *loopError) Unwrap() error { return e.err }

// pump moves what it can from side dir to side 1-dir: first what is left
// from before, then what can be read, until the source has nothing, the
// destination takes nothing more, or the budget is spent. Unless drain is
// set, a short read is taken to mean that the source has nothing more. buf
// is the buffer to read into: the loop's on its goroutine. Once it has
// moved budget bytes, the pump queues the direction to go on with after
// the other connections' turn. p.mu is held.
func (p *pipe) pump(dir int, drain bool, buf []byte, budget int) error {
	s := p.loop
	d := &s.dir[dir]
	if d.ended {
		return nil
	}
	src, dst := s.fd[dir], s.fd[1-dir]
	moved := false
	defer func() {
		if moved {
			p.active.Store(time.Now().UnixNano())
		}
	}()
	for {
		if d.pend != nil {
			b := (*d.pend)[d.off:]
			n, blocked, err := writeAll(dst, b)
			d.off += n
			d.n += int64(n)
			moved = moved || n > 0
			if s.connecting && err != nil {
				err = connectError(p.backend.(*rawSocket).addr, err)
			} else if s.connecting && n > 0 {
				p.connected()
			}
			if err != nil {
				return &loopError{1 - dir, err}
			}
			if blocked {
				if s.connecting {
					return nil // EPOLLOUT comes once connected
				}
				return p.block(dir, true)
			}
			putLoopBuf(d.pend)
			d.pend, d.off = nil, 0
			if err := p.block(dir, false); err != nil {
				return err
			}
		}
		if d.srcEOF {
			// Pass the half-close on and give the other side the fin
			// timeout.
			rawSyscall(syscall.SYS_SHUTDOWN, dst, syscall.SHUT_WR, 0)
			d.ended = true
			p.startFinLoop()
			return nil
		}
		if budget <= 0 {
			s.l.mu.Lock()
			s.l.ready = append(s.l.ready, loopReady{s.id, dir})
			s.l.mu.Unlock()
			return nil
		}
		n, err := rawSyscall(syscall.SYS_READ, src, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return nil
		case err != nil:
			return &loopError{dir, err}
		case n == 0:
			d.srcEOF = true
			continue
		}
		budget -= n
		// A short read took all the socket had: the next bytes, or its
		// end, are a new event (a socket signals each arrival, edge
		// triggered or not), so there is no need to read until EAGAIN.
		short := n < len(buf) && !drain
		w, blocked, err := writeAll(dst, buf[:n])
		d.n += int64(w)
		moved = true
		if err != nil {
			return &loopError{1 - dir, err}
		}
		if blocked {
			// Keep the rest, and read no more until dst takes it.
			d.pend = loopBufs.Get().(*[]byte)
			*d.pend = append((*d.pend)[:0], buf[w:n]...)
			return p.block(dir, true)
		}
		if short {
			return nil
		}
	}
}

// writeAll writes b to fd until it is written, fd would block, or an
// error.
func writeAll(fd int, b []byte) (n int, blocked bool, err error) {
	for n < len(b) {
		// NOTE: a write to a socket reset by its peer fails with EPIPE:
		// Go ignores SIGPIPE for descriptors other than 1 and 2.
		m, err := rawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[n])), uintptr(len(b)-n))
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return n, true, nil
		case err != nil:
			return n, false, err
		}
		n += m
	}
	return n, false, nil
}

// interest is what the loop waits for on side's socket, edge triggered:
// EPOLLIN unless its direction is blocked, EPOLLOUT if the other one waits
// for it.
func (s *loopState) interest(side int) syscall.EpollEvent {
	ev := syscall.EpollEvent{Events: epollET, Fd: int32(s.id), Pad: int32(side)}
	if !s.blocked[side] {
		ev.Events |= syscall.EPOLLIN | syscall.EPOLLRDHUP
	}
	if s.waitsFor(1 - side) {
		ev.Events |= syscall.EPOLLOUT
	}
	return ev
}

// waitsFor reports whether direction dir waits for its destination to be
// writable: it is blocked, or its destination is the backend's socket
// that the loop is connecting. Once connected, the backend stays
// registered for EPOLLOUT, edge triggered, until its next change: that
// costs no wake-up (a socket that has room signals EPOLLOUT only with
// other events, or after a write that found it full), and spares two
// changes of the epoll set per connection.
func (s *loopState) waitsFor(dir int) bool {
	return s.blocked[dir] || dir == 0 && s.connecting
}

// block says whether direction dir is blocked on its destination: then
// the destination is registered for EPOLLOUT, and the source no longer for
// EPOLLIN, as HAProxy does. Edge triggered, a source still registered
// would wake the loop at each segment it receives, for nothing, and the
// wake-ups (each an inter-processor interrupt sent by the peer's CPU) cost
// more than the copies. Unblocked, the pump reads the source on until
// EAGAIN, and registering it again signals bytes that came since. If the
// system refuses, bytes held would be lost or the source never read
// again: the error fails that side, whose peer then gets a reset rather
// than a clean end.
func (p *pipe) block(dir int, on bool) error {
	s := p.loop
	if s.blocked[dir] == on {
		return nil
	}
	s.blocked[dir] = on
	// Registered for EPOLLOUT before the source is left, and the source
	// registered again before EPOLLOUT is left.
	order := [2]int{1 - dir, dir}
	if !on {
		order = [2]int{dir, 1 - dir}
	}
	for _, side := range order {
		ev := s.interest(side)
		if err := epollCtl(s.l.epfd, syscall.EPOLL_CTL_MOD, s.fd[side], &ev); err != nil {
			return &loopError{side, err}
		}
	}
	return nil
}

var loopBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, loopBufSize)
	return &b
}}

// putLoopBuf puts b back in loopBufs, unless a hello larger than
// loopBufSize made it grow.
func putLoopBuf(b *[]byte) {
	if cap(*b) == loopBufSize {
		loopBufs.Put(b)
	}
}

// startFinLoop starts the fin timeout, once. p.mu is held.
func (p *pipe) startFinLoop() {
	s := p.loop
	if s.dir[0].ended && s.dir[1].ended {
		return // both done: the connection ends now
	}
	p.finAt.CompareAndSwap(0, time.Now().Add(p.fin).UnixNano())
	p.armFin()
}

// armFin starts the timer of the fin timeout once it has started (finAt),
// if it has none yet. p.mu is held.
func (p *pipe) armFin() {
	if f := p.finAt.Load(); f != 0 && p.loop.finT == nil {
		p.loop.finT = time.AfterFunc(time.Until(time.Unix(0, f)), p.onFin)
	}
}

// onIdle ends p if nothing moved either way for its idle timeout.
func (p *pipe) onIdle() {
	p.mu.Lock()
	if p.reported || p.loop == nil {
		p.mu.Unlock()
		return
	}
	if p.loop.connecting {
		// The timer was the dial timeout.
		p.endLoop(1, dialError(p.backend.(*rawSocket).addr, os.ErrDeadlineExceeded), false)
		return
	}
	if left := p.idle - time.Since(time.Unix(0, p.active.Load())); left > 0 {
		p.loop.idleT.Reset(left)
		p.mu.Unlock()
		return
	}
	p.endLoop(-1, errIdleTimeout, false)
}

// onFin ends p when the fin timeout of its first closed side ends.
func (p *pipe) onFin() {
	p.mu.Lock()
	if p.reported || p.loop == nil {
		p.mu.Unlock()
		return
	}
	p.endLoop(-1, errFinTimeout, false)
}

// endLoop closes both connections and reports the end, on a goroutine of
// its own if async. If failed is a side, the other side's peer gets a
// reset. p.mu is held, and released.
func (p *pipe) endLoop(failed int, err error, async bool) {
	s := p.loop
	wasClosed := p.closed
	p.closed, p.reported = true, true
	s.idleT.Stop()
	if s.finT != nil {
		s.finT.Stop()
	}
	s.l.mu.Lock()
	delete(s.l.pipes, s.id)
	s.l.mu.Unlock()
	for i := range s.dir {
		if d := &s.dir[i]; d.pend != nil {
			putLoopBuf(d.pend)
			d.pend = nil
		}
	}
	if !wasClosed {
		// Closing the sockets takes them out of the epoll set, and ends a
		// goroutine still reading one.
		var failedConn net.Conn
		if failed >= 0 {
			failedConn = [2]net.Conn{p.client, p.backend}[failed]
		}
		p.closeConns(failedConn)
	}
	in, out := max(s.dir[0].n, 0), s.dir[1].n // less a PROXY header not written
	p.mu.Unlock()
	if failed == 1 {
		err = fmt.Errorf("%w: %w", errBackend, err)
	}
	if async {
		// Logging may wait on a slow log reader: not in the loop.
		queueEnd(endReport{p, in, out, err})
		return
	}
	p.done(in, out, err)
}

// endReport is the end of a connection, to report.
type endReport struct {
	p       *pipe
	in, out int64
	err     error
}

// ends queues the ends the loops report, for one goroutine to report in
// turn: a loop neither waits for a slow log reader nor starts a goroutine
// for each connection that ends. While the log is stuck, each end waiting
// holds only its entry here, not a goroutine.
var ends struct {
	sync.Mutex
	once  sync.Once
	queue []endReport
	wake  chan struct{} // one token: the queue has ends
}

func queueEnd(r endReport) {
	ends.once.Do(func() {
		ends.wake = make(chan struct{}, 1)
		go reportEnds()
	})
	ends.Lock()
	ends.queue = append(ends.queue, r)
	ends.Unlock()
	select {
	case ends.wake <- struct{}{}:
	default: // a token is waiting already
	}
}

// reportEnds reports the queued ends, for ever.
func reportEnds() {
	var batch []endReport
	for range ends.wake {
		ends.Lock()
		batch, ends.queue = ends.queue, batch[:0]
		ends.Unlock()
		for i, r := range batch {
			r.p.done(r.in, r.out, r.err)
			batch[i] = endReport{}
		}
	}
}

// The loop's system calls never block (its sockets are non-blocking, its
// epoll_wait does not wait): they are made raw, without telling the
// runtime, which would otherwise prepare to hand the processor to another
// thread and wake its monitor thread, at a cost larger than the calls'.

func rawSyscall(trap uintptr, fd int, a2, a3 uintptr) (int, error) {
	n, _, errno := syscall.RawSyscall(trap, uintptr(fd), a2, a3)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

func epollCtl(epfd, op, fd int, ev *syscall.EpollEvent) error {
	_, _, errno := syscall.RawSyscall6(syscall.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// epollPoll returns the events ready, without waiting.
func epollPoll(epfd int, events []syscall.EpollEvent) (int, error) {
	n, _, errno := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
