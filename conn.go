package ech

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Status is the outcome of ECH on a connection.
type Status uint8

const (
	// StatusNotOffered means the client sent no encrypted_client_hello
	// extension.
	StatusNotOffered Status = iota
	// StatusAccepted means the ClientHelloOuter decrypted with one of the
	// server's keys: the Conn replays the ClientHelloInner.
	StatusAccepted
	// StatusRejected means the client sent an outer ECH extension that
	// did not decrypt: GREASE, an unknown config_id or a stale key. The
	// Conn replays the ClientHelloOuter, and [Conn.ServerName] is the name
	// in the clear: route the connection by it, as one without ECH (RFC
	// 9849, Section 7.1). A GREASE client names its real server there; a
	// client with a stale config names the public name, whose server
	// should use [KeySet.PublicNameConfig] to send it retry configs.
	StatusRejected
)

// String returns "not offered", "accepted" or "rejected".
func (s Status) String() string {
	switch s {
	case StatusNotOffered:
		return "not offered"
	case StatusAccepted:
		return "accepted"
	case StatusRejected:
		return "rejected"
	}
	return fmt.Sprintf("Status(%d)", uint8(s))
}

// hrrRandom is ServerHello.random of a HelloRetryRequest
// (RFC 8446, Section 4.1.3).
var hrrRandom = [32]byte{
	0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
	0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
}

// serverHelloPrefix is how many bytes of the server's first flight tell a
// HelloRetryRequest from a ServerHello: record header, handshake header,
// legacy_version and random.
const serverHelloPrefix = recordHeaderLen + handshakeHeaderLen + 2 + 32

// Server flight states, set by Write and read by Read.
const (
	serverUnseen uint32 = iota // nothing classified yet
	serverHRR                  // the server sent a HelloRetryRequest
	serverDone                 // the server sent a ServerHello or anything else
)

// Conn is a server connection whose ClientHello has been read and, when ECH
// was accepted, decrypted. Reads return the ClientHello to pass on (the
// ClientHelloInner when ECH was accepted, else the ClientHelloOuter) and
// then the client's bytes; writes go to the client. When ECH was accepted
// the Conn also handles a HelloRetryRequest: it decrypts the client's second
// ClientHello with the same HPKE context and replays its inner hello.
//
// A Conn is used as any [net.Conn], from any number of goroutines. Once the
// handshake messages are through, Read and Write go straight to the wrapped
// connection. Until then the server's bytes must go through [Conn.Write], not
// the wrapped connection: the Conn watches them for a HelloRetryRequest.
//
// The read side is a state machine: it replays the hello; then, when ECH
// was accepted, it watches the client's records (passing them on) until the
// server has answered with a ServerHello or the client has sent its second
// ClientHello, whose inner hello it replays; then it reads the wrapped
// connection directly. An error on the way ends the handshake: every later
// Read returns it.
type Conn struct {
	conn net.Conn

	// Read side. Until rdone is set, rmu guards the fields below it; then
	// Read goes straight to conn.
	rdone  atomic.Bool
	rmu    sync.Mutex
	replay replay          // bytes Read returns before the wrapped conn's
	hr     handshakeReader // the client's records: the hello's, then watched
	watch  *secondHello    // non-nil while a second ClientHello may come
	rerr   error           // the error that ended the handshake
	rstate atomic.Uint32   // the server's first flight, set by Write

	// The read deadline while watching: the earlier of the one set
	// through the Conn and NewConn's (see boundRead). dmu guards them.
	dmu      sync.Mutex
	userRead time.Time // the read deadline set through the Conn
	bound    time.Time // NewConn's deadline while it bounds reads, else zero

	// Write side. Until wdone is set, wmu guards wwatch; then Write goes
	// straight to conn.
	wdone  atomic.Bool
	wmu    sync.Mutex
	wwatch *serverFlight // non-nil until the server's first message is classified

	status    Status
	presented bool
	// outerParsed is set once the ClientHelloOuter parsed, for HelloError.
	outerParsed bool
	configID    uint8
	serverName  string
	outerName   string
	alpn        []string
}

var (
	_ net.Conn      = (*Conn)(nil)
	_ io.WriterTo   = (*Conn)(nil)
	_ io.ReaderFrom = (*Conn)(nil)
)

