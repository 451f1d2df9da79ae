//go:build linux

package echquic

import (
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// On Linux the datagrams of established flows are read and written in
// batches, with recvmmsg(2) and sendmmsg(2): a system call costs more than
// the copying of a datagram, and the proxy makes two per datagram where the
// direct path makes one.

// batchSize is the number of datagrams a batch reads or writes at most.
const batchSize = 16

// mmsghdr is struct mmsghdr of recvmmsg(2); Go pads it as C does.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// sockName is a socket address in the form sendmmsg(2) takes.
type sockName struct {
	sa  unix.RawSockaddrInet6 // or a RawSockaddrInet4 in its first bytes
	len uint32
}

// batch is the memory of one recvmmsg(2) call and of the sendmmsg(2) call
// that forwards what it read. Its functions for [syscall.RawConn] are made
// once, so that a call does not allocate.
type batch struct {
	in    [batchSize]mmsghdr
	iovs  [batchSize]unix.Iovec
	names [batchSize]unix.RawSockaddrInet6
	buf   []byte // batchSize datagrams of slot bytes
	slot  int
	n     int // messages read

	out     [batchSize]mmsghdr
	outIovs [batchSize]unix.Iovec
	nout    int // messages to send
	sent    int

	// gso is the message of a sendmsg(2) with UDP generic segmentation
	// offload: all queued datagrams at once, segmented by the kernel.
	gso    unix.Msghdr
	gsoOOB [gsoOOBLen]byte

	errno                 syscall.Errno
	recvFn, sendFn, gsoFn func(fd uintptr) bool
}

// Linux UDP generic segmentation offload (linux/udp.h): a cmsg of level
// SOL_UDP and type UDP_SEGMENT with the segment size as a uint16 makes one
// sendmsg(2) send a buffer as datagrams of that size, the last one shorter.
const (
	udpSegment    = 103
	maxUDPPayload = 65507 // IPv4
	gsoOOBLen     = 24    // CMSG_SPACE(2) on 64-bit
)

// batchPool holds the batches of the backend readers.
var batchPool = sync.Pool{New: func() any { return newBatch(maxDatagramSize) }}

// newBatch returns a batch that reads datagrams of up to slot bytes;
// larger ones are dropped.
func newBatch(slot int) *batch {
	b := &batch{buf: make([]byte, batchSize*slot), slot: slot}
	for i := range b.in {
		b.iovs[i].Base = &b.buf[i*slot]
		b.iovs[i].SetLen(slot)
		b.in[i].hdr.Iov = &b.iovs[i]
		b.in[i].hdr.SetIovlen(1)
		b.in[i].hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		b.out[i].hdr.Iov = &b.outIovs[i]
		b.out[i].hdr.SetIovlen(1)
	}
	b.recvFn = b.recv
	b.sendFn = b.send
	b.gsoFn = b.sendGSO
	b.gso.Iov = &b.outIovs[0]
	if unix.CmsgSpace(2) <= len(b.gsoOOB) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b.gsoOOB[0]))
		h.Level = unix.SOL_UDP
		h.Type = udpSegment
		h.SetLen(unix.CmsgLen(2))
		b.gso.Control = &b.gsoOOB[0]
		b.gso.SetControllen(unix.CmsgSpace(2))
	}
	return b
}

func (b *batch) recv(fd uintptr) bool {
	for i := range b.in {
		b.in[i].hdr.Namelen = unix.SizeofSockaddrInet6
		b.in[i].hdr.Flags = 0
	}
	for {
		n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.in[0])), batchSize, 0, 0, 0)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false // wait for the socket to be readable
		case 0:
			b.n = int(n)
		default:
			b.n = 0
		}
		b.errno = e
		return true
	}
}

// read reads a batch from rc into b.
func (b *batch) read(rc syscall.RawConn) (int, error) {
	b.n, b.errno = 0, 0
	if err := rc.Read(b.recvFn); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.n, nil
}

// datagram returns the i-th datagram read, nil if it was truncated or
// empty. It is valid until the next read.
func (b *batch) datagram(i int) []byte {
	m := &b.in[i]
	if m.n == 0 || m.hdr.Flags&unix.MSG_TRUNC != 0 {
		return nil
	}
	return b.buf[i*b.slot : i*b.slot+int(m.n)]
}

// addr returns the source address of the i-th datagram read, as
// [net.UDPConn.ReadFromUDPAddrPort] does (a zone by number).
func (b *batch) addr(i int) netip.AddrPort {
	sa := &b.names[i]
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port(&sa4.Port))
	case unix.AF_INET6:
		a := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			a = a.WithZone(strconv.FormatUint(uint64(sa.Scope_id), 10))
		}
		return netip.AddrPortFrom(a, port(&sa.Port))
	}
	return netip.AddrPort{}
}

