package router

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/knottest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// freeAddr returns a loopback address with a port that was free.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().String()
}

// startKnot starts Knot DNS for the zone "example." with records (see
// [knottest.Start]) and returns its address.
func startKnot(t *testing.T, records string) string {
	t.Helper()
	return knottest.Start(t, "example.", records)
}

// httpsECH returns the ech parameter of the HTTPS record at name.
func httpsECH(t *testing.T, server, name string) ech.ConfigList {
	t.Helper()
	return knottest.QueryECH(t, server, name)
}

// TestAutoKeysFleetKnot runs three routers from their configuration files
// with keys.auto on one directory, each listing the three as peers, and
// keys.publish to Knot DNS: the routers make the first key, publish it,
// rotate, publish the new key once all three decrypt it, and retire the old
// one; a client with the config from DNS has ECH accepted throughout, and
// one with the old config until its retirement, then gets retry configs.
func TestAutoKeysFleetKnot(t *testing.T) {
	e := newEnv(t) // for its CA and backend; its Router and keys are not used
	server := startKnot(t, tlsName+". HTTPS 1 . alpn=h2\n")
	dir := t.TempDir()
	writeCert(t, dir, "cover", e.cert(publicName))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.ca.Cert.Raw}), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tsig"), []byte(knottest.Secret+"\n"), 0o600))
	backend := e.tlsBackend(tlsName)
	addrs := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	peers := ""
	for i, a := range addrs {
		if i > 0 {
			peers += ", "
		}
		peers += fmt.Sprintf("%q", "https://"+a+"/ech-config-list")
	}

	clk := time.Now().UTC().Truncate(time.Second)
	now := func() time.Time { return clk }
	var srvs []*Server
	for i, a := range addrs {
		config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s",
    "auto": {"rotate": "24h", "ttl": "1m", "retire": "48h", "peers": [%s], "peer_ca": "ca.pem"},
    "publish": {"rfc2136": {"server": %q, "zone": "example", "key_name": "upd", "secret_file": "tsig"}}},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "listeners": [{"address": %q, "routes": [
    {"name": "tls", "server_names": [%q], "alpn": ["h2"], "mode": "passthrough", "backend": %q}]}]
}`, peers, server, publicName, a, tlsName, backend)
		path := filepath.Join(dir, fmt.Sprintf("router%d.json", i))
		require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
		cfg, err := LoadConfig(path)
		require.NoError(t, err)
		srv, err := New(cfg, slog.New(captureHandler{c: make(chan logLine, 1000)}))
		require.NoError(t, err)
		require.NoError(t, srv.Listen())
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			srv.Run(ctx, nil)
			close(done)
		}()
		t.Cleanup(func() {
			cancel()
			<-done
		})
		// Reloads are called below, never by a timer ("reload": "0s"),
		// so the clock can be set between them.
		srv.Keys.Manager.Now = now
		srvs = append(srvs, srv)
	}
	reloadAll := func() {
		t.Helper()
		for i, s := range srvs {
			_, err := s.Keys.Reload()
			require.NoError(t, err, "router %d", i)
		}
	}
	failed := 0
	connect := func(i int, list ech.ConfigList) error {
		_, _, state, err := exchange(addrs[i], e.clientConfig(tlsName, list, "h2"))
		if err == nil && !state.ECHAccepted {
			err = errors.New("ECH not accepted")
		}
		return err
	}
	checkAll := func(what string, list ech.ConfigList) {
		t.Helper()
		for i := range srvs {
			if err := connect(i, list); err != nil {
				failed++
				t.Errorf("%s, router %d: %v", what, i, err)
			}
		}
	}

	reloadAll()
	l1 := httpsECH(t, server, tlsName)
	require.NotNil(t, l1, "the first key is published once every router decrypts it")
	m1, err := srvs[0].Keys.Manager.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, m1, l1)
	checkAll("first key from DNS", l1)

	// Rotation.
	clk = clk.Add(24 * time.Hour)
	start := time.Now()
	reloadAll()
	l2 := httpsECH(t, server, tlsName)
	t.Logf("rotation to published record, three routers reloading once: %v", time.Since(start))
	require.NotEqual(t, l1, l2, "the new key is published")
	checkAll("new key from DNS", l2)
	checkAll("old key before retirement", l1)

	// Retirement.
	clk = clk.Add(24 * time.Hour)
	reloadAll()
	reloadAll()
	for i := range srvs {
		err := connect(i, l1)
		var rej *tls.ECHRejectionError
		require.True(t, errors.As(err, &rej), "router %d: the old key is deleted: %v", i, err)
		retry := ech.ConfigList(rej.RetryConfigList)
		require.NoError(t, connect(i, retry), "router %d: retry configs work", i)
	}
	checkAll("config from DNS after retirement", httpsECH(t, server, tlsName))
	assert.Zero(t, failed, "failed handshakes")
}
