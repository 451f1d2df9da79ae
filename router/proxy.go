package router

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/crypto/cryptobyte"
)

// PROXY protocol version 2 (HAProxy's proxy-protocol.txt, Section 2.2):
//
//	struct {
//	    uint8 sig[12];
//	    uint8 ver_cmd;  // version 2 in the high nibble, command in the low
//	    uint8 fam;      // address family in the high nibble, transport in the low
//	    uint16 len;     // bytes that follow: addresses, then TLVs
//	    ...
//	} proxy_hdr_v2;
var proxyV2Signature = [12]byte{0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a}

const (
	proxyV2VersionLocal uint8 = 0x20 // version 2, LOCAL: no addresses
	proxyV2VersionProxy uint8 = 0x21 // version 2, PROXY: addresses follow
	proxyFamUnspec      uint8 = 0x00
	proxyFamTCP4        uint8 = 0x11 // AF_INET, STREAM: 4+4+2+2 address bytes
	proxyFamTCP6        uint8 = 0x21 // AF_INET6, STREAM: 16+16+2+2 address bytes

	// TLV types (Section 2.2.x).
	pp2TypeALPN          uint8 = 0x01
	pp2TypeAuthority     uint8 = 0x02 // the server name the client asked for
	pp2TypeSSL           uint8 = 0x20 // the client connected over TLS (Section 2.2.5)
	pp2SubtypeSSLVersion uint8 = 0x21 // inside PP2_TYPE_SSL: "TLSv1.3"

	// Bits of pp2_tlv_ssl.client (Section 2.2.5).
	pp2ClientSSL uint8 = 0x01 // the client connected over SSL/TLS
)

// ErrInvalidServerName reports a server name that is not a DNS host name
// of LDH labels, which the router refuses to pass to a backend.
var ErrInvalidServerName = errors.New("router: server name is not a DNS host name")

// checkServerName returns nil if name is a DNS host name: dot-separated LDH
// labels (letters, digits, hyphens; RFC 5890, Section 2.3.1) of 1 to 63
// bytes that neither start nor end with a hyphen, at most 253 bytes in all,
// with no trailing dot (RFC 6066, Section 3). The error does not quote the
// name: it may be a hidden inner name, and it may hold control bytes.
func checkServerName(name string) error {
	if len(name) == 0 || len(name) > 253 {
		return fmt.Errorf("%w: %d bytes", ErrInvalidServerName, len(name))
	}
	start := 0
	for i := 0; i <= len(name); i++ {
		if i < len(name) && name[i] != '.' {
			c := name[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Errorf("%w: byte 0x%02x at offset %d", ErrInvalidServerName, c, i)
			}
			continue
		}
		label := name[start:i]
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%w: bad label at offset %d", ErrInvalidServerName, start)
		}
		start = i + 1
	}
	return nil
}

// sslVersionName is the PP2_SUBTYPE_SSL_VERSION string for a TLS version,
// as OpenSSL's SSL_get_version spells it, which HAProxy sends and servers
// such as Dovecot log.
func sslVersionName(v uint16) (string, bool) {
	switch v {
	case tls.VersionTLS10:
		return "TLSv1", true
	case tls.VersionTLS11:
		return "TLSv1.1", true
	case tls.VersionTLS12:
		return "TLSv1.2", true
	case tls.VersionTLS13:
		return "TLSv1.3", true
	}
	return "", false
}

// appendProxyHeader appends a PROXY v2 header for a connection from src to
// dst, with the authority (server name) and ALPN TLVs when they are not
// empty. Addresses that are not TCP give a LOCAL header.
//
// tlsVersion is the TLS version the router negotiated with the client when
// it terminated TLS itself, or 0 when it did not (passthrough). When it is
// set the header carries PP2_TYPE_SSL with PP2_CLIENT_SSL, verify 0 (no
// client certificate was asked for, which OpenSSL reports as X509_V_OK) and
// the version, as HAProxy's send-proxy-v2-ssl does: a backend such as
// Dovecot then treats the plaintext connection as secured.
//
// An authority that is not a DNS host name gives an error wrapping
// [ErrInvalidServerName].
func appendProxyHeader(buf []byte, src, dst net.Addr, authority, alpn string, tlsVersion uint16) ([]byte, error) {
	if authority != "" {
		if err := checkServerName(authority); err != nil {
			return nil, err
		}
	}
	var sslVersion string
	if tlsVersion != 0 {
		var ok bool
		if sslVersion, ok = sslVersionName(tlsVersion); !ok {
			return nil, fmt.Errorf("router: PROXY header: unknown TLS version 0x%04x", tlsVersion)
		}
	}
	var s, d netip.AddrPort
	st, ok1 := src.(*net.TCPAddr)
	dt, ok2 := dst.(*net.TCPAddr)
	if ok1 && ok2 {
		s, d = st.AddrPort(), dt.AddrPort()
	}
	b := cryptobyte.NewBuilder(buf)
	b.AddBytes(proxyV2Signature[:])
	switch {
	case !s.IsValid() || !d.IsValid():
		b.AddUint8(proxyV2VersionLocal)
		b.AddUint8(proxyFamUnspec)
	case s.Addr().Unmap().Is4() && d.Addr().Unmap().Is4():
		b.AddUint8(proxyV2VersionProxy)
		b.AddUint8(proxyFamTCP4)
	default:
		b.AddUint8(proxyV2VersionProxy)
		b.AddUint8(proxyFamTCP6)
	}
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		if s.IsValid() && d.IsValid() {
			sa, da := s.Addr().Unmap(), d.Addr().Unmap()
			if sa.Is4() && da.Is4() {
				b.AddBytes(sa.AsSlice())
				b.AddBytes(da.AsSlice())
			} else {
				s16, d16 := sa.As16(), da.As16()
				b.AddBytes(s16[:])
				b.AddBytes(d16[:])
			}
			b.AddUint16(s.Port())
			b.AddUint16(d.Port())
		}
		addTLV := func(b *cryptobyte.Builder, typ uint8, v string) {
			if v == "" {
				return
			}
			b.AddUint8(typ)
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(v)) })
		}
		addTLV(b, pp2TypeAuthority, authority)
		addTLV(b, pp2TypeALPN, alpn)
		if sslVersion != "" {
			// Section 2.2.5:
			//   struct pp2_tlv_ssl {
			//       uint8_t  client;
			//       uint32_t verify;
			//       struct pp2_tlv sub_tlv[0];
			//   };
			b.AddUint8(pp2TypeSSL)
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
				b.AddUint8(pp2ClientSSL)
				// NOTE: the spec reads verify as "a client certificate
				// verified"; HAProxy sends OpenSSL's verify result, which
				// is X509_V_OK (0) when none was asked for, and so do we.
				b.AddUint32(0)
				addTLV(b, pp2SubtypeSSLVersion, sslVersion)
			})
		}
	})
	out, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("router: building PROXY header: %w", err)
	}
	return out, nil
}
