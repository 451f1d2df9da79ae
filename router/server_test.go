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
	assert.ErrorContains(t, err, "not for cover.example")
	err = load(fmt.Sprintf(base, "cover.crt", "cover.key",
		`{"name": "m", "server_names": ["mail.example"], "mode": "terminate", "backend": "127.0.0.1:1", "cert": "wrong.crt", "key": "wrong.key"}`))
	assert.ErrorContains(t, err, "not for mail.example")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "keys", "2.ech"), []byte("junk"), 0o600))
	err = load(fmt.Sprintf(base, "cover.crt", "cover.key", ""))
	assert.ErrorIs(t, err, ech.ErrMalformedPEM)
	assert.ErrorContains(t, err, "2.ech")
}

// serverEnv writes a configuration with a passthrough and a terminate
// route into a temp dir and returns the dir, the Server and its log.
func serverEnv(t *testing.T, e *env) (string, *Server, *records) {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	writeKey(t, filepath.Join(dir, "keys"), "1.ech", e.ks.Keys()[0])
	writeCert(t, dir, "cover", e.cert(publicName))
	writeCert(t, dir, "mail", e.cert(plainName))
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "listeners": [{"address": "127.0.0.1:0", "routes": [
    {"name": "mail", "server_names": [%q], "mode": "terminate", "backend": %q, "cert": "mail.crt", "key": "mail.key"}
  ]}]
}`, publicName, plainName, e.plainBackend("mail", nil))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "router.json"), []byte(config), 0o600))
	cfg, err := LoadConfig(filepath.Join(dir, "router.json"))
	require.NoError(t, err)
	recs := new(records)
	srv, err := New(cfg, slog.New(captureHandler{c: make(chan logLine, 100), all: recs}))
	require.NoError(t, err)
	return dir, srv, recs
}

// TestCertificateReload checks that certificates are loaded again with the
// keys, and that a bad new file keeps the old certificate, with an error.
func TestCertificateReload(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir, srv, recs := serverEnv(t, e)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(t.Context())
	reload := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, reload) }()
	defer func() { cancel(); <-done }()
	addr := srv.Addrs()[0].String()

	serial := func(name string) string {
		t.Helper()
		conn, err := tls.Dial("tcp", addr, e.clientConfig(name, e.list))
		require.NoError(t, err)
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	oldPub, oldMail := serial(publicName), serial(plainName)

	newPub, newMail := e.cert(publicName), e.cert(plainName)
	writeCert(t, dir, "cover", newPub)
	writeCert(t, dir, "mail", newMail)
	reload <- struct{}{}
	require.Eventually(t, func() bool { return serial(publicName) != oldPub }, 5*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return serial(plainName) != oldMail }, 5*time.Second, 20*time.Millisecond)
	assert.Equal(t, newPub.Leaf.SerialNumber.String(), serial(publicName))
	assert.Equal(t, newMail.Leaf.SerialNumber.String(), serial(plainName))

	// A bad file: the certificate in use stays, and the error is logged.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "mail.crt"), []byte("junk"), 0o600))
	writeCert(t, dir, "cover", e.cert("other.example"))
	reload <- struct{}{}
	require.Eventually(t, func() bool {
		return len(recs.matching("ERROR certificate not reloaded", "mail.crt")) == 1 &&
			len(recs.matching("ERROR certificate not reloaded", "cover.crt", "not for cover.example")) == 1
	}, 5*time.Second, 20*time.Millisecond, recs.text())
	assert.Equal(t, newPub.Leaf.SerialNumber.String(), serial(publicName))
	assert.Equal(t, newMail.Leaf.SerialNumber.String(), serial(plainName))
}

// TestFileWarnings checks the warnings on certificates near or past their
// expiry and on key files anyone may read.
func TestFileWarnings(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir, srv, recs := serverEnv(t, e)
	// testpki certificates are valid for 24 hours.
	assert.Len(t, recs.matching("WARN certificate expires soon", "cover.crt"), 1, recs.text())
	assert.Len(t, recs.matching("WARN certificate expires soon", "mail.crt"), 1, recs.text())
	assert.Empty(t, recs.matching("world-readable"))

	f := srv.certs[[2]string{filepath.Join(dir, "cover.crt"), filepath.Join(dir, "cover.key")}]
	require.NotNil(t, f)
	c := f.cert.Load()
	_, err := f.load(srv.logger, c.Leaf.NotAfter.Add(time.Second))
	require.NoError(t, err)
	assert.Len(t, recs.matching("WARN certificate has expired", "cover.crt"), 1, recs.text())
	before := len(recs.matching("WARN certificate"))
	_, err = f.load(srv.logger, c.Leaf.NotAfter.Add(-certExpiryWarning-time.Hour))
	require.NoError(t, err)
	assert.Len(t, recs.matching("WARN certificate"), before, "no warning 15 days before expiry")

	require.NoError(t, os.Chmod(filepath.Join(dir, "cover.key"), 0o644))
	require.NoError(t, os.Chmod(filepath.Join(dir, "keys", "1.ech"), 0o604))
	srv.Reload()
	assert.Len(t, recs.matching("WARN private key file is world-readable", "cover.key", "-rw-r--r--"), 1, recs.text())
	assert.Len(t, recs.matching("WARN private key file is world-readable", "1.ech"), 1, recs.text())
	assert.Empty(t, recs.matching("mail.key", "world-readable"))
}

// TestKeyForOtherPublicName checks that a key whose config names another
// public name is refused, at start and on reload.
func TestKeyForOtherPublicName(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir, srv, recs := serverEnv(t, e)
	other, err := ech.GenerateKey("other.example", &ech.KeyOptions{AvoidConfigIDs: e.ks.ConfigIDs()})
	require.NoError(t, err)
	writeKey(t, filepath.Join(dir, "keys"), "2.ech", other)
	srv.Reload()
	assert.Len(t, recs.matching("ERROR keys not reloaded", `"other.example"`), 1, recs.text())
	assert.Len(t, srv.Router.Keys.Keys(), 1, "the keys in use stay")

	cfg, err := LoadConfig(filepath.Join(dir, "router.json"))
	require.NoError(t, err)
	_, err = New(cfg, slog.New(captureHandler{c: make(chan logLine, 10)}))
	assert.ErrorIs(t, err, errWrongPublicName)
	assert.ErrorContains(t, err, "other.example")
}

// TestCheckFiles checks that every missing file is reported.
func TestCheckFiles(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir, _, _ := serverEnv(t, e)
	cfg, err := LoadConfig(filepath.Join(dir, "router.json"))
	require.NoError(t, err)
	require.NoError(t, CheckFiles(cfg))
	require.NoError(t, os.Remove(filepath.Join(dir, "cover.key")))
	require.NoError(t, os.Remove(filepath.Join(dir, "mail.crt")))
	require.NoError(t, os.RemoveAll(filepath.Join(dir, "keys")))
	err = CheckFiles(cfg)
	assert.ErrorIs(t, err, os.ErrNotExist)
	for _, want := range []string{"keys.dir: ", "public.key: ", "listeners[0].routes[0].cert: "} {
		assert.ErrorContains(t, err, want)
	}
	assert.NotContains(t, err.Error(), "public.cert")
}
