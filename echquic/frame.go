package echquic

import (
	"errors"
	"fmt"
	"sync"
)

// Frame types allowed in Initial packets (RFC 9000, Section 12.4, Table 3).
const (
	framePadding         = 0x00
	framePing            = 0x01
	frameAck             = 0x02
	frameAckECN          = 0x03
	frameCrypto          = 0x06
	frameConnectionClose = 0x1c
)

var (
	errMalformedFrame = errors.New("echquic: malformed frame")
	errCryptoLimit    = errors.New("echquic: CRYPTO data beyond the limit")
)

// cryptoFrame is a CRYPTO frame (RFC 9000, Section 19.6):
//
//	CRYPTO Frame {
//	  Type (i) = 0x06,
//	  Offset (i),
//	  Length (i),
//	  Crypto Data (..),
//	}
type cryptoFrame struct {
	off  uint64
	data []byte // aliases the packet
}

// maxFramesPerPacket bounds the frames of one Initial packet we keep track
// of; a packet with more is dropped.
const maxFramesPerPacket = 64

// initialFrames are the frames of one Initial packet. The slices alias the
// plaintext payload.
type initialFrames struct {
	crypto [maxFramesPerPacket]cryptoFrame
	nc     int
	other  [maxFramesPerPacket][]byte // frames other than CRYPTO and PADDING, whole
	no     int
}

func (f *initialFrames) cryptoFrames() []cryptoFrame { return f.crypto[:f.nc] }
func (f *initialFrames) otherFrames() [][]byte       { return f.other[:f.no] }

// parseInitialFrames parses the payload of an Initial packet. Any frame
// type not allowed in Initial packets is an error (RFC 9000, Section 12.4:
// PROTOCOL_VIOLATION); so is a payload with no frame.
func parseInitialFrames(p []byte, f *initialFrames) error {
	f.nc, f.no = 0, 0
	if len(p) == 0 {
		return fmt.Errorf("%w: empty payload", errMalformedFrame)
	}
	for len(p) > 0 {
		start := p
		typ, n := readVarint(p)
		if n == 0 {
			return errMalformedFrame
		}
		p = p[n:]
		switch typ {
		case framePadding:
			// Skip the run of PADDING frames at once: clients pad with
			// hundreds of them.
			i := 0
			for i < len(p) && p[i] == framePadding {
				i++
			}
			p = p[i:]
			continue
		case framePing:
		case frameAck, frameAckECN:
			//   Largest Acknowledged (i), ACK Delay (i), ACK Range Count (i),
			//   First ACK Range (i), ACK Range (..) ..., [ECN Counts (..)],
			var fields [4]uint64
			for i := range fields {
				if fields[i], n = readVarint(p); n == 0 {
					return errMalformedFrame
				}
				p = p[n:]
			}
			ranges := fields[2] * 2
			if typ == frameAckECN {
				ranges += 3
			}
			if ranges > uint64(len(p)) {
				return errMalformedFrame
			}
			for range ranges {
				if _, n = readVarint(p); n == 0 {
					return errMalformedFrame
				}
				p = p[n:]
			}
		case frameCrypto:
			off, n := readVarint(p)
			if n == 0 {
				return errMalformedFrame
			}
			p = p[n:]
			l, n := readVarint(p)
			if n == 0 || l > uint64(len(p)-n) {
				return errMalformedFrame
			}
			p = p[n:]
			// RFC 9000, Section 19.6: the end offset must fit in 2^62-1.
			if off+l >= 1<<62 {
				return errMalformedFrame
			}
			if f.nc == maxFramesPerPacket {
				return fmt.Errorf("%w: too many frames", errMalformedFrame)
			}
			f.crypto[f.nc] = cryptoFrame{off: off, data: p[:l]}
			f.nc++
			p = p[l:]
			continue
		case frameConnectionClose:
			//   Error Code (i), Frame Type (i), Reason Phrase Length (i), Reason Phrase (..),
			for range 2 {
				if _, n = readVarint(p); n == 0 {
					return errMalformedFrame
				}
				p = p[n:]
			}
			l, n := readVarint(p)
			if n == 0 || l > uint64(len(p)-n) {
				return errMalformedFrame
			}
			p = p[n+int(l):]
		default:
			return fmt.Errorf("%w: frame type 0x%x in an Initial packet", errMalformedFrame, typ)
		}
		if f.no == maxFramesPerPacket {
			return fmt.Errorf("%w: too many frames", errMalformedFrame)
		}
		f.other[f.no] = start[:len(start)-len(p)]
		f.no++
	}
	return nil
}

