package echquic

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

const echoALPN = "echo"

// addEcho starts a QUIC backend for name (no ECH keys) that, on every
// stream, writes the server name it saw and a newline, then echoes.
func (e *env) addEcho(name string, tweak func(*tls.Config), qcfg *quic.Config) {
	t := e.t
	cfg := e.backendConfig(name)
	cfg.NextProtos = []string{echoALPN}
	if tweak != nil {
		tweak(cfg)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", cfg, qcfg)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go serveEcho(ln)
	e.setBackend(name, ln.Addr())
}

func serveEcho(ln *quic.Listener) {
	for {
		c, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		go func() {
			for {
				s, err := c.AcceptStream(context.Background())
				if err != nil {
					return
				}
				go func() {
					defer s.Close()
					fmt.Fprintf(s, "%s\n", c.ConnectionState().TLS.ServerName)
					io.Copy(s, s)
				}()
			}
		}()
	}
}

// echoConfig returns a client config for the echo backends of name.
func (e *env) echoConfig(name string) *tls.Config {
	cfg := e.clientConfig(name)
	cfg.NextProtos = []string{echoALPN}
	return cfg
}

// dialEcho connects to addr, opens a stream, sends msg and checks the
// server name and the echo. It returns the connection.
func dialEcho(ctx context.Context, t testing.TB, addr net.Addr, cfg *tls.Config, qcfg *quic.Config, msg string) (*quic.Conn, string, error) {
	c, err := quic.DialAddr(ctx, addr.String(), cfg, qcfg)
	if err != nil {
		return nil, "", err
	}
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		c.CloseWithError(0, "")
		return nil, "", err
	}
	if _, err := io.WriteString(s, msg); err != nil {
		c.CloseWithError(0, "")
		return nil, "", err
	}
	s.Close()
	got, err := io.ReadAll(s)
	if err != nil {
		c.CloseWithError(0, "")
		return nil, "", err
	}
	name, echo, _ := strings.Cut(string(got), "\n")
	if echo != msg {
		c.CloseWithError(0, "")
		return nil, "", fmt.Errorf("echo %q, want %q", echo, msg)
	}
	return c, name, nil
}

// manyALPN returns n ALPN values and echoALPN last, to make the ClientHello
// span several Initial packets.
func manyALPN(n int) []string {
	var p []string
	for i := range n {
		p = append(p, fmt.Sprintf("proto-%02d-%s", i, strings.Repeat("x", 20)))
	}
	return append(p, echoALPN)
}

// relay is a UDP relay between clients and the proxy. Each client gets its
// own upstream socket. drop and swap act on the client's datagrams by
// index (0-based).
type relay struct {
	pc      *net.UDPConn
	to      *net.UDPAddr
	mu      sync.Mutex
	flows   map[string]*net.UDPConn
	first   [][]byte // the first client datagrams, recorded
	drop    map[int]bool
	swap    bool // hold datagram 1 and send it after 2
	counter map[string]int
	held    []byte
}

func newRelay(t *testing.T, to *net.UDPAddr, drop map[int]bool, swap bool) *relay {
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	r := &relay{pc: pc, to: to, flows: map[string]*net.UDPConn{}, drop: drop, swap: swap, counter: map[string]int{}}
	go r.serve()
	t.Cleanup(func() {
		pc.Close()
		r.mu.Lock()
		for _, c := range r.flows {
			c.Close()
		}
		r.mu.Unlock()
	})
	return r
}

