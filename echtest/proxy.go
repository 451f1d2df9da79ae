package echtest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// ProxyHeader is a PROXY protocol header (version 1 or 2, as HAProxy
// specifies it) that a [Backend] read before the connection's data.
type ProxyHeader struct {
	// Version is 1 (the text form) or 2 (the binary form).
	Version int
	// Local reports a version 2 LOCAL command: the frontend's own
	// connection, with no client addresses.
	Local bool
	// Source and Destination are the client's address and the address it
	// connected to, or nil for LOCAL and UNKNOWN.
	Source, Destination net.Addr
	// Authority is the PP2_TYPE_AUTHORITY TLV: the server name the client
	// asked for.
	Authority string
	// ALPN is the PP2_TYPE_ALPN TLV: the negotiated application protocol.
	ALPN string
	// SSL reports a PP2_TYPE_SSL TLV with the PP2_CLIENT_SSL bit: the
	// client connected to the frontend over TLS. SSLVersion is its
	// PP2_SUBTYPE_SSL_VERSION, such as "TLSv1.3".
	SSL        bool
	SSLVersion string
	// TLVs holds every version 2 TLV by type, sub-TLVs not split.
	TLVs map[byte][]byte
}

// PROXY protocol version 2 constants.
const (
	proxyV2Sig          = "\r\n\r\n\x00\r\nQUIT\n"
	proxyTLVALPN        = 0x01
	proxyTLVAuthority   = 0x02
	proxyTLVSSL         = 0x20
	proxySubSSLVersion  = 0x21
	proxyClientSSL      = 0x01
	proxyMaxV1Line      = 107 // the longest v1 line, CRLF included
	proxyMaxV2Addresses = 216 // the AF_UNIX pair, the largest address block
)

var errProxyHeader = errors.New("echtest: malformed PROXY header")

// readProxyHeader reads a PROXY header from r if the stream starts with
// one, and returns nil otherwise, reading nothing more.
func readProxyHeader(r *bufio.Reader) (*ProxyHeader, error) {
	b, err := r.Peek(len(proxyV2Sig))
	switch {
	case err == nil && string(b) == proxyV2Sig:
		return readProxyV2(r)
	case len(b) >= 6 && string(b[:6]) == "PROXY ":
		return readProxyV1(r)
	case err != nil && len(b) == 0:
		return nil, err
	}
	return nil, nil
}

func readProxyV1(r *bufio.Reader) (*ProxyHeader, error) {
	var line []byte
	for len(line) < proxyMaxV1Line {
		c, err := r.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("%w: v1: %v", errProxyHeader, err)
		}
		line = append(line, c)
		if bytes.HasSuffix(line, []byte("\r\n")) {
			break
		}
	}
	if !bytes.HasSuffix(line, []byte("\r\n")) {
		return nil, fmt.Errorf("%w: v1 line longer than %d bytes", errProxyHeader, proxyMaxV1Line)
	}
	f := strings.Fields(string(line[:len(line)-2]))
	h := &ProxyHeader{Version: 1}
	if len(f) == 2 && f[1] == "UNKNOWN" {
		return h, nil
	}
	if len(f) != 6 || (f[1] != "TCP4" && f[1] != "TCP6") {
		return nil, fmt.Errorf("%w: v1 line %q", errProxyHeader, line)
	}
	src, err1 := parseAddrPort(f[2], f[4])
	dst, err2 := parseAddrPort(f[3], f[5])
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("%w: v1: %v", errProxyHeader, err)
	}
	h.Source, h.Destination = src, dst
	return h, nil
}

func parseAddrPort(ip, port string) (net.Addr, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return nil, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return nil, err
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, uint16(p))), nil
}

func readProxyV2(r *bufio.Reader) (*ProxyHeader, error) {
	var hdr [16]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: v2: %v", errProxyHeader, err)
	}
	verCmd, fam := hdr[12], hdr[13]
	n := int(binary.BigEndian.Uint16(hdr[14:]))
	if verCmd>>4 != 2 || verCmd&0xf > 1 {
		return nil, fmt.Errorf("%w: v2 version/command 0x%02x", errProxyHeader, verCmd)
	}
	body := make([]byte, n) // at most 64 KiB, by the length's width
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("%w: v2 body: %v", errProxyHeader, err)
	}
	h := &ProxyHeader{Version: 2, Local: verCmd&0xf == 0, TLVs: map[byte][]byte{}}
	var alen int
	switch fam >> 4 {
	case 1: // AF_INET
		alen = 12
		if len(body) >= alen && !h.Local {
			h.Source = tcpAddr(body[0:4], body[8:10])
			h.Destination = tcpAddr(body[4:8], body[10:12])
		}
	case 2: // AF_INET6
		alen = 36
		if len(body) >= alen && !h.Local {
			h.Source = tcpAddr(body[0:16], body[32:34])
			h.Destination = tcpAddr(body[16:32], body[34:36])
		}
	case 3: // AF_UNIX
		alen = proxyMaxV2Addresses
	}
	if len(body) < alen {
		return nil, fmt.Errorf("%w: v2 address block of %d bytes", errProxyHeader, len(body))
	}
	for tlvs := body[alen:]; len(tlvs) > 0; {
		t, v, rest, ok := cutTLV(tlvs)
		if !ok {
			return nil, fmt.Errorf("%w: v2 TLV cut", errProxyHeader)
		}
		tlvs = rest
		h.TLVs[t] = v
		switch t {
		case proxyTLVALPN:
			h.ALPN = string(v)
		case proxyTLVAuthority:
			h.Authority = string(v)
		case proxyTLVSSL:
			// uint8 client; uint32 verify; struct pp2_tlv sub_tlv[0];
			if len(v) < 5 {
				return nil, fmt.Errorf("%w: PP2_TYPE_SSL of %d bytes", errProxyHeader, len(v))
			}
			h.SSL = v[0]&proxyClientSSL != 0
			for sub := v[5:]; len(sub) > 0; {
				st, sv, rest, ok := cutTLV(sub)
				if !ok {
					return nil, fmt.Errorf("%w: PP2_TYPE_SSL sub-TLV cut", errProxyHeader)
				}
				if st == proxySubSSLVersion {
					h.SSLVersion = string(sv)
				}
				sub = rest
			}
		}
	}
	return h, nil
}

func tcpAddr(ip, port []byte) net.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(a.Unmap(), binary.BigEndian.Uint16(port)))
}

// cutTLV splits the first TLV off b:
//
//	struct pp2_tlv { uint8_t type; uint8_t length_hi; uint8_t length_lo; uint8_t value[0]; };
func cutTLV(b []byte) (t byte, v, rest []byte, ok bool) {
	if len(b) < 3 {
		return 0, nil, nil, false
	}
	n := 3 + int(binary.BigEndian.Uint16(b[1:3]))
	if len(b) < n {
		return 0, nil, nil, false
	}
	return b[0], b[3:n], b[n:], true
}
