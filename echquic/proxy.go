package echquic

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech"
)

// Defaults of the [Proxy] fields left zero.
const (
	DefaultIdleTimeout      = 30 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxFlows         = 10000
)

const (
	// maxQueued bounds the datagrams a flow holds while its ClientHello is
	// incomplete or being routed, in count and bytes.
	maxQueued      = 32
	maxQueuedBytes = 64 << 10
	// maxDatagramSize is the largest datagram a backend may send. QUIC
	// stacks stay under 1500 bytes (quic-go: 1452); a larger datagram
	// is dropped.
	maxDatagramSize = 4096
	// transportCryptoBufferExceeded is the QUIC transport error code for
	// CRYPTO data beyond what the server buffers (RFC 9000, Section 20.1).
	transportCryptoBufferExceeded = 0x0d
	cryptoErrorBase               = 0x100 // RFC 9001, Section 4.8
)

// Info describes a new QUIC connection to route: the ClientHello the
// backend will get.
type Info struct {
	// RemoteAddr is the client's address.
	RemoteAddr net.Addr
	// Version is the QUIC version of the client's Initial packets.
	Version uint32
	// Status is the outcome of ECH.
	Status ech.Status
	// ServerName is the server_name of the hello the backend gets: the
	// inner name when ECH was accepted, else the name in the clear.
	ServerName string
	// OuterServerName is the server_name in the clear.
	OuterServerName string
	// ALPNProtos are the ALPN protocols of the hello the backend gets.
	ALPNProtos []string
}

// Proxy is a client-facing server for QUIC in split mode. It reads the
// ClientHello from the client's Initial packets, decrypts its ECH with the
// keys of ECHOptions as [ech.NewConn] does, asks Route where the connection
// goes, and forwards the connection's datagrams between the client and that
// backend, with the client's Initial packets rewritten to carry the
// ClientHelloInner. See the package documentation.
//
// The zero value is not usable: Route must be set. Fields must not change
// once Serve is called.
type Proxy struct {
	// Route returns the backend of a new connection. It is called from the
	// goroutine that reads the client datagrams and should not block. An
	// error refuses the connection: the client gets a CONNECTION_CLOSE
	// with the alert unrecognized_name.
	Route func(Info) (net.Addr, error)
	// ECHOptions are the options of [ech.NewConn]: the keys
	// ([ech.WithKeySet]), the public name check, the hello size limit.
	// Timeouts and loggers given here do not apply.
	ECHOptions []ech.Option
	// IdleTimeout ends a flow that has forwarded nothing for that long.
	IdleTimeout time.Duration
	// HandshakeTimeout ends a flow whose ClientHello is not complete and
	// routed after that long.
	HandshakeTimeout time.Duration
	// MaxFlows bounds the flows at once; Initials of new connections
	// beyond it are dropped.
	MaxFlows int
	// MaxHelloSize bounds a ClientHello, as [ech.WithMaxHelloSize]
	// (default [ech.DefaultMaxHelloSize]).
	MaxHelloSize int
	// Logger, if set, gets refused connections at info level.
	Logger *slog.Logger

	mu     sync.RWMutex
	flows  map[netip.AddrPort]*flow
	pcs    map[net.PacketConn]struct{}
	closed bool
	wg     sync.WaitGroup
	now    atomic.Int64 // coarse clock, in nanoseconds, set by the janitor
	start  sync.Once
	stop   chan struct{}
}

// flow is the state of one client address. The serve goroutine owns hs and
// queue; the janitor and Close may close it concurrently.
type flow struct {
	client  netip.AddrPort
	addr    *net.UDPAddr
	pc      net.PacketConn
	udp     *net.UDPConn // pc, when it is one: no allocation per datagram
	created int64
	last    atomic.Int64

	up     *net.UDPConn // set once before routed is set
	batch  *batchConn   // set with up when the sockets can forward in batches
	routed atomic.Bool
	// retryCID is the Source Connection ID of the backend's Retry, once
	// it sent one.
	retryCID atomic.Pointer[[]byte]
	closed   bool // guarded by Proxy.mu

	hs         *handshake
	queue      [][]byte
	queueBytes int
	out        []byte // scratch for rewritten datagrams
}

