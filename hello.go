package ech

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/crypto/cryptobyte"
)

// TLS codepoints used by this package.
const (
	typeClientHello uint8 = 1
	typeServerHello uint8 = 2

	extensionServerName         uint16 = 0
	extensionALPN               uint16 = 16
	extensionSupportedVersions  uint16 = 43
	extensionECHOuterExtensions uint16 = 0xfd00
	extensionECH                uint16 = 0xfe0d

	echTypeOuter uint8 = 0
	echTypeInner uint8 = 1

	versionTLS13 uint16 = 0x0304
)

// extension is one ClientHello extension. data aliases the hello.
type extension struct {
	typ  uint16
	data []byte
	end  int // offset just past data in the hello body
}

// clientHello is a parsed ClientHello body (RFC 8446, Section 4.1.2):
//
//	struct {
//	    ProtocolVersion legacy_version = 0x0303;
//	    Random random;
//	    opaque legacy_session_id<0..32>;
//	    CipherSuite cipher_suites<2..2^16-2>;
//	    opaque legacy_compression_methods<1..2^8-1>;
//	    Extension extensions<8..2^16-1>;
//	} ClientHello;
//
// Its slices alias the parsed bytes.
type clientHello struct {
	vers         uint16
	random       []byte
	sessionID    []byte
	cipherSuites []byte
	compression  []byte
	exts         []extension

	serverName []byte // the host_name, aliasing the hello, or nil
	ech        []byte // the encrypted_client_hello extension data, or nil
	echEnd     int    // offset just past the ECH extension data
	hasECH     bool
}

// errDuplicateExtension reports an extension type that appears twice.
var errDuplicateExtension = fmt.Errorf("%w: duplicate extension", ErrDecodeError)

// extensionSet is a bitmap of the 2^16 extension types, for finding
// duplicates in linear time.
type extensionSet [1 << 10]uint64

func (s *extensionSet) add(t uint16) (dup bool) {
	w, b := t>>6, uint64(1)<<(t&63)
	dup = s[w]&b != 0
	s[w] |= b
	return dup
}

// parseClientHelloBody parses a ClientHello body into ch, reusing the
// capacity of ch.exts. It returns the bytes after the structure: for a
// handshake message they must be empty, for an EncodedClientHelloInner they
// are the padding.
func parseClientHelloBody(ch *clientHello, body []byte) ([]byte, error) {
	s := cryptobyte.String(body)
	*ch = clientHello{exts: ch.exts[:0]}
	var random, sid, suites, comp cryptobyte.String
	if !s.ReadUint16(&ch.vers) || !s.ReadBytes((*[]byte)(&random), 32) ||
		!s.ReadUint8LengthPrefixed(&sid) || !s.ReadUint16LengthPrefixed(&suites) ||
		!s.ReadUint8LengthPrefixed(&comp) {
		return nil, fmt.Errorf("%w: truncated ClientHello", ErrDecodeError)
	}
	if len(sid) > 32 || len(suites) < 2 || len(suites)%2 != 0 || len(comp) < 1 {
		return nil, fmt.Errorf("%w: ClientHello field length", ErrDecodeError)
	}
	ch.random, ch.sessionID, ch.cipherSuites, ch.compression = random, sid, suites, comp
	if len(s) == 0 {
		// A ClientHello without extensions is valid before TLS 1.3.
		return s, nil
	}
	var exts cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&exts) {
		return nil, fmt.Errorf("%w: truncated extensions", ErrDecodeError)
	}
	var seen extensionSet
	for !exts.Empty() {
		var e extension
		var data cryptobyte.String
		if !exts.ReadUint16(&e.typ) || !exts.ReadUint16LengthPrefixed(&data) {
			return nil, fmt.Errorf("%w: truncated extension", ErrDecodeError)
		}
		e.data = data
		e.end = len(body) - len(s) - len(exts)
		// RFC 8446, Section 4.2: at most one extension of each type; like
		// crypto/tls, a repeated one is a decode_error. RFC 9849, Section
		// 5.1: a repeated ech_outer_extensions is illegal_parameter.
		if seen.add(e.typ) {
			if e.typ == extensionECHOuterExtensions {
				return nil, fmt.Errorf("%w: ech_outer_extensions repeated", ErrIllegalParameter)
			}
			return nil, fmt.Errorf("%w 0x%04x", errDuplicateExtension, e.typ)
		}
		switch e.typ {
		case extensionServerName:
			name, err := parseServerName(data)
			if err != nil {
				return nil, err
			}
			ch.serverName = name
		case extensionECH:
			ch.ech, ch.echEnd, ch.hasECH = data, e.end, true
		}
		ch.exts = append(ch.exts, e)
	}
	return s, nil
}

