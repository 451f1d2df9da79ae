package ech_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cloudflare/circl/hpke"
	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// memConn is a net.Conn that reads a fixed client stream and discards
// writes, for fuzzing and benchmarking NewConn without sockets.
type memConn struct {
	data []byte
	off  int
}

func (m *memConn) Read(p []byte) (int, error) {
	if m.off == len(m.data) {
		return 0, io.EOF
	}
	n := copy(p, m.data[m.off:])
	m.off += n
	return n, nil
}
func (m *memConn) Write(p []byte) (int, error)      { return len(p), nil }
func (m *memConn) Close() error                     { return nil }
func (m *memConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (m *memConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (m *memConn) SetDeadline(time.Time) error      { return nil }
func (m *memConn) SetReadDeadline(time.Time) error  { return nil }
func (m *memConn) SetWriteDeadline(time.Time) error { return nil }

var errCaptured = errors.New("captured")

// captureConn records the client's first flight and ends the handshake.
type captureConn struct {
	memConn
	out []byte
}

func (c *captureConn) Write(p []byte) (int, error) {
	c.out = append(c.out, p...)
	return 0, errCaptured
}

// captureHello returns the ClientHello records that Go's crypto/tls client
// sends with cfg.
func captureHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &captureConn{}
	err := tls.Client(c, cfg).Handshake()
	require.ErrorIs(t, err, errCaptured)
	return c.out
}

// benchHello returns an accepted X25519 ClientHello from Go's client and
// the key set that decrypts it.
func benchHello(b *testing.B) ([]byte, *ech.KeySet, ech.Key) {
	ks := echtest.NewKeySet(b, publicName)
	list, err := ks.ConfigList()
	require.NoError(b, err)
	return captureHello(b, &tls.Config{ServerName: innerName, EncryptedClientHelloConfigList: list}), ks, ks.Keys()[0]
}

func BenchmarkNewConn(b *testing.B) {
	hello, ks, key := benchHello(b)
	ctx := context.Background()
	replay := make([]byte, 1<<16)
	b.Run("KeySet", func(b *testing.B) {
		b.ReportAllocs()
		defer reportCPU(b)()
		conn := &memConn{data: hello}
		for b.Loop() {
			conn.off = 0
			c, err := ech.NewConn(ctx, conn, ech.WithKeySet(ks))
			if err != nil || !c.ECHAccepted() {
				b.Fatal(err)
			}
			// Read the replayed inner hello, as a backend would; its
			// buffer goes back to the pool.
			if _, err := c.Read(replay); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Keys", func(b *testing.B) {
		b.ReportAllocs()
		defer reportCPU(b)()
		conn := &memConn{data: hello}
		for b.Loop() {
			conn.off = 0
			c, err := ech.NewConn(ctx, conn, ech.WithKeys(key))
			if err != nil || !c.ECHAccepted() {
				b.Fatal(err)
			}
		}
	})
	b.Run("NotOffered", func(b *testing.B) {
		b.ReportAllocs()
		defer reportCPU(b)()
		conn := &memConn{data: captureHello(b, &tls.Config{ServerName: innerName})}
		for b.Loop() {
			conn.off = 0
			c, err := ech.NewConn(ctx, conn, ech.WithKeySet(ks))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Read(replay); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The baseline: circl's HPKE open of the same payload, the private key
	// already parsed, as a server that did nothing but decrypt would.
	b.Run("BareHPKEOpen", func(b *testing.B) {
		b.ReportAllocs()
		defer reportCPU(b)()
		suite, enc, payload, aad, info := echFields(b, hello, key)
		sk, err := hpke.KEM_X25519_HKDF_SHA256.Scheme().UnmarshalBinaryPrivateKey(key.PrivateKey)
		require.NoError(b, err)
		for b.Loop() {
			r, err := suite.NewReceiver(sk, info)
			if err != nil {
				b.Fatal(err)
			}
			o, err := r.Setup(enc)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := o.Open(payload, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// echFields extracts from a one-record ClientHello what an HPKE open needs.
func echFields(b *testing.B, rec []byte, key ech.Key) (suite hpke.Suite, enc, payload, aad, info []byte) {
	body := rec[5+4:]
	aad = append([]byte(nil), body...)
	s := cryptobyte.String(body)
	var sid, suites, comp, exts cryptobyte.String
	require.True(b, s.Skip(2+32) && s.ReadUint8LengthPrefixed(&sid) && s.ReadUint16LengthPrefixed(&suites) &&
		s.ReadUint8LengthPrefixed(&comp) && s.ReadUint16LengthPrefixed(&exts))
	for !exts.Empty() {
		var typ uint16
		var data cryptobyte.String
		require.True(b, exts.ReadUint16(&typ) && exts.ReadUint16LengthPrefixed(&data))
		if typ != 0xfe0d {
			continue
		}
		var kdf, aeadID uint16
		var e, p cryptobyte.String
		require.True(b, data.Skip(1) && data.ReadUint16(&kdf) && data.ReadUint16(&aeadID) && data.Skip(1) &&
			data.ReadUint16LengthPrefixed(&e) && data.ReadUint16LengthPrefixed(&p))
		end := len(body) - len(exts)
		clear(aad[end-len(p) : end])
		suite = hpke.NewSuite(hpke.KEM_X25519_HKDF_SHA256, hpke.KDF(kdf), hpke.AEAD(aeadID))
		return suite, e, p, aad, append([]byte("tls ech\x00"), key.Config...)
	}
	b.Fatal("no ECH extension")
	return
}

// BenchmarkHandshake runs full TLS 1.3 handshakes over loopback, client and
// server in this process: crypto/tls without ECH, crypto/tls's own ECH
// server (shared mode), and NewConn in front of crypto/tls (split mode).
func BenchmarkHandshake(b *testing.B) {
	ca, list, modes := handshakeServers(b)
	// The default key exchange (X25519MLKEM768) costs more than ECH on
	// either side; X25519 alone shows the ECH part more plainly.
	for _, curves := range [][]tls.CurveID{nil, {tls.X25519}} {
		group := "X25519MLKEM768"
		if curves != nil {
			group = "X25519"
		}
		b.Run(group, func(b *testing.B) { benchmarkHandshakes(b, modes, ca, list, curves) })
	}
}

type handshakeMode struct {
	name   string
	ech    bool
	server func(net.Conn) error
}

// handshakeServers returns the three servers the handshake benchmarks
// compare, with the CA their certificate chains to and the config list of
// their ECH key.
func handshakeServers(b *testing.B) (*echtest.CA, ech.ConfigList, []handshakeMode) {
	ca := echtest.NewCA(b)
	ks := echtest.NewKeySet(b, publicName)
	list, err := ks.ConfigList()
	require.NoError(b, err)
	serverCfg := &tls.Config{Certificates: []tls.Certificate{ca.Certificate(innerName)}, MinVersion: tls.VersionTLS13}
	sharedCfg := serverCfg.Clone()
	sharedCfg.EncryptedClientHelloKeys = ks.Keys()
	ctx := context.Background()
	return ca, list, []handshakeMode{
		{"NoECH", false, func(c net.Conn) error { return tls.Server(c, serverCfg).HandshakeContext(ctx) }},
		{"SharedModeCryptoTLS", true, func(c net.Conn) error { return tls.Server(c, sharedCfg).HandshakeContext(ctx) }},
		{"SplitModeNewConn", true, func(c net.Conn) error {
			ec, err := ech.NewConn(ctx, c, ech.WithKeySet(ks))
			if err != nil {
				return err
			}
			if !ec.ECHAccepted() {
				return errors.New("not accepted")
			}
			return tls.Server(ec, serverCfg).HandshakeContext(ctx)
		}},
	}
}

func benchmarkHandshakes(b *testing.B, modes []handshakeMode, ca *echtest.CA, list ech.ConfigList, curves []tls.CurveID) {
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			b.ReportAllocs()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(b, err)
			defer ln.Close()
			errs := make(chan error, 1)
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					err = m.server(c)
					c.Close()
					errs <- err
				}
			}()
			cfg := &tls.Config{ServerName: innerName, RootCAs: ca.Pool(), CurvePreferences: curves}
			if m.ech {
				cfg.EncryptedClientHelloConfigList = list
			}
			for b.Loop() {
				c, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				tc := tls.Client(c, cfg)
				if err := tc.Handshake(); err != nil {
					b.Fatal(err)
				}
				if tc.ConnectionState().ECHAccepted != m.ech {
					b.Fatal("ECH state")
				}
				c.Close()
				if err := <-errs; err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
		})
	}
}

// FuzzNewConn feeds arbitrary client bytes to NewConn with the recordings
// key: it must return (with a Conn or an error), never panic or hang.
func FuzzNewConn(f *testing.F) {
	pemData, err := os.ReadFile("testdata/recordings/ech.pem")
	require.NoError(f, err)
	pf, err := ech.ParsePEM(pemData)
	require.NoError(f, err)
	key, err := pf.Key()
	require.NoError(f, err)
	ks, err := ech.NewKeySet(key)
	require.NoError(f, err)
	files, _ := filepath.Glob("testdata/recordings/*.c2s.bin")
	for _, file := range files {
		b, err := os.ReadFile(file)
		require.NoError(f, err)
		f.Add(b)
	}
	s := newSealer(f, key)
	accepted := records(s.seal(baseOuter(), baseInner(), s.enc, key.Config[4]), 1<<14)
	f.Add(accepted)
	// After an accepted hello: an alert inside a handshake message
	// (unexpected_message), a handshake record over 2^14 bytes
	// (record_overflow).
	f.Add(append(slices.Clone(accepted), 22, 3, 3, 0, 1, 1, 21, 3, 3, 0, 2, 2, 40))
	f.Add(append(slices.Clone(accepted), 22, 3, 3, 0x40, 1))
	f.Add(records(baseOuter().message(), 7))
	f.Fuzz(func(t *testing.T, data []byte) {
		conn := &memConn{data: data}
		c, err := ech.NewConn(t.Context(), conn, ech.WithKeySet(ks), ech.WithMaxHelloSize(1<<16))
		if err != nil {
			require.Nil(t, c)
			checkError(t, err)
			return
		}
		// Drain what the Conn replays; the stream ends with io.EOF. A
		// malformed second hello is reported as an error.
		if _, err = io.Copy(io.Discard, c); err != nil {
			checkError(t, err)
		}
	})
}

// BenchmarkServerHandshake measures the server's side of a handshake alone:
// each iteration feeds a ClientHello captured from Go's client to a server,
// which does all its work (ECH, key exchange, signature, its whole first
// flight) and stops when it reads the end of the stream instead of the
// client's Finished. The client's cost, which BenchmarkHandshake includes
// and which is the larger part there, is left out: ns/op is what a server
// spends per handshake, so 1e9/ns/op is its handshakes per second per core.
func BenchmarkServerHandshake(b *testing.B) {
	ca, list, modes := handshakeServers(b)
	for _, curves := range [][]tls.CurveID{nil, {tls.X25519}} {
		group := "X25519MLKEM768"
		if curves != nil {
			group = "X25519"
		}
		clientCfg := &tls.Config{ServerName: innerName, RootCAs: ca.Pool(), CurvePreferences: curves}
		plain := captureHello(b, clientCfg)
		clientCfg.EncryptedClientHelloConfigList = list
		withECH := captureHello(b, clientCfg)
		for _, m := range modes {
			b.Run(group+"/"+m.name, func(b *testing.B) {
				b.ReportAllocs()
				conn := &memConn{data: plain}
				if m.ech {
					conn.data = withECH
				}
				for b.Loop() {
					conn.off = 0
					// The server has sent its flight and waits for the
					// client's: the end of the stream stops it there.
					if err := m.server(conn); !errors.Is(err, io.EOF) {
						b.Fatalf("server stopped with %v, want EOF after its flight", err)
					}
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
			})
		}
	}
}

// helloOfSize returns an accepted ClientHello from Go's client, padded with
// ALPN protocols (which Go's client compresses into ech_outer_extensions,
// so both hellos grow) to at least size bytes of records.
func helloOfSize(b testing.TB, list []byte, size int) []byte {
	cfg := &tls.Config{ServerName: innerName, EncryptedClientHelloConfigList: list}
	base := len(captureHello(b, cfg))
	for i := 0; base+11*len(cfg.NextProtos) < size; i++ {
		cfg.NextProtos = append(cfg.NextProtos, fmt.Sprintf("proto-%04d", i))
	}
	// A hello over 2^14 bytes is written as several records, each in its
	// own Write: take them all, until the client waits for the server.
	c := &sinkConn{}
	require.Error(b, tls.Client(c, cfg).Handshake())
	return c.out
}

// sinkConn records all the client writes; its reads end at once.
type sinkConn struct {
	memConn
	out []byte
}

func (c *sinkConn) Write(p []byte) (int, error) {
	c.out = append(c.out, p...)
	return len(p), nil
}

// BenchmarkNewConnHelloSize measures NewConn on accepted hellos of 1, 16
// and 60 KiB: the cost should grow linearly with the size.
func BenchmarkNewConnHelloSize(b *testing.B) {
	ks := echtest.NewKeySet(b, publicName)
	list, err := ks.ConfigList()
	require.NoError(b, err)
	ctx := context.Background()
	replay := make([]byte, 1<<17)
	for _, size := range []int{1 << 10, 16 << 10, 60 << 10} {
		hello := helloOfSize(b, list, size)
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			b.ReportAllocs()
			defer reportCPU(b)()
			b.SetBytes(int64(len(hello)))
			conn := &memConn{data: hello}
			for b.Loop() {
				conn.off = 0
				c, err := ech.NewConn(ctx, conn, ech.WithKeySet(ks))
				if err != nil || !c.ECHAccepted() {
					b.Fatal(err)
				}
				// Read the whole replayed inner hello, up to the end of
				// the client's stream.
				for err == nil {
					_, err = c.Read(replay)
				}
				if err != io.EOF {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkNewConnKeys measures the WithKeys path against the KeySet path
// with 1 and 16 keys, for a hello that decrypts with the first key and for
// a GREASE hello (a config_id no key has).
func BenchmarkNewConnKeys(b *testing.B) {
	ctx := context.Background()
	keys := make([]ech.Key, 16)
	ids := make([]uint8, 0, 16)
	for i := range keys {
		k, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: ids})
		require.NoError(b, err)
		keys[i] = k
		ids = append(ids, k.Config[4])
	}
	first, err := ech.NewKeySet(keys[0])
	require.NoError(b, err)
	list, err := first.ConfigList()
	require.NoError(b, err)
	accepted := captureHello(b, &tls.Config{ServerName: innerName, EncryptedClientHelloConfigList: list})
	grease := captureHello(b, &tls.Config{ServerName: innerName, EncryptedClientHelloConfigList: greaseList(b, ids)})
	for _, n := range []int{1, 16} {
		ks, err := ech.NewKeySet(keys[:n]...)
		require.NoError(b, err)
		for _, h := range []struct {
			name  string
			hello []byte
			want  ech.Status
		}{{"accepted", accepted, ech.StatusAccepted}, {"GREASE", grease, ech.StatusRejected}} {
			for _, mode := range []struct {
				name string
				opt  ech.Option
			}{{"KeySet", ech.WithKeySet(ks)}, {"Keys", ech.WithKeys(keys[:n]...)}} {
				b.Run(fmt.Sprintf("%d/%s/%s", n, h.name, mode.name), func(b *testing.B) {
					b.ReportAllocs()
					defer reportCPU(b)()
					conn := &memConn{data: h.hello}
					for b.Loop() {
						conn.off = 0
						c, err := ech.NewConn(ctx, conn, mode.opt)
						if err != nil || c.Status() != h.want {
							b.Fatal(err, c)
						}
					}
				})
			}
		}
	}
}

// greaseList returns a config list of a fresh key whose config_id is none
// of ids: its hellos look like real ECH to the server but never decrypt.
func greaseList(b *testing.B, ids []uint8) []byte {
	k, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: ids})
	require.NoError(b, err)
	ks, err := ech.NewKeySet(k)
	require.NoError(b, err)
	list, err := ks.ConfigList()
	require.NoError(b, err)
	return list
}

// reportCPU starts counting the process's CPU time (user and system, all
// threads); the function it returns reports it per op as cpu-ns/op. On a
// machine shared with other loads, it varies less than ns/op, which counts
// the time this process waited for a CPU.
func reportCPU(b *testing.B) func() {
	start := cpuTime()
	return func() { b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op") }
}

func cpuTime() int64 {
	var r syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &r)
	return r.Utime.Nano() + r.Stime.Nano()
}
