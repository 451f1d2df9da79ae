package echquic

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
)

// Handshake phases of a connection whose ECH was accepted.
const (
	phaseHello1 = iota // reassembling the first ClientHello
	phaseHello2        // first hello rewritten; a second one may follow a HelloRetryRequest
	phaseDone          // second hello rewritten
)

var errInnerTooLong = errors.New("echquic: ClientHelloInner does not fit in the client's Initial packets")

// handshake is the Initial-level state of one QUIC connection attempt:
// its keys, the reassembly of its ClientHellos and, once ECH is accepted,
// what the rewriting of its Initial packets needs. One goroutine uses it.
type handshake struct {
	version    uint32
	dcid, scid []byte // of the client's first Initial packet
	keys       *initialKeys
	largest    int64 // largest packet number received, -1 if none

	phase  int
	stream cryptoBuffer // the ClientHello being reassembled
	hello  helloState
	limit  int

	// Once accepted: the outer stream [0, o1) carried the first outer
	// hello and [o1, o1+o2) the second; the backend gets inner, of which
	// [0, i1) is the first inner hello and [i1, i1+i2) the second.
	accepted bool
	o1, i1   uint64
	o2, i2   uint64
	inner    []byte
}

// scratch is the memory the processing of one datagram needs and does not
// keep: the packet being unprotected and its frames. It comes from
// scratchPool, so that a new connection does not allocate it.
type scratch struct {
	frames initialFrames
	pkt    []byte
}

var scratchPool = sync.Pool{New: func() any { return &scratch{pkt: make([]byte, 0, 1500)} }}

func getScratch() *scratch { return scratchPool.Get().(*scratch) }

// putScratch returns s to the pool. Its frames alias its own pkt only.
func putScratch(s *scratch) { scratchPool.Put(s) }

func newHandshake(h *longHeader, limit int) (*handshake, error) {
	keys, err := newInitialKeys(h.version, h.dcid, false)
	if err != nil {
		return nil, err
	}
	hs := &handshake{
		version: h.version,
		dcid:    bytes.Clone(h.dcid),
		scid:    bytes.Clone(h.scid),
		keys:    keys,
		largest: -1,
		limit:   limit,
	}
	hs.stream.reset(0, uint64(limit)+handshakeHeaderLen)
	return hs, nil
}

// ours reports whether the long header packet h may be an Initial of this
// connection attempt; it is if it decrypts.
func (hs *handshake) ours(h *longHeader) bool {
	return h.typ == packetInitial && h.version == hs.version
}

// open copies the Initial packet pkt to s.pkt, removes its protection and
// parses its frames into s.frames.
func (hs *handshake) open(s *scratch, pkt []byte, h *longHeader) (pn uint64, pnLen int, payload []byte, err error) {
	s.pkt = append(s.pkt[:0], pkt...)
	pn, pnLen, payload, err = hs.keys.unprotect(s.pkt, h.pnOff, hs.largest)
	if err != nil {
		return 0, 0, nil, err
	}
	if err := parseInitialFrames(payload, &s.frames); err != nil {
		return 0, 0, nil, err
	}
	hs.largest = max(hs.largest, int64(pn))
	return pn, pnLen, payload, nil
}

// feed reads the client's Initial packets of datagram b into the stream
// being reassembled. Packets that are not Initials of this attempt, or whose
// protection does not verify, are skipped (RFC 9001, Section 5.2: dropped).
// It reports whether the datagram holds CRYPTO data the rewriting has to
// wait for (see [handshake.needsWait]), and how many Initials it read.
func (hs *handshake) feed(b []byte) (wait bool, opened int, err error) {
	s := getScratch()
	defer putScratch(s)
	for len(b) > 0 && b[0]&headerFormLong != 0 {
		h, perr := parseLongHeader(b)
		if perr != nil {
			break
		}
		pkt := b[:h.end]
		b = b[h.end:]
		if !hs.ours(&h) {
			continue
		}
		if _, _, _, err := hs.open(s, pkt, &h); err != nil {
			continue
		}
		opened++
		for _, cf := range s.frames.cryptoFrames() {
			if hs.phase != phaseDone {
				if err := hs.stream.write(cf.off, cf.data); err != nil {
					return false, opened, err
				}
			}
			wait = wait || hs.needsWait(cf)
		}
	}
	return wait, opened, nil
}

// needsWait reports whether cf holds data that cannot be rewritten yet: any
// data before the first hello is rewritten, beyond it before the second.
func (hs *handshake) needsWait(cf cryptoFrame) bool {
	end := cf.off + uint64(len(cf.data))
	switch hs.phase {
	case phaseHello1:
		return true
	case phaseHello2:
		return end > hs.o1
	}
	return false
}

