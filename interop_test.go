package ech_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Independent ECH clients run against NewConn in front of a crypto/tls
// backend (echtest.NewServer with greet) over loopback:
//
//   - BoringSSL's bssl-tool (Debian android-boringssl) prints
//     "Encrypted ClientHello: yes" or "...: no" after a handshake, and fails
//     with "ECH_REJECTED" when the server rejected its ECH configs.
//   - NSS's tstclnt (Debian libnss3-tools) prints nothing about ECH on
//     success: with -N it completes a handshake only when ECH was accepted,
//     and fails with SSL_ERROR_ECH_RETRY_WITH_ECH (and prints "Received ECH
//     retry_configs:" and their base64) when the server rejected ECH.
//
// Each case checks what the tool reports, what the server recorded of the
// connection and what the backend answered ("hello <name>").

// interopTimeout bounds one run of a client tool.
const interopTimeout = 20 * time.Second

// interopTool returns the path of an installed client tool. A missing tool
// skips the test, except under CI (CI set), where .ci/run installs the
// tools and a missing one is a failure.
func interopTool(t *testing.T, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is not installed (Debian package %s) and CI is set: %v", name, debianPackage, err)
	}
	t.Skipf("%s is not installed (Debian package %s); with CI set this is a failure", name, debianPackage)
	return ""
}

// interopRun is the outcome of one run of a client tool.
type interopRun struct {
	stdout, stderr string
	err            error // from exec.Cmd.Run: nil on exit status 0
}

func (r interopRun) String() string {
	exit := "status 0"
	if r.err != nil {
		exit = r.err.Error()
	}
	return "exit " + exit + "\nstdout:\n" + r.stdout + "\nstderr:\n" + r.stderr
}

// runInteropTool runs a client tool with stdin read from a regular file
// holding stdin (tstclnt loops forever on a closed pipe), bounded by
// interopTimeout.
func runInteropTool(t *testing.T, stdin string, path string, args ...string) interopRun {
	t.Helper()
	in := filepath.Join(t.TempDir(), "stdin")
	require.NoError(t, os.WriteFile(in, []byte(stdin), 0o600))
	f, err := os.Open(in)
	require.NoError(t, err)
	defer f.Close()

	ctx, cancel := context.WithTimeout(t.Context(), interopTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = f, &stdout, &stderr
	cmd.WaitDelay = 2 * time.Second
	err = cmd.Run()
	r := interopRun{stdout: stdout.String(), stderr: stderr.String(), err: err}
	require.NoError(t, ctx.Err(), "%s timed out\n%s", filepath.Base(path), r)
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("running %s: %v", path, err)
	}
	return r
}

// interopSetup is a server and the files a client tool needs to reach it.
type interopSetup struct {
	srv     *echtest.Server
	dir     string
	caPEM   string         // the test CA's certificate, PEM
	list    ech.ConfigList // the server's ECHConfigList
	listBin string         // list as a file
	stale   ech.ConfigList // configs of a key the server lacks
	staleID uint8
	host    string
	port    string
	seen    int // connections whose records were checked
}