func (p *Proxy) init() {
	p.start.Do(func() {
		p.flows = make(map[netip.AddrPort]*flow)
		p.pcs = make(map[net.PacketConn]struct{})
		p.stop = make(chan struct{})
		p.now.Store(time.Now().UnixNano())
		p.wg.Add(1)
		go p.janitor()
	})
}

func (p *Proxy) idleTimeout() time.Duration {
	if p.IdleTimeout > 0 {
		return p.IdleTimeout
	}
	return DefaultIdleTimeout
}

func (p *Proxy) handshakeTimeout() time.Duration {
	if p.HandshakeTimeout > 0 {
		return p.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

func (p *Proxy) maxHelloSize() int {
	if p.MaxHelloSize > 0 {
		return min(p.MaxHelloSize, 1<<24-1)
	}
	return ech.DefaultMaxHelloSize
}

// Serve reads datagrams from pc and forwards them until pc fails or the
// Proxy is closed; it then returns the error, or nil after [Proxy.Close].
// Serve closes pc when it returns. Only addresses of type [*net.UDPAddr]
// are served.
func (p *Proxy) Serve(pc net.PacketConn) error {
	p.init()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		pc.Close()
		return nil
	}
	p.pcs[pc] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.pcs, pc)
		p.mu.Unlock()
		pc.Close()
	}()
	if udp, ok := pc.(*net.UDPConn); ok {
		return p.serveBatches(udp)
	}
	return p.serveEach(pc, nil)
}

// serveEach is the loop of Serve that reads one datagram at a time.
func (p *Proxy) serveEach(pc net.PacketConn, udp *net.UDPConn) error {
	buf := make([]byte, 1<<16)
	for {
		var (
			n   int
			ap  netip.AddrPort
			err error
		)
		if udp != nil {
			n, ap, err = udp.ReadFromUDPAddrPort(buf)
		} else {
			var a net.Addr
			n, a, err = pc.ReadFrom(buf)
			if ua, ok := a.(*net.UDPAddr); ok {
				ap = ua.AddrPort()
			}
		}
		if err != nil {
			if stop, ret := p.readEnd(err); stop {
				return ret
			}
			continue // ICMP errors and the like
		}
		if !ap.IsValid() || n == 0 {
			continue
		}
		p.handle(pc, udp, ap, buf[:n])
	}
}

// readEnd reports whether Serve ends after the read error err, and what
// it returns then: nil when the Proxy was closed, err when the socket was
// closed or on a timeout. Other errors (ICMP errors and the like) are
// skipped.
func (p *Proxy) readEnd(err error) (stop bool, ret error) {
	p.mu.RLock()
	closed := p.closed
	p.mu.RUnlock()
	if closed {
		return true, nil
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, net.ErrClosed), err
}

// handle processes one datagram from a client.
func (p *Proxy) handle(pc net.PacketConn, udp *net.UDPConn, ap netip.AddrPort, b []byte) {
	p.mu.RLock()
	f := p.flows[ap]
	p.mu.RUnlock()
	if f != nil && b[0]&headerFormLong == 0 {
		if f.routed.Load() {
			f.last.Store(p.now.Load())
			f.up.Write(b)
		}
		return
	}
	if f == nil {
		p.newFlow(pc, udp, ap, b, nil)
		return
	}
	p.handleLong(f, b, nil)
}

