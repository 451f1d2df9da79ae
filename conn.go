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
	// Conn replays the ClientHelloOuter; the handshake should be completed
	// for the public name with retry configs (see [KeySet.TLSKeys]).
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

// TLS alerts sent by the client-facing server (RFC 8446, Section 6).
type alert uint8

const (
	alertUnexpectedMessage alert = 10
	alertRecordOverflow    alert = 22
	alertIllegalParameter  alert = 47
	alertDecodeError       alert = 50
	alertDecryptError      alert = 51
	alertInternalError     alert = 80
	alertMissingExtension  alert = 109
)

// alertFor returns the alert that tells the peer about err, and false for
// errors the peer is not told about (I/O errors, cancellation).
func alertFor(err error) (alert, bool) {
	switch {
	case errors.Is(err, ErrIllegalParameter):
		return alertIllegalParameter, true
	case errors.Is(err, ErrDecodeError), errors.Is(err, ErrHelloTooLarge):
		return alertDecodeError, true
	case errors.Is(err, ErrMissingExtension):
		return alertMissingExtension, true
	case errors.Is(err, ErrDecryptError):
		return alertDecryptError, true
	case errors.Is(err, ErrNotTLS), errors.Is(err, ErrUnexpectedMessage):
		return alertUnexpectedMessage, true
	case errors.Is(err, ErrRecordOverflow):
		return alertRecordOverflow, true
	case errors.Is(err, ErrInvalidKey), errors.Is(err, ErrMalformedConfig),
		errors.Is(err, ErrUnsupportedAlgorithm), errors.Is(err, ErrInvalidPublicName):
		return alertInternalError, true
	}
	return 0, false
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
type Conn struct {
	conn net.Conn

	// Read side. Until rdone is set, rmu guards the fields below it; then
	// Read goes straight to conn.
	rdone  atomic.Bool
	rmu    sync.Mutex
	replay []byte       // bytes Read returns before the wrapped conn's
	pooled *[]byte      // buffer behind replay, returned to the pool when drained
	watch  *secondHello // non-nil while a second ClientHello may come
	rstate atomic.Uint32

	// Write side. Until wdone is set, wmu guards wwatch; then Write goes
	// straight to conn.
	wdone  atomic.Bool
	wmu    sync.Mutex
	wwatch *serverFlight // non-nil until the server's first message is classified

	status     Status
	presented  bool
	configID   uint8
	serverName string
	outerName  string
	alpn       []string
}

var (
	_ net.Conn      = (*Conn)(nil)
	_ io.WriterTo   = (*Conn)(nil)
	_ io.ReaderFrom = (*Conn)(nil)
)

// secondHello is what decrypting a second ClientHello after a
// HelloRetryRequest needs (RFC 9849, Section 7.1.1).
type secondHello struct {
	recipient *hpkeRecipient
	suite     CipherSuite
	configID  uint8
	recVers   uint16
	maxSize   int
	hdr       [recordHeaderLen]byte
	msg       []byte // handshake message being reassembled
	rec       []byte // a record passed through unchanged (change_cipher_spec, early data)
}

// serverFlight collects the first bytes the server writes, to tell a
// HelloRetryRequest from a ServerHello.
type serverFlight struct {
	n    int
	head [serverHelloPrefix]byte
}

// bufPool holds ClientHello buffers: a hello is read into one, and the
// replay of the outer hello is served from it.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

// putBuf returns b to the pool, cleared: it held a ClientHelloInner.
func putBuf(b *[]byte) {
	if cap(*b) <= 1<<17 {
		clear((*b)[:cap(*b)])
		*b = (*b)[:0]
		bufPool.Put(b)
	}
}

// scratch is per-hello working memory: the extension lists of the outer and
// inner hellos and the AAD.
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
// it works and clears them before it returns.
//
// A hello that breaks the rules of RFC 8446 or RFC 9849 gets the matching
// alert (decode_error, illegal_parameter, ...) written to conn, and NewConn
// returns an error wrapping the matching sentinel, such as
// [ErrIllegalParameter]. A hello whose ECH does not decrypt (GREASE, an
// unknown config_id, a stale key) is not an error: see [StatusRejected].
// NewConn does not close conn. Without a key option it returns
// [ErrNoKeys] at once; an empty [KeySet] is allowed.
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
	err := c.readHello(ctx, &o)
	if err == nil {
		c.rdone.Store(c.replay == nil && c.watch == nil)
		c.wdone.Store(c.wwatch == nil)
		return c, nil
	}
	ctxErr := ctx.Err()
	if d, ok := ctx.Deadline(); ctxErr == nil && ok && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(d) {
		// The conn's deadline, which is the context's, fired before the
		// context's own timer.
		ctxErr = context.DeadlineExceeded
	}
	if ctxErr != nil {
		err = fmt.Errorf("ech: reading ClientHello: %w (%w)", ctxErr, err)
	} else if a, ok := alertFor(err); ok {
		c.sendAlert(a)
	}
	if o.logger != nil {
		o.logger.LogAttrs(ctx, slog.LevelInfo, "ech: ClientHello refused",
			slog.String("remote", addrString(conn.RemoteAddr())), slog.String("error", err.Error()))
	}
	return nil, err
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func (c *Conn) sendAlert(a alert) {
	// RFC 8446, Section 6: level fatal(2). The record version is TLS 1.2's,
	// as before the version is negotiated.
	c.conn.Write([]byte{recordTypeAlert, 3, 3, 0, 2, 2, byte(a)})
}

// readHandshakeMessage reads records from r until one whole handshake
// message has been read, and appends to dst a record header's room
// followed by the message. It reads exactly the records that hold the
// message. It returns the version of the first record and the number of
// records read.
func readHandshakeMessage(r io.Reader, dst []byte, hdr *[recordHeaderLen]byte, maxSize int) (out []byte, vers uint16, records int, err error) {
	start := len(dst)
	out = append(dst, make([]byte, recordHeaderLen)...)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if records > 0 && err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, 0, records, fmt.Errorf("ech: reading ClientHello: %w", err)
		}
		typ, rv, n := hdr[0], uint16(hdr[1])<<8|uint16(hdr[2]), int(hdr[3])<<8|int(hdr[4])
		switch {
		case hdr[1] != 3 || typ != recordTypeHandshake && records == 0:
			return nil, 0, records, fmt.Errorf("%w: record type %d, version 0x%04x", ErrNotTLS, typ, rv)
		case typ != recordTypeHandshake:
			// RFC 8446, Section 5.1: handshake messages are not interleaved.
			return nil, 0, records, fmt.Errorf("%w: record type %d inside the ClientHello", ErrUnexpectedMessage, typ)
		case n > maxPlaintext:
			return nil, 0, records, fmt.Errorf("%w: handshake record of %d bytes", ErrRecordOverflow, n)
		case n == 0:
			// RFC 8446, Section 5.1: no zero-length handshake fragments.
			return nil, 0, records, fmt.Errorf("%w: empty handshake record", ErrDecodeError)
		}
		if records == 0 {
			vers = rv
		}
		records++
		out = slices.Grow(out, n)
		if _, err := io.ReadFull(r, out[len(out):len(out)+n]); err != nil {
			return nil, 0, records, fmt.Errorf("ech: reading ClientHello: %w", noEOF(err))
		}
		out = out[:len(out)+n]
		got := len(out) - start - recordHeaderLen
		if got < handshakeHeaderLen {
			continue
		}
		msg := out[start+recordHeaderLen:]
		if msg[0] != typeClientHello {
			return nil, 0, records, fmt.Errorf("%w: handshake message type %d", ErrNotTLS, msg[0])
		}
		msgLen := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
		if msgLen > maxSize {
			return nil, 0, records, fmt.Errorf("%w: %d bytes, limit %d", ErrHelloTooLarge, msgLen, maxSize)
		}
		switch {
		case got == handshakeHeaderLen+msgLen:
			return out, vers, records, nil
		case got > handshakeHeaderLen+msgLen:
			// RFC 8446, Section 5.1: a message before a key change ends at
			// a record boundary.
			return nil, 0, records, fmt.Errorf("%w: data after the ClientHello in its record", ErrUnexpectedMessage)
		}
	}
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// readHello reads and processes the first ClientHello.
func (c *Conn) readHello(ctx context.Context, o *options) error {
	bp := getBuf()
	var hdr [recordHeaderLen]byte
	buf, vers, records, err := readHandshakeMessage(c.conn, *bp, &hdr, o.maxHelloSize)
	if err != nil {
		putBuf(bp)
		return err
	}
	*bp = buf
	msg := buf[recordHeaderLen:]
	sc := scratchPool.Get().(*scratch)
	defer sc.release()

	outer := &sc.outer
	if err := parseClientHello(outer, msg[handshakeHeaderLen:]); err != nil {
		putBuf(bp)
		return err
	}
	c.outerName = outer.serverName
	c.serverName = outer.serverName
	replayOuter := func() error {
		alpn, err := outer.alpn()
		if err != nil {
			putBuf(bp)
			return err
		}
		c.alpn = alpn
		if records == 1 {
			// The hello came in one record: replay the bytes as received.
			buf[0], buf[1], buf[2] = recordTypeHandshake, byte(vers>>8), byte(vers)
			buf[3], buf[4] = byte(len(msg)>>8), byte(len(msg))
			c.replay, c.pooled = buf, bp
			return nil
		}
		c.replay = appendRecords(nil, vers, msg)
		putBuf(bp)
		return nil
	}
	if !outer.hasECH {
		c.status = StatusNotOffered
		c.log(ctx, o.logger)
		return replayOuter()
	}
	typ, ech, err := parseECHExtension(outer.ech)
	if err != nil {
		putBuf(bp)
		return err
	}
	if typ == echTypeInner {
		putBuf(bp)
		// RFC 9849, Section 7: a client-facing server aborts on an inner extension.
		return fmt.Errorf("%w: client sent an inner encrypted_client_hello to the client-facing server", ErrIllegalParameter)
	}
	c.presented, c.configID = true, ech.configID

	cands, err := o.candidates(sc.cands[:0], ech.configID, ech.suite)
	if err != nil {
		putBuf(bp)
		return err
	}
	if len(cands) > 0 {
		sc.aad = outerAAD(sc.aad, msg[handshakeHeaderLen:], outer, len(ech.payload))
	}
	for _, pk := range cands {
		r, err := pk.recipient(ech.suite, ech.enc)
		if err != nil {
			continue // try the next key
		}
		encoded, err := r.open(sc.pt[:0], sc.aad, ech.payload)
		if err != nil {
			continue // try the next key
		}
		sc.pt = encoded[:0] // keep the capacity for the next hello
		// RFC 9849, Section 7.1: optionally, the outer SNI is the public_name.
		if o.checkPublicName && !strings.EqualFold(strings.TrimSuffix(outer.serverName, "."), pk.config.PublicName) {
			putBuf(bp)
			return fmt.Errorf("%w: outer server_name is not the public_name of config_id %d", ErrIllegalParameter, ech.configID)
		}
		ib := getBuf()
		ibuf := append((*ib)[:0], make([]byte, recordHeaderLen)...)
		ibuf, err = appendInnerHello(ibuf, outer, encoded, &sc.enc, &sc.inner)
		putBuf(bp)
		if err != nil {
			putBuf(ib)
			return err
		}
		alpn, err := sc.inner.alpn()
		if err != nil {
			putBuf(ib)
			return err
		}
		c.status, c.serverName, c.alpn = StatusAccepted, sc.inner.serverName, alpn
		innerMsg := ibuf[recordHeaderLen:]
		if len(innerMsg) <= maxPlaintext {
			ibuf[0], ibuf[1], ibuf[2] = recordTypeHandshake, byte(vers>>8), byte(vers)
			ibuf[3], ibuf[4] = byte(len(innerMsg)>>8), byte(len(innerMsg))
			*ib = ibuf
			c.replay, c.pooled = ibuf, ib
		} else {
			c.replay = appendRecords(nil, vers, innerMsg)
			putBuf(ib)
		}
		c.watch = &secondHello{recipient: r, suite: ech.suite, configID: ech.configID, maxSize: o.maxHelloSize}
		c.wwatch = new(serverFlight)
		c.log(ctx, o.logger)
		return nil
	}
	c.status = StatusRejected
	c.log(ctx, o.logger)
	return replayOuter()
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
// the wrapped connection.
func (c *Conn) Read(p []byte) (int, error) {
	if c.rdone.Load() {
		return c.conn.Read(p)
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for c.replay == nil {
		if c.watch == nil {
			c.rdone.Store(true)
			return c.conn.Read(p)
		}
		if err := c.readWatching(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.replay)
	c.replay = c.replay[n:]
	if len(c.replay) == 0 {
		c.replay = nil
		if c.pooled != nil {
			putBuf(c.pooled)
			c.pooled = nil
		}
	}
	return n, nil
}

// readWatching reads the next client record after an accepted hello, while
// a second ClientHello may come. It passes records other than handshake
// records through unchanged (change_cipher_spec, early data), decrypts a
// second ClientHello, and stops watching once the server has answered with
// a ServerHello.
//
// NOTE: an error in the middle of a record (a read deadline, say) loses the
// part already read; the handshake cannot go on after it anyway, as neither
// crypto/tls nor a proxy resumes a handshake after a failed read.
func (c *Conn) readWatching() error {
	w := c.watch
	if c.rstate.Load() == serverDone && len(w.msg) == 0 {
		c.watch = nil // the server accepted the first hello: no second one
		return nil
	}
	if _, err := io.ReadFull(c.conn, w.hdr[:]); err != nil {
		if len(w.msg) > 0 {
			err = noEOF(err) // the stream ended inside the second ClientHello
		}
		return err
	}
	typ, n := w.hdr[0], int(w.hdr[3])<<8|int(w.hdr[4])
	if typ != recordTypeHandshake {
		if len(w.msg) > 0 {
			// RFC 8446, Section 5.1: handshake messages are not interleaved.
			return c.fail(fmt.Errorf("%w: record type %d inside the second ClientHello", ErrUnexpectedMessage, typ))
		}
		// RFC 8446, Section 5.2: protected records carry at most 2^14+256 bytes.
		if n > maxPlaintext+256 {
			return c.fail(fmt.Errorf("%w: record of %d bytes", ErrRecordOverflow, n))
		}
		// The previous record has been read out of replay: reuse its buffer.
		w.rec = append(append(w.rec[:0], w.hdr[:]...), make([]byte, n)...)
		if _, err := io.ReadFull(c.conn, w.rec[recordHeaderLen:]); err != nil {
			return noEOF(err)
		}
		c.replay = w.rec
		return nil
	}
	if n > maxPlaintext {
		return c.fail(fmt.Errorf("%w: handshake record of %d bytes", ErrRecordOverflow, n))
	}
	if n == 0 {
		return c.fail(fmt.Errorf("%w: empty handshake record", ErrDecodeError))
	}
	if len(w.msg) == 0 {
		w.recVers = uint16(w.hdr[1])<<8 | uint16(w.hdr[2]) // replay with the client's framing
	}
	if len(w.msg)+n > handshakeHeaderLen+w.maxSize {
		return c.fail(fmt.Errorf("%w: second ClientHello over %d bytes", ErrHelloTooLarge, w.maxSize))
	}
	w.msg = slices.Grow(w.msg, n)
	if _, err := io.ReadFull(c.conn, w.msg[len(w.msg):len(w.msg)+n]); err != nil {
		return noEOF(err)
	}
	w.msg = w.msg[:len(w.msg)+n]
	if len(w.msg) < handshakeHeaderLen {
		return nil
	}
	msgLen := int(w.msg[1])<<16 | int(w.msg[2])<<8 | int(w.msg[3])
	switch {
	case msgLen > w.maxSize:
		return c.fail(fmt.Errorf("%w: second ClientHello of %d bytes", ErrHelloTooLarge, msgLen))
	case len(w.msg) < handshakeHeaderLen+msgLen:
		return nil // more records to come
	case len(w.msg) > handshakeHeaderLen+msgLen:
		// RFC 8446, Section 5.1: a message before a key change ends at a
		// record boundary.
		return c.fail(fmt.Errorf("%w: data after the second ClientHello in its record", ErrUnexpectedMessage))
	}
	if w.msg[0] != typeClientHello {
		// Not ours to judge: pass it on and stop watching.
		c.replay, c.watch = appendRecords(nil, w.recVers, w.msg), nil
		return nil
	}
	inner, err := c.decryptSecondHello(w)
	if err != nil {
		return c.fail(err)
	}
	c.replay, c.watch = appendRecords(nil, w.recVers, inner), nil
	return nil
}

// decryptSecondHello applies RFC 9849, Section 7.1.1 to the second
// ClientHello and returns its ClientHelloInner.
func (c *Conn) decryptSecondHello(w *secondHello) ([]byte, error) {
	sc := scratchPool.Get().(*scratch)
	defer sc.release()
	body := w.msg[handshakeHeaderLen:]
	ch := &sc.outer
	if err := parseClientHello(ch, body); err != nil {
		return nil, err
	}
	if !ch.hasECH {
		return nil, fmt.Errorf("%w: second ClientHello lacks encrypted_client_hello", ErrMissingExtension)
	}
	typ, ech, err := parseECHExtension(ch.ech)
	if err != nil {
		return nil, err
	}
	if typ != echTypeOuter {
		return nil, fmt.Errorf("%w: second ClientHello has an inner encrypted_client_hello", ErrIllegalParameter)
	}
	if ech.suite != w.suite || ech.configID != w.configID || len(ech.enc) != 0 {
		return nil, fmt.Errorf("%w: second ClientHello changes cipher_suite or config_id, or has enc", ErrIllegalParameter)
	}
	sc.aad = outerAAD(sc.aad, body, ch, len(ech.payload))
	encoded, err := w.recipient.open(sc.pt[:0], sc.aad, ech.payload)
	if err != nil {
		return nil, fmt.Errorf("%w: second ClientHello", ErrDecryptError)
	}
	return appendInnerHello(nil, ch, encoded, &sc.enc, &sc.inner)
}

// fail sends the alert for err and returns it.
func (c *Conn) fail(err error) error {
	if a, ok := alertFor(err); ok {
		c.sendAlert(a)
	}
	c.watch = nil
	return err
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
		c.rstate.Store(serverDone)
		return
	}
	if len(h) < serverHelloPrefix {
		return
	}
	c.wwatch = nil
	if [32]byte(h[serverHelloPrefix-32:]) == hrrRandom {
		c.rstate.Store(serverHRR)
	} else {
		c.rstate.Store(serverDone)
	}
}

// WriteTo copies the client's bytes to w until EOF or an error: first
// through [Conn.Read], while the handshake messages are being replayed or
// watched, then with [io.Copy] from the wrapped connection, so that a proxy
// between two TCP connections gets the kernel's splice.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	n, ended, err := copyHandshake(w, c, &c.rdone)
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
	n, ended, err := copyHandshake(c, r, &c.wdone)
	if ended {
		return n, err
	}
	m, err := io.Copy(c.conn, r)
	return n + m, err
}

// copyHandshake copies src to dst through a buffer until done is set. It
// reports whether the copy ended (EOF or an error) before that.
func copyHandshake(dst io.Writer, src io.Reader, done *atomic.Bool) (n int64, ended bool, err error) {
	var buf []byte
	for !done.Load() {
		if buf == nil {
			buf = make([]byte, maxPlaintext+recordHeaderLen+256)
		}
		m, rerr := src.Read(buf)
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
func (c *Conn) SetDeadline(t time.Time) error { return c.conn.SetDeadline(t) }

// SetReadDeadline sets the read deadline of the wrapped connection.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.conn.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline of the wrapped connection.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }

// NetConn returns the wrapped connection. Write the server's first flight
// through the Conn, not through it (see [Conn]).
func (c *Conn) NetConn() net.Conn { return c.conn }

// Status returns the outcome of ECH for this connection.
func (c *Conn) Status() Status { return c.status }

// ECHAccepted reports whether the client's ECH was decrypted, so that the
// Conn replays the ClientHelloInner.
func (c *Conn) ECHAccepted() bool { return c.status == StatusAccepted }

// ECHPresented reports whether the client sent an outer ECH extension, real
// or GREASE.
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