// secondHello is what reading and decrypting a second ClientHello after a
// HelloRetryRequest needs (RFC 9849, Section 7.1.1).
type secondHello struct {
	recipient  *hpkeRecipient
	suite      CipherSuite
	publicName string    // the outer server_name required, when checked
	deadline   time.Time // NewConn's deadline, which bounds the wait
}

// serverFlight collects the first bytes the server writes, to tell a
// HelloRetryRequest from a ServerHello.
type serverFlight struct {
	n    int
	head [serverHelloPrefix]byte
}

// scratch is per-hello working memory: the extension lists of the outer and
// inner hellos, the AAD and the decrypted EncodedClientHelloInner.
type scratch struct {
	outer, enc, inner clientHello
	aad, pt           []byte
	cands             [MaxKeysPerHello]*parsedKey
}

var scratchPool = sync.Pool{New: func() any {
	sc := new(scratch)
	sc.outer.exts = make([]extension, 0, 32)
	sc.enc.exts = make([]extension, 0, 32)
	sc.inner.exts = make([]extension, 0, 32)
	return sc
}}

// release returns sc to the pool, keeping no reference to the hello.
func (sc *scratch) release() {
	sc.outer = clientHello{exts: sc.outer.exts[:0]}
	sc.enc = clientHello{exts: sc.enc.exts[:0]}
	sc.inner = clientHello{exts: sc.inner.exts[:0]}
	clear(sc.cands[:])
	clear(sc.pt[:cap(sc.pt)]) // the decrypted EncodedClientHelloInner
	scratchPool.Put(sc)
}

// aLongTimeAgo is a deadline in the past, to interrupt blocked I/O.
var aLongTimeAgo = time.Unix(1, 0)

// NewConn reads the ClientHello from conn and returns a [Conn] that replays
// the hello to route onward: when the hello carries ECH that one of the
// keys (given by [WithKeySet] or [WithKeys]) decrypts, the rebuilt
// ClientHelloInner, else the hello as received. The Conn's [Conn.ServerName]
// and [Conn.ALPNProtos] describe the hello it replays.
//
// Reading is bounded by ctx, by [WithHandshakeTimeout] when ctx has no
// deadline, and by [WithMaxHelloSize]. NewConn sets conn's deadlines while
// it works and clears them before it returns. When ECH was accepted, the
// same deadline (not ctx's cancellation) also bounds the Conn's reads of
// the client until the server has answered or the client has sent its
// second ClientHello.
//
// A hello that breaks the rules of RFC 8446 or RFC 9849 gets the matching
// alert (decode_error, illegal_parameter, ...) written to conn, and NewConn
// returns an error wrapping the matching sentinel, such as
// [ErrIllegalParameter], that also matches [tls.AlertError] with
// [errors.As]; the error is a [*HelloError], which says what was known of
// the hello (whether it offered ECH, its name in the clear). A hello whose ECH does not decrypt (GREASE, an unknown
// config_id, a stale key) is not an error: see [StatusRejected]. NewConn
// does not close conn. Without a key option it returns [ErrNoKeys] at
// once; an empty [KeySet] is allowed.
func NewConn(ctx context.Context, conn net.Conn, opts ...Option) (*Conn, error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	if o.keySet == nil && len(o.keys) == 0 {
		return nil, fmt.Errorf("%w: NewConn needs WithKeySet or WithKeys", ErrNoKeys)
	}
	deadline, ok := ctx.Deadline()
	if !ok && o.timeout > 0 {
		deadline = time.Now().Add(o.timeout)
	}
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, fmt.Errorf("ech: setting deadline: %w", err)
	}
	// Deferred calls run last first: the deadline is cleared only after the
	// context's callback can no longer set it.
	defer conn.SetDeadline(time.Time{})
	if ctx.Done() != nil {
		interrupted := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			conn.SetDeadline(aLongTimeAgo)
			close(interrupted)
		})
		defer func() {
			if !stop() {
				<-interrupted
			}
		}()
	}

	c := &Conn{conn: conn}
	c.hr = handshakeReader{conn: conn, maxSize: o.maxHelloSize, first: true}
	err := c.readHello(ctx, &o, deadline)
	if err == nil {
		// rdone stays false: the hello is still to be replayed.
		c.hr.first = false
		c.wdone.Store(c.wwatch == nil)
		return c, nil
	}
	c.hr.release()
	c.replay.release()
	ctxErr := ctx.Err()
	if d, ok := ctx.Deadline(); ctxErr == nil && ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(d) {
		// The conn's deadline, which is the context's, fired before the
		// context's own timer.
		ctxErr = context.DeadlineExceeded
	}
	if ctxErr != nil {
		err = fmt.Errorf("ech: reading ClientHello: %w (%w)", ctxErr, err)
	} else {
		err = sendAlert(conn, err)
	}
	if o.logger != nil {
		o.logger.LogAttrs(ctx, slog.LevelInfo, "ech: ClientHello refused",
			slog.String("remote", addrString(conn.RemoteAddr())), slog.String("error", err.Error()))
	}
	he := &HelloError{Err: err, Parsed: c.outerParsed}
	if c.outerParsed {
		he.ECHPresented, he.OuterServerName = c.presented, c.outerName
	}
	return nil, he
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// readHello reads and processes the first ClientHello.
func (c *Conn) readHello(ctx context.Context, o *options, deadline time.Time) error {
	msg, err := readClientHello(&c.hr)
	if err != nil {
		return err
	}
	sc := scratchPool.Get().(*scratch)
	defer sc.release()
	body := msg[handshakeHeaderLen:]
	outer := &sc.outer
	if err := parseClientHello(outer, body); err != nil {
		return err
	}
	c.outerName = string(outer.serverName)
	c.serverName = c.outerName
	c.outerParsed, c.presented = true, outer.hasECH
	c.status = StatusNotOffered
	if outer.hasECH {
		accepted, err := c.acceptECH(o, body, sc, deadline)
		if err != nil {
			return err
		}
		if accepted {
			c.log(ctx, o.logger)
			return nil
		}
		c.status = StatusRejected
	}
	if c.alpn, err = outer.alpn(); err != nil {
		return err
	}
	c.replay.message(msg, c.hr.vers, c.hr.take())
	c.log(ctx, o.logger)
	return nil
}