// parseClientHello parses a whole ClientHello handshake message body into
// ch, reusing the capacity of ch.exts.
func parseClientHello(ch *clientHello, body []byte) error {
	rest, err := parseClientHelloBody(ch, body)
	if err != nil {
		return err
	}
	if len(rest) != 0 {
		return fmt.Errorf("%w: trailing data after ClientHello", ErrDecodeError)
	}
	return nil
}

// parseServerName returns the host_name of a server_name extension
// (RFC 6066, Section 3):
//
//	struct {
//	    NameType name_type;
//	    select (name_type) { case host_name: HostName; } name;
//	} ServerName;
//	opaque HostName<1..2^16-1>;
//	struct { ServerName server_name_list<1..2^16-1> } ServerNameList;
//
// The name aliases data: only the names the Conn keeps become strings.
func parseServerName(data []byte) ([]byte, error) {
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() || list.Empty() {
		return nil, fmt.Errorf("%w: server_name", ErrDecodeError)
	}
	var name []byte
	for !list.Empty() {
		var typ uint8
		var host cryptobyte.String
		if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&host) || len(host) == 0 {
			return nil, fmt.Errorf("%w: server_name", ErrDecodeError)
		}
		if typ == 0 && name == nil {
			name = host
		}
	}
	return name, nil
}

// parseALPN returns the protocols of an ALPN extension (RFC 7301):
//
//	opaque ProtocolName<1..2^8-1>;
//	struct { ProtocolName protocol_name_list<2..2^16-1> } ProtocolNameList;
func parseALPN(data []byte) ([]string, error) {
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() || list.Empty() {
		return nil, fmt.Errorf("%w: application_layer_protocol_negotiation", ErrDecodeError)
	}
	// One string for all names, sliced: two allocations per hello.
	all := string(list)
	n, off := 0, 0
	for l := list; !l.Empty(); n++ {
		var p cryptobyte.String
		if !l.ReadUint8LengthPrefixed(&p) || len(p) == 0 {
			return nil, fmt.Errorf("%w: application_layer_protocol_negotiation", ErrDecodeError)
		}
	}
	out := make([]string, n)
	for i := range out {
		l := int(all[off])
		out[i] = all[off+1 : off+1+l]
		off += 1 + l
	}
	return out, nil
}

// alpn returns the client's ALPN protocols.
func (ch *clientHello) alpn() ([]string, error) {
	for _, e := range ch.exts {
		if e.typ == extensionALPN {
			return parseALPN(e.data)
		}
	}
	return nil, nil
}

// offersOnlyTLS13 reports whether the hello offers TLS 1.3 or later and
// nothing older, ignoring GREASE values (RFC 8701).
func (ch *clientHello) offersOnlyTLS13() (bool, error) {
	for _, e := range ch.exts {
		if e.typ != extensionSupportedVersions {
			continue
		}
		s := cryptobyte.String(e.data)
		var list cryptobyte.String
		if !s.ReadUint8LengthPrefixed(&list) || !s.Empty() || len(list) < 2 || len(list)%2 != 0 {
			return false, fmt.Errorf("%w: supported_versions", ErrDecodeError)
		}
		tls13 := false
		for !list.Empty() {
			var v uint16
			list.ReadUint16(&v)
			switch {
			case v&0x0f0f == 0x0a0a && v>>8 == v&0xff: // GREASE
			case v >= versionTLS13:
				tls13 = true
			default:
				return false, nil
			}
		}
		return tls13, nil
	}
	return false, nil // legacy_version alone cannot offer TLS 1.3
}

