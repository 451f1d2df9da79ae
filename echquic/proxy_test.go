package echquic

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

const publicName = "public.example"

// env is a proxy in front of HTTP/3 backends, with the keys and CA the
// clients trust.
type env struct {
	t        *testing.T
	ca       *echtest.CA
	ks       *ech.KeySet
	list     ech.ConfigList
	proxy    *Proxy
	addr     *net.UDPAddr // the proxy's
	mu       sync.Mutex
	backends map[string]*net.UDPAddr // by server name
	routed   []Info
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, ca: echtest.NewCA(t), ks: echtest.NewKeySet(t, publicName), backends: map[string]*net.UDPAddr{}}
	var err error
	e.list, err = e.ks.ConfigList()
	require.NoError(t, err)
	e.proxy = &Proxy{Route: e.route, ECHOptions: []ech.Option{ech.WithKeySet(e.ks)}, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	e.addr = pc.LocalAddr().(*net.UDPAddr)
	done := make(chan error, 1)
	go func() { done <- e.proxy.Serve(pc) }()
	t.Cleanup(func() {
		e.proxy.Close()
		assert.NoError(t, <-done)
	})
	return e
}

func (e *env) route(info Info) (net.Addr, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.routed = append(e.routed, info)
	if a, ok := e.backends[info.ServerName]; ok {
		return a, nil
	}
	return nil, fmt.Errorf("no backend for %q", info.ServerName)
}

func (e *env) infos() []Info {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.routed)
}

// backendConfig returns the TLS config of a backend for name: no ECH keys.
func (e *env) backendConfig(name string) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{e.ca.Certificate(name)}, MinVersion: tls.VersionTLS13}
}

// addHTTP3 starts an HTTP/3 backend for name whose handler answers with the
// server name it saw and echoes bodies.
func (e *env) addHTTP3(name string, tweak func(*tls.Config)) {
	t := e.t
	cfg := e.backendConfig(name)
	if tweak != nil {
		tweak(cfg)
	}
	srv := &http3.Server{
		TLSConfig: http3.ConfigureTLSConfig(cfg),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Server-Name", r.TLS.ServerName)
			if r.Method == http.MethodPost {
				io.Copy(w, r.Body)
				return
			}
			fmt.Fprintf(w, "hello from %s", name)
		}),
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	go srv.Serve(pc)
	t.Cleanup(func() { srv.Close(); pc.Close() })
	e.setBackend(name, pc.LocalAddr())
}

func (e *env) setBackend(name string, a net.Addr) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.backends[name] = a.(*net.UDPAddr)
}

// clientConfig returns a client TLS config for name with the proxy's ECH
// configs.
func (e *env) clientConfig(name string) *tls.Config {
	return &tls.Config{
		ServerName:                     name,
		RootCAs:                        e.ca.Pool(),
		EncryptedClientHelloConfigList: e.list,
		MinVersion:                     tls.VersionTLS13,
	}
}

// transport returns an HTTP/3 client transport that dials the proxy, or
// via instead, with a new UDP socket for every connection.
func (e *env) transport(cfg *tls.Config, via net.Addr) *http3.Transport {
	if via == nil {
		via = e.addr
	}
	return &http3.Transport{
		TLSClientConfig: cfg,
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, via.String(), tlsCfg, qcfg)
		},
	}
}

// get does an HTTP/3 GET of https://name/ through the proxy.
func (e *env) get(ctx context.Context, tr *http3.Transport, name string) (*http.Response, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+name+"/", nil)
	if err != nil {
		return nil, "", err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, string(body), err
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestHTTP3ECHAccepted(t *testing.T) {
	e := newEnv(t)
	e.addHTTP3("secret.example", nil)
	tr := e.transport(e.clientConfig("secret.example"), nil)
	defer tr.Close()
	resp, body, err := e.get(ctxTimeout(t, 10*time.Second), tr, "secret.example")
	require.NoError(t, err)
	assert.Equal(t, "hello from secret.example", body)
	assert.Equal(t, "secret.example", resp.Header.Get("X-Server-Name"))
	require.NotNil(t, resp.TLS)
	assert.True(t, resp.TLS.ECHAccepted, "ECH accepted at the client")
	infos := e.infos()
	require.Len(t, infos, 1)
	assert.Equal(t, ech.StatusAccepted, infos[0].Status)
	assert.Equal(t, "secret.example", infos[0].ServerName)
	assert.Equal(t, publicName, infos[0].OuterServerName)
	assert.Equal(t, []string{"h3"}, infos[0].ALPNProtos)
	assert.Equal(t, uint32(version1), infos[0].Version)
}

func TestTwoNamesTwoBackends(t *testing.T) {
	e := newEnv(t)
	e.addHTTP3("a.example", nil)
	e.addHTTP3("b.example", nil)
	ctx := ctxTimeout(t, 10*time.Second)
	for _, name := range []string{"a.example", "b.example", "a.example"} {
		tr := e.transport(e.clientConfig(name), nil)
		resp, body, err := e.get(ctx, tr, name)
		tr.Close()
		require.NoError(t, err, name)
		assert.Equal(t, "hello from "+name, body)
		assert.Equal(t, name, resp.Header.Get("X-Server-Name"))
		assert.True(t, resp.TLS.ECHAccepted)
	}
	assert.Len(t, e.infos(), 3)
}

var _ = errors.New
