package echquic

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/echkit/ech"
)

// TLS codepoints (RFC 8446).
const (
	recordTypeHandshake = 22
	recordHeaderLen     = 5
	handshakeHeaderLen  = 4
	maxPlaintext        = 1 << 14
	typeClientHello     = 1
	typeServerHello     = 2
	recordVersion       = 0x0301 // legacy_record_version of a first ClientHello
)

// TLS alerts this package sends itself (RFC 8446, Section 6).
const (
	alertUnexpectedMessage = 10
	alertIllegalParameter  = 47
	alertDecodeError       = 50
	alertInternalError     = 80
	alertUnrecognizedName  = 112
)

// hrrRandom is ServerHello.random of a HelloRetryRequest
// (RFC 8446, Section 4.1.3).
var hrrRandom = [32]byte{
	0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
	0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
}

// memConn is the in-memory [net.Conn] that [ech.NewConn] reads a
// ClientHello from: Read serves msg as TLS handshake records of at most 2^14
// bytes, framed on the fly so that the message is not copied; what the Conn
// writes to the client (an alert) is dropped, so that no goroutine is
// involved.
type memConn struct {
	msg    []byte // the rest of the handshake message
	hdr    [recordHeaderLen]byte
	nhdr   int // bytes at the end of hdr not served yet
	left   int // bytes of msg in the current record not served yet
	remote net.Addr
}

var _ net.Conn = (*memConn)(nil)

// serve makes m serve msg, which m aliases until the next call.
func (m *memConn) serve(msg []byte) {
	m.msg, m.nhdr, m.left = msg, 0, 0
}

func (m *memConn) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if m.nhdr == 0 && m.left == 0 {
			if len(m.msg) == 0 {
				break
			}
			l := min(len(m.msg), maxPlaintext)
			m.hdr = [recordHeaderLen]byte{recordTypeHandshake, recordVersion >> 8, recordVersion & 0xff, byte(l >> 8), byte(l)}
			m.nhdr, m.left = recordHeaderLen, l
		}
		if m.nhdr > 0 {
			k := copy(p[n:], m.hdr[recordHeaderLen-m.nhdr:])
			m.nhdr -= k
			n += k
			continue
		}
		k := copy(p[n:], m.msg[:m.left])
		m.msg, m.left = m.msg[k:], m.left-k
		n += k
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// Write drops p: the alert the Conn sends is also in the error it returns.
func (m *memConn) Write(p []byte) (int, error) { return len(p), nil }

func (m *memConn) Close() error                     { return nil }
func (m *memConn) LocalAddr() net.Addr              { return m.remote }
func (m *memConn) RemoteAddr() net.Addr             { return m.remote }
func (m *memConn) SetDeadline(time.Time) error      { return nil }
func (m *memConn) SetReadDeadline(time.Time) error  { return nil }
func (m *memConn) SetWriteDeadline(time.Time) error { return nil }

// readMessage reads handshake records from r and appends the handshake
// message they carry to dst.
func readMessage(r io.Reader, dst []byte, limit int) ([]byte, error) {
	var hdr [recordHeaderLen]byte
	start := len(dst)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, err
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		if hdr[0] != recordTypeHandshake || n == 0 || n > maxPlaintext || len(dst)-start+n > limit+handshakeHeaderLen {
			return nil, fmt.Errorf("%w: unexpected record from ech.Conn", errHello)
		}
		dst = append(dst, make([]byte, n)...)
		if _, err := io.ReadFull(r, dst[len(dst)-n:]); err != nil {
			return nil, err
		}
		msg := dst[start:]
		if len(msg) >= handshakeHeaderLen {
			l := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
			if len(msg) == handshakeHeaderLen+l {
				return dst, nil
			}
			if len(msg) > handshakeHeaderLen+l {
				return nil, fmt.Errorf("%w: trailing data after the ClientHello", errHello)
			}
		}
	}
}

var errHello = errors.New("echquic: ClientHello refused")

// alertError is the error of a ClientHello refused with a TLS alert. The
// client got a CONNECTION_CLOSE of type 0x1c with error code 0x100+Alert
// (RFC 9001, Section 4.8).
type alertError struct {
	Alert uint8
	Err   error // the error of package ech, wrapping one of its sentinels
}

func (e *alertError) Error() string {
	return fmt.Sprintf("echquic: ClientHello refused with alert %d: %v", e.Alert, e.Err)
}

func (e *alertError) Unwrap() error { return e.Err }

// alertFor returns the TLS alert the Conn sent for err: the errors of
// package ech match [tls.AlertError] when the peer was told; any other error
// is internal_error.
func alertFor(err error) uint8 {
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return uint8(ae)
	}
	return alertInternalError
}

// helloState drives [ech.NewConn] over the ClientHellos of one connection.
type helloState struct {
	mc   memConn
	conn *ech.Conn
}

// first decrypts the first ClientHello msg (a whole handshake message). It
// returns the message to pass on: the ClientHelloInner when ECH was
// accepted, else nil (the hello goes on as received).
func (h *helloState) first(msg []byte, remote net.Addr, opts []ech.Option, limit int) ([]byte, error) {
	h.mc = memConn{remote: remote}
	h.mc.serve(msg)
	defer h.mc.serve(nil) // msg is the caller's
	c, err := ech.NewConn(context.Background(), &h.mc, opts...)
	if err != nil {
		return nil, &alertError{Alert: alertFor(err), Err: err}
	}
	h.conn = c
	if c.Status() != ech.StatusAccepted {
		return nil, nil
	}
	inner, err := readMessage(c, make([]byte, 0, len(msg)+64), limit)
	if err != nil {
		return nil, &alertError{Alert: alertInternalError, Err: err}
	}
	return inner, nil
}

// second decrypts the ClientHello the client sent after a
// HelloRetryRequest, with the HPKE context of the first (RFC 9849,
// Section 7.1.1), and returns its ClientHelloInner.
//
// NOTE: the proxy does not decrypt the backend's Initial packets: it learns
// of the HelloRetryRequest from the client sending a second ClientHello,
// which a client does only after one, and tells the Conn with a stand-in
// HelloRetryRequest header.
func (h *helloState) second(msg []byte, limit int) ([]byte, error) {
	var hrr [recordHeaderLen + handshakeHeaderLen + 2 + 32]byte
	n := len(hrr) - recordHeaderLen
	copy(hrr[:], []byte{recordTypeHandshake, 3, 3, byte(n >> 8), byte(n), typeServerHello, 0, 0, byte(n - handshakeHeaderLen), 3, 3})
	copy(hrr[recordHeaderLen+handshakeHeaderLen+2:], hrrRandom[:])
	if _, err := h.conn.Write(hrr[:]); err != nil {
		return nil, &alertError{Alert: alertInternalError, Err: err}
	}
	h.mc.serve(msg)
	defer h.mc.serve(nil)
	inner, err := readMessage(h.conn, make([]byte, 0, len(msg)+64), limit)
	if err != nil {
		return nil, &alertError{Alert: alertFor(err), Err: err}
	}
	return inner, nil
}
