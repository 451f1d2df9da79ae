package ech

import (
	"fmt"

	"golang.org/x/crypto/cryptobyte"
)

// TLS codepoints used by this package.
const (
	recordTypeChangeCipherSpec uint8 = 20
	recordTypeAlert            uint8 = 21
	recordTypeHandshake        uint8 = 22

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

	recordHeaderLen    = 5
	handshakeHeaderLen = 4
	maxPlaintext       = 1 << 14 // RFC 8446, Section 5.1
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

	serverName string
	ech        []byte // the encrypted_client_hello extension data, or nil
	echEnd     int    // offset just past the ECH extension data
	hasECH     bool
}

// extensionSet is a bitmap of the 2^16 extension types, for finding
// duplicates in linear time.
type extensionSet [1 << 10]uint64

func (s *extensionSet) add(t uint16) (dup bool) {
	w, b := t>>6, uint64(1)<<(t&63)
	dup = s[w]&b != 0
	s[w] |= b
	return dup
}

// parseClientHelloBody parses a ClientHello body. It returns the bytes after
// the structure: for a handshake message they must be empty, for an
// EncodedClientHelloInner they are the padding.
func parseClientHelloBody(body []byte, scratch []extension) (*clientHello, []byte, error) {
	s := cryptobyte.String(body)
	ch := &clientHello{exts: scratch[:0]}
	var random, sid, suites, comp cryptobyte.String
	if !s.ReadUint16(&ch.vers) || !s.ReadBytes((*[]byte)(&random), 32) ||
		!s.ReadUint8LengthPrefixed(&sid) || !s.ReadUint16LengthPrefixed(&suites) ||
		!s.ReadUint8LengthPrefixed(&comp) {
		return nil, nil, fmt.Errorf("%w: truncated ClientHello", ErrDecodeError)
	}
	if len(sid) > 32 || len(suites) < 2 || len(suites)%2 != 0 || len(comp) < 1 {
		return nil, nil, fmt.Errorf("%w: ClientHello field length", ErrDecodeError)
	}
	ch.random, ch.sessionID, ch.cipherSuites, ch.compression = random, sid, suites, comp
	if len(s) == 0 {
		// A ClientHello without extensions is valid before TLS 1.3.
		return ch, s, nil
	}
	var exts cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&exts) {
		return nil, nil, fmt.Errorf("%w: truncated extensions", ErrDecodeError)
	}
	var seen extensionSet
	for !exts.Empty() {
		var e extension
		var data cryptobyte.String
		if !exts.ReadUint16(&e.typ) || !exts.ReadUint16LengthPrefixed(&data) {
			return nil, nil, fmt.Errorf("%w: truncated extension", ErrDecodeError)
		}
		e.data = data
		e.end = len(body) - len(s) - len(exts)
		// RFC 8446, Section 4.2: at most one extension of each type.
		if seen.add(e.typ) {
			return nil, nil, fmt.Errorf("%w: duplicate extension 0x%04x", ErrIllegalParameter, e.typ)
		}
		switch e.typ {
		case extensionServerName:
			name, err := parseServerName(data)
			if err != nil {
				return nil, nil, err
			}
			ch.serverName = name
		case extensionECH:
			ch.ech, ch.echEnd, ch.hasECH = data, e.end, true
		}
		ch.exts = append(ch.exts, e)
	}
	return ch, s, nil
}