// port reads a port in network byte order.
func port(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func setPort(p *uint16, v uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0], b[1] = byte(v>>8), byte(v)
}

// newSockName returns ap in the form of the socket it came from: a 4-byte
// address from an IPv4 socket, a 16-byte one from an IPv6 socket.
func newSockName(ap netip.AddrPort) *sockName {
	s := new(sockName)
	a := ap.Addr()
	if a.Is4() {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&s.sa))
		sa4.Family = unix.AF_INET
		sa4.Addr = a.As4()
		setPort(&sa4.Port, ap.Port())
		s.len = unix.SizeofSockaddrInet4
		return s
	}
	s.sa.Family = unix.AF_INET6
	s.sa.Addr = a.As16()
	setPort(&s.sa.Port, ap.Port())
	if z := a.Zone(); z != "" {
		if id, err := strconv.ParseUint(z, 10, 32); err == nil {
			s.sa.Scope_id = uint32(id)
		} else if ifi, err := net.InterfaceByName(z); err == nil {
			s.sa.Scope_id = uint32(ifi.Index)
		}
	}
	s.len = unix.SizeofSockaddrInet6
	return s
}

// queue adds d to the datagrams to send, to name if not nil (else on a
// connected socket). d must stay valid until the batch is flushed.
func (b *batch) queue(d []byte, name *sockName) {
	m := &b.out[b.nout]
	b.outIovs[b.nout].Base = &d[0]
	b.outIovs[b.nout].SetLen(len(d))
	if name != nil {
		m.hdr.Name = (*byte)(unsafe.Pointer(&name.sa))
		m.hdr.Namelen = name.len
	} else {
		m.hdr.Name, m.hdr.Namelen = nil, 0
	}
	b.nout++
}

func (b *batch) send(fd uintptr) bool {
	for b.sent < b.nout {
		n, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.out[b.sent])), uintptr(b.nout-b.sent), 0, 0, 0)
		switch e {
		case unix.EINTR:
		case unix.EAGAIN:
			return false // wait for room in the socket buffer
		case 0:
			b.sent += int(n)
		default:
			// The datagram that failed is dropped, as a failed write is:
			// ECONNREFUSED after an ICMP error, and the like.
			b.sent++
		}
	}
	return true
}

// segmentSize returns the segment size with which one sendmsg(2) with
// UDP_SEGMENT sends the queued datagrams, 0 if it cannot: they must be two
// or more, all of one size but the last, which may be shorter.
func (b *batch) segmentSize() int {
	if b.nout < 2 || b.gso.Control == nil {
		return 0
	}
	size := int(b.outIovs[0].Len)
	total := 0
	for i := range b.nout {
		l := int(b.outIovs[i].Len)
		if l > size || l < size && i < b.nout-1 {
			return 0
		}
		total += l
	}
	if total > maxUDPPayload {
		return 0
	}
	return size
}

func (b *batch) sendGSO(fd uintptr) bool {
	for {
		_, _, e := unix.Syscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&b.gso)), 0)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		b.errno = e
		return true
	}
}

// flush sends the queued datagrams on rc: with one sendmsg(2) and UDP
// generic segmentation offload if gso is set and they allow it (gso is
// cleared when the kernel or the route refuses it), else with sendmmsg(2).
// A datagram that cannot be sent is dropped, as a failed WriteTo would
// drop it.
func (b *batch) flush(rc syscall.RawConn, gso *atomic.Bool) {
	if b.nout == 0 {
		return
	}
	if size := b.segmentSize(); size > 0 && gso.Load() {
		*(*uint16)(unsafe.Pointer(&b.gsoOOB[unix.CmsgLen(0)])) = uint16(size)
		b.gso.Name, b.gso.Namelen = b.out[0].hdr.Name, b.out[0].hdr.Namelen
		b.gso.SetIovlen(b.nout)
		b.errno = 0
		err := rc.Write(b.gsoFn)
		if err == nil && b.errno == 0 {
			b.reset()
			return
		}
		if gsoRefused(b.errno) {
			gso.Store(false)
		}
		// Send them one by one.
	}
	b.sent = 0
	rc.Write(b.sendFn)
	b.reset()
}

// gsoRefused reports whether a sendmsg(2) with UDP_SEGMENT failed with e
// because the kernel, the device or the route does not do it (quic-go
// turns GSO off on EIO), rather than for a reason of the datagrams, such
// as ECONNREFUSED after an ICMP error.
func gsoRefused(e syscall.Errno) bool {
	switch e {
	case unix.EIO, unix.EINVAL, unix.ENOPROTOOPT, unix.EOPNOTSUPP, unix.EMSGSIZE:
		return true
	}
	return false
}