// newFlow starts a flow with the client's first datagram, replacing the
// flow old if not nil. It reports whether it did.
func (p *Proxy) newFlow(pc net.PacketConn, udp *net.UDPConn, ap netip.AddrPort, b []byte, old *flow) bool {
	if b[0]&headerFormLong == 0 {
		return false // a short header packet of an unknown connection
	}
	h, err := parseLongHeader(b)
	if err != nil {
		// RFC 9000, Section 6.1: answer an unsupported version in a
		// datagram as large as an Initial with Version Negotiation.
		if h.version != 0 && !supportedVersion(h.version) && len(b) >= minInitialSize && h.dcid != nil {
			vn := appendVersionNegotiation(nil, h.dcid, h.scid, byte(p.now.Load()))
			p.send(pc, udp, ap, net.UDPAddrFromAddrPort(ap), vn)
		}
		return false
	}
	// RFC 9000, Section 14.1: a server drops an Initial in a datagram of
	// less than 1200 bytes; Section 7.2: the client's first Destination
	// Connection ID has at least 8 bytes.
	if h.typ != packetInitial || len(b) < minInitialSize || len(h.dcid) < 8 {
		return false
	}
	hs, err := newHandshake(&h, p.maxHelloSize())
	if err != nil {
		return false
	}
	// Only a datagram with an Initial that decrypts starts a flow.
	fed := feedResult{}
	if fed.wait, fed.opened, fed.err = hs.feed(b); fed.opened == 0 {
		return false
	}
	now := p.now.Load()
	f := &flow{client: ap, addr: net.UDPAddrFromAddrPort(ap), pc: pc, udp: udp, created: now, hs: hs}
	f.last.Store(now)
	p.mu.Lock()
	if old != nil {
		p.closeFlow(old)
	}
	if p.closed || len(p.flows) >= p.maxFlows() {
		p.mu.Unlock()
		return false
	}
	p.flows[ap] = f
	p.mu.Unlock()
	p.handleLong(f, b, &fed)
	return true
}

func (p *Proxy) maxFlows() int {
	if p.MaxFlows > 0 {
		return p.MaxFlows
	}
	return DefaultMaxFlows
}

// feedResult is the result of [handshake.feed] on a datagram.
type feedResult struct {
	wait   bool
	opened int
	err    error
}

// handleLong processes a datagram starting with a long header packet. fed
// is the result of feeding it to f.hs if that was done already: for the
// datagram that started f.
func (p *Proxy) handleLong(f *flow, b []byte, fed *feedResult) {
	hs := f.hs
	if h, err := parseLongHeader(b); fed == nil && err == nil && hs.ours(&h) {
		s := getScratch()
		_, _, _, err := hs.open(s, b[:h.end], &h)
		putScratch(s)
		if err != nil {
			// Not an Initial of this connection attempt: the client's
			// Initials all use the keys of its first Destination
			// Connection ID (RFC 9001, Section 5.2), whatever the
			// Destination Connection ID they carry later.
			if f.routed.Load() && f.isRetryCID(h.dcid) && !bytes.Equal(h.dcid, hs.dcid) {
				// RFC 9000, Section 17.2.5.2: after a Retry the client's
				// Initials carry the Retry's Source Connection ID, hence
				// new keys, and its CRYPTO stream starts over: read the
				// hello afresh, for the same backend.
				nhs, err := newHandshake(&h, p.maxHelloSize())
				if err != nil {
					return
				}
				f.hs, hs = nhs, nhs
			} else if p.newFlow(f.pc, f.udp, f.client, b, f) {
				return // a new connection from the same address and port
			}
		}
	}
	f.last.Store(p.now.Load())
	if hs.phase != phaseHello1 && !hs.accepted {
		// The hello went on as received, and so does all that follows.
		f.up.Write(b)
		return
	}
	var wait bool
	var err error
	if fed != nil {
		wait, err = fed.wait, fed.err
	} else {
		wait, _, err = hs.feed(b)
	}
	if err != nil {
		p.fail(f, transportCryptoBufferExceeded, err)
		return
	}
	if hs.phase == phaseHello1 {
		if !p.enqueue(f, b) {
			return
		}
		msg, err := hs.message()
		if err == nil && msg != nil {
			err = hs.firstHello(msg, f.addr, p)
			if err == nil {
				err = p.route(f)
			}
		}
		if err != nil {
			p.fail(f, cryptoErrorBase+uint64(alertOf(err)), err)
			return
		}
		if msg == nil {
			return
		}
		p.flush(f)
		return
	}
	if wait || len(f.queue) > 0 {
		if !p.enqueue(f, b) {
			return
		}
	}
	if hs.phase == phaseHello2 {
		msg, err := hs.message()
		if err == nil && msg != nil {
			err = hs.secondHello(msg)
		}
		if err != nil {
			p.fail(f, cryptoErrorBase+uint64(alertOf(err)), err)
			return
		}
		if msg == nil && len(f.queue) > 0 {
			return // the second hello is not complete
		}
	}
	if len(f.queue) > 0 {
		p.flush(f)
		return
	}
	p.forwardRewritten(f, b)
}

