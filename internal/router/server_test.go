package router

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeKey(t testing.TB, dir, name string, k ech.Key) {
	t.Helper()
	b, err := ech.MarshalPEM(k)
	require.NoError(t, err)
	// Write then rename, as an operator's tooling should, so that a reload
	// never sees half a file.
	tmp := filepath.Join(dir, "."+name+".tmp")
	require.NoError(t, os.WriteFile(tmp, b, 0o600))
	require.NoError(t, os.Rename(tmp, filepath.Join(dir, name)))
}

func removeFile(dir, name string) error { return os.Remove(filepath.Join(dir, name)) }

// writeCert writes c as PEM files name.crt and name.key in dir.
func writeCert(t testing.TB, dir, name string, c *tls.Certificate) {
	t.Helper()
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".crt"), chain, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600))
}

func TestServer(t *testing.T) {
	t.Parallel()
	e := newEnv(t) // for its CA and key; its Router is not used
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	writeKey(t, filepath.Join(dir, "keys"), "1.ech", e.ks.Keys()[0])
	writeCert(t, dir, "cover", e.cert(publicName))
	writeCert(t, dir, "mail", e.cert(plainName))
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "shutdown_timeout": "5s",
  "listeners": [
    {"address": "127.0.0.1:0", "routes": [
      {"name": "tls", "server_names": [%q], "mode": "passthrough", "backend": %q}
    ]},
    {"address": "127.0.0.2:0", "routes": [
      {"name": "mail", "server_names": [%q], "mode": "terminate", "backend": %q,
       "cert": "mail.crt", "key": "mail.key"}
    ]}
  ]
}`, publicName, tlsName, e.tlsBackend(tlsName), plainName, e.plainBackend("mail", nil))
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))

	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	logs := make(chan logLine, 100)
	srv, err := New(cfg, slog.New(captureHandler{c: logs}))
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	addrs := srv.Addrs()
	require.Len(t, addrs, 2)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	reload := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, reload) }()

	greeting, _, state, err := exchange(addrs[0].String(), e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, "tls secret.example", greeting)
	greeting, _, state, err = exchange(addrs[1].String(), e.clientConfig(plainName, e.list))
	require.NoError(t, err)
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, "plain mail", greeting)
	// Routes belong to their listener.
	_, _, _, err = exchange(addrs[1].String(), e.clientConfig(tlsName, e.list))
	assert.ErrorContains(t, err, "unrecognized name")

	// A new key, picked up on reload.
	k2 := newKey(t, e.ks.ConfigIDs()...)
	writeKey(t, filepath.Join(dir, "keys"), "2.ech", k2)
	reload <- struct{}{}
	ks2, err := ech.NewKeySet(k2)
	require.NoError(t, err)
	list2, _ := ks2.ConfigList()
	require.Eventually(t, func() bool {
		_, _, state, err := exchange(addrs[0].String(), e.clientConfig(tlsName, list2))
		return err == nil && state.ECHAccepted
	}, 5*time.Second, 20*time.Millisecond)

	// Graceful shutdown: an open connection is waited for.
	conn, err := tls.Dial("tcp", addrs[0].String(), e.clientConfig(tlsName, e.list))
	require.NoError(t, err)
	_, err = conn.Read(make([]byte, 100))
	require.NoError(t, err)
	cancel()
	select {
	case err := <-done:
		t.Fatalf("Run returned with a connection open: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	_, err = net.DialTimeout("tcp", addrs[0].String(), time.Second)
	assert.Error(t, err, "listeners are closed")
	conn.Close()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the last connection ended")
	}
}

func TestNewErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	writeCert(t, dir, "cover", e.cert(publicName))
	writeCert(t, dir, "wrong", e.cert("wrong.example"))
	load := func(config string) error {
		t.Helper()
		cfg, err := ParseConfig("router.json", []byte(config))
		require.NoError(t, err)
		cfg.Dir = dir
		_, err = New(cfg, slog.New(captureHandler{c: make(chan logLine)}))
		return err
	}
	base := `{"keys": {"dir": "keys"}, "public": {"name": "cover.example", "cert": %q, "key": %q},
	  "listeners": [{"address": "127.0.0.1:0", "routes": [%s]}]}`

	err := load(fmt.Sprintf(base, "cover.crt", "cover.key", ""))
	assert.ErrorIs(t, err, ech.ErrNoKeys, "an empty key directory")

	writeKey(t, filepath.Join(dir, "keys"), "1.ech", e.ks.Keys()[0])
	require.NoError(t, load(fmt.Sprintf(base, "cover.crt", "cover.key", "")))

	err = load(fmt.Sprintf(base, "none.crt", "cover.key", ""))
	assert.ErrorContains(t, err, "none.crt")
	err = load(fmt.Sprintf(base, "wrong.crt", "wrong.key", ""))
	assert.ErrorContains(t, err, "not for the public name")
	err = load(fmt.Sprintf(base, "cover.crt", "cover.key",
		`{"name": "m", "server_names": ["mail.example"], "mode": "terminate", "backend": "127.0.0.1:1", "cert": "wrong.crt", "key": "wrong.key"}`))
	assert.ErrorContains(t, err, "not for mail.example")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "keys", "2.ech"), []byte("junk"), 0o600))
	err = load(fmt.Sprintf(base, "cover.crt", "cover.key", ""))
	assert.ErrorIs(t, err, ech.ErrMalformedPEM)
	assert.ErrorContains(t, err, "2.ech")
}