func (r *relay) serve() {
	buf := make([]byte, 1<<16)
	for {
		n, a, err := r.pc.ReadFromUDP(buf)
		if err != nil {
			return
		}
		b := append([]byte(nil), buf[:n]...)
		r.mu.Lock()
		up := r.flows[a.String()]
		if up == nil {
			up, err = net.DialUDP("udp", nil, r.to)
			if err != nil {
				r.mu.Unlock()
				return
			}
			r.flows[a.String()] = up
			go func() {
				rb := make([]byte, 1<<16)
				for {
					n, err := up.Read(rb)
					if err != nil {
						return
					}
					r.pc.WriteToUDP(rb[:n], a)
				}
			}()
		}
		i := r.counter[a.String()]
		r.counter[a.String()]++
		if len(r.first) < 8 {
			r.first = append(r.first, b)
		}
		var send [][]byte
		switch {
		case r.drop[i]:
		case r.swap && i == 1:
			r.held = b
		case r.swap && i == 2:
			send = append(send, b)
			if r.held != nil {
				send = append(send, r.held)
			}
		default:
			send = append(send, b)
		}
		r.mu.Unlock()
		for _, s := range send {
			up.Write(s)
		}
	}
}

// initialsIn counts the client Initial packets with CRYPTO data in the
// recorded datagrams, decrypting them with the test's own keys.
func (r *relay) initialsIn(t *testing.T) (packets int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range r.first {
		for len(d) > 0 && d[0]&headerFormLong != 0 {
			h, err := parseLongHeader(d)
			require.NoError(t, err)
			if h.typ == packetInitial {
				hs, err := newHandshake(&h, 1<<16)
				require.NoError(t, err)
				s := getScratch()
				if _, _, _, err := hs.open(s, d[:h.end], &h); err == nil && s.frames.nc > 0 {
					packets++
				}
			}
			d = d[h.end:]
		}
	}
	return packets
}

func TestHelloSpanningInitials(t *testing.T) {
	for _, tc := range []struct {
		name    string
		alpn    int
		packets int
	}{
		{"two", 0, 2},
		{"three", 60, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.addEcho("secret.example", func(c *tls.Config) { c.NextProtos = []string{echoALPN} }, nil)
			r := newRelay(t, e.addr, nil, false)
			cfg := e.echoConfig("secret.example")
			cfg.NextProtos = manyALPN(tc.alpn)
			cfg.CurvePreferences = []tls.CurveID{tls.X25519MLKEM768, tls.X25519}
			c, name, err := dialEcho(ctxTimeout(t, 10*time.Second), t, r.pc.LocalAddr(), cfg, nil, "ping")
			require.NoError(t, err)
			defer c.CloseWithError(0, "")
			assert.Equal(t, "secret.example", name)
			assert.True(t, c.ConnectionState().TLS.ECHAccepted)
			assert.Equal(t, echoALPN, c.ConnectionState().TLS.NegotiatedProtocol)
			assert.GreaterOrEqual(t, r.initialsIn(t), tc.packets, "Initial packets carrying the ClientHello")
			infos := e.infos()
			require.Len(t, infos, 1)
			assert.Equal(t, cfg.NextProtos, infos[0].ALPNProtos)
		})
	}
}

func TestLossyReorderingRelay(t *testing.T) {
	e := newEnv(t)
	e.addEcho("secret.example", nil, nil)
	cfg := e.echoConfig("secret.example")
	cfg.NextProtos = manyALPN(60) // three Initials
	cfg.CurvePreferences = []tls.CurveID{tls.X25519MLKEM768}
	for _, tc := range []struct {
		name string
		drop map[int]bool
		swap bool
	}{
		{"drop first", map[int]bool{0: true}, false},
		{"swap first two", nil, true},
		{"drop first swap next", map[int]bool{0: true}, true},
		{"drop second", map[int]bool{1: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRelay(t, e.addr, tc.drop, tc.swap)
			c, name, err := dialEcho(ctxTimeout(t, 20*time.Second), t, r.pc.LocalAddr(), cfg, nil, "ping")
			require.NoError(t, err)
			defer c.CloseWithError(0, "")
			assert.Equal(t, "secret.example", name)
			assert.True(t, c.ConnectionState().TLS.ECHAccepted)
		})
	}
}

