package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/cli"
	"github.com/echkit/ech/internal/testpki"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// build compiles the router once for the tests.
func build(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "router-test-"); buildErr != nil {
			return
		}
		var out []byte
		// go test puts the go command that runs it first on PATH.
		out, buildErr = exec.Command("go", "build", "-o", filepath.Join(binDir, "router"), ".").CombinedOutput()
		if buildErr != nil {
			buildErr = fmt.Errorf("%w: %s", buildErr, out)
		}
	})
	require.NoError(t, buildErr)
	return filepath.Join(binDir, "router")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func TestCheck(t *testing.T) {
	t.Parallel()
	bin := build(t)
	// The example's files are not on this machine: each is reported.
	out, err := exec.Command(bin, "-check", "-config", "chatmail.json").CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 1, ee.ExitCode())
	assert.Contains(t, string(out), "chatmail.json: missing files:\n")
	for _, want := range []string{"keys.dir: stat /etc/ech-router/keys: no such file", "public.cert: ", "public.key: ",
		"listeners[0].routes[0].cert: ", "listeners[2].routes[0].key: "} {
		assert.Contains(t, string(out), want)
	}

	// A positional argument is refused, not ignored.
	out, err = exec.Command(bin, "-check", "chatmail.json").CombinedOutput()
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 2, ee.ExitCode())
	assert.Contains(t, string(out), `ech-router: unexpected argument "chatmail.json": the configuration file is given by -config`)

	bad := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte("{\n  \"keys\": {\"dir\": \"k\"},\n  \"listen\": [\":443\"]\n}\n"), 0o600))
	out, err = exec.Command(bin, "-config", bad).CombinedOutput()
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 1, ee.ExitCode())
	assert.Equal(t, "ech-router: bad.json:3: listen: unknown setting\n", string(out), "the error names the line")
}

func TestVersion(t *testing.T) {
	t.Parallel()
	var stdout, stderr strings.Builder
	require.Equal(t, 0, cli.Run("ech-router", []string{"-version"}, &stdout, &stderr, run), stderr.String())
	assert.Regexp(t, `^ech-router github.com/echkit/ech \S+ .*go1\.`, stdout.String())
	assert.Equal(t, 2, cli.Run("ech-router", []string{"-log", "xml"}, &stdout, &stderr, run))
	assert.Contains(t, stderr.String(), `-log "xml": want text or json`)
}

// TestSystemdUnit checks ech-router.service with systemd-analyze verify, as
// systemd would read it, with the binary it names replaced by this one.
func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("systemd-analyze is missing (Debian package systemd): .ci/run installs it")
		}
		t.Skip("systemd-analyze not found: apt-get install systemd")
	}
	unit, err := os.ReadFile("ech-router.service")
	require.NoError(t, err)
	for _, want := range []string{"DynamicUser=yes", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ProtectSystem=strict",
		"ReadOnlyPaths=/etc/ech-router", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"} {
		assert.Contains(t, string(unit), want)
	}
	bin := build(t)
	dir := t.TempDir()
	local := strings.ReplaceAll(string(unit), "/usr/local/bin/ech-router", bin)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ech-router.service"), []byte(local), 0o644))
	cmd := exec.Command(sa, "verify", filepath.Join(dir, "ech-router.service"))
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "systemd-analyze verify:\n%s", out)
	assert.Empty(t, strings.TrimSpace(string(out)), "no warnings")
}

func writeCert(t *testing.T, dir, name string, c tls.Certificate) {
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

func writeKey(t *testing.T, path string, k ech.Key) {
	t.Helper()
	b, err := ech.MarshalPEM(k)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path+".tmp", b, 0o600))
	require.NoError(t, os.Rename(path+".tmp", path))
}