// readClientHello reads the records of the first ClientHello.
func readClientHello(hr *handshakeReader) ([]byte, error) {
	for {
		msg, _, err := hr.next()
		switch {
		case err != nil:
			if _, ok := alertFor(err); !ok {
				err = fmt.Errorf("ech: reading ClientHello: %w", err)
			}
			return nil, err
		case msg != nil:
			return msg, nil
		}
	}
}

// acceptECH tries the candidate keys on the outer hello's ECH extension. It
// reports whether one decrypted it, and then sets the Conn to replay the
// ClientHelloInner and to watch for a second ClientHello.
func (c *Conn) acceptECH(o *options, body []byte, sc *scratch, deadline time.Time) (bool, error) {
	outer := &sc.outer
	typ, ech, err := parseECHExtension(outer.ech)
	if err != nil {
		return false, err
	}
	if typ == echTypeInner {
		// RFC 9849, Section 7: a client-facing server aborts on an inner extension.
		return false, fmt.Errorf("%w: client sent an inner encrypted_client_hello to the client-facing server", ErrIllegalParameter)
	}
	c.configID = ech.configID
	cands, err := o.candidates(sc.cands[:0], ech.configID, ech.suite)
	if err != nil || len(cands) == 0 {
		return false, err
	}
	sc.aad = outerAAD(sc.aad, body, outer, len(ech.payload))
	ib := getBuf()
	defer func() {
		if ib != nil {
			putBuf(ib)
		}
	}()
	for _, pk := range cands {
		r, err := pk.recipient(ech.suite, ech.enc)
		if err != nil {
			continue // try the next key
		}
		inner, alpn, err := openInner((*ib)[:0], r, sc.aad, ech.payload, outer, sc)
		if err == errNotDecrypted {
			continue // try the next key
		}
		if err != nil {
			return false, err
		}
		w := &secondHello{recipient: r, suite: ech.suite, deadline: deadline}
		if o.checkPublicName {
			w.publicName = pk.config.PublicName
			if err := checkPublicName(c.outerName, w.publicName, ech.configID); err != nil {
				return false, err
			}
		}
		c.status, c.serverName, c.alpn = StatusAccepted, string(sc.inner.serverName), alpn
		*ib = inner
		c.replay.message(inner, c.hr.vers, ib)
		ib = nil
		c.hr.release()
		c.watch, c.wwatch = w, new(serverFlight)
		return true, nil
	}
	return false, nil
}

