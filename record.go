package ech

import (
	"fmt"
	"io"
	"sync"
)

// Record layer codepoints and limits (RFC 8446, Section 5).
const (
	recordTypeAlert     uint8 = 21
	recordTypeHandshake uint8 = 22

	recordHeaderLen    = 5
	handshakeHeaderLen = 4

	// maxPlaintext is the most a plaintext record carries
	// (RFC 8446, Section 5.1).
	maxPlaintext = 1 << 14
	// maxCiphertext is the most a protected record carries
	// (RFC 8446, Section 5.2).
	maxCiphertext = maxPlaintext + 256

	// firstReadSize is the most buffer a record gets before its bytes
	// arrive; the buffer then grows with them, doubling, up to what the
	// record and message headers announce.
	firstReadSize = 2 << 10
	// maxPooledSize is the largest buffer returned to the pool: a
	// 2^16-byte hello and its framing fit.
	maxPooledSize = 1 << 17
)

// bufPool holds the buffers of ClientHellos: read into one, rebuilt into
// another, replayed from either.
var bufPool = sync.Pool{New: func() any { return new([]byte) }}

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

// putBuf returns b to the pool, cleared: it may have held a
// ClientHelloInner.
func putBuf(b *[]byte) {
	if cap(*b) <= maxPooledSize {
		clear((*b)[:cap(*b)])
		*b = (*b)[:0]
		bufPool.Put(b)
	}
}

// handshakeReader reassembles the client's handshake messages from its
// records (RFC 8446, Section 5.1): the first ClientHello, and later the
// second one after a HelloRetryRequest, with the records around it. Its
// buffer comes from the pool when a record's body is due and grows only
// as the bytes arrive, never past what the headers announce: a client
// that sent a record header holds a small buffer, and one that sent most
// of its hello a buffer of about the hello's size.
type handshakeReader struct {
	conn    io.Reader
	maxSize int // the largest handshake message body accepted
	// first is set for the client's first flight: a ClientHello in
	// handshake records and nothing else.
	first bool

	hdr  [recordHeaderLen]byte
	buf  *[]byte // the message so far, or a record of another type
	vers uint16  // record version of the message's first record
	done bool    // buf holds what the last call of next returned
}

// next reads one record. It returns msg when the record completes a
// handshake message, rec (header included) when it is a record of another
// type between messages, which only a reader that is not first accepts,
// and neither when the message goes on in the next record. msg and rec
// alias the reader's buffer: they are valid until the next call of next,
// take or release. I/O errors are returned as they are, io.EOF only at a
// record boundary outside a message.
func (h *handshakeReader) next() (msg, rec []byte, err error) {
	if h.done {
		*h.buf, h.done = (*h.buf)[:0], false
	}
	have := 0
	if h.buf != nil {
		have = len(*h.buf)
	}
	if _, err := io.ReadFull(h.conn, h.hdr[:]); err != nil {
		if have > 0 {
			err = noEOF(err) // the stream ended inside a message
		}
		return nil, nil, err
	}
	typ, vers, n := h.hdr[0], uint16(h.hdr[1])<<8|uint16(h.hdr[2]), int(h.hdr[3])<<8|int(h.hdr[4])
	if h.first && (h.hdr[1] != 3 || typ != recordTypeHandshake && have == 0) {
		return nil, nil, fmt.Errorf("%w: record type %d, version 0x%04x", ErrNotTLS, typ, vers)
	}
	if typ != recordTypeHandshake {
		switch {
		case have > 0:
			// RFC 8446, Section 5.1: handshake messages are not interleaved.
			return nil, nil, fmt.Errorf("%w: record type %d inside a ClientHello", ErrUnexpectedMessage, typ)
		case n > maxCiphertext:
			return nil, nil, fmt.Errorf("%w: record of %d bytes", ErrRecordOverflow, n)
		}
		if err := h.read(h.hdr[:], n); err != nil {
			return nil, nil, noEOF(err)
		}
		h.done = true
		return nil, *h.buf, nil
	}
	switch {
	case n > maxPlaintext:
		return nil, nil, fmt.Errorf("%w: handshake record of %d bytes", ErrRecordOverflow, n)
	case n == 0:
		// RFC 8446, Section 5.1: no zero-length handshake fragments.
		return nil, nil, fmt.Errorf("%w: empty handshake record", ErrDecodeError)
	}
	if have == 0 {
		h.vers = vers // the message is replayed with the client's framing
	}
	if have >= handshakeHeaderLen {
		if have+n > handshakeHeaderLen+messageLen(*h.buf) {
			// RFC 8446, Section 5.1: a message before a key change ends
			// at a record boundary.
			return nil, nil, fmt.Errorf("%w: data after the ClientHello in its record", ErrUnexpectedMessage)
		}
	} else if have+n > handshakeHeaderLen+h.maxSize {
		return nil, nil, fmt.Errorf("%w: record of %d bytes, limit %d", ErrHelloTooLarge, n, h.maxSize)
	}
	if err := h.read(nil, n); err != nil {
		return nil, nil, noEOF(err)
	}
	m := *h.buf
	if len(m) < handshakeHeaderLen {
		return nil, nil, nil
	}
	if h.first && m[0] != typeClientHello {
		return nil, nil, fmt.Errorf("%w: handshake message type %d", ErrNotTLS, m[0])
	}
	switch l := messageLen(m); {
	case l > h.maxSize:
		return nil, nil, fmt.Errorf("%w: %d bytes, limit %d", ErrHelloTooLarge, l, h.maxSize)
	case len(m) > handshakeHeaderLen+l:
		// RFC 8446, Section 5.1: a message before a key change ends at a
		// record boundary.
		return nil, nil, fmt.Errorf("%w: data after the ClientHello in its record", ErrUnexpectedMessage)
	case len(m) < handshakeHeaderLen+l:
		return nil, nil, nil // more records to come
	}
	h.done = true
	return m, nil, nil
}

