package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/cli"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func keygen(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e strings.Builder
	code = cli.Run("ech-keygen", args, &o, &e, run)
	return code, o.String(), e.String()
}

func TestNewAndInspect(t *testing.T) {
	t.Parallel()
	out := filepath.Join(t.TempDir(), "keys", "cover.ech")
	code, stdout, stderr := keygen(t, "new", "-public-name", "cover.example", "-out", out,
		"-dns", "secret.example,mail.example", "-alpn", "h2,http/1.1", "-ttl", "1h")
	require.Equal(t, 0, code, stderr)

	data, err := os.ReadFile(out)
	require.NoError(t, err)
	f, err := ech.ParsePEM(data)
	require.NoError(t, err)
	k, err := f.Key()
	require.NoError(t, err)
	c, err := ech.KeyConfig(k)
	require.NoError(t, err)
	assert.Equal(t, "cover.example", c.PublicName)
	assert.Equal(t, ech.KEMX25519, c.KEM)
	assert.Equal(t, ech.DefaultCipherSuites, c.CipherSuites)
	fi, err := os.Stat(out)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	keys, err := ech.LoadKeyDir(filepath.Dir(out))
	require.NoError(t, err)
	require.Len(t, keys, 1, "the router's key directory format")

	assert.Contains(t, stdout, c.String())
	record := f.ConfigList.HTTPSRecord("secret.example", 3600e9, "h2", "http/1.1")
	assert.Contains(t, stdout, record)
	assert.Contains(t, stdout, "mail.example. 3600 IN HTTPS 1 .")

	// Run again, as a README followed twice: the key is kept, not replaced.
	code, stdout, stderr = keygen(t, "new", "-public-name", "cover.example", "-out", out, "-dns", "secret.example", "-ttl", "1h")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "kept "+out)
	assert.Contains(t, stdout, f.ConfigList.HTTPSRecord("secret.example", 3600e9))
	again, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, data, again, "an existing key file is not overwritten")

	code, _, stderr = keygen(t, "new", "-public-name", "other.example", "-out", out)
	assert.Equal(t, 1, code, "a key for another name is not overwritten")
	assert.Contains(t, stderr, "exists with a key for cover.example, not other.example")
	notKey := filepath.Join(t.TempDir(), "notes.ech")
	require.NoError(t, os.WriteFile(notKey, []byte("hello"), 0o600))
	code, _, stderr = keygen(t, "new", "-public-name", "cover.example", "-out", notKey)
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "not an ECH key file")
	got, err := os.ReadFile(notKey)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))

	code, stdout, stderr = keygen(t, "inspect", out)
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "RFC 9934 PEM file with a private key")
	assert.Contains(t, stdout, c.String())
	assert.Contains(t, stdout, "base64: "+f.ConfigList.String())

	// A base64 list on the command line, and in a file, and binary.
	code, stdout, _ = keygen(t, "inspect", "-dns", "secret.example", f.ConfigList.String())
	require.Equal(t, 0, code)
	assert.Contains(t, stdout, "argument: base64 ECHConfigList")
	assert.Contains(t, stdout, f.ConfigList.HTTPSRecord("secret.example", 300e9))
	b64 := filepath.Join(t.TempDir(), "list.b64")
	require.NoError(t, os.WriteFile(b64, []byte(f.ConfigList.String()+"\n"), 0o600))
	bin := filepath.Join(t.TempDir(), "list.bin")
	require.NoError(t, os.WriteFile(bin, f.ConfigList, 0o600))
	code, stdout, _ = keygen(t, "inspect", b64, bin)
	require.Equal(t, 0, code)
	assert.Contains(t, stdout, "list.b64: base64 ECHConfigList")
	assert.Contains(t, stdout, "list.bin: binary ECHConfigList")

	// A PEM file without a private key: the ECHCONFIG block alone.
	pub := filepath.Join(t.TempDir(), "public.pem")
	require.NoError(t, os.WriteFile(pub, data[strings.Index(string(data), "-----BEGIN ECHCONFIG"):], 0o600))
	code, stdout, _ = keygen(t, "inspect", pub)
	require.Equal(t, 0, code)
	assert.Contains(t, stdout, "without a private key")
}

func TestNewOptions(t *testing.T) {
	t.Parallel()
	out := filepath.Join(t.TempDir(), "pq.ech")
	code, stdout, stderr := keygen(t, "new", "-public-name", "cover.example", "-out", out,
		"-kem", "xwing", "-suites", "HKDF-SHA256/AES-128-GCM,sha384/chacha20poly1305", "-config-id", "7", "-max-name-length", "64")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "config_id=7 kem=MLKEM768-X25519 suites=[HKDF-SHA256/AES-128-GCM HKDF-SHA384/ChaCha20-Poly1305]")
	assert.Contains(t, stdout, "max_name_length=64")
	assert.Contains(t, stdout, "cover.example. 300 IN HTTPS 1 .", "the public name's record by default")
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.txt")
	require.NoError(t, os.WriteFile(junk, []byte("not a key\n"), 0o600))
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "usage"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"new", "-out", filepath.Join(dir, "a.ech")}, 2, "needs -public-name and -out"},
		{[]string{"new", "-public-name", "192.0.2.1", "-out", filepath.Join(dir, "b.ech")}, 1, "is an IP address"},
		{[]string{"new", "-public-name", "c.example", "-kem", "rsa", "-out", filepath.Join(dir, "c.ech")}, 1, `-kem: "rsa"`},
		{[]string{"new", "-public-name", "c.example", "-suites", "sha256", "-out", filepath.Join(dir, "d.ech")}, 1, `-suites: "sha256"`},
		{[]string{"new", "-public-name", "c.example", "-config-id", "256", "-out", filepath.Join(dir, "e.ech")}, 2, "at most 255"},
		{[]string{"new", "-bogus"}, 2, "flag provided but not defined"},
		{[]string{"inspect"}, 2, "needs a file"},
		{[]string{"inspect", "not base64!"}, 1, "neither a file nor a base64 ECHConfigList"},
		{[]string{"inspect", junk}, 1, "junk.txt: not a PEM file"},
	} {
		code, _, stderr := keygen(t, tc.args...)
		assert.Equal(t, tc.code, code, "%q", tc.args)
		assert.Contains(t, stderr, tc.want, "%q", tc.args)
	}
	code, stdout, _ := keygen(t, "help")
	assert.Equal(t, 0, code)
	assert.Contains(t, stdout, "ech-keygen new")
	code, stdout, _ = keygen(t, "-version")
	assert.Equal(t, 0, code)
	assert.Regexp(t, `^ech-keygen github.com/echkit/ech \S+ .*go1\.`, stdout)
}
