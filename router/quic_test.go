package router

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// h3Backend starts an HTTP/3 server with no ECH keys (tlsCfg as given, or
// a certificate for names) whose handler answers with its label and the
// server name it saw. It returns its UDP address.
func (e *env) h3Backend(label string, tlsCfg *tls.Config, names ...string) string {
	t := e.t
	if tlsCfg == nil {
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{*e.cert(names...)}}
	}
	tlsCfg.MinVersion = tls.VersionTLS13
	srv := &http3.Server{
		TLSConfig: http3.ConfigureTLSConfig(tlsCfg),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s", label, r.TLS.ServerName)
		}),
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	go srv.Serve(pc)
	t.Cleanup(func() { srv.Close(); pc.Close() })
	return pc.LocalAddr().String()
}

// h3Get does an HTTP/3 GET of https://name/ at addr with cfg, on a new
// connection, and returns the body.
func h3Get(ctx context.Context, addr string, cfg *tls.Config) (string, error) {
	tr := &http3.Transport{
		TLSClientConfig: cfg,
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, addr, tlsCfg, qcfg)
		},
	}
	defer tr.Close()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+cfg.ServerName+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// udpLog returns the next connection line of a QUIC connection.
func (e *env) udpLog() logLine {
	e.t.Helper()
	for {
		l := e.log()
		if l["network"] == "udp" {
			return l
		}
	}
}

