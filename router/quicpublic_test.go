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
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// h3Request does an HTTP/3 GET of https://cfg.ServerName+path at addr
// with cfg, on a new connection, and returns the response's status, its
// body and the connection's TLS state.
func h3Request(ctx context.Context, addr string, cfg *tls.Config, path string) (int, string, tls.ConnectionState, error) {
	var state tls.ConnectionState
	cfg = cfg.Clone()
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { state = cs; return nil }
	tr := &http3.Transport{
		TLSClientConfig: cfg,
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, qcfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddr(ctx, addr, tlsCfg, qcfg)
		},
	}
	defer tr.Close()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+cfg.ServerName+path, nil)
	if err != nil {
		return 0, "", state, err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return 0, "", state, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), state, err
}

// publicQUICAddr returns the address of the router's own QUIC server for
// the public name, as its log says it started one, or "".
func (e *env) publicQUICAddr() string {
	const msg = "public name's QUIC server address="
	ls := e.all.matching(msg)
	if len(ls) == 0 {
		return ""
	}
	_, addr, _ := strings.Cut(ls[0], msg)
	return strings.Fields(addr)[0]
}

// publicQUICGoroutines returns the stacks of the goroutines of a
// publicQUIC.
func publicQUICGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "router.(*publicQUIC)") {
			out = append(out, g)
		}
	}
	return out
}