// alertOf returns the alert of err, internal_error if it names none.
func alertOf(err error) uint8 {
	var ae *alertError
	if errors.As(err, &ae) {
		return ae.Alert
	}
	return alertInternalError
}

// enqueue keeps a copy of b until the flow can forward it. It fails the
// flow when the queue is full.
func (p *Proxy) enqueue(f *flow, b []byte) bool {
	if len(f.queue) >= maxQueued || f.queueBytes+len(b) > maxQueuedBytes {
		p.fail(f, transportCryptoBufferExceeded, fmt.Errorf("%w: more than %d datagrams before the ClientHello is complete", errHello, maxQueued))
		return false
	}
	f.queue = append(f.queue, bytes.Clone(b))
	f.queueBytes += len(b)
	return true
}

// flush forwards the queued datagrams in order.
func (p *Proxy) flush(f *flow) {
	q := f.queue
	f.queue, f.queueBytes = nil, 0
	for _, b := range q {
		if !f.hs.accepted {
			f.up.Write(b)
			continue
		}
		if !p.forwardRewritten(f, b) {
			return
		}
	}
}

// forwardRewritten sends b to the backend with its Initials rewritten.
func (p *Proxy) forwardRewritten(f *flow, b []byte) bool {
	out, err := f.hs.rewrite(f.out[:0], b)
	if err != nil {
		p.fail(f, cryptoErrorBase+alertInternalError, err)
		return false
	}
	f.out = out
	f.up.Write(out)
	return true
}

// route asks Route for the backend of f and connects to it.
func (p *Proxy) route(f *flow) error {
	if f.routed.Load() {
		return nil // a hello read afresh after a Retry stays with its backend
	}
	c := f.hs.hello.conn
	info := Info{
		RemoteAddr:      f.addr,
		Version:         f.hs.version,
		Status:          c.Status(),
		ServerName:      c.ServerName(),
		OuterServerName: c.OuterServerName(),
		ALPNProtos:      c.ALPNProtos(),
	}
	a, err := p.Route(info)
	if err != nil {
		return &alertError{Alert: alertUnrecognizedName, Err: err}
	}
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		if ua, err = net.ResolveUDPAddr("udp", a.String()); err != nil {
			return err
		}
	}
	up, err := net.DialUDP("udp", nil, ua)
	if err != nil {
		return err
	}
	p.mu.Lock()
	if f.closed {
		p.mu.Unlock()
		up.Close()
		return net.ErrClosed
	}
	f.up = up
	f.batch = newBatchConn(f)
	f.routed.Store(true)
	p.wg.Add(1)
	p.mu.Unlock()
	if f.batch != nil {
		go p.readBackendBatches(f)
	} else {
		go p.readBackend(f)
	}
	return nil
}

