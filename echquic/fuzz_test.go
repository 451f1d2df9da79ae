package echquic

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

var fuzzDCID = []byte{0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08}

// FuzzInitial feeds the proxy one client datagram, twice: as given, and
// with its bytes as the plaintext frames of an Initial packet protected
// with the keys of fuzzDCID, so that the frame parser, the CRYPTO
// reassembly and the ClientHello processing see the fuzzer's bytes. Seeds
// are in testdata/fuzz/FuzzInitial: Initials of crypto/tls QUIC
// ClientHellos with and without ECH.
func FuzzInitial(f *testing.F) {
	ks := echtest.NewKeySet(f, publicName)
	list, err := ks.ConfigList()
	if err != nil {
		f.Fatal(err)
	}
	hello := quicHello(f, &tls.Config{ServerName: "secret.example", EncryptedClientHelloConfigList: list, NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13})
	f.Add(cryptoFrameBytes(0, hello))
	f.Add(append(cryptoFrameBytes(100, hello[100:]), cryptoFrameBytes(0, hello[:100])...))
	f.Add(sealInitial(f, version1, fuzzDCID, nil, 0, cryptoFrameBytes(0, hello), minInitialSize))
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		f.Fatal(err)
	}
	defer backend.Close()
	ap := netip.MustParseAddrPort("127.0.0.1:4433")
	p := &Proxy{
		Route:      func(Info) (net.Addr, error) { return backend.LocalAddr(), nil },
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
	}
	p.init()
	defer p.Close()
	rc := &recordingConn{}
	f.Fuzz(func(t *testing.T, data []byte) {
		defer func() {
			p.mu.Lock()
			for _, fl := range p.flows {
				p.closeFlow(fl)
			}
			p.mu.Unlock()
			rc.mu.Lock()
			rc.writes = rc.writes[:0]
			rc.mu.Unlock()
		}()
		if len(data) > 0 {
			p.handle(rc, nil, ap, bytes.Clone(data))
		}
		if len(data) > 4000 {
			return
		}
		for _, v := range []uint32{version1, version2} {
			pkt := sealInitial(t, v, fuzzDCID, []byte{1}, 0, data, minInitialSize)
			p.handle(rc, nil, ap, pkt)
			p.handle(rc, nil, ap, pkt) // a retransmission
		}
		var fr initialFrames
		parseInitialFrames(data, &fr)
	})
}

// FuzzCryptoReassembly writes the frames the input describes, each a 2-byte
// offset and a 1-byte length into a fixed stream, and checks the
// reassembly against a byte map: what is contiguous from the start equals
// the stream, and the ranges stay sorted, disjoint and bounded.
func FuzzCryptoReassembly(f *testing.F) {
	f.Add([]byte{0, 0, 100})
	f.Add([]byte{0, 50, 100, 0, 0, 60, 0, 10, 20})
	f.Add([]byte{0, 200, 10, 0, 100, 10, 0, 0, 255, 0, 90, 200})
	stream := make([]byte, 1<<16+256)
	for i := range stream {
		stream[i] = byte(i * 7)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var c cryptoBuffer
		const limit = 1 << 15
		c.reset(0, limit)
		have := make([]bool, 1<<16+256)
		for len(data) >= 3 {
			off := uint64(binary.BigEndian.Uint16(data))
			n := uint64(data[2])
			data = data[3:]
			err := c.write(off, stream[off:off+n])
			if off+n > limit {
				if err == nil {
					t.Fatalf("write beyond the limit: %d", off+n)
				}
				continue
			}
			if err != nil {
				continue // too many gaps: the connection would be dropped
			}
			for i := off; i < off+n; i++ {
				have[i] = true
			}
		}
		want := 0
		for want < len(have) && have[want] {
			want++
		}
		got := c.contiguous()
		if len(got) != want {
			t.Fatalf("contiguous %d bytes, want %d", len(got), want)
		}
		if !bytes.Equal(got, stream[:want]) {
			t.Fatal("reassembled bytes differ from the stream")
		}
		if len(c.ranges) > maxCryptoRanges {
			t.Fatalf("%d ranges", len(c.ranges))
		}
		for i, r := range c.ranges {
			if r.a >= r.b || i > 0 && c.ranges[i-1].b >= r.a {
				t.Fatalf("ranges not sorted and disjoint: %v", c.ranges)
			}
			for j := r.a; j < r.b; j++ {
				if !have[j] {
					t.Fatalf("range %v covers %d, never written", r, j)
				}
			}
		}
	})
}