// checkPublicName applies WithPublicNameCheck: the outer server_name must
// be the public_name of the config the client named.
func checkPublicName(outerName, publicName string, configID uint8) error {
	// RFC 9849, Section 7.1: optionally, the outer SNI is the public_name.
	if !strings.EqualFold(strings.TrimSuffix(outerName, "."), publicName) {
		return fmt.Errorf("%w: outer server_name is not the public_name of config_id %d", ErrIllegalParameter, configID)
	}
	return nil
}

// errNotDecrypted reports an ECH payload that does not open with the key:
// no error on the first hello (the next key is tried), a decrypt_error on
// the second.
var errNotDecrypted = errors.New("ech: payload does not decrypt")

// openInner opens the ECH payload of the outer hello with r, aad being the
// ClientHelloOuterAAD, and appends to dst the ClientHelloInner it encodes,
// rebuilt and checked (RFC 9849, Sections 5.1 and 7.1), as a handshake
// message; it returns the extended buffer and the inner hello's ALPN
// protocols. The buffer grows at most once. It works in sc (enc, inner,
// pt) and changes nothing else; the rebuilt hello stays parsed in
// sc.inner. A payload that does not open is errNotDecrypted.
func openInner(dst []byte, r *hpkeRecipient, aad, payload []byte, outer *clientHello, sc *scratch) ([]byte, []string, error) {
	encoded, err := r.open(sc.pt[:0], aad, payload)
	if err != nil {
		return nil, nil, errNotDecrypted
	}
	sc.pt = encoded[:0] // keep the capacity for the next hello
	// The inner hello is at most the encoded one with the outer session ID
	// and the outer extensions it references, which exclude the payload.
	dst = slices.Grow(dst, handshakeHeaderLen+len(encoded)+len(outer.sessionID)+len(aad)-len(payload))
	out, err := appendInnerHello(dst, outer, encoded, &sc.enc, &sc.inner)
	if err != nil {
		return nil, nil, err
	}
	alpn, err := sc.inner.alpn()
	if err != nil {
		return nil, nil, err
	}
	return out, alpn, nil
}

func (c *Conn) log(ctx context.Context, logger *slog.Logger) {
	if logger == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("remote", addrString(c.conn.RemoteAddr())),
		slog.String("ech", c.status.String()),
		slog.String("outer_sni", c.outerName),
		slog.String("sni", c.serverName),
	}
	if c.presented {
		attrs = append(attrs, slog.Int("config_id", int(c.configID)))
	}
	logger.LogAttrs(ctx, slog.LevelDebug, "ech: ClientHello", attrs...)
}

// Read reads from the connection: first the ClientHello to pass on, then
// the client's bytes. After the handshake messages it is a direct read of
// the wrapped connection. An error while the Conn watches for a second
// ClientHello (a bad hello, for which the client got an alert, or a failed
// read) ends the handshake: Read returns it from then on. A deadline that
// passes then is such an error: Read returns [os.ErrDeadlineExceeded] once,
// then an error wrapping [context.DeadlineExceeded], as reading again does
// not help.
func (c *Conn) Read(p []byte) (int, error) {
	if c.rdone.Load() {
		return c.conn.Read(p)
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for c.replay.empty() {
		switch {
		case c.rerr != nil:
			return 0, c.rerr
		case c.watch == nil:
			c.rdone.Store(true)
			return c.conn.Read(p)
		}
		if err := c.readWatching(); err != nil {
			c.rerr = err
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// The handshake is over for good (a part of a record
				// read is lost): later reads must not look like a
				// deadline that reading again after would help.
				c.rerr = fmt.Errorf("ech: the client's handshake timed out: %w (%v)", context.DeadlineExceeded, err)
			}
			c.endWatch()
			return 0, err
		}
	}
	n := c.replay.read(p)
	// Settled, reads are direct from now on, and WriteTo hands the
	// connection to io.Copy (and splice) now rather than after one more
	// buffered read, which would hold its buffer for as long as the
	// client is idle.
	c.settleLocked()
	return n, nil
}

