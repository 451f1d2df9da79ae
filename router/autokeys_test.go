package router

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestServerAutoKeys runs the router with keys.auto on an empty directory:
// it makes a key, serves ECH with it and publishes nothing without
// keys.publish.
func TestServerAutoKeys(t *testing.T) {
	t.Parallel()
	e := newEnv(t) // for its CA and backends; its Router and keys are not used
	dir := t.TempDir()
	writeCert(t, dir, "cover", e.cert(publicName))
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s", "auto": {"propagation": "0s", "rotate": "24h"}},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "listeners": [
    {"address": "127.0.0.1:0", "routes": [
      {"name": "tls", "server_names": [%q], "mode": "passthrough", "backend": %q}
    ]}
  ]
}`, publicName, tlsName, e.tlsBackend(tlsName))
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	srv, err := New(cfg, slog.New(captureHandler{c: make(chan logLine, 100)}))
	require.NoError(t, err)
	require.NotNil(t, srv.Keys.Manager)
	assert.Nil(t, srv.Keys.Manager.Publisher)

	entries, err := os.ReadDir(filepath.Join(dir, "keys"))
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.True(t, strings.HasPrefix(entries[0].Name(), "echkeys-"), entries[0].Name())
	fi, err := entries[0].Info()
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()
	list, err := srv.Router.Keys.ConfigList()
	require.NoError(t, err)
	mlist, err := srv.Keys.Manager.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, mlist, list)
	greeting, _, state, err := exchange(srv.Addrs()[0].String(), e.clientConfig(tlsName, list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, "tls secret.example", greeting)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
}

func TestParseConfigAutoKeys(t *testing.T) {
	base := `{"keys": {"dir": "k", %s},
  "public": {"name": "cover.example", "cert": "c", "key": "k"},
  "listeners": [{"address": ":443", "routes": [
    {"name": "web", "server_names": ["www.example", "*.example"], "alpn": ["h2"], "mode": "passthrough", "backend": "10.0.0.2:443"}]}]}`
	good := `"auto": {"rotate": "720h", "ttl": "1h", "peers": ["https://10.0.0.1/ech-config-list"]},
  "publish": {"rfc2136": {"server": "ns1.example:53", "zone": "example", "key_name": "upd", "secret_file": "tsig"}}`
	c, err := ParseConfig("router.json", fmt.Appendf(nil, base, good))
	require.NoError(t, err)
	require.NotNil(t, c.Keys.Auto)
	assert.Equal(t, 720*time.Hour, c.rotate)
	assert.Equal(t, time.Hour, c.ttl)
	assert.Equal(t, []string{"https://10.0.0.1/ech-config-list"}, c.Keys.Auto.Peers)

	// The names to publish default to the routes' exact names.
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tsig"), []byte("c2VjcmV0\n"), 0o600))
	c.Dir = dir
	m, err := newManager(c, nil, nil)
	require.NoError(t, err)
	require.NotNil(t, m.Publisher)
	require.Len(t, m.Publisher.Names, 1)
	assert.Equal(t, "www.example", m.Publisher.Names[0].Name)
	assert.Equal(t, []string{"h2"}, m.Publisher.Names[0].ALPN)

	for _, tc := range []struct{ keys, path string }{
		{`"publish": {"rfc2136": {"server": "ns:53", "zone": "z", "key_name": "k", "secret_file": "s"}}`, "keys.publish"},
		{`"auto": {"rotate": "soon"}`, "keys.auto.rotate"},
		{`"auto": {"peers": ["http://10.0.0.1/ech-config-list"]}`, "keys.auto.peers[0]"},
		{`"auto": {}, "publish": {"rfc2136": {"zone": "z", "key_name": "k", "secret_file": "s"}}`, "keys.publish.rfc2136.server"},
		{`"auto": {"unknown": true}`, "keys.auto.unknown"},
	} {
		_, err := ParseConfig("router.json", fmt.Appendf(nil, base, tc.keys))
		var ce *ConfigError
		require.ErrorAs(t, err, &ce, tc.keys)
		assert.Equal(t, tc.path, ce.Path, tc.keys)
	}
}

// TestAutoKeysRetryBackoff checks that a keys.auto run whose publishing
// fails is tried again with backoff, long before the next reload, and that
// the keys stay in use meanwhile. Not parallel: it shortens the backoff.
func TestAutoKeysRetryBackoff(t *testing.T) {
	oldMin, oldMax := retryMin, retryMax
	retryMin, retryMax = 20*time.Millisecond, 80*time.Millisecond
	t.Cleanup(func() { retryMin, retryMax = oldMin, oldMax })

	e := newEnv(t)
	dir := t.TempDir()
	writeCert(t, dir, "cover", e.cert(publicName))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tsig"), []byte("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\n"), 0o600))
	// A name server that is not there: every publish fails at once.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	nowhere := pc.LocalAddr().String()
	pc.Close()
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "1h", "auto": {"propagation": "0s", "rotate": "24h"},
    "publish": {"rfc2136": {"server": %q, "zone": "example", "key_name": "upd", "secret_file": "tsig"}}},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "listeners": [
    {"address": "127.0.0.1:0", "routes": [
      {"name": "tls", "server_names": [%q], "mode": "passthrough", "backend": %q}
    ]}
  ]
}`, nowhere, publicName, tlsName, e.tlsBackend(tlsName))
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	logs := &lockedBuffer{}
	srv, err := New(cfg, slog.New(slog.NewTextHandler(logs, nil)))
	require.NoError(t, err)
	require.True(t, srv.Keys.TickFailed(), "the first publish failed: %s", logs)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()

	// Tried again with backoff (20 ms, 40, 80, 80, ...), not after 1h.
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "keys.auto: trying again") >= 4 },
		10*time.Second, 10*time.Millisecond, "%s", logs)
	assert.Contains(t, logs.String(), "in=20ms")
	assert.Contains(t, logs.String(), "in=80ms", "doubling, up to the limit")
	// The keys stay in use.
	list, err := srv.Router.Keys.ConfigList()
	require.NoError(t, err)
	_, _, state, err := exchange(srv.Addrs()[0].String(), e.clientConfig(tlsName, list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	cancel()
	require.NoError(t, <-done)
}