// read appends prefix and then n bytes of the conn to the buffer, growing
// it as the bytes arrive.
func (h *handshakeReader) read(prefix []byte, n int) error {
	if h.buf == nil {
		h.buf = getBuf()
	}
	b := *h.buf
	end := len(b) + len(prefix) + n
	if cap(b)-len(b) < len(prefix) {
		b = growBuf(b, end)
	}
	b = append(b, prefix...)
	for len(b) < end {
		if len(b) == cap(b) {
			b = growBuf(b, end)
		}
		// Keep no reference to a buffer grown out of while blocked.
		*h.buf = b
		m, err := h.conn.Read(b[len(b):min(end, cap(b))])
		b = b[:len(b)+m]
		*h.buf = b
		if err != nil && len(b) < end {
			return err
		}
	}
	*h.buf = b
	return nil
}

// growBuf returns a copy of b with room for twice its capacity, at least
// firstReadSize and at most end bytes. b is left to the collector: it
// held the client's bytes, which are no secret.
func growBuf(b []byte, end int) []byte {
	nb := make([]byte, len(b), min(end, max(2*cap(b), firstReadSize)))
	copy(nb, b)
	return nb
}

// messageLen returns the body length in a handshake message header.
func messageLen(m []byte) int { return int(m[1])<<16 | int(m[2])<<8 | int(m[3]) }

// inMessage reports whether a message has been read in part.
func (h *handshakeReader) inMessage() bool { return h.buf != nil && !h.done && len(*h.buf) > 0 }

// take returns the buffer, which the caller then owns, and leaves the
// reader without one.
func (h *handshakeReader) take() *[]byte {
	b := h.buf
	h.buf, h.done = nil, false
	return b
}

// release returns the buffer to the pool.
func (h *handshakeReader) release() {
	if b := h.take(); b != nil {
		putBuf(b)
	}
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// replay is what [Conn.Read] returns before the client's next bytes: a
// handshake message, cut into records of at most maxPlaintext bytes as it
// is read (one record, as the client sent it, when it fits), or a record
// passed on as received.
type replay struct {
	rest    []byte // bytes not yet returned
	vers    uint16 // record version of the records cut from a message
	hdr     [recordHeaderLen]byte
	hdrLeft int     // bytes at the end of hdr not yet returned
	body    int     // bytes at the start of rest in the current record
	buf     *[]byte // pooled buffer behind rest, or nil when it is borrowed
}

// message sets the replay to msg, framed with record version vers. buf,
// if not nil, is returned to the pool once msg has been read.
func (r *replay) message(msg []byte, vers uint16, buf *[]byte) {
	*r = replay{rest: msg, vers: vers, buf: buf}
}

// record sets the replay to a whole record, borrowed.
func (r *replay) record(rec []byte) { *r = replay{rest: rec, body: len(rec)} }

func (r *replay) empty() bool { return r.hdrLeft == 0 && len(r.rest) == 0 }

// read copies the next bytes into p.
func (r *replay) read(p []byte) int {
	n := 0
	for n < len(p) {
		switch {
		case r.hdrLeft > 0:
			m := copy(p[n:], r.hdr[recordHeaderLen-r.hdrLeft:])
			r.hdrLeft -= m
			n += m
		case r.body > 0:
			m := copy(p[n:], r.rest[:r.body])
			r.rest, r.body = r.rest[m:], r.body-m
			n += m
		case len(r.rest) > 0:
			l := min(len(r.rest), maxPlaintext)
			r.hdr = [recordHeaderLen]byte{recordTypeHandshake, byte(r.vers >> 8), byte(r.vers), byte(l >> 8), byte(l)}
			r.hdrLeft, r.body = recordHeaderLen, l
		default:
			return n
		}
	}
	return n
}

// release returns the buffer, if owned, and empties the replay.
func (r *replay) release() {
	if r.buf != nil {
		putBuf(r.buf)
	}
	*r = replay{}
}
