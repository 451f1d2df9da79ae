package echtest_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// myRouter is the kind of frontend a project writes on ech.NewConn, and
// tests with echtest's backends: web.example passes through to an
// ECH-aware TLS backend, mail.example is terminated here and forwarded in
// plaintext after a PROXY v2 header.
func myRouter(t *testing.T, keys *ech.KeySet, ca *echtest.CA, web, mail string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(keys))
				if err != nil {
					return
				}
				var client net.Conn = c
				backend := web
				if c.ServerName() == "mail.example" {
					tc := tls.Server(c, &tls.Config{GetCertificate: ca.GetCertificate})
					if tc.Handshake() != nil {
						return
					}
					client, backend = tc, mail
				}
				b, err := net.Dial("tcp", backend)
				if err != nil {
					return
				}
				defer b.Close()
				if backend == mail {
					b.Write(proxyV2(conn.RemoteAddr(), conn.LocalAddr(), c.ServerName()))
				}
				go io.Copy(b, client)
				io.Copy(client, b)
			}()
		}
	}()
	return ln.Addr().String()
}

// proxyV2 returns a PROXY v2 header with the authority and SSL TLVs.
func proxyV2(src, dst net.Addr, authority string) []byte {
	s, d := src.(*net.TCPAddr).AddrPort(), dst.(*net.TCPAddr).AddrPort()
	tlvs := append([]byte{0x02, 0, byte(len(authority))}, authority...)
	ssl := append([]byte{0x01, 0, 0, 0, 0, 0x21, 0, 7}, "TLSv1.3"...)
	tlvs = append(append(tlvs, 0x20, 0, byte(len(ssl))), ssl...)
	h := []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11")
	h = binary.BigEndian.AppendUint16(h, uint16(12+len(tlvs)))
	h = append(h, s.Addr().Unmap().AsSlice()...)
	h = append(h, d.Addr().Unmap().AsSlice()...)
	h = binary.BigEndian.AppendUint16(h, s.Port())
	h = binary.BigEndian.AppendUint16(h, d.Port())
	return append(h, tlvs...)
}

// TestMyRouter is the README's test of a project's own router.
func TestMyRouter(t *testing.T) {
	keys, ca := echtest.NewKeySet(t, "public.example"), echtest.NewCA(t)
	web, mail := echtest.NewTLSBackend(t, ca), echtest.NewPlainBackend(t)
	addr := myRouter(t, keys, ca, web.Addr, mail.Addr)

	conn := echtest.DialFrontend(t, addr, echtest.ClientConfig(keys, ca, "web.example"))
	require.True(t, conn.ConnectionState().ECHAccepted)
	got := web.WaitConns(t, 1)[0]
	assert.Equal(t, "web.example", got.ServerName)
	assert.True(t, got.InnerHello, "the backend got the ClientHelloInner")

	cfg := echtest.ClientConfig(keys, ca, "mail.example")
	cfg.NextProtos = []string{"imap"}
	conn = echtest.DialFrontend(t, addr, cfg)
	require.True(t, conn.ConnectionState().ECHAccepted)
	_, err := conn.Write([]byte("a LOGIN\r\n"))
	require.NoError(t, err)
	line, err := bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "a LOGIN\r\n", line, "echoed by the plain backend")
	m := mail.WaitConns(t, 1)[0]
	require.NotNil(t, m.Proxy)
	assert.Equal(t, "mail.example", m.Proxy.Authority)
	assert.True(t, m.Proxy.SSL)
	assert.Equal(t, "TLSv1.3", m.Proxy.SSLVersion)
	assert.Equal(t, conn.LocalAddr().String(), m.Proxy.Source.String(), "the client's address")
	assert.Empty(t, web.Conns()[1:], "nothing else reached the web backend")
}

func TestBackendSeesOuterHello(t *testing.T) {
	// A frontend that forwards everything untouched: a GREASE-like hello
	// (a config the frontend lacks) reaches the backend with its outer ECH.
	ca := echtest.NewCA(t)
	web := echtest.NewTLSBackend(t, ca)
	other := echtest.NewKeySet(t, "public.example")
	cfg := echtest.ClientConfig(other, ca, "web.example")
	_, err := tls.Dial("tcp", web.Addr, cfg)
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej, "the backend has no keys: ECH is rejected")
	got := web.WaitConns(t, 1)[0]
	assert.True(t, got.OuterECH)
	assert.False(t, got.InnerHello)
	assert.Equal(t, "public.example", got.ServerName)
}

func TestProxyHeaders(t *testing.T) {
	src := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 40000}
	dst := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 993}
	v6src := net.TCPAddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::1]:5"))
	tests := []struct {
		name   string
		header []byte
		check  func(t *testing.T, h *echtest.ProxyHeader)
		err    bool
	}{
		{"v1 TCP4", []byte("PROXY TCP4 192.0.2.1 127.0.0.1 40000 993\r\n"), func(t *testing.T, h *echtest.ProxyHeader) {
			assert.Equal(t, 1, h.Version)
			assert.Equal(t, src.String(), h.Source.String())
			assert.Equal(t, dst.String(), h.Destination.String())
		}, false},
		{"v1 TCP6", []byte("PROXY TCP6 2001:db8::1 ::1 5 993\r\n"), func(t *testing.T, h *echtest.ProxyHeader) {
			assert.Equal(t, v6src.String(), h.Source.String())
		}, false},
		{"v1 UNKNOWN", []byte("PROXY UNKNOWN\r\n"), func(t *testing.T, h *echtest.ProxyHeader) {
			assert.Nil(t, h.Source)
		}, false},
		{"v1 garbage", []byte("PROXY TCP4 a b c d\r\n"), nil, true},
		{"v1 no end", append([]byte("PROXY "), make([]byte, 200)...), nil, true},
		{"v2", proxyV2(src, dst, "mail.example"), func(t *testing.T, h *echtest.ProxyHeader) {
			assert.Equal(t, 2, h.Version)
			assert.Equal(t, src.String(), h.Source.String())
			assert.Equal(t, "mail.example", h.Authority)
			assert.True(t, h.SSL)
			assert.Equal(t, "TLSv1.3", h.SSLVersion)
		}, false},
		{"v2 cut TLV", proxyV2(src, dst, "mail.example")[:40], nil, true},
		{"v2 cut SSL sub-TLV", func() []byte {
			h := proxyV2(src, dst, "mail.example")
			h[len(h)-len("TLSv1.3")-1]++ // the sub-TLV claims a byte more than it has
			return h
		}(), nil, true},
		{"none", []byte("a LOGIN\r\n"), func(t *testing.T, h *echtest.ProxyHeader) {
			assert.Nil(t, h)
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := echtest.NewPlainBackend(t)
			c, err := net.Dial("tcp", b.Addr)
			require.NoError(t, err)
			defer c.Close()
			c.Write(append(tc.header, "data\r\n"...))
			if tc.err {
				c.(*net.TCPConn).CloseWrite()
			}
			got := b.WaitConns(t, 1)[0]
			if tc.err {
				require.Error(t, got.Err)
				return
			}
			require.NoError(t, got.Err)
			tc.check(t, got.Proxy)
		})
	}
}