// readBackend forwards the backend's datagrams of f to the client.
func (p *Proxy) readBackend(f *flow) {
	defer p.wg.Done()
	buf := make([]byte, maxDatagramSize)
	for {
		n, err := f.up.Read(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // ICMP port unreachable and the like: the idle timeout ends the flow
		}
		if n == 0 || n == len(buf) {
			continue // possibly truncated
		}
		p.forwardToClient(f, buf[:n])
	}
}

// forwardToClient sends a backend datagram to the client.
func (p *Proxy) forwardToClient(f *flow, b []byte) {
	p.noteRetry(f, b)
	f.last.Store(p.now.Load())
	p.send(f.pc, f.udp, f.client, f.addr, b)
}

// noteRetry keeps the Source Connection ID of b if it is the backend's
// first Retry.
func (p *Proxy) noteRetry(f *flow, b []byte) {
	if b[0]&headerFormLong != 0 && len(b) >= 5 {
		v := uint32(b[1])<<24 | uint32(b[2])<<16 | uint32(b[3])<<8 | uint32(b[4])
		// The client's next Initials carry the Retry's Source Connection
		// ID; it accepts only the first Retry (RFC 9000, Section 17.2.5.2).
		if supportedVersion(v) && typeOf(v, b[0]) == packetRetry {
			if h, err := parseLongHeader(b); err == nil {
				cid := bytes.Clone(h.scid)
				f.retryCID.CompareAndSwap(nil, &cid)
			}
		}
	}
}

func (p *Proxy) send(pc net.PacketConn, udp *net.UDPConn, ap netip.AddrPort, a *net.UDPAddr, b []byte) {
	if udp != nil {
		udp.WriteToUDPAddrPort(b, ap)
		return
	}
	pc.WriteTo(b, a)
}

// fail ends f, telling the client with a CONNECTION_CLOSE carrying code.
func (p *Proxy) fail(f *flow, code uint64, err error) {
	if hs := f.hs; hs != nil {
		if pkt, cerr := hs.appendClose(nil, code); cerr == nil {
			p.send(f.pc, f.udp, f.client, f.addr, pkt)
		}
	}
	if p.Logger != nil {
		p.Logger.Info("echquic: connection refused", slog.String("remote", f.addr.String()), slog.String("error", err.Error()))
	}
	p.mu.Lock()
	p.closeFlow(f)
	p.mu.Unlock()
}

// closeFlow removes f; p.mu is held.
func (p *Proxy) closeFlow(f *flow) {
	if f.closed {
		return
	}
	f.closed = true
	if p.flows[f.client] == f {
		delete(p.flows, f.client)
	}
	if f.routed.Load() {
		f.up.Close()
	}
}

// janitor keeps the coarse clock and ends idle and stuck flows.
func (p *Proxy) janitor() {
	defer p.wg.Done()
	tick := min(max(min(p.idleTimeout(), p.handshakeTimeout())/4, 10*time.Millisecond), time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			p.sweep(now.UnixNano())
		}
	}
}

// sweep sets the clock to n and ends the flows idle or stuck at n.
func (p *Proxy) sweep(n int64) {
	p.now.Store(n)
	idle, hello := p.idleTimeout().Nanoseconds(), p.handshakeTimeout().Nanoseconds()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, f := range p.flows {
		if !f.routed.Load() && n-f.created > hello || n-f.last.Load() > idle {
			p.closeFlow(f)
		}
	}
}

// Close stops the Proxy: it closes the PacketConns being served and every
// flow, and waits for its goroutines.
func (p *Proxy) Close() error {
	p.init()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	close(p.stop)
	for pc := range p.pcs {
		pc.Close()
	}
	for _, f := range p.flows {
		p.closeFlow(f)
	}
	p.mu.Unlock()
	p.wg.Wait()
	return nil
}

// isRetryCID reports whether cid is the Source Connection ID of the
// backend's Retry.
func (f *flow) isRetryCID(cid []byte) bool {
	r := f.retryCID.Load()
	return r != nil && bytes.Equal(*r, cid)
}
