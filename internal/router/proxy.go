package router

import (
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
	pp2TypeALPN         uint8 = 0x01
	pp2TypeAuthority    uint8 = 0x02 // the server name the client asked for
)

// appendProxyHeader appends a PROXY v2 header for a connection from src to
// dst, with the authority (server name) and ALPN TLVs when they are not
// empty. Addresses that are not TCP give a LOCAL header.
func appendProxyHeader(buf []byte, src, dst net.Addr, authority, alpn string) ([]byte, error) {
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
		addTLV := func(typ uint8, v string) {
			if v == "" {
				return
			}
			b.AddUint8(typ)
			b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(v)) })
		}
		addTLV(pp2TypeAuthority, authority)
		addTLV(pp2TypeALPN, alpn)
	})
	out, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("router: building PROXY header: %w", err)
	}
	return out, nil
}