// message returns the handshake message reassembled in the stream, or nil
// while it is incomplete. An over-long message is an error.
func (hs *handshake) message() ([]byte, error) {
	got := hs.stream.contiguous()
	if len(got) < handshakeHeaderLen {
		return nil, nil
	}
	if got[0] != typeClientHello {
		return nil, &alertError{Alert: alertUnexpectedMessage, Err: fmt.Errorf("%w: handshake message type %d", errHello, got[0])}
	}
	n := int(got[1])<<16 | int(got[2])<<8 | int(got[3])
	if n > hs.limit {
		return nil, &alertError{Alert: alertDecodeError, Err: fmt.Errorf("%w: ClientHello of %d bytes, limit %d", errHello, n, hs.limit)}
	}
	if len(got) < handshakeHeaderLen+n {
		return nil, nil
	}
	return got[:handshakeHeaderLen+n], nil
}

// firstHello processes the complete first ClientHello msg.
func (hs *handshake) firstHello(msg []byte, remote net.Addr, p *Proxy) error {
	inner, err := hs.hello.first(msg, remote, p.ECHOptions, hs.limit)
	if err != nil {
		return err
	}
	if inner == nil {
		// The hello goes on as received, and so does all that follows.
		hs.phase = phaseDone
		hs.stream.release()
		return nil
	}
	hs.accepted = true
	hs.o1, hs.i1 = uint64(len(msg)), uint64(len(inner))
	hs.inner = inner
	hs.phase = phaseHello2
	// The second hello, if any, starts with a new buffer.
	hs.stream.release()
	hs.stream.reset(hs.o1, uint64(hs.limit)+handshakeHeaderLen)
	return nil
}

// secondHello processes the complete second ClientHello msg.
func (hs *handshake) secondHello(msg []byte) error {
	inner, err := hs.hello.second(msg, hs.limit)
	if err != nil {
		return err
	}
	hs.o2, hs.i2 = uint64(len(msg)), uint64(len(inner))
	hs.inner = append(hs.inner, inner...)
	hs.phase = phaseDone
	hs.stream.release()
	hs.stream.reset(0, 0)
	return nil
}

// rewrite appends to dst datagram b with the CRYPTO data of the client's
// Initial packets replaced by the inner hellos. Every other packet, and
// every Initial without CRYPTO data, is copied unchanged. A rewritten packet
// keeps its header, packet number and length, its frames other than CRYPTO
// and PADDING in their order, and is padded with PADDING frames to its
// original length, so the datagram keeps its size (RFC 9000, Section 14.1).
//
// A CRYPTO frame's range of the outer stream is mapped to the same range of
// the inner stream, clipped to the inner hello's length; the frame that
// carries the end of an outer hello carries the end of the inner hello, so
// that an inner hello longer than the outer one (which the encryption
// overhead makes rare) goes into the room the client's padding left in that
// packet. When that room is too small the datagram cannot be rewritten
// ([errInnerTooLong]). Because the mapping depends only on the frame's
// range, a retransmitted Initial is rewritten to the same bytes.
func (hs *handshake) rewrite(dst, b []byte) ([]byte, error) {
	s := getScratch()
	defer putScratch(s)
	for len(b) > 0 {
		if b[0]&headerFormLong == 0 {
			return append(dst, b...), nil
		}
		h, err := parseLongHeader(b)
		if err != nil {
			return append(dst, b...), nil // the backend judges it
		}
		pkt := b[:h.end]
		b = b[h.end:]
		if !hs.ours(&h) {
			dst = append(dst, pkt...)
			continue
		}
		pn, pnLen, _, err := hs.open(s, pkt, &h)
		if err != nil {
			continue // RFC 9001, Section 5.2: dropped, as the backend would
		}
		if s.frames.nc == 0 {
			dst = append(dst, pkt...)
			continue
		}
		if dst, err = hs.rebuild(s, dst, pkt, &h, pn, pnLen); err != nil {
			return nil, err
		}
	}
	return dst, nil
}

// rebuild appends the rewritten form of the packet pkt, opened into s.pkt
// and s.frames.
func (hs *handshake) rebuild(s *scratch, dst, pkt []byte, h *longHeader, pn uint64, pnLen int) ([]byte, error) {
	hdrLen := h.pnOff + pnLen
	payloadLen := len(pkt) - hdrLen - aeadTagLen
	start := len(dst)
	dst = append(dst, s.pkt[:hdrLen]...)
	for _, f := range s.frames.otherFrames() {
		dst = append(dst, f...)
	}
	for _, cf := range s.frames.cryptoFrames() {
		dst = hs.appendMapped(dst, cf)
	}
	if n := len(dst) - start - hdrLen; n > payloadLen {
		return nil, fmt.Errorf("%w: %d bytes of frames for a payload of %d", errInnerTooLong, n, payloadLen)
	}
	dst = append(dst, make([]byte, len(pkt)-(len(dst)-start))...) // PADDING frames and the tag's room
	hs.keys.protect(dst[start:], h.pnOff, pnLen, pn)
	return dst, nil
}