// echOuter is the outer encrypted_client_hello extension
// (RFC 9849, Section 5):
//
//	struct {
//	   ECHClientHelloType type;
//	   select (ECHClientHello.type) {
//	       case outer:
//	           HpkeSymmetricCipherSuite cipher_suite;
//	           uint8 config_id;
//	           opaque enc<0..2^16-1>;
//	           opaque payload<1..2^16-1>;
//	       case inner:
//	           Empty;
//	   };
//	} ECHClientHello;
type echOuter struct {
	suite    CipherSuite
	configID uint8
	enc      []byte
	payload  []byte
}

// parseECHExtension parses the extension data. An inner extension returns
// typ echTypeInner and a zero echOuter.
func parseECHExtension(data []byte) (typ uint8, e echOuter, err error) {
	s := cryptobyte.String(data)
	if !s.ReadUint8(&typ) {
		return 0, e, fmt.Errorf("%w: empty encrypted_client_hello", ErrDecodeError)
	}
	switch typ {
	case echTypeInner:
		if !s.Empty() {
			return 0, e, fmt.Errorf("%w: inner encrypted_client_hello not empty", ErrDecodeError)
		}
		return typ, e, nil
	case echTypeOuter:
	default:
		return 0, e, fmt.Errorf("%w: encrypted_client_hello type %d", ErrIllegalParameter, typ)
	}
	var kdf, aead uint16
	var enc, payload cryptobyte.String
	if !s.ReadUint16(&kdf) || !s.ReadUint16(&aead) || !s.ReadUint8(&e.configID) ||
		!s.ReadUint16LengthPrefixed(&enc) || !s.ReadUint16LengthPrefixed(&payload) ||
		!s.Empty() || len(payload) == 0 {
		return 0, e, fmt.Errorf("%w: malformed encrypted_client_hello", ErrDecodeError)
	}
	e.suite = CipherSuite{KDFID(kdf), AEADID(aead)}
	e.enc, e.payload = enc, payload
	return typ, e, nil
}

// outerAAD writes into dst the ClientHelloOuterAAD: the outer ClientHello
// body with the ECH payload replaced by zeros (RFC 9849, Section 5.2).
func outerAAD(dst, body []byte, ch *clientHello, payloadLen int) []byte {
	dst = append(dst[:0], body...)
	clear(dst[ch.echEnd-payloadLen : ch.echEnd])
	return dst
}