// maxCryptoRanges bounds the number of disjoint ranges a cryptoBuffer keeps:
// a client that fragments its hello further is dropped.
const maxCryptoRanges = 32

// span is a half-open range of stream offsets.
type span struct{ a, b uint64 }

// streamBufSize is the size of the pooled buffers of cryptoBuffer.
const streamBufSize = 4096

var streamPool = sync.Pool{New: func() any { return new([streamBufSize]byte) }}

// cryptoBuffer reassembles a part of the CRYPTO stream, starting at offset
// base, from frames that may come out of order, duplicated or overlapping.
// Data is kept as first received. It holds at most max bytes.
type cryptoBuffer struct {
	base   uint64
	max    uint64
	buf    []byte
	ranges []span // sorted, disjoint, not adjacent; relative to base
}

// reset empties the buffer, keeping its memory, for a stream part at base.
func (c *cryptoBuffer) reset(base, limit uint64) {
	clear(c.buf)
	c.buf, c.ranges, c.base, c.max = c.buf[:0], c.ranges[:0], base, limit
}

// write adds the data of a CRYPTO frame at stream offset off. Data before
// base is ignored: it belongs to an earlier part.
func (c *cryptoBuffer) write(off uint64, data []byte) error {
	if off < c.base {
		if off+uint64(len(data)) <= c.base {
			return nil
		}
		data = data[c.base-off:]
		off = c.base
	}
	a := off - c.base
	b := a + uint64(len(data))
	if b > c.max {
		return fmt.Errorf("%w: offset %d", errCryptoLimit, off+uint64(len(data)))
	}
	if a == b {
		return nil
	}
	if uint64(len(c.buf)) < b {
		if c.buf == nil {
			// Most ClientHellos fit in a pooled buffer.
			if b <= streamBufSize {
				c.buf = (*streamPool.Get().(*[streamBufSize]byte))[:0]
			} else {
				c.buf = make([]byte, 0, min(b, c.max))
			}
		}
		c.buf = append(c.buf, make([]byte, int(b)-len(c.buf))...)
	}
	// Copy into the gaps only: the first data received at an offset stays.
	pos := a
	for _, r := range c.ranges {
		if r.b <= pos {
			continue
		}
		if r.a >= b {
			break
		}
		if r.a > pos {
			copy(c.buf[pos:r.a], data[pos-a:r.a-a])
		}
		pos = max(pos, r.b)
		if pos >= b {
			break
		}
	}
	if pos < b {
		copy(c.buf[pos:b], data[pos-a:])
	}
	return c.add(span{a, b})
}

// add merges s into the ranges.
func (c *cryptoBuffer) add(s span) error {
	i := 0
	for ; i < len(c.ranges) && c.ranges[i].b < s.a; i++ {
	}
	j := i
	for ; j < len(c.ranges) && c.ranges[j].a <= s.b; j++ {
		s.a, s.b = min(s.a, c.ranges[j].a), max(s.b, c.ranges[j].b)
	}
	if i == j {
		if len(c.ranges) == maxCryptoRanges {
			return fmt.Errorf("%w: more than %d gaps", errCryptoLimit, maxCryptoRanges)
		}
		c.ranges = append(c.ranges, span{})
		copy(c.ranges[i+1:], c.ranges[i:])
		c.ranges[i] = s
		return nil
	}
	c.ranges[i] = s
	c.ranges = append(c.ranges[:i+1], c.ranges[j:]...)
	return nil
}

// release empties the buffer and returns its memory to the pool. What
// [cryptoBuffer.contiguous] returned must no longer be used.
func (c *cryptoBuffer) release() {
	if cap(c.buf) == streamBufSize {
		streamPool.Put((*[streamBufSize]byte)(c.buf[:streamBufSize]))
	}
	c.buf, c.ranges = nil, c.ranges[:0]
}

// contiguous returns the bytes received without a gap from base.
func (c *cryptoBuffer) contiguous() []byte {
	if len(c.ranges) == 0 || c.ranges[0].a != 0 {
		return nil
	}
	return c.buf[:c.ranges[0].b]
}
