package echquic

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// QUIC versions this package reads Initial packets of.
const (
	version1 uint32 = 0x00000001 // RFC 9000
	version2 uint32 = 0x6b3343cf // RFC 9369
)

// Long header packet types, independent of the version's encoding of them
// (RFC 9000, Section 17.2; RFC 9369, Section 3.2).
type packetType uint8

const (
	packetInitial packetType = iota
	packetZeroRTT
	packetHandshake
	packetRetry
)

// String returns the packet type's name.
func (t packetType) String() string {
	switch t {
	case packetInitial:
		return "Initial"
	case packetZeroRTT:
		return "0-RTT"
	case packetHandshake:
		return "Handshake"
	case packetRetry:
		return "Retry"
	}
	return fmt.Sprintf("packetType(%d)", uint8(t))
}

const (
	headerFormLong   = 0x80 // RFC 9000, Section 17.2: Header Form bit
	headerFixedBit   = 0x40
	maxConnIDLen     = 20 // RFC 9000, Section 17.2
	minInitialSize   = 1200
	sampleLen        = 16 // RFC 9001, Section 5.4.2
	aeadTagLen       = 16
	maxPacketNumLen  = 4
	initialKeyLen    = 16 // AEAD_AES_128_GCM
	initialIVLen     = 12
	initialSecretLen = 32
)

var (
	// RFC 9001, Section 5.2.
	saltV1 = []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	// RFC 9369, Section 3.3.1.
	saltV2 = []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9}
)

// Errors of the packet layer. They are not sent to anyone: a packet that
// fails is dropped (RFC 9000, Section 12.2; RFC 9001, Section 5.2).
var (
	errMalformedPacket = errors.New("echquic: malformed packet")
	errUnprotect       = errors.New("echquic: packet protection does not verify")
)

func supportedVersion(v uint32) bool { return v == version1 || v == version2 }

// typeOf decodes the long header packet type bits of version v.
func typeOf(v uint32, first byte) packetType {
	bits := (first >> 4) & 3
	if v == version2 {
		// RFC 9369, Section 3.2: Initial 0b01, 0-RTT 0b10, Handshake 0b11, Retry 0b00.
		return packetType((bits + 3) & 3)
	}
	return packetType(bits)
}

// longHeader is a parsed long header (RFC 9000, Section 17.2):
//
//	Long Header Packet {
//	  Header Form (1) = 1, Fixed Bit (1) = 1, Long Packet Type (2),
//	  Type-Specific Bits (4), Version (32),
//	  Destination Connection ID Length (8), Destination Connection ID (0..160),
//	  Source Connection ID Length (8), Source Connection ID (0..160),
//	  Type-Specific Payload (..),
//	}
//
// Slices alias the datagram.
type longHeader struct {
	typ        packetType
	version    uint32
	dcid, scid []byte
	token      []byte // Initial only
	pnOff      int    // offset of the Packet Number field (Initial, 0-RTT, Handshake)
	end        int    // length of the packet in the datagram
}

// parseLongHeader parses the long header packet at the start of b. The
// version must be a supported one; Version Negotiation (version 0) and other
// versions return errMalformedPacket with the version set.
func parseLongHeader(b []byte) (h longHeader, err error) {
	if len(b) < 7 || b[0]&headerFormLong == 0 {
		return h, errMalformedPacket
	}
	h.version = binary.BigEndian.Uint32(b[1:5])
	i := 5
	l := int(b[i])
	i++
	if l > maxConnIDLen || len(b) < i+l+1 {
		return h, errMalformedPacket
	}
	h.dcid = b[i : i+l]
	i += l
	l = int(b[i])
	i++
	if l > maxConnIDLen || len(b) < i+l {
		return h, errMalformedPacket
	}
	h.scid = b[i : i+l]
	i += l
	if !supportedVersion(h.version) {
		return h, fmt.Errorf("%w: version 0x%08x", errMalformedPacket, h.version)
	}
	if b[0]&headerFixedBit == 0 {
		return h, errMalformedPacket
	}
	h.typ = typeOf(h.version, b[0])
	if h.typ == packetRetry {
		h.end = len(b) // RFC 9000, Section 17.2.5: a Retry has no Length and ends the datagram
		return h, nil
	}
	if h.typ == packetInitial {
		//   Token Length (i), Token (..),
		n, m := readVarint(b[i:])
		if m == 0 || uint64(len(b)-i-m) < n {
			return h, errMalformedPacket
		}
		i += m
		h.token = b[i : i+int(n)]
		i += int(n)
	}
	//   Length (i), Packet Number (8..32), Packet Payload (8..),
	n, m := readVarint(b[i:])
	if m == 0 || uint64(len(b)-i-m) < n {
		return h, errMalformedPacket
	}
	i += m
	h.pnOff = i
	h.end = i + int(n)
	// RFC 9001, Section 5.4.2: the sample is taken 4 bytes after the start
	// of the Packet Number field.
	if int(n) < maxPacketNumLen+sampleLen {
		return h, errMalformedPacket
	}
	return h, nil
}