// appendMapped appends the CRYPTO frames that carry, in the inner stream,
// what cf carried in the outer one.
func (hs *handshake) appendMapped(out []byte, cf cryptoFrame) []byte {
	a, b := cf.off, cf.off+uint64(len(cf.data))
	// The first hello: outer [0, o1) to inner [0, i1).
	if a < hs.o1 {
		e := min(b, hs.o1)
		if e == hs.o1 {
			e = hs.i1
		}
		out = hs.appendInner(out, a, min(e, hs.i1))
	}
	if hs.phase != phaseDone || b <= hs.o1 {
		return out
	}
	// The second hello: outer [o1, o1+o2) to inner [i1, i1+i2).
	if a < hs.o1+hs.o2 {
		s, e := max(a, hs.o1)-hs.o1, min(b, hs.o1+hs.o2)-hs.o1
		if e == hs.o2 {
			e = hs.i2
		}
		out = hs.appendInner(out, hs.i1+s, hs.i1+min(e, hs.i2))
	}
	// Anything after: shifted.
	if b > hs.o1+hs.o2 {
		s := max(a, hs.o1+hs.o2)
		out = appendCrypto(out, s-hs.o1-hs.o2+hs.i1+hs.i2, cf.data[s-a:])
	}
	return out
}

// appendInner appends a CRYPTO frame with hs.inner[a:b], if not empty.
func (hs *handshake) appendInner(out []byte, a, b uint64) []byte {
	if a >= b {
		return out
	}
	return appendCrypto(out, a, hs.inner[a:b])
}

// appendCrypto appends a CRYPTO frame carrying data at stream offset off.
func appendCrypto(out []byte, off uint64, data []byte) []byte {
	out = append(out, frameCrypto)
	out = appendVarint(out, off)
	out = appendVarint(out, uint64(len(data)))
	return append(out, data...)
}

// appendClose appends an Initial packet from the server carrying a
// CONNECTION_CLOSE of type 0x1c with the error code: 0x100+alert for a TLS
// alert (RFC 9001, Section 4.8), or a transport error code. It is protected
// with the server's Initial keys.
func (hs *handshake) appendClose(dst []byte, code uint64) ([]byte, error) {
	keys, err := newInitialKeys(hs.version, hs.dcid, true)
	if err != nil {
		return nil, err
	}
	typeBits := byte(packetInitial)
	if hs.version == version2 {
		typeBits = 1
	}
	start := len(dst)
	dst = append(dst, headerFormLong|headerFixedBit|typeBits<<4)
	dst = binary.BigEndian.AppendUint32(dst, hs.version)
	dst = append(dst, byte(len(hs.scid)))
	dst = append(dst, hs.scid...)
	dst = append(dst, byte(len(hs.dcid)))
	dst = append(dst, hs.dcid...)
	dst = append(dst, 0) // Token Length
	var frame []byte
	frame = append(frame, frameConnectionClose)
	frame = appendVarint(frame, code)
	frame = appendVarint(frame, frameCrypto) // the frame type that triggered the error
	frame = append(frame, 0)                 // Reason Phrase Length
	// The frame is at least 5 bytes: with the packet number and the tag
	// there is room for the header protection sample (RFC 9001, Section 5.4.2).
	length := 1 + len(frame) + aeadTagLen
	dst = append(dst, 0x40|byte(length>>8), byte(length)) // two-byte Length
	pnOff := len(dst) - start
	dst = append(dst, 0) // packet number 0, one byte
	dst = append(dst, frame...)
	dst = append(dst, make([]byte, aeadTagLen)...)
	keys.protect(dst[start:], pnOff, 1, 0)
	return dst, nil
}

// appendVersionNegotiation appends a Version Negotiation packet answering a
// long header packet whose connection IDs are dcid and scid
// (RFC 9000, Sections 6.1 and 17.2.1).
func appendVersionNegotiation(dst, dcid, scid []byte, unused byte) []byte {
	dst = append(dst, headerFormLong|unused&0x7f, 0, 0, 0, 0)
	dst = append(dst, byte(len(scid)))
	dst = append(dst, scid...)
	dst = append(dst, byte(len(dcid)))
	dst = append(dst, dcid...)
	dst = binary.BigEndian.AppendUint32(dst, version1)
	return binary.BigEndian.AppendUint32(dst, version2)
}