// TestServerQUICPublic runs a Server whose UDP listener has no
// public_quic_backend: the router serves the public name's QUIC
// connections itself, over real loopback UDP with quic-go clients.
func TestServerQUICPublic(t *testing.T) {
	t.Parallel()
	e := newEnv(t) // for its CA, key and log; its Router is not used
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	require.NoError(t, os.Mkdir(keys, 0o700))
	writeKey(t, keys, "1.ech", e.ks.Keys()[0])
	writeCert(t, dir, "cover", e.cert(publicName))
	h3 := e.h3Backend("h3", nil, tlsName)
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "shutdown_timeout": "5s",
  "listeners": [
    {"address": "127.0.0.1:0", "network": "udp", "routes": [
      {"name": "h3", "server_names": [%q], "alpn": ["h3"], "mode": "passthrough", "backend": %q}
    ]}
  ]
}`, publicName, tlsName, h3)
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	srv, err := New(cfg, slog.New(captureHandler{c: e.logs, all: e.all}))
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	udpAddr := srv.Addrs()[0].String()

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()
	require.Eventually(t, func() bool { return e.publicQUICAddr() != "" }, 10*time.Second, 10*time.Millisecond,
		"Run starts the public name's QUIC server")
	pubAddr := e.publicQUICAddr()
	pa, err := net.ResolveUDPAddr("udp", pubAddr)
	require.NoError(t, err)
	assert.True(t, pa.IP.IsLoopback(), "the public QUIC server listens on loopback")

	reqCtx, reqCancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer reqCancel()
	current := func() []byte {
		l, err := srv.Router.Keys.ConfigList()
		require.NoError(t, err)
		return l
	}
	staleList := func() ech.ConfigList {
		stale, err := ech.NewKeySet(newKey(t, srv.Router.Keys.ConfigIDs()...))
		require.NoError(t, err)
		l, err := stale.ConfigList()
		require.NoError(t, err)
		return l
	}

	t.Run("stale config gets retry configs", func(t *testing.T) {
		_, _, _, err := h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, staleList()), "/")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		require.NotEmpty(t, rej.RetryConfigList, "the public name's QUIC server sent retry configs")
		assert.Equal(t, current(), rej.RetryConfigList, "the retry configs are the router's configs")
		l := e.udpLog()
		assert.Equal(t, "public", l["route"])
		assert.Equal(t, "rejected", l["ech"])
		assert.Equal(t, publicName, l["outer_sni"])

		status, body, state, err := h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, rej.RetryConfigList), "/")
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, status)
		assert.True(t, state.ECHAccepted, "ECH accepted with the retry configs")
		assert.Equal(t, "h3 "+tlsName, body, "the inner backend answered")
		l = e.udpLog()
		assert.Equal(t, "h3", l["route"])
		assert.Equal(t, "accepted", l["ech"])
	})

	t.Run("public page without ECH", func(t *testing.T) {
		status, body, state, err := h3Request(reqCtx, udpAddr, e.clientConfig(publicName, nil), "/")
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, status)
		assert.Equal(t, publicName+": ECH client-facing server.\nECHConfigList: "+WellKnownPath+" (JSON), "+ConfigListPath+" (base64)\n", body)
		assert.False(t, state.ECHAccepted)
		assert.Equal(t, http3.NextProtoH3, state.NegotiatedProtocol)
		require.NotEmpty(t, state.PeerCertificates)
		assert.NoError(t, state.PeerCertificates[0].VerifyHostname(publicName))
		l := e.udpLog()
		assert.Equal(t, "public", l["route"])
		assert.Equal(t, "not offered", l["ech"])

		status, body, _, err = h3Request(reqCtx, udpAddr, e.clientConfig(publicName, nil), ConfigListPath)
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, status)
		assert.Equal(t, ech.ConfigList(current()).String()+"\n", body, "the current ECHConfigList, as over TCP")
		e.udpLog()

		status, _, _, err = h3Request(reqCtx, udpAddr, e.clientConfig(publicName, nil), "/nothing")
		require.NoError(t, err)
		assert.Equal(t, http.StatusNotFound, status)
		e.udpLog()
	})

	t.Run("unknown config for a routed name goes to its route", func(t *testing.T) {
		// A config the router lacks whose public_name is the routed name:
		// the outer SNI names the real server, as a GREASE client's does.
		// The hello does not decrypt, so it is routed by that name to the
		// backend, which has no ECH keys and sends no retry configs; the
		// public name's server would have sent them.
		k, err := ech.GenerateKey(tlsName, &ech.KeyOptions{AvoidConfigIDs: srv.Router.Keys.ConfigIDs()})
		require.NoError(t, err)
		ks, err := ech.NewKeySet(k)
		require.NoError(t, err)
		list, err := ks.ConfigList()
		require.NoError(t, err)
		_, _, _, err = h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, list), "/")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej, "the backend, whose certificate is for the name, rejected ECH")
		assert.Empty(t, rej.RetryConfigList, "no retry configs: the route's backend answered, not the public server")
		l := e.udpLog()
		assert.Equal(t, "h3", l["route"])
		assert.Equal(t, "rejected", l["ech"])
		assert.Equal(t, tlsName, l["outer_sni"])
	})

	t.Run("the public QUIC server never decrypts", func(t *testing.T) {
		// Through the router a hello with a current config never reaches
		// the public server: the router decrypts it and routes it by its
		// inner name. Sent to the public server directly, it must still be
		// rejected with retry configs: the server holds no private key.
		_, _, _, err := h3Request(reqCtx, pubAddr, e.clientConfig(tlsName, current()), "/")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Equal(t, current(), rej.RetryConfigList)
	})

	t.Run("ECH for the public name itself", func(t *testing.T) {
		// The router decrypts the hello and, its inner name being the
		// public name, forwards the inner hello to the public server,
		// which confirms ECH as a split-mode backend does (RFC 9849,
		// Section 7.2), as the TCP side's server does.
		status, body, state, err := h3Request(reqCtx, udpAddr, e.clientConfig(publicName, current()), "/")
		require.NoError(t, err)
		assert.Equal(t, http.StatusOK, status)
		assert.True(t, state.ECHAccepted)
		assert.Contains(t, body, "ECH client-facing server")
		l := e.udpLog()
		assert.Equal(t, "public", l["route"])
		assert.Equal(t, "accepted", l["ech"])
	})

	t.Run("other ALPN", func(t *testing.T) {
		// A client with a stale config that does not speak HTTP/3 still
		// gets the retry configs.
		c := e.clientConfig(tlsName, staleList(), "doq")
		_, err := quic.DialAddr(reqCtx, udpAddr, c, nil)
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Equal(t, current(), rej.RetryConfigList)
		e.udpLog()

		// Without ECH it is refused in the handshake.
		_, err = quic.DialAddr(reqCtx, udpAddr, e.clientConfig(publicName, nil, "doq"), nil)
		var te *quic.TransportError
		require.ErrorAs(t, err, &te)
		assert.Equal(t, quic.TransportErrorCode(0x100+120), te.ErrorCode, "no_application_protocol")
		e.udpLog()
	})

	t.Run("keys rotate", func(t *testing.T) {
		before := current()
		k2 := newKey(t, srv.Router.Keys.ConfigIDs()...)
		writeKey(t, keys, "2.ech", k2)
		srv.Reload()
		after := current()
		require.NotEqual(t, before, after)

		_, _, _, err := h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, staleList()), "/")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Equal(t, after, rej.RetryConfigList, "the retry configs follow the key set")
		e.udpLog()

		ks2, err := ech.NewKeySet(k2)
		require.NoError(t, err)
		list2, err := ks2.ConfigList()
		require.NoError(t, err)
		_, body, state, err := h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, list2), "/")
		require.NoError(t, err)
		assert.True(t, state.ECHAccepted)
		assert.Equal(t, "h3 "+tlsName, body)
		e.udpLog()
	})

	t.Run("certificate reload", func(t *testing.T) {
		c := e.cert(publicName)
		writeCert(t, dir, "cover", c)
		srv.Reload()
		_, _, state, err := h3Request(reqCtx, udpAddr, e.clientConfig(publicName, nil), "/")
		require.NoError(t, err)
		require.NotEmpty(t, state.PeerCertificates)
		assert.Equal(t, c.Certificate[0], state.PeerCertificates[0].Raw, "the reloaded certificate")
		e.udpLog()

		_, _, _, err = h3Request(reqCtx, udpAddr, e.clientConfig(tlsName, staleList()), "/")
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej, "the new certificate verifies for the public name")
		e.udpLog()
	})

	// A connection left open is closed at shutdown. It is made to the
	// public server directly: the proxies, closed first, forward nothing
	// more, not even a CONNECTION_CLOSE.
	conn, err := quic.DialAddr(reqCtx, pubAddr, e.clientConfig(publicName, nil, http3.NextProtoH3), nil)
	require.NoError(t, err)
	defer conn.CloseWithError(0, "")
	req, err := http.NewRequestWithContext(reqCtx, http.MethodGet, "https://"+publicName+"/", nil)
	require.NoError(t, err)
	resp, err := (&http3.Transport{}).NewClientConn(conn).RoundTrip(req)
	require.NoError(t, err, "the connection is served")
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	// Its socket is closed: the port is free again.
	if free, err := net.ListenUDP("udp", pa); assert.NoError(t, err, "the public QUIC server's socket is closed") {
		free.Close()
	}
	select {
	case <-conn.Context().Done():
	case <-time.After(10 * time.Second):
		t.Error("the open connection was not closed")
	}
	// The public server's socket is closed: its port is free again.
	pc, err := net.ListenPacket("udp", pubAddr)
	require.NoError(t, err, "the public QUIC server's socket is closed")
	pc.Close()
	assert.Empty(t, publicQUICGoroutines(), "no goroutine of the public QUIC server is left")
}

// TestQUICProxyNoPublicBackend checks that a [Router.QUICProxy] without
// PublicBackend, as a library user may make it, refuses the public name's
// connections with unrecognized_name.
func TestQUICProxyNoPublicBackend(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	p, err := e.r.QUICProxy(QUICListener{Name: "udp/test"})
	require.NoError(t, err)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan struct{})
	go func() { p.Serve(pc); close(served) }()
	t.Cleanup(func() { p.Close(); pc.Close(); <-served })

	_, err = h3Get(ctxTimeout(t, 20*time.Second), pc.LocalAddr().String(), e.clientConfig(publicName, nil))
	var te *quic.TransportError
	require.ErrorAs(t, err, &te)
	assert.Equal(t, quic.TransportErrorCode(0x100+112), te.ErrorCode, "unrecognized_name")
	l := e.udpLog()
	assert.Equal(t, "public", l["route"])
	assert.Contains(t, l["error"], errNoPublicQUIC.Error())
}