// serverAnswered reports whether the server answered the first
// ClientHello with a ServerHello, and no client handshake message is
// partly read: no second ClientHello can come.
func (c *Conn) serverAnswered() bool {
	return c.rstate.Load() == serverDone && !c.hr.inMessage()
}

// settleLocked reports whether every handshake message has been passed on
// and no second ClientHello can come; reads are then direct (rdone). It
// gives the replay's buffer back once it is empty. c.rmu is held.
func (c *Conn) settleLocked() bool {
	if !c.replay.empty() {
		return false // it may alias the watch's buffer
	}
	c.replay.release()
	if c.rerr != nil {
		return false
	}
	if c.watch != nil && c.serverAnswered() {
		c.endWatch()
	}
	if c.watch == nil {
		c.rdone.Store(true)
	}
	return c.watch == nil
}

// readWatching reads the next client record after an accepted hello, while
// a second ClientHello may come. It passes records other than handshake
// records through unchanged (change_cipher_spec, early data), decrypts a
// second ClientHello, and stops watching once the server has answered with
// a ServerHello. Its reads are bounded by NewConn's deadline.
//
// NOTE: an error in the middle of a record (a read deadline, say) loses the
// part already read, and ends the handshake: neither crypto/tls nor a proxy
// resumes a handshake after a failed read.
func (c *Conn) readWatching() error {
	w := c.watch
	if c.serverAnswered() {
		c.endWatch() // the server accepted the first hello: no second one
		return nil
	}
	c.boundRead(w.deadline)
	msg, rec, err := c.hr.next()
	switch {
	case err == io.EOF:
		return err
	case err != nil:
		if _, ok := alertFor(err); !ok {
			return fmt.Errorf("ech: reading the client's records after its ClientHello: %w", err)
		}
		return sendAlert(c.conn, err)
	case rec != nil:
		c.replay.record(rec)
	case msg == nil: // the message goes on in the next record
	case msg[0] != typeClientHello:
		// Not ours to judge: pass it on and stop watching.
		c.replay.message(msg, c.hr.vers, c.hr.take())
		c.endWatch()
	default:
		if err := c.openSecondHello(msg); err != nil {
			return sendAlert(c.conn, err)
		}
		c.endWatch()
	}
	return nil
}

// openSecondHello applies RFC 9849, Section 7.1.1 to the second ClientHello
// and sets the Conn to replay its ClientHelloInner.
func (c *Conn) openSecondHello(msg []byte) error {
	w := c.watch
	sc := scratchPool.Get().(*scratch)
	defer sc.release()
	body := msg[handshakeHeaderLen:]
	ch := &sc.outer
	if err := parseClientHello(ch, body); err != nil {
		return err
	}
	if !ch.hasECH {
		return fmt.Errorf("%w: second ClientHello lacks encrypted_client_hello", ErrMissingExtension)
	}
	typ, ech, err := parseECHExtension(ch.ech)
	if err != nil {
		return err
	}
	if typ != echTypeOuter {
		return fmt.Errorf("%w: second ClientHello has an inner encrypted_client_hello", ErrIllegalParameter)
	}
	if ech.suite != w.suite || ech.configID != c.configID || len(ech.enc) != 0 {
		return fmt.Errorf("%w: second ClientHello changes cipher_suite or config_id, or has enc", ErrIllegalParameter)
	}
	if w.publicName != "" {
		if err := checkPublicName(string(ch.serverName), w.publicName, ech.configID); err != nil {
			return err
		}
	}
	sc.aad = outerAAD(sc.aad, body, ch, len(ech.payload))
	ib := getBuf()
	defer func() {
		if ib != nil {
			putBuf(ib)
		}
	}()
	inner, alpn, err := openInner((*ib)[:0], w.recipient, sc.aad, ech.payload, ch, sc)
	if err == errNotDecrypted {
		return fmt.Errorf("%w: second ClientHello", ErrDecryptError)
	}
	if err != nil {
		return err
	}
	// RFC 8446, Section 4.1.2 lists what the second hello may change; the
	// route was chosen by the first one's server_name and ALPN.
	if string(sc.inner.serverName) != c.serverName || !slices.Equal(alpn, c.alpn) {
		return fmt.Errorf("%w: second ClientHelloInner changes server_name or ALPN", ErrIllegalParameter)
	}
	*ib = inner
	c.replay.message(inner, c.hr.vers, ib)
	ib = nil
	return nil
}