// newInteropSetup starts a server whose backend offers h2 and http/1.1;
// hrr makes the backend accept only P-256 so that a client whose first key
// share is X25519 gets a HelloRetryRequest.
func newInteropSetup(t *testing.T, hrr bool) *interopSetup {
	t.Helper()
	// NOTE: tstclnt checks the certificate of a handshake whose ECH was
	// rejected against the inner name (-a), not the public name (RFC 9849,
	// Section 6.1.6): a certificate for both lets it go on to report the
	// retry configs.
	ca := echtest.NewCA(t)
	cert := ca.Certificate(publicName, innerName)
	srv := echtest.NewServer(t, greet, echtest.WithCA(ca), echtest.WithBackendConfig(func(c *tls.Config) {
		c.GetCertificate, c.Certificates = nil, []tls.Certificate{cert}
		c.NextProtos = []string{"h2", "http/1.1"}
		if hrr {
			c.CurvePreferences = []tls.CurveID{tls.CurveP256}
		}
	}))
	s := &interopSetup{srv: srv, dir: t.TempDir()}
	var err error
	s.host, s.port, err = net.SplitHostPort(srv.Addr)
	require.NoError(t, err)

	s.caPEM = filepath.Join(s.dir, "ca.pem")
	require.NoError(t, os.WriteFile(s.caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.CA.Root().Raw}), 0o600))
	s.list, err = srv.Keys.ConfigList()
	require.NoError(t, err)
	s.listBin = filepath.Join(s.dir, "configlist.bin")
	require.NoError(t, os.WriteFile(s.listBin, s.list, 0o600))

	s.stale = srv.StaleClientConfig(innerName).EncryptedClientHelloConfigList
	stale, err := s.stale.Configs()
	require.NoError(t, err)
	s.staleID = stale[0].ConfigID
	return s
}

// next returns what the server recorded of the next connection.
func (s *interopSetup) next(t *testing.T) echtest.ConnInfo {
	t.Helper()
	s.seen++
	return s.srv.WaitConns(t, s.seen)[s.seen-1]
}

// checkAccepted checks the server's record of the next connection, whose
// ECH was accepted.
func (s *interopSetup) checkAccepted(t *testing.T) echtest.ConnInfo {
	t.Helper()
	r := s.next(t)
	require.NoError(t, r.Err)
	assert.Equal(t, ech.StatusAccepted, r.Status)
	assert.Equal(t, innerName, r.ServerName)
	assert.Equal(t, publicName, r.OuterServerName)
	assert.True(t, r.ECHPresented)
	assert.Equal(t, s.srv.Keys.ConfigIDs()[0], r.ConfigID)
	return r
}

// checkRejected checks the server's record of the next connection, whose
// ECH did not decrypt: the outer hello went to the backend.
func (s *interopSetup) checkRejected(t *testing.T) echtest.ConnInfo {
	t.Helper()
	r := s.next(t)
	assert.Equal(t, ech.StatusRejected, r.Status)
	assert.Equal(t, publicName, r.ServerName)
	assert.Equal(t, publicName, r.OuterServerName)
	assert.True(t, r.ECHPresented)
	return r
}