// TestServerQUIC runs a Server from one config with a TCP and a UDP
// listener, the UDP one in front of quic-go HTTP/3 backends.
func TestServerQUIC(t *testing.T) {
	t.Parallel()
	e := newEnv(t) // for its CA, key and log; its Router is not used
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	k := e.ks.Keys()[0]
	k.SendAsRetry = true
	writeKey(t, filepath.Join(dir, "keys"), "1.ech", k)
	writeCert(t, dir, "cover", e.cert(publicName))
	h3 := e.h3Backend("h3", nil, tlsName)
	// The public name's QUIC server sends the router's configs as retry
	// configs.
	retryKeys, err := ech.NewKeySet(k)
	require.NoError(t, err)
	pub := e.h3Backend("public", retryKeys.PublicNameConfig(&tls.Config{Certificates: []tls.Certificate{*e.cert(publicName)}}))
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "shutdown_timeout": "5s",
  "metrics": "127.0.0.1:0",
  "listeners": [
    {"address": "127.0.0.1:0", "routes": [
      {"name": "tls", "server_names": [%q], "mode": "passthrough", "backend": %q}
    ]},
    {"address": "127.0.0.1:0", "network": "udp", "idle_timeout": "20s", "max_connections": 10,
     "public_quic_backend": %q, "routes": [
      {"name": "h3", "server_names": [%q], "alpn": ["h3"], "mode": "passthrough", "backend": %q}
    ]}
  ]
}`, publicName, tlsName, e.tlsBackend(tlsName), pub, tlsName, h3)
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	srv, err := New(cfg, slog.New(captureHandler{c: e.logs, all: e.all}))
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	addrs := srv.Addrs()
	require.Len(t, addrs, 2)
	require.IsType(t, (*net.TCPAddr)(nil), addrs[0])
	require.IsType(t, (*net.UDPAddr)(nil), addrs[1])
	udpAddr := addrs[1].String()

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()
	reqCtx, reqCancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer reqCancel()

	t.Run("tcp", func(t *testing.T) {
		greeting, _, state, err := exchange(addrs[0].String(), e.clientConfig(tlsName, e.list))
		require.NoError(t, err)
		assert.True(t, state.ECHAccepted)
		assert.Equal(t, "tls secret.example", greeting)
		e.log()
	})

	t.Run("http3 ECH", func(t *testing.T) {
		var state tls.ConnectionState
		c := e.clientConfig(tlsName, e.list)
		c.VerifyConnection = func(cs tls.ConnectionState) error { state = cs; return nil }
		body, err := h3Get(reqCtx, udpAddr, c)
		require.NoError(t, err)
		assert.True(t, state.ECHAccepted, "ECH accepted at the client")
		assert.Equal(t, "h3 "+tlsName, body, "the backend saw the inner name")
		l := e.udpLog()
		assert.Equal(t, "h3", l["route"])
		assert.Equal(t, "accepted", l["ech"])
		assert.Equal(t, publicName, l["outer_sni"])
		assert.Equal(t, tlsName, l["inner_sni"])
		assert.Equal(t, "h3", l["alpn"])
	})

	t.Run("stale config", func(t *testing.T) {
		stale, err := ech.NewKeySet(newKey(t, e.ks.ConfigIDs()...))
		require.NoError(t, err)
		list, err := stale.ConfigList()
		require.NoError(t, err)
		_, err = h3Get(reqCtx, udpAddr, e.clientConfig(tlsName, list))
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		require.NotEmpty(t, rej.RetryConfigList, "the public name's QUIC server sent retry configs")
		l := e.udpLog()
		assert.Equal(t, "public", l["route"])
		assert.Equal(t, "rejected", l["ech"])

		var state tls.ConnectionState
		c := e.clientConfig(tlsName, rej.RetryConfigList)
		c.VerifyConnection = func(cs tls.ConnectionState) error { state = cs; return nil }
		body, err := h3Get(reqCtx, udpAddr, c)
		require.NoError(t, err)
		assert.True(t, state.ECHAccepted)
		assert.Equal(t, "h3 "+tlsName, body)
		assert.Equal(t, "h3", e.udpLog()["route"])
	})

	t.Run("public_quic_backend wins", func(t *testing.T) {
		assert.Empty(t, e.publicQUICAddr(), "no QUIC server of the router's own for the public name")
		body, err := h3Get(reqCtx, udpAddr, e.clientConfig(publicName, nil))
		require.NoError(t, err)
		assert.Equal(t, "public "+publicName, body, "the configured backend answered")
		assert.Equal(t, "public", e.udpLog()["route"])
	})

	t.Run("no route", func(t *testing.T) {
		_, err := h3Get(reqCtx, udpAddr, e.clientConfig("other.example", e.list))
		var te *quic.TransportError
		require.ErrorAs(t, err, &te)
		assert.Equal(t, quic.TransportErrorCode(0x100+112), te.ErrorCode, "unrecognized_name")
		l := e.udpLog()
		assert.Equal(t, "other.example", l["inner_sni"])
		assert.Contains(t, l["error"], errNoRoute.Error())
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + srv.MetricsAddr().String() + "/metrics")
		require.NoError(t, err)
		defer resp.Body.Close()
		p := expfmt.NewTextParser(model.UTF8Validation)
		f, err := p.TextToMetricFamilies(resp.Body)
		require.NoError(t, err)
		udp := map[string]string{"listener": "udp/" + udpAddr}
		with := func(route, outcome string) map[string]string {
			return map[string]string{"listener": udp["listener"], "route": route, "ech": outcome}
		}
		assert.Equal(t, 2.0, metricValue(t, f, "ech_router_connections_total", with("h3", "accepted")))
		assert.Equal(t, 1.0, metricValue(t, f, "ech_router_connections_total", with("public", "stale")))
		assert.Equal(t, 1.0, metricValue(t, f, "ech_router_connections_total", with("public", "not_offered")))
		assert.Equal(t, 1.0, metricValue(t, f, "ech_router_connections_total", with("", "accepted")), "no route")
	})

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	// The UDP socket is closed.
	_, err = h3Get(ctxTimeout(t, time.Second), udpAddr, e.clientConfig(tlsName, e.list))
	assert.Error(t, err)
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestQUICProxyRefusesTerminate checks that a QUIC proxy is not made for a
// terminate route, which config checks refuse too.
func TestQUICProxyRefusesTerminate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	_, err := e.r.QUICProxy(QUICListener{Listener: Listener{Routes: []Route{
		{Name: "mail", ServerNames: []string{plainName}, Mode: ModeTerminate, Backend: "127.0.0.1:1", Certificate: e.cert(plainName)},
	}}})
	assert.ErrorContains(t, err, `route "mail": a QUIC route is passthrough`)
}