// endWatch ends the watching state: no second ClientHello is expected.
func (c *Conn) endWatch() {
	c.watch = nil
	c.hr.release()
	c.unboundRead()
}

// boundRead bounds the wrapped conn's read deadline by d, NewConn's
// deadline, while the server has not answered with a ServerHello.
func (c *Conn) boundRead(d time.Time) {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.bound.IsZero() && !d.IsZero() && c.rstate.Load() != serverDone {
		c.bound = d
		c.conn.SetReadDeadline(c.readDeadline())
	}
}

// unboundRead restores the read deadline set through the Conn.
func (c *Conn) unboundRead() {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if !c.bound.IsZero() {
		c.bound = time.Time{}
		c.conn.SetReadDeadline(c.userRead)
	}
}

// readDeadline returns the read deadline for the wrapped conn. c.dmu is
// held.
func (c *Conn) readDeadline() time.Time {
	if c.bound.IsZero() || !c.userRead.IsZero() && c.userRead.Before(c.bound) {
		return c.userRead
	}
	return c.bound
}

// Write writes to the client. Until the server's first handshake message
// has gone through, it notes whether it is a HelloRetryRequest.
func (c *Conn) Write(p []byte) (int, error) {
	if !c.wdone.Load() {
		c.wmu.Lock()
		if c.wwatch != nil {
			c.observe(p)
		}
		c.wdone.Store(c.wwatch == nil)
		c.wmu.Unlock()
	}
	return c.conn.Write(p)
}

// observe classifies the server's first flight.
//
// NOTE: it reads the first 43 bytes written as one record; a backend that
// split its ServerHello into records shorter than that would be classified
// by bytes of two records. No TLS stack does that with a ServerHello.
func (c *Conn) observe(p []byte) {
	w := c.wwatch
	w.n += copy(w.head[w.n:], p)
	h := w.head[:w.n]
	if len(h) >= 1 && h[0] != recordTypeHandshake ||
		len(h) >= recordHeaderLen+1 && h[recordHeaderLen] != typeServerHello {
		c.wwatch = nil
		c.serverDone()
		return
	}
	if len(h) < serverHelloPrefix {
		return
	}
	c.wwatch = nil
	if [32]byte(h[serverHelloPrefix-32:]) == hrrRandom {
		c.rstate.Store(serverHRR)
	} else {
		c.serverDone()
	}
}

// serverDone notes that the server answered with a ServerHello (or
// anything but a HelloRetryRequest): no second ClientHello will come, and
// the client's reads are no longer bounded by NewConn's deadline.
func (c *Conn) serverDone() {
	c.rstate.Store(serverDone)
	c.unboundRead()
}

// WriteTo copies the client's bytes to w until EOF or an error: first
// through [Conn.Read], while the handshake messages are being replayed or
// watched, then with [io.Copy] from the wrapped connection, so that a proxy
// between two TCP connections gets the kernel's splice.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	n, ended, err := copyHandshake(w, c, c.readSettled)
	if ended {
		return n, err
	}
	m, err := io.Copy(w, c.conn)
	return n + m, err
}

// ReadFrom copies r to the client until EOF or an error: through
// [Conn.Write] until the server's first message has been seen, then with
// [io.Copy] to the wrapped connection, so that a proxy between two TCP
// connections gets the kernel's splice.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	n, ended, err := copyHandshake(c, r, c.wdone.Load)
	if ended {
		return n, err
	}
	m, err := io.Copy(c.conn, r)
	return n + m, err
}