// TestInteropBoringSSL runs BoringSSL's bssl-tool client through NewConn.
func TestInteropBoringSSL(t *testing.T) {
	t.Parallel()
	bssl := interopTool(t, "bssl-tool", "android-boringssl")
	client := func(s *interopSetup, args ...string) []string {
		return append([]string{"client", "-connect", s.srv.Addr, "-root-certs", s.caPEM}, args...)
	}

	t.Run("accepted", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, false)
		run := runInteropTool(t, "", bssl, client(s, "-server-name", innerName, "-ech-config-list", s.listBin,
			"-alpn-protos", "h2,http/1.1")...)
		require.NoError(t, run.err, "%s", run)
		assert.Contains(t, run.stderr, "Encrypted ClientHello: yes", "bssl-tool reports ECH accepted")
		assert.Contains(t, run.stderr, "ALPN protocol: h2")
		assert.Contains(t, run.stdout, "hello "+innerName)
		r := s.checkAccepted(t)
		assert.Equal(t, []string{"h2", "http/1.1"}, r.ALPN, "the inner hello's ALPN")
		assert.Equal(t, "h2", r.NegotiatedProtocol)
		assert.False(t, r.HelloRetryRequest)
	})

	t.Run("hrr", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, true)
		// The first key share is X25519; the backend takes only P-256.
		run := runInteropTool(t, "", bssl, client(s, "-server-name", innerName, "-ech-config-list", s.listBin,
			"-curves", "X25519:P-256")...)
		require.NoError(t, run.err, "%s", run)
		assert.Contains(t, run.stderr, "Encrypted ClientHello: yes", "bssl-tool reports ECH accepted")
		assert.Contains(t, run.stderr, "ECDHE curve: P-256")
		assert.Contains(t, run.stdout, "hello "+innerName)
		cs := s.checkAccepted(t)
		assert.True(t, cs.HelloRetryRequest, "the backend sent a HelloRetryRequest")
		assert.Equal(t, tls.CurveP256, cs.CurveID)
	})

	for _, hrr := range []bool{false, true} {
		name := "grease"
		if hrr {
			name = "grease_hrr"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := newInteropSetup(t, hrr)
			run := runInteropTool(t, "", bssl, client(s, "-server-name", publicName, "-ech-grease",
				"-curves", "X25519:P-256")...)
			require.NoError(t, run.err, "%s", run)
			assert.Contains(t, run.stderr, "Encrypted ClientHello: no", "bssl-tool reports no ECH")
			assert.Contains(t, run.stdout, "hello "+publicName)
			r := s.checkRejected(t)
			require.NoError(t, r.Err)
			assert.Equal(t, hrr, r.HelloRetryRequest)
		})
	}

	t.Run("rejected", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, false)
		stale := filepath.Join(s.dir, "stale.bin")
		require.NoError(t, os.WriteFile(stale, s.stale, 0o600))
		run := runInteropTool(t, "", bssl, client(s, "-server-name", innerName, "-ech-config-list", stale)...)
		require.Error(t, run.err, "bssl-tool fails when ECH is rejected\n%s", run)
		assert.Contains(t, run.stderr, "ECH_REJECTED", "bssl-tool reports ECH rejected")
		assert.NotContains(t, run.stdout, "hello ")
		r := s.checkRejected(t)
		assert.Equal(t, s.staleID, r.ConfigID)

		// NOTE: bssl-tool has no flag to print the retry configs
		// (SSL_get0_ech_retry_configs): crypto/tls, with the same stale
		// config, takes them from the server's rejection, and bssl-tool
		// reconnects with them.
		t.Run("retry", func(t *testing.T) {
			_, err := tls.Dial("tcp", s.srv.Addr, s.srv.StaleClientConfig(innerName))
			var rej *tls.ECHRejectionError
			require.ErrorAs(t, err, &rej)
			require.NotEmpty(t, rej.RetryConfigList)
			s.checkRejected(t)
			retry := filepath.Join(s.dir, "retry.bin")
			require.NoError(t, os.WriteFile(retry, rej.RetryConfigList, 0o600))
			run := runInteropTool(t, "", bssl, client(s, "-server-name", innerName, "-ech-config-list", retry)...)
			require.NoError(t, run.err, "%s", run)
			assert.Contains(t, run.stderr, "Encrypted ClientHello: yes", "bssl-tool reports ECH accepted")
			assert.Contains(t, run.stdout, "hello "+innerName)
			s.checkAccepted(t)
		})
	})
}