// readVarint reads a variable-length integer (RFC 9000, Section 16). It
// returns the number of bytes read, 0 if b is too short.
func readVarint(b []byte) (uint64, int) {
	if len(b) == 0 {
		return 0, 0
	}
	l := 1 << (b[0] >> 6)
	if len(b) < l {
		return 0, 0
	}
	v := uint64(b[0] & 0x3f)
	for _, c := range b[1:l] {
		v = v<<8 | uint64(c)
	}
	return v, l
}

// appendVarint appends v in the shortest encoding.
func appendVarint(b []byte, v uint64) []byte {
	switch {
	case v < 1<<6:
		return append(b, byte(v))
	case v < 1<<14:
		return append(b, 0x40|byte(v>>8), byte(v))
	case v < 1<<30:
		return append(b, 0x80|byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return binary.BigEndian.AppendUint64(b, v|0xc0<<56)
}

// initialKeys protect the Initial packets of one direction
// (RFC 9001, Section 5.2). One goroutine uses them at a time.
type initialKeys struct {
	aead cipher.AEAD
	iv   [initialIVLen]byte
	hp   cipher.Block
	// Scratch for the nonce and the mask: an array passed to an interface
	// method escapes, and would cost an allocation per packet.
	nonceBuf [initialIVLen]byte
	maskBuf  [aes.BlockSize]byte
}

// newInitialKeys derives the Initial keys of the client (or the server) from
// the Destination Connection ID of the client's first Initial packet.
func newInitialKeys(version uint32, dcid []byte, server bool) (*initialKeys, error) {
	salt, prefix := saltV1, "quic "
	if version == version2 {
		salt, prefix = saltV2, "quicv2 " // RFC 9369, Section 3.3.2
	}
	label := "client in"
	if server {
		label = "server in"
	}
	initial := hmacSHA256(salt, dcid) // HKDF-Extract (RFC 5869, Section 2.2)
	secret := expandLabel(&initial, label, initialSecretLen)
	key := expandLabel(&secret, prefix+"key", initialKeyLen)
	iv := expandLabel(&secret, prefix+"iv", initialIVLen)
	hpKey := expandLabel(&secret, prefix+"hp", initialKeyLen)
	block, err := aes.NewCipher(key[:initialKeyLen])
	if err != nil {
		return nil, err
	}
	k := new(initialKeys)
	if k.aead, err = cipher.NewGCM(block); err != nil {
		return nil, err
	}
	copy(k.iv[:], iv[:initialIVLen])
	if k.hp, err = aes.NewCipher(hpKey[:initialKeyLen]); err != nil {
		return nil, err
	}
	return k, nil
}

// hmacSHA256 returns HMAC-SHA256(key, msg) (RFC 2104) for a key and a
// message of at most one block each, computed on the stack: the Initial
// keys of every new connection are derived with five of them, and
// crypto/hmac allocates.
func hmacSHA256(key, msg []byte) [sha256.Size]byte {
	const block = 64 // SHA-256 block size
	var in [2 * block]byte
	var out [block + sha256.Size]byte
	copy(in[:], key)
	copy(out[:], key)
	for i := range block {
		in[i] ^= 0x36
		out[i] ^= 0x5c
	}
	n := copy(in[block:], msg)
	inner := sha256.Sum256(in[:block+n])
	copy(out[block:], inner[:])
	return sha256.Sum256(out[:])
}

// expandLabel returns HKDF-Expand-Label(secret, label, "", n) for n of at
// most one hash output (RFC 8446, Section 7.1; RFC 5869, Section 2.3: T(1)
// only) in its first n bytes:
//
//	struct {
//	    uint16 length = Length;
//	    opaque label<7..255> = "tls13 " + Label;
//	    opaque context<0..255> = Context;
//	} HkdfLabel;
func expandLabel(secret *[sha256.Size]byte, label string, n int) [sha256.Size]byte {
	var info [64]byte
	b := append(info[:0], byte(n>>8), byte(n), byte(6+len(label)))
	b = append(b, "tls13 "...)
	b = append(b, label...)
	b = append(b, 0, 1) // empty context, then the counter of T(1)
	return hmacSHA256(secret[:], b)
}

// nonce returns the AEAD nonce of packet number pn (RFC 9001, Section 5.3).
func (k *initialKeys) nonce(pn uint64) [initialIVLen]byte {
	n := k.iv
	for i := 0; i < 8; i++ {
		n[initialIVLen-1-i] ^= byte(pn >> (8 * i))
	}
	return n
}

// mask computes the header protection mask of a packet whose Packet Number
// field starts at pnOff (RFC 9001, Section 5.4).
func (k *initialKeys) mask(pkt []byte, pnOff int) *[aes.BlockSize]byte {
	k.hp.Encrypt(k.maskBuf[:], pkt[pnOff+maxPacketNumLen:pnOff+maxPacketNumLen+sampleLen])
	return &k.maskBuf
}

// unprotect removes the header and payload protection of the long header
// packet pkt in place. largest is the largest packet number received so far
// in the space, -1 if none. It returns the packet number, the length of its
// encoding and the plaintext payload, which aliases pkt.
func (k *initialKeys) unprotect(pkt []byte, pnOff int, largest int64) (pn uint64, pnLen int, payload []byte, err error) {
	m := k.mask(pkt, pnOff)
	pkt[0] ^= m[0] & 0x0f // RFC 9001, Section 5.4.1: long header
	pnLen = int(pkt[0]&3) + 1
	var truncated uint64
	for i := range pnLen {
		pkt[pnOff+i] ^= m[1+i]
		truncated = truncated<<8 | uint64(pkt[pnOff+i])
	}
	pn = decodePacketNumber(largest, truncated, pnLen)
	k.nonceBuf = k.nonce(pn)
	hdrLen := pnOff + pnLen
	payload, err = k.aead.Open(pkt[hdrLen:hdrLen], k.nonceBuf[:], pkt[hdrLen:], pkt[:hdrLen])
	if err != nil {
		return 0, 0, nil, errUnprotect
	}
	return pn, pnLen, payload, nil
}

// protect seals the packet pkt, whose header (up to and including the
// packet number) is written in the clear and whose payload plaintext follows
// with room for the tag at the end of pkt, then applies header protection.
func (k *initialKeys) protect(pkt []byte, pnOff, pnLen int, pn uint64) {
	hdrLen := pnOff + pnLen
	k.nonceBuf = k.nonce(pn)
	k.aead.Seal(pkt[hdrLen:hdrLen], k.nonceBuf[:], pkt[hdrLen:len(pkt)-aeadTagLen], pkt[:hdrLen])
	m := k.mask(pkt, pnOff)
	pkt[0] ^= m[0] & 0x0f
	for i := range pnLen {
		pkt[pnOff+i] ^= m[1+i]
	}
}

// decodePacketNumber expands a truncated packet number
// (RFC 9000, Appendix A.3).
func decodePacketNumber(largest int64, truncated uint64, pnLen int) uint64 {
	expected := uint64(largest + 1)
	win := uint64(1) << (pnLen * 8)
	hwin := win / 2
	mask := win - 1
	candidate := (expected &^ mask) | truncated
	switch {
	case candidate+hwin <= expected && candidate < 1<<62-win:
		return candidate + win
	case candidate > expected+hwin && candidate >= win:
		return candidate - win
	}
	return candidate
}