func TestHelloRetryRequest(t *testing.T) {
	e := newEnv(t)
	// The client's key shares are X25519MLKEM768 and X25519; P-256 forces
	// a HelloRetryRequest.
	e.addEcho("secret.example", func(c *tls.Config) { c.CurvePreferences = []tls.CurveID{tls.CurveP256} }, nil)
	cfg := e.echoConfig("secret.example")
	c, name, err := dialEcho(ctxTimeout(t, 10*time.Second), t, e.addr, cfg, nil, "ping")
	require.NoError(t, err)
	defer c.CloseWithError(0, "")
	assert.Equal(t, "secret.example", name)
	assert.True(t, c.ConnectionState().TLS.ECHAccepted)
	assert.True(t, c.ConnectionState().TLS.HelloRetryRequest, "the backend sent a HelloRetryRequest")
}

func TestVersion2(t *testing.T) {
	e := newEnv(t)
	qcfg := &quic.Config{Versions: []quic.Version{quic.Version2}}
	e.addEcho("secret.example", nil, qcfg)
	c, name, err := dialEcho(ctxTimeout(t, 10*time.Second), t, e.addr, e.echoConfig("secret.example"), qcfg, "ping")
	require.NoError(t, err)
	defer c.CloseWithError(0, "")
	assert.Equal(t, "secret.example", name)
	assert.True(t, c.ConnectionState().TLS.ECHAccepted)
	assert.Equal(t, quic.Version2, c.ConnectionState().Version)
	assert.Equal(t, uint32(version2), e.infos()[0].Version)
}

func TestBackendRetry(t *testing.T) {
	e := newEnv(t)
	cfg := e.backendConfig("secret.example")
	cfg.NextProtos = []string{echoALPN}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	var retries atomic.Int32
	tr := &quic.Transport{Conn: pc, VerifySourceAddress: func(net.Addr) bool { retries.Add(1); return true }}
	ln, err := tr.Listen(cfg, nil)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close(); tr.Close() })
	go serveEcho(ln)
	e.setBackend("secret.example", pc.LocalAddr())

	c, name, err := dialEcho(ctxTimeout(t, 10*time.Second), t, e.addr, e.echoConfig("secret.example"), nil, "ping")
	require.NoError(t, err)
	defer c.CloseWithError(0, "")
	assert.Equal(t, "secret.example", name)
	assert.True(t, c.ConnectionState().TLS.ECHAccepted)
	assert.Positive(t, retries.Load(), "the backend asked for a Retry")
	assert.Len(t, e.infos(), 1, "routed once")
}