// readSettled reports whether every handshake message has been passed on
// and no second ClientHello can come: reads are then direct. Unlike Read,
// it does not wait for the client's next record to learn that the server
// has answered, so that WriteTo hands the connection to io.Copy before the
// client's next bytes rather than after.
func (c *Conn) readSettled() bool {
	if c.rdone.Load() {
		return true
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	return c.settleLocked()
}

// copyBufPool holds buffers of a whole record: copyHandshake's, which
// every connection copied by WriteTo or ReadFrom needs for its first
// records, and arrivedWithoutECH's. Unlike the hello buffers of bufPool,
// they do not grow with what arrives; whoever used one clears what it
// used before putting it back.
var copyBufPool = sync.Pool{New: func() any {
	b := make([]byte, recordHeaderLen+maxCiphertext)
	return &b
}}

// copyHandshake copies src to dst through a buffer until done reports
// true. It reports whether the copy ended (EOF or an error) before that.
func copyHandshake(dst io.Writer, src io.Reader, done func() bool) (n int64, ended bool, err error) {
	if done() {
		return 0, false, nil
	}
	bp := copyBufPool.Get().(*[]byte)
	buf, used := *bp, 0
	defer func() {
		clear(buf[:used]) // it may have held a ClientHelloInner
		copyBufPool.Put(bp)
	}()
	for !done() {
		m, rerr := src.Read(buf)
		used = max(used, m)
		if m > 0 {
			wm, werr := dst.Write(buf[:m])
			n += int64(wm)
			if werr != nil {
				return n, true, werr
			}
		}
		if rerr == io.EOF {
			return n, true, nil
		}
		if rerr != nil {
			return n, true, rerr
		}
	}
	return n, false, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.conn.Close() }

// CloseWrite shuts down the writing side of the wrapped connection, if it
// supports that (as [net.TCPConn] does), for proxies that forward a
// half-close.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("ech: wrapped connection has no CloseWrite")
}

// LocalAddr returns the local network address.
func (c *Conn) LocalAddr() net.Addr { return c.conn.LocalAddr() }

// RemoteAddr returns the client's network address.
func (c *Conn) RemoteAddr() net.Addr { return c.conn.RemoteAddr() }

// SetDeadline sets the read and write deadlines of the wrapped connection.
// While the Conn waits for a second ClientHello, reads also end at
// NewConn's deadline, if that is earlier.
func (c *Conn) SetDeadline(t time.Time) error {
	if c.rdone.Load() {
		return c.conn.SetDeadline(t)
	}
	if err := c.conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.SetReadDeadline(t)
}

// SetReadDeadline sets the read deadline of the wrapped connection. While
// the Conn waits for a second ClientHello, reads also end at NewConn's
// deadline, if that is earlier.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.rdone.Load() {
		return c.conn.SetReadDeadline(t)
	}
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.userRead = t
	return c.conn.SetReadDeadline(c.readDeadline())
}

// SetWriteDeadline sets the write deadline of the wrapped connection.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }

// NetConn returns the wrapped connection. Write the server's first flight
// through the Conn, not through it (see [Conn]).
func (c *Conn) NetConn() net.Conn { return c.conn }

// Status returns the outcome of ECH for this connection.
func (c *Conn) Status() Status { return c.status }

// ECHAccepted reports whether the client's ECH was decrypted, so that the
// Conn replays the ClientHelloInner: Status() == StatusAccepted. It and
// [Conn.ECHPresented] are the names users of c2FmZQ/ech know; Status says
// both at once.
func (c *Conn) ECHAccepted() bool { return c.status == StatusAccepted }

// ECHPresented reports whether the client sent an outer ECH extension, real
// or GREASE: Status() != StatusNotOffered.
func (c *Conn) ECHPresented() bool { return c.presented }

// ConfigID returns the config_id the client named, and whether it sent an
// ECH extension at all.
func (c *Conn) ConfigID() (uint8, bool) { return c.configID, c.presented }

// ServerName returns the server_name of the hello the Conn replays: the
// inner name when ECH was accepted, else the outer (public) name. It is
// empty when the client sent none.
func (c *Conn) ServerName() string { return c.serverName }

// OuterServerName returns the server_name of the ClientHelloOuter, the name
// visible on the wire.
func (c *Conn) OuterServerName() string { return c.outerName }

// ALPNProtos returns a copy of the ALPN protocols of the hello the Conn
// replays, in the client's order.
func (c *Conn) ALPNProtos() []string { return slices.Clone(c.alpn) }