// TestSignals runs the router: a connection through it, a key added and
// picked up on SIGHUP, and a graceful exit on SIGTERM.
func TestSignals(t *testing.T) {
	t.Parallel()
	bin := build(t)
	dir := t.TempDir()
	ca, err := testpki.NewCA()
	require.NoError(t, err)
	pub, err := ca.Leaf("cover.example")
	require.NoError(t, err)
	inner, err := ca.Leaf("chat.example")
	require.NoError(t, err)
	writeCert(t, dir, "cover", pub)
	writeCert(t, dir, "chat", inner)
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	k1, err := ech.GenerateKey("cover.example", nil)
	require.NoError(t, err)
	writeKey(t, filepath.Join(dir, "keys", "1.ech"), k1)

	// A plaintext backend that greets.
	bln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer bln.Close()
	go func() {
		for {
			c, err := bln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.WriteString(c, "* OK IMAP ready\r\n")
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, c)
			}()
		}
	}()
	// A free port for the router.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": "cover.example", "cert": "cover.crt", "key": "cover.key"},
  "listeners": [{"address": %q, "routes": [
    {"name": "imap", "server_names": ["chat.example"], "alpn": ["imap"], "mode": "terminate",
     "backend": %q, "cert": "chat.crt", "key": "chat.key"}
  ]}]
}`, addr, bln.Addr().String())
	require.NoError(t, os.WriteFile(filepath.Join(dir, "router.json"), []byte(config), 0o600))
	out, err := exec.Command(bin, "-check", "-config", filepath.Join(dir, "router.json")).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, filepath.Join(dir, "router.json")+": ok\n", string(out))

	cmd := exec.Command(bin, "-config", filepath.Join(dir, "router.json"), "-log", "json")
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	waitFor := func(re string) string {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				require.True(t, ok, "router exited while waiting for %s", re)
				if regexp.MustCompile(re).MatchString(l) {
					return l
				}
			case <-timeout:
				t.Fatalf("no log line matching %s", re)
			}
		}
	}
	waitFor(`"msg":"listening"`)

	dial := func(k ech.Key) (string, error) {
		ks, err := ech.NewKeySet(k)
		require.NoError(t, err)
		list, err := ks.ConfigList()
		require.NoError(t, err)
		c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "chat.example", RootCAs: ca.Pool,
			EncryptedClientHelloConfigList: list, NextProtos: []string{"imap"}})
		if err != nil {
			return "", err
		}
		defer c.Close()
		if !c.ConnectionState().ECHAccepted {
			return "", fmt.Errorf("ECH not accepted")
		}
		return bufio.NewReader(c).ReadString('\n')
	}
	greeting, err := dial(k1)
	require.NoError(t, err)
	assert.Equal(t, "* OK IMAP ready\r\n", greeting)
	line := waitFor(`"msg":"connection"`)
	for _, field := range []string{`"client":"127.0.0.1:`, `"ech":"accepted"`, `"config_id":`, `"outer_sni":"cover.example"`,
		`"inner_sni":"chat.example"`, `"alpn":"imap"`, `"route":"imap"`, `"mode":"terminate"`, `"bytes_in":`, `"bytes_out":`, `"duration":`} {
		assert.Contains(t, line, field)
	}

	// A new key, loaded on SIGHUP.
	k2, err := ech.GenerateKey("cover.example", &ech.KeyOptions{AvoidConfigIDs: []uint8{mustConfig(t, k1).ConfigID}})
	require.NoError(t, err)
	writeKey(t, filepath.Join(dir, "keys", "2.ech"), k2)
	_, err = dial(k2)
	require.ErrorContains(t, err, "rejected", "not loaded yet")
	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	waitFor(`"msg":"keys loaded".*"keys":2`)
	greeting, err = dial(k2)
	require.NoError(t, err)
	assert.Equal(t, "* OK IMAP ready\r\n", greeting)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	waitFor(`"msg":"shutting down"`)
	done := make(chan error, 1)
	go func() {
		for range lines {
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		assert.NoError(t, err, "exit status 0 on SIGTERM")
	case <-time.After(10 * time.Second):
		t.Fatal("router did not exit on SIGTERM")
	}
}

func mustConfig(t *testing.T, k ech.Key) *ech.Config {
	c, err := ech.KeyConfig(k)
	require.NoError(t, err)
	return c
}