// appendInnerHello decodes an EncodedClientHelloInner against the outer
// hello and appends the ClientHelloInner, as a handshake message, to dst
// (RFC 9849, Section 5.1). It parses the encoded hello into enc and the
// rebuilt one into inner, and returns the extended buffer; the rebuilt
// message is out[len(dst):].
func appendInnerHello(dst []byte, outer *clientHello, encoded []byte, enc, inner *clientHello) (out []byte, err error) {
	padding, err := parseClientHelloBody(enc, encoded)
	if err != nil {
		return nil, err
	}
	// RFC 9849, Section 5.1: padding is zeros.
	for _, b := range padding {
		if b != 0 {
			return nil, fmt.Errorf("%w: non-zero padding in EncodedClientHelloInner", ErrIllegalParameter)
		}
	}
	// RFC 9849, Section 5.1: the encoded inner legacy_session_id is empty,
	// and the outer one is copied in.
	if len(enc.sessionID) != 0 {
		return nil, fmt.Errorf("%w: EncodedClientHelloInner has a legacy_session_id", ErrIllegalParameter)
	}
	out = append(dst, typeClientHello, 0, 0, 0)
	out = binary.BigEndian.AppendUint16(out, enc.vers)
	out = append(out, enc.random...)
	out = append(out, byte(len(outer.sessionID)))
	out = append(out, outer.sessionID...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(enc.cipherSuites)))
	out = append(out, enc.cipherSuites...)
	out = append(out, byte(len(enc.compression)))
	out = append(out, enc.compression...)
	extStart := len(out)
	out = append(out, 0, 0)
	sawOuterExts := false
	for _, e := range enc.exts {
		if e.typ != extensionECHOuterExtensions {
			out = appendExtension(out, e.typ, e.data)
			continue
		}
		if sawOuterExts {
			return nil, fmt.Errorf("%w: ech_outer_extensions repeated", ErrIllegalParameter)
		}
		sawOuterExts = true
		if out, err = expandOuterExtensions(out, outer.exts, e.data); err != nil {
			return nil, err
		}
	}
	extLen, msgLen := len(out)-extStart-2, len(out)-len(dst)-handshakeHeaderLen
	if extLen > 0xffff {
		return nil, fmt.Errorf("%w: rebuilt ClientHelloInner extensions over 65535 bytes", ErrIllegalParameter)
	}
	binary.BigEndian.PutUint16(out[extStart:], uint16(extLen))
	out[len(dst)+1], out[len(dst)+2], out[len(dst)+3] = byte(msgLen>>16), byte(msgLen>>8), byte(msgLen)

	// The rebuilt hello may repeat a type that the inner and the outer
	// extensions both carry: parsing it again catches that as well, and it
	// is a bad ech_outer_extensions reference.
	if err := parseClientHello(inner, out[len(dst)+handshakeHeaderLen:]); err != nil {
		if errors.Is(err, errDuplicateExtension) {
			return nil, fmt.Errorf("%w: ech_outer_extensions references a type the inner hello has", ErrIllegalParameter)
		}
		return nil, err
	}
	// RFC 9849, Section 7.1: the inner hello carries an inner ECH extension.
	if !inner.hasECH {
		return nil, fmt.Errorf("%w: ClientHelloInner lacks encrypted_client_hello", ErrIllegalParameter)
	}
	if typ, _, err := parseECHExtension(inner.ech); err != nil || typ != echTypeInner {
		return nil, fmt.Errorf("%w: ClientHelloInner encrypted_client_hello is not of type inner", ErrIllegalParameter)
	}
	// RFC 9849, Section 7.1: the inner hello must not offer TLS 1.2 or below.
	ok, err := inner.offersOnlyTLS13()
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: ClientHelloInner offers TLS 1.2 or below", ErrIllegalParameter)
	}
	return out, nil
}

func appendExtension(out []byte, typ uint16, data []byte) []byte {
	out = binary.BigEndian.AppendUint16(out, typ)
	out = binary.BigEndian.AppendUint16(out, uint16(len(data)))
	return append(out, data...)
}

// expandOuterExtensions appends the outer extensions that an
// ech_outer_extensions extension references, in linear time
// (RFC 9849, Section 5.1 and Appendix B):
//
//	ExtensionType OuterExtensions<2..254>;
func expandOuterExtensions(out []byte, outer []extension, data []byte) ([]byte, error) {
	s := cryptobyte.String(data)
	var refs cryptobyte.String
	if !s.ReadUint8LengthPrefixed(&refs) || !s.Empty() || len(refs) < 2 || len(refs)%2 != 0 {
		return nil, fmt.Errorf("%w: malformed ech_outer_extensions", ErrDecodeError)
	}
	i := 0
	for !refs.Empty() {
		var t uint16
		refs.ReadUint16(&t)
		switch t {
		case extensionECH:
			return nil, fmt.Errorf("%w: ech_outer_extensions references encrypted_client_hello", ErrIllegalParameter)
		case extensionECHOuterExtensions:
			// RFC 9849, Section 5.1: ech_outer_extensions is in neither
			// hello, so it cannot be copied from one into the other.
			return nil, fmt.Errorf("%w: ech_outer_extensions references ech_outer_extensions", ErrIllegalParameter)
		}
		for i < len(outer) && outer[i].typ != t {
			i++
		}
		if i == len(outer) {
			return nil, fmt.Errorf("%w: ech_outer_extensions references 0x%04x, missing or out of order", ErrIllegalParameter, t)
		}
		out = appendExtension(out, t, outer[i].data)
		i++
	}
	return out, nil
}