// TestInteropNSS runs NSS's tstclnt through NewConn.
func TestInteropNSS(t *testing.T) {
	t.Parallel()
	tstclnt := interopTool(t, "tstclnt", "libnss3-tools")
	certutil := interopTool(t, "certutil", "libnss3-tools")

	// client returns tstclnt's arguments, with an NSS database in s.dir that
	// trusts the test CA.
	client := func(t *testing.T, s *interopSetup, args ...string) []string {
		t.Helper()
		db := filepath.Join(s.dir, "nssdb")
		if _, err := os.Stat(db); err != nil {
			require.NoError(t, os.Mkdir(db, 0o700))
			run := runInteropTool(t, "", certutil, "-N", "--empty-password", "-d", "sql:"+db)
			require.NoError(t, run.err, "%s", run)
			run = runInteropTool(t, "", certutil, "-A", "-n", "ech test CA", "-t", "CT,,", "-i", s.caPEM, "-d", "sql:"+db)
			require.NoError(t, run.err, "%s", run)
		}
		return append([]string{"-h", s.host, "-p", s.port, "-d", "sql:" + db, "-V", "tls1.3:tls1.3"}, args...)
	}

	t.Run("accepted", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, false)
		run := runInteropTool(t, "", tstclnt, client(t, s, "-a", innerName, "-N", s.list.String())...)
		// With -N, tstclnt completes only handshakes that accepted ECH.
		require.NoError(t, run.err, "%s", run)
		assert.NotContains(t, run.stderr, "SSL_ERROR")
		assert.Contains(t, run.stdout, "hello "+innerName)
		assert.False(t, s.checkAccepted(t).HelloRetryRequest)
	})

	t.Run("hrr", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, true)
		// NSS sends a key share for its first group only: X25519.
		run := runInteropTool(t, "", tstclnt, client(t, s, "-a", innerName, "-N", s.list.String(), "-I", "x25519,P256")...)
		require.NoError(t, run.err, "%s", run)
		assert.NotContains(t, run.stderr, "SSL_ERROR")
		assert.Contains(t, run.stdout, "hello "+innerName)
		cs := s.checkAccepted(t)
		assert.True(t, cs.HelloRetryRequest, "the backend sent a HelloRetryRequest")
		assert.Equal(t, tls.CurveP256, cs.CurveID)
	})

	for _, hrr := range []bool{false, true} {
		name := "grease"
		if hrr {
			name = "grease_hrr"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s := newInteropSetup(t, hrr)
			run := runInteropTool(t, "", tstclnt, client(t, s, "-a", publicName, "-i", "32", "-I", "x25519,P256")...)
			require.NoError(t, run.err, "%s", run)
			assert.NotContains(t, run.stderr, "SSL_ERROR")
			assert.Contains(t, run.stdout, "hello "+publicName)
			r := s.checkRejected(t)
			require.NoError(t, r.Err)
			assert.Equal(t, hrr, r.HelloRetryRequest)
		})
	}

	t.Run("rejected_then_retry", func(t *testing.T) {
		t.Parallel()
		s := newInteropSetup(t, false)
		// tstclnt prints the retry configs only when the handshake is
		// driven by data to send, so it gets a request on stdin.
		const request = "GET / HTTP/1.0\r\n\r\n"
		run := runInteropTool(t, request, tstclnt, client(t, s, "-a", innerName, "-N", s.stale.String())...)
		require.Error(t, run.err, "tstclnt fails when ECH is rejected\n%s", run)
		assert.Contains(t, run.stderr, "SSL_ERROR_ECH_RETRY_WITH_ECH", "tstclnt reports ECH rejected with retry configs")
		assert.NotContains(t, run.stdout, "hello ")
		r := s.checkRejected(t)
		assert.Equal(t, s.staleID, r.ConfigID)

		retry := nssRetryConfigs(t, run.stderr)
		assert.Equal(t, s.list, retry, "the public name's server sent the key set's configs")

		run = runInteropTool(t, "", tstclnt, client(t, s, "-a", innerName, "-N", retry.String())...)
		require.NoError(t, run.err, "%s", run)
		assert.NotContains(t, run.stderr, "SSL_ERROR")
		assert.Contains(t, run.stdout, "hello "+innerName)
		s.checkAccepted(t)
	})
}

// nssRetryConfigs returns the retry configs tstclnt printed after
// "Received ECH retry_configs:".
func nssRetryConfigs(t *testing.T, stderr string) ech.ConfigList {
	t.Helper()
	const marker = "Received ECH retry_configs:"
	_, after, ok := strings.Cut(stderr, marker)
	require.True(t, ok, "tstclnt printed no retry configs:\n%s", stderr)
	fields := strings.Fields(after)
	require.NotEmpty(t, fields, "tstclnt printed no retry configs:\n%s", stderr)
	list, err := base64.StdEncoding.DecodeString(fields[0])
	require.NoError(t, err)
	_, err = ech.ParseConfigList(list)
	require.NoError(t, err)
	return list
}