// parseClientHello parses a whole ClientHello handshake message body.
func parseClientHello(body []byte, exts []extension) (*clientHello, error) {
	ch, rest, err := parseClientHelloBody(body, exts)
	if err != nil {
		return nil, err
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: trailing data after ClientHello", ErrDecodeError)
	}
	return ch, nil
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
func parseServerName(data []byte) (string, error) {
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() || list.Empty() {
		return "", fmt.Errorf("%w: server_name", ErrDecodeError)
	}
	var name string
	for !list.Empty() {
		var typ uint8
		var host cryptobyte.String
		if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&host) || len(host) == 0 {
			return "", fmt.Errorf("%w: server_name", ErrDecodeError)
		}
		if typ == 0 && name == "" {
			name = string(host)
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
	var out []string
	for !list.Empty() {
		var p cryptobyte.String
		if !list.ReadUint8LengthPrefixed(&p) || len(p) == 0 {
			return nil, fmt.Errorf("%w: application_layer_protocol_negotiation", ErrDecodeError)
		}
		out = append(out, string(p))
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
// typ echTypeInner and a nil echOuter.
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
// (RFC 9849, Section 5.1). It returns the extended buffer and the parse of
// the rebuilt message, which is out[len(dst):].
func appendInnerHello(dst []byte, outer *clientHello, encoded []byte, exts []extension) (out []byte, inner *clientHello, err error) {
	enc, padding, err := parseClientHelloBody(encoded, exts)
	if err != nil {
		return nil, nil, err
	}
	// RFC 9849, Section 5.1: padding is zeros.
	for _, b := range padding {
		if b != 0 {
			return nil, nil, fmt.Errorf("%w: non-zero padding in EncodedClientHelloInner", ErrIllegalParameter)
		}
	}
	// RFC 9849, Section 5.1: the encoded inner legacy_session_id is empty.
	if len(enc.sessionID) != 0 {
		return nil, nil, fmt.Errorf("%w: EncodedClientHelloInner has a legacy_session_id", ErrIllegalParameter)
	}
	b := cryptobyte.NewBuilder(dst)
	b.AddUint8(typeClientHello)
	b.AddUint24LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint16(enc.vers)
		b.AddBytes(enc.random)
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(outer.sessionID) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(enc.cipherSuites) })
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(enc.compression) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			sawOuterExts := false
			for _, e := range enc.exts {
				if e.typ != extensionECHOuterExtensions {
					b.AddUint16(e.typ)
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e.data) })
					continue
				}
				if sawOuterExts {
					b.SetError(fmt.Errorf("%w: ech_outer_extensions repeated", ErrIllegalParameter))
					return
				}
				sawOuterExts = true
				if err := expandOuterExtensions(b, outer.exts, e.data); err != nil {
					b.SetError(err)
					return
				}
			}
		})
	})
	out, err = b.Bytes()
	if err != nil {
		if isSentinel(err) {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("%w: rebuilt ClientHelloInner: %v", ErrDecodeError, err)
	}
	// The rebuilt hello may repeat a type that the inner and the outer
	// extensions both carry: parsing it again catches that as well.
	inner, err = parseClientHello(out[len(dst)+handshakeHeaderLen:], enc.exts[:0])
	if err != nil {
		return nil, nil, err
	}
	// RFC 9849, Section 7.1: the inner hello carries an inner ECH extension.
	if !inner.hasECH {
		return nil, nil, fmt.Errorf("%w: ClientHelloInner lacks encrypted_client_hello", ErrIllegalParameter)
	}
	if typ, _, err := parseECHExtension(inner.ech); err != nil || typ != echTypeInner {
		return nil, nil, fmt.Errorf("%w: ClientHelloInner encrypted_client_hello is not of type inner", ErrIllegalParameter)
	}
	// RFC 9849, Section 7.1: the inner hello must not offer TLS 1.2 or below.
	ok, err := inner.offersOnlyTLS13()
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		return nil, nil, fmt.Errorf("%w: ClientHelloInner offers TLS 1.2 or below", ErrIllegalParameter)
	}
	return out, inner, nil
}

// expandOuterExtensions adds the outer extensions that an
// ech_outer_extensions extension references, in linear time
// (RFC 9849, Section 5.1 and Appendix B):
//
//	ExtensionType OuterExtensions<2..254>;
func expandOuterExtensions(b *cryptobyte.Builder, outer []extension, data []byte) error {
	s := cryptobyte.String(data)
	var refs cryptobyte.String
	if !s.ReadUint8LengthPrefixed(&refs) || !s.Empty() || len(refs) < 2 || len(refs)%2 != 0 {
		return fmt.Errorf("%w: malformed ech_outer_extensions", ErrDecodeError)
	}
	i := 0
	for !refs.Empty() {
		var t uint16
		refs.ReadUint16(&t)
		if t == extensionECH {
			return fmt.Errorf("%w: ech_outer_extensions references encrypted_client_hello", ErrIllegalParameter)
		}
		for i < len(outer) && outer[i].typ != t {
			i++
		}
		if i == len(outer) {
			return fmt.Errorf("%w: ech_outer_extensions references 0x%04x, missing or out of order", ErrIllegalParameter, t)
		}
		b.AddUint16(t)
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(outer[i].data) })
		i++
	}
	return nil
}

// appendRecords appends msg to dst as handshake records of at most
// maxPlaintext bytes each, with record version vers.
func appendRecords(dst []byte, vers uint16, msg []byte) []byte {
	for len(msg) > 0 {
		n := min(len(msg), maxPlaintext)
		dst = append(dst, recordTypeHandshake, byte(vers>>8), byte(vers), byte(n>>8), byte(n))
		dst = append(dst, msg[:n]...)
		msg = msg[n:]
	}
	return dst
}