// TestNotDecrypted covers hellos whose ECH does not decrypt, routed by
// their name in the clear: no ECH at all; a config of another key set
// (as GREASE, which crypto/tls does not send, is to the server); and a
// stale config, which the public-name server answers with retry configs
// the client reconnects with.
func TestNotDecrypted(t *testing.T) {
	e := newEnv(t)
	e.addEcho("secret.example", nil, nil)
	e.addEcho("open.example", nil, nil)
	// The public name's QUIC server: no keys, retry configs.
	pub := e.ks.PublicNameConfig(&tls.Config{Certificates: []tls.Certificate{e.ca.Certificate(publicName)}, NextProtos: []string{echoALPN}})
	ln, err := quic.ListenAddr("127.0.0.1:0", pub, nil)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go serveEcho(ln)
	e.setBackend(publicName, ln.Addr())
	ctx := ctxTimeout(t, 20*time.Second)

	t.Run("no ECH", func(t *testing.T) {
		cfg := e.echoConfig("open.example")
		cfg.EncryptedClientHelloConfigList = nil
		c, name, err := dialEcho(ctx, t, e.addr, cfg, nil, "ping")
		require.NoError(t, err)
		defer c.CloseWithError(0, "")
		assert.Equal(t, "open.example", name)
		infos := e.infos()
		assert.Equal(t, ech.StatusNotOffered, infos[len(infos)-1].Status)
	})
	t.Run("unknown config", func(t *testing.T) {
		other := echtest.NewKeySet(t, "open.example")
		list, err := other.ConfigList()
		require.NoError(t, err)
		cfg := e.echoConfig("secret.example")
		cfg.EncryptedClientHelloConfigList = list
		_, _, err = dialEcho(ctx, t, e.addr, cfg, nil, "ping")
		// The outer name, open.example, is routed to its backend, which
		// completes the handshake for it without retry configs: crypto/tls
		// then refuses, having offered ECH.
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Empty(t, rej.RetryConfigList)
		infos := e.infos()
		last := infos[len(infos)-1]
		assert.Equal(t, ech.StatusRejected, last.Status)
		assert.Equal(t, "open.example", last.ServerName)
	})
	t.Run("stale config", func(t *testing.T) {
		stale := echtest.NewKeySet(t, publicName)
		list, err := stale.ConfigList()
		require.NoError(t, err)
		cfg := e.echoConfig("secret.example")
		cfg.EncryptedClientHelloConfigList = list
		_, _, err = dialEcho(ctx, t, e.addr, cfg, nil, "ping")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		require.NotEmpty(t, rej.RetryConfigList, "retry configs from the public name")
		infos := e.infos()
		last := infos[len(infos)-1]
		assert.Equal(t, ech.StatusRejected, last.Status)
		assert.Equal(t, publicName, last.ServerName)

		cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
		c, name, err := dialEcho(ctx, t, e.addr, cfg, nil, "ping")
		require.NoError(t, err)
		defer c.CloseWithError(0, "")
		assert.Equal(t, "secret.example", name)
		assert.True(t, c.ConnectionState().TLS.ECHAccepted)
	})
}

func TestConcurrentConnections(t *testing.T) {
	e := newEnv(t)
	e.addEcho("a.example", nil, nil)
	e.addEcho("b.example", nil, nil)
	n := 200
	ctx := ctxTimeout(t, 180*time.Second)
	// A generous handshake timeout: on a loaded machine under -race a
	// handshake can take seconds.
	qcfg := &quic.Config{HandshakeIdleTimeout: time.Minute}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 20)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			want := []string{"a.example", "b.example"}[i%2]
			c, name, err := dialEcho(ctx, t, e.addr, e.echoConfig(want), qcfg, fmt.Sprint("ping ", i))
			if err != nil {
				errs <- err
				return
			}
			defer c.CloseWithError(0, "")
			if name != want || !c.ConnectionState().TLS.ECHAccepted {
				errs <- fmt.Errorf("connection %d: name %q, ECH %v", i, name, c.ConnectionState().TLS.ECHAccepted)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assert.Equal(t, n, len(e.infos()))
}

func TestLargeTransfer(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB transfer: skipped in -short mode")
	}
	e := newEnv(t)
	e.addEcho("secret.example", nil, nil)
	ctx := ctxTimeout(t, 120*time.Second)
	c, err := quic.DialAddr(ctx, e.addr.String(), e.echoConfig("secret.example"), nil)
	require.NoError(t, err)
	defer c.CloseWithError(0, "")
	require.True(t, c.ConnectionState().TLS.ECHAccepted)
	s, err := c.OpenStreamSync(ctx)
	require.NoError(t, err)
	const size = 64 << 20
	sent := sha256.New()
	go func() {
		rng := rand.NewChaCha8([32]byte{1})
		buf := make([]byte, 64<<10)
		for n := 0; n < size; n += len(buf) {
			rng.Read(buf)
			sent.Write(buf)
			if _, err := s.Write(buf); err != nil {
				return
			}
		}
		s.Close()
	}()
	br := bufio.NewReader(s)
	name, err := br.ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "secret.example\n", name)
	got := sha256.New()
	n, err := io.Copy(got, br)
	require.NoError(t, err)
	assert.Equal(t, int64(size), n)
	assert.Equal(t, sent.Sum(nil), got.Sum(nil))
}

var _ = errors.New