// reset empties the queue, and drops its references to the datagrams and
// addresses.
func (b *batch) reset() {
	for i := range b.nout {
		b.outIovs[i].Base = nil
		b.out[i].hdr.Name = nil
	}
	b.gso.Name = nil
	b.nout, b.sent = 0, 0
}

// batchConn is what a flow needs to forward in batches.
type batchConn struct {
	pc     syscall.RawConn // the client-facing socket
	client *sockName
	up     syscall.RawConn // the backend socket
	// Whether UDP generic segmentation offload works to the client and
	// to the backend; set until a send with it fails.
	gsoClient, gsoUp atomic.Bool
}

// serveBatches is [Proxy.Serve] on a UDP socket of Linux: it reads
// batches of datagrams and forwards the short header packets of
// established flows in batches.
//
// NOTE: unlike readBackendBatches, it handles a batch after the read
// returns: handling takes p.mu, which Close holds while it closes the
// socket, and closing waits for the reads in progress.
func (p *Proxy) serveBatches(udp *net.UDPConn) error {
	rc, err := udp.SyscallConn()
	if err != nil {
		return p.serveEach(udp, udp)
	}
	b := newBatch(1 << 16) // any datagram, as serveEach reads
	for {
		if _, err := b.read(rc); err != nil {
			if stop, ret := p.readEnd(err); stop {
				return ret
			}
			continue
		}
		p.forwardBatch(udp, b)
	}
}

// forwardBatch handles the datagrams of b read by serveBatches.
func (p *Proxy) forwardBatch(udp *net.UDPConn, b *batch) {
	var (
		cur   *flow // the flow of ap, nil if none
		ap    netip.AddrPort
		queue *flow // the flow of the queued datagrams
	)
	for i := range b.n {
		d := b.datagram(i)
		a := b.addr(i)
		if d == nil || !a.IsValid() {
			continue
		}
		if a != ap || cur == nil {
			ap = a
			p.mu.RLock()
			cur = p.flows[ap]
			p.mu.RUnlock()
		}
		if cur != nil && d[0]&headerFormLong == 0 {
			if !cur.routed.Load() {
				continue
			}
			if cur != queue {
				p.flushUp(b, queue)
				queue = cur
			}
			b.queue(d, nil)
			continue
		}
		// Another packet of this flow, or a new flow: in order, after
		// what is queued.
		p.flushUp(b, queue)
		queue = nil
		p.handle(udp, udp, a, d)
		cur = nil // handle may have made or ended flows
	}
	p.flushUp(b, queue)
}

// flushUp sends the datagrams queued in b to the backend of f.
func (p *Proxy) flushUp(b *batch, f *flow) {
	if f == nil || b.nout == 0 {
		return
	}
	f.last.Store(p.now.Load())
	b.flush(f.batch.up, &f.batch.gsoUp)
}

// readBackendBatches is [Proxy.readBackend] in batches. A batch is taken
// from a pool only while datagrams are there to read, so that an idle flow
// holds no buffer.
//
// The batches are forwarded inside the function given to
// [syscall.RawConn.Read], which returns false after a batch that emptied
// the socket: the runtime then waits for the next datagram without the
// recvmmsg(2) that would fail with EAGAIN. No datagram is missed: one that
// arrives after the socket was emptied wakes the wait. Closing the socket
// waits for that function to return: it must not take p.mu, which
// closeFlow holds while it closes the socket.
func (p *Proxy) readBackendBatches(f *flow) {
	defer p.wg.Done()
	fn := func(fd uintptr) bool {
		for {
			b := batchPool.Get().(*batch)
			if !b.recv(fd) {
				batchPool.Put(b)
				return false
			}
			if b.errno != 0 {
				batchPool.Put(b)
				return true // the error ends this Read
			}
			for i := range b.n {
				d := b.datagram(i)
				if d == nil {
					continue // possibly truncated
				}
				p.noteRetry(f, d)
				b.queue(d, f.batch.client)
			}
			f.last.Store(p.now.Load())
			b.flush(f.batch.pc, &f.batch.gsoClient)
			n := b.n
			batchPool.Put(b)
			if n < batchSize {
				return false
			}
		}
	}
	for {
		if err := f.batch.up.Read(fn); err != nil && errors.Is(err, net.ErrClosed) {
			return
		}
		// ICMP port unreachable and the like: the idle timeout ends the flow.
	}
}

// newBatchConn returns what f needs to forward in batches, nil if its
// sockets cannot.
func newBatchConn(f *flow) *batchConn {
	if f.udp == nil {
		return nil
	}
	pc, err := f.udp.SyscallConn()
	if err != nil {
		return nil
	}
	up, err := f.up.SyscallConn()
	if err != nil {
		return nil
	}
	c := &batchConn{pc: pc, client: newSockName(f.client), up: up}
	c.gsoClient.Store(true)
	c.gsoUp.Store(true)
	return c
}
