package router

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The mail integration test runs the router in front of Debian's Dovecot and
// Postfix (packages dovecot-imapd, dovecot-lmtpd, postfix; bssl-tool from
// android-boringssl for the GREASE client), as cmd/ech-router/chatmail.json
// does: the router terminates TLS and sends a PROXY v2 header, Dovecot and
// Postfix speak plaintext behind it. Postfix authenticates submissions
// through Dovecot's SASL service and delivers to Dovecot over LMTP.
//
// NOTE: Postfix reads only the addresses of a PROXY v2 header, not its
// TLVs, so it never learns that the client used TLS: smtpd_tls_auth_only
// must stay off (its default) on the port behind the router, or AUTH is
// not offered.

const (
	mailName     = "chat.example"
	mailCover    = "cover.example"
	mailUser     = "alice@" + mailName
	mailPassword = "correct horse battery staple"
	mailTimeout  = 20 * time.Second // bounds each step: a start, a session, a delivery
)

// Source addresses of the clients, one per session, so that each shows in
// the servers' logs only if the PROXY header carried it.
const (
	srcIMAP993    = "127.0.0.2"
	srcSMTP465    = "127.0.0.3"
	srcIMAP443    = "127.0.0.4"
	srcSMTP443    = "127.0.0.5"
	srcGreaseIMAP = "127.0.0.6"
	srcGreaseSMTP = "127.0.0.7"
)

var dovecotConf = template.Must(template.New("dovecot.conf").Parse(`# Written by TestMailServers.
base_dir = {{.Dir}}/dovecot-run
state_dir = {{.Dir}}/dovecot-state
log_path = {{.Dir}}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
# The router terminates TLS. disable_plaintext_auth is left at its default,
# yes: a login is allowed only because the PROXY header says TLS was used.
ssl = no
auth_mechanisms = plain
auth_verbose = yes
haproxy_trusted_networks = 127.0.0.0/8
mail_location = maildir:~/Maildir
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {{.Dir}}/passwd
}
userdb {
  driver = static
  args = uid={{.UID}} gid={{.GID}} home={{.Dir}}/home/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = {{.IMAPPort}}
    haproxy = yes
  }
  inet_listener imaps {
    port = 0
  }
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = {{.LMTPPort}}
  }
}
# Postfix's SASL authentication.
service auth {
  inet_listener {
    address = 127.0.0.1
    port = {{.AuthPort}}
  }
}
`))

var postfixMain = template.Must(template.New("main.cf").Parse(`# Written by TestMailServers.
compatibility_level = 3.6
queue_directory = {{.Dir}}/postfix-spool
data_directory = {{.Dir}}/postfix-data
maillog_file = {{.Dir}}/postfix.log
maillog_file_prefixes = {{.Dir}}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{{.Name}}
mydomain = {{.Name}}
myorigin = {{.Name}}
mydestination = {{.Name}}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_peername_lookup = no
local_recipient_maps =
local_transport = lmtp:inet:127.0.0.1:{{.LMTPPort}}
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
`))

// postfixMaster runs the services a delivery needs, none chrooted. The
// submissions-style smtpd behind the router reads a PROXY header.
var postfixMaster = template.Must(template.New("master.cf").Parse(`# Written by TestMailServers.
127.0.0.1:{{.SMTPPort}} inet n - n - - smtpd
  -o smtpd_upstream_proxy_protocol=haproxy
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path=inet:127.0.0.1:{{.AuthPort}}
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
lmtp      unix  - - n -     - lmtp
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
`))

// mailEnv is Dovecot and Postfix running for one test.
type mailEnv struct {
	Dir                                    string
	Name                                   string
	UID, GID                               int
	IMAPPort, LMTPPort, SMTPPort, AuthPort int
}

func TestMailServers(t *testing.T) {
	dovecot, err := exec.LookPath("dovecot")
	if err != nil {
		t.Skip("dovecot not installed (Debian packages dovecot-imapd dovecot-lmtpd):", err)
	}
	if _, err := os.Stat("/usr/sbin/postfix"); err != nil {
		t.Skip("postfix not installed (Debian package postfix):", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: Dovecot and Postfix switch to their own users")
	}
	_, bsslErr := exec.LookPath("bssl-tool")
	start := time.Now()
	m := startMailServers(t, dovecot)

	// The router, from a chatmail-shaped configuration file.
	ca := echtest.NewCA(t)
	ks := echtest.NewKeySet(t, mailCover)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	logs := &recordHandler{}
	srv := startMailRouter(t, m, ca, ks, logs)
	addrs := srv.Addrs()
	require.Len(t, addrs, 3)
	addr443, addr993, addr465 := addrs[0].String(), addrs[1].String(), addrs[2].String()

	client := func(t *testing.T, addr, src, alpn string) *textConn {
		t.Helper()
		d := &net.Dialer{Timeout: mailTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{
			ServerName:                     mailName,
			RootCAs:                        ca.Pool(),
			EncryptedClientHelloConfigList: list,
			NextProtos:                     []string{alpn},
			MinVersion:                     tls.VersionTLS13,
		})
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		require.True(t, conn.ConnectionState().ECHAccepted, "ECH accepted")
		conn.SetDeadline(time.Now().Add(mailTimeout))
		return newTextConn(t, conn, conn)
	}

	// SMTP first, then IMAP reads back what was delivered.
	tokens := map[string]string{}
	for _, tc := range []struct{ name, addr, src, alpn string }{
		{"smtp/465", addr465, srcSMTP465, "smtp"},
		{"smtp/443-alpn", addr443, srcSMTP443, "smtp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tokens[tc.name] = smtpSession(t, client(t, tc.addr, tc.src, tc.alpn))
		})
	}
	t.Run("grease/smtp/465", func(t *testing.T) {
		tokens["grease/smtp/465"] = smtpSession(t, greaseClient(t, ca, addr465, srcGreaseSMTP, "smtp"))
	})
	t.Run("delivered", func(t *testing.T) {
		for name, token := range tokens {
			m.waitDelivered(t, token)
			t.Logf("%s: message %s delivered", name, token)
		}
	})
	for _, tc := range []struct{ name, addr, src, alpn string }{
		{"imap/993", addr993, srcIMAP993, "imap"},
		{"imap/443-alpn", addr443, srcIMAP443, "imap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			subjects := imapSession(t, client(t, tc.addr, tc.src, tc.alpn), true)
			for name, token := range tokens {
				assert.Contains(t, subjects, "Subject: ech-test "+token, "message sent over %s read back", name)
			}
		})
	}
	t.Run("grease/imap/993", func(t *testing.T) {
		imapSession(t, greaseClient(t, ca, addr993, srcGreaseIMAP, "imap"), false)
	})

	// The router's connection lines: ECH accepted, or GREASE (ECH not
	// decrypted) routed by the clear name, each to the right route.
	srv.stop(t)
	for _, want := range []struct{ src, ech, route string }{
		{srcSMTP465, "accepted", "submissions"},
		{srcSMTP443, "accepted", "smtp-alpn"},
		{srcIMAP993, "accepted", "imaps"},
		{srcIMAP443, "accepted", "imap-alpn"},
		{srcGreaseSMTP, "rejected", "submissions"},
		{srcGreaseIMAP, "rejected", "imaps"},
	} {
		if bsslErr != nil && want.ech == "rejected" {
			continue
		}
		l := logs.from(want.src)
		if assert.NotNil(t, l, "router logged the connection from %s", want.src) {
			assert.Equal(t, want.ech, l["ech"], "ech status of %s", want.src)
			assert.Equal(t, want.route, l["route"], "route of %s", want.src)
			if want.ech == "accepted" {
				assert.Equal(t, mailCover, l["outer_sni"])
				assert.Equal(t, mailName, l["inner_sni"])
			} else {
				assert.Equal(t, mailName, l["outer_sni"], "GREASE: the real name in the clear")
			}
			assert.Empty(t, l["error"], "connection from %s", want.src)
		}
	}

	// The servers saw each client's own address, from the PROXY header,
	// and Dovecot treated the plaintext connections as secured.
	dlog := m.readLog("dovecot.log")
	plog := m.readLog("postfix.log")
	imapSrcs := []string{srcIMAP993, srcIMAP443}
	smtpSrcs := []string{srcSMTP465, srcSMTP443}
	if bsslErr == nil {
		imapSrcs = append(imapSrcs, srcGreaseIMAP)
		smtpSrcs = append(smtpSrcs, srcGreaseSMTP)
	}
	for _, src := range imapSrcs {
		line := findLine(dlog, "Login: user=<"+mailUser+">", "rip="+src+",")
		if assert.NotEmpty(t, line, "Dovecot logged a login from %s", src) {
			assert.Contains(t, line, "secured", "Dovecot saw TLS in the PROXY header")
		}
	}
	for _, src := range smtpSrcs {
		assert.NotEmpty(t, findLine(plog, "connect from unknown["+src+"]"), "Postfix logged the client %s", src)
		assert.NotEmpty(t, findLine(plog, "client=unknown["+src+"]", "sasl_username="+mailUser),
			"Postfix accepted a message from %s after AUTH (Dovecot SASL)", src)
	}
	assert.NotEmpty(t, findLine(plog, "status=sent", "lmtp"), "Postfix delivered over LMTP")

	if t.Failed() {
		t.Logf("router log:\n%s", logs) // the servers' logs are printed at cleanup
		return
	}
	grease := "GREASE clients (bssl-tool -ech-grease) over 993 and 465 routed by their clear name"
	if bsslErr != nil {
		grease = "GREASE skipped: bssl-tool not installed (Debian package android-boringssl)"
	}
	t.Logf("PASS mail servers behind the router (%s, Postfix %s) in %v: ECH accepted, "+
		"IMAP LOGIN/LIST/SELECT/FETCH/LOGOUT over 993 and 443 (ALPN imap), "+
		"SMTP EHLO/AUTH PLAIN/MAIL/RCPT/DATA/QUIT over 465 and 443 (ALPN smtp) delivered by LMTP and read back, "+
		"disable_plaintext_auth=yes with logins secured by PP2_TYPE_SSL, client addresses from the PROXY header in both logs; %s",
		dovecotVersion(), postfixVersion(), time.Since(start).Round(time.Millisecond), grease)
}

// startMailServers writes the configurations and starts Dovecot and
// Postfix as child processes, stopped at cleanup.
func startMailServers(t *testing.T, dovecot string) *mailEnv {
	t.Helper()
	dir := t.TempDir()
	// The servers' unprivileged users must reach their files: open the
	// temporary directory and its parent (both 0700) for traversal.
	for _, d := range []string{filepath.Dir(dir), dir} {
		require.NoError(t, os.Chmod(d, 0o755))
	}
	nobody, err := user.Lookup("nobody")
	require.NoError(t, err)
	nogroup, err := user.LookupGroup("nogroup")
	require.NoError(t, err)
	m := &mailEnv{Dir: dir, Name: mailName, IMAPPort: freePort(t), LMTPPort: freePort(t), SMTPPort: freePort(t), AuthPort: freePort(t)}
	m.UID, _ = strconv.Atoi(nobody.Uid)
	m.GID, _ = strconv.Atoi(nogroup.Gid)

	// Dovecot: one user in a passwd-file, mail in ~/Maildir owned by nobody.
	writeFile(t, filepath.Join(dir, "passwd"), mailUser+":{PLAIN}"+mailPassword+"\n", 0o644)
	require.NoError(t, os.Mkdir(filepath.Join(dir, "home"), 0o755))
	require.NoError(t, os.Chown(filepath.Join(dir, "home"), m.UID, m.GID))
	conf := filepath.Join(dir, "dovecot.conf")
	writeTemplate(t, conf, dovecotConf, m)
	out, err := exec.Command("doveconf", "-c", conf, "-h", "disable_plaintext_auth").CombinedOutput()
	require.NoError(t, err, "doveconf: %s", out)
	require.Equal(t, "yes", strings.TrimSpace(string(out)), "Dovecot's default disable_plaintext_auth is kept")
	dovecotExited := startChild(t, true, filepath.Join(dir, "dovecot.out"), dovecot, "-F", "-c", conf)

	// Postfix: its own configuration directory and queue. The queue is
	// made here as `postfix post-install create-missing` would (that
	// command takes seconds): postfix-owned directories in a root-owned
	// queue, maildrop and public for group postdrop.
	pfConf := filepath.Join(dir, "postfix")
	require.NoError(t, os.Mkdir(pfConf, 0o755))
	writeTemplate(t, filepath.Join(pfConf, "main.cf"), postfixMain, m)
	writeTemplate(t, filepath.Join(pfConf, "master.cf"), postfixMaster, m)
	pf, err := user.Lookup("postfix")
	require.NoError(t, err)
	postdrop, err := user.LookupGroup("postdrop")
	require.NoError(t, err)
	pfUID, _ := strconv.Atoi(pf.Uid)
	pdGID, _ := strconv.Atoi(postdrop.Gid)
	spool := filepath.Join(dir, "postfix-spool")
	require.NoError(t, os.Mkdir(spool, 0o755))
	for _, d := range []struct {
		name string
		gid  int
		mode os.FileMode
	}{
		{"active", 0, 0o700}, {"bounce", 0, 0o700}, {"corrupt", 0, 0o700}, {"defer", 0, 0o700},
		{"deferred", 0, 0o700}, {"flush", 0, 0o700}, {"hold", 0, 0o700}, {"incoming", 0, 0o700},
		{"private", 0, 0o700}, {"saved", 0, 0o700}, {"trace", 0, 0o700},
		{"maildrop", pdGID, 0o730}, {"public", pdGID, 0o710},
	} {
		p := filepath.Join(spool, d.name)
		require.NoError(t, os.Mkdir(p, d.mode))
		require.NoError(t, os.Chmod(p, d.mode)) // past the umask
		require.NoError(t, os.Chown(p, pfUID, d.gid))
	}
	require.NoError(t, os.Mkdir(filepath.Join(spool, "pid"), 0o755))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "postfix-data"), 0o700))
	require.NoError(t, os.Chown(filepath.Join(dir, "postfix-data"), pfUID, 0))
	out, err = exec.Command("postconf", "-c", pfConf, "-h", "daemon_directory").CombinedOutput()
	require.NoError(t, err, "postconf: %s", out)
	// master -s stays in the foreground (`postfix start-fg` runs it the
	// same way, after a slow postfix-script check).
	postfixExited := startChild(t, false, filepath.Join(dir, "postfix.out"),
		filepath.Join(strings.TrimSpace(string(out)), "master"), "-s", "-c", pfConf)

	t.Cleanup(func() {
		if t.Failed() {
			for _, f := range []string{"dovecot.out", "dovecot.log", "postfix.out", "postfix.log"} {
				t.Logf("%s:\n%s", f, m.readLog(f))
			}
		}
	})
	waitListening(t, "dovecot", dovecotExited, m.LMTPPort)
	waitListening(t, "postfix", postfixExited, m.SMTPPort)
	// Dovecot's LMTP answers once its services are up.
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(m.LMTPPort)), mailTimeout)
	require.NoError(t, err)
	c.SetDeadline(time.Now().Add(mailTimeout))
	tc := newTextConn(t, c, c)
	tc.expect("220")
	tc.send("QUIT")
	tc.expect("221")
	c.Close()
	return m
}

// startChild starts a server, its output in logFile, in a process group
// of its own: a new one if setpgid, else the server makes its own session
// (Postfix's master calls setsid, which fails in a group leader). At cleanup
// it gets SIGTERM, then its process group SIGKILL. The returned channel is
// closed when the server exits.
func startChild(t *testing.T, setpgid bool, logFile, name string, args ...string) <-chan struct{} {
	t.Helper()
	f, err := os.Create(logFile)
	require.NoError(t, err)
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: setpgid}
	require.NoError(t, cmd.Start(), name)
	done := make(chan struct{})
	go func() { cmd.Wait(); f.Close(); close(done) }()
	t.Cleanup(func() {
		pid := cmd.Process.Pid
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s did not exit on SIGTERM", name)
		}
		// Postfix's master runs in its own session (pgid = its pid),
		// Dovecot in the group made here: stragglers die with it.
		syscall.Kill(-pid, syscall.SIGKILL)
		<-done
	})
	return done
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// waitListening waits until a server started by startChild listens on
// port.
func waitListening(t *testing.T, name string, exited <-chan struct{}, port int) {
	t.Helper()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(mailTimeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			t.Fatalf("%s exited at start", name)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: nothing listens on %s: %v", name, addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, []byte(content), mode))
}

func writeTemplate(t *testing.T, path string, tmpl *template.Template, data any) {
	t.Helper()
	var b strings.Builder
	require.NoError(t, tmpl.Execute(&b, data))
	writeFile(t, path, b.String(), 0o644)
}

func (m *mailEnv) readLog(name string) string {
	b, err := os.ReadFile(filepath.Join(m.Dir, name))
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// waitDelivered waits until a message holding token is in the user's
// Maildir.
func (m *mailEnv) waitDelivered(t *testing.T, token string) {
	t.Helper()
	maildir := filepath.Join(m.Dir, "home", mailUser, "Maildir")
	deadline := time.Now().Add(mailTimeout)
	for {
		for _, sub := range []string{"new", "cur"} {
			files, _ := filepath.Glob(filepath.Join(maildir, sub, "*"))
			for _, f := range files {
				if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), token) {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s not delivered to %s in %v", token, maildir, mailTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func dovecotVersion() string {
	out, err := exec.Command("dovecot", "--version").Output()
	if err != nil {
		return "Dovecot ?"
	}
	return "Dovecot " + strings.Fields(string(out))[0]
}

func postfixVersion() string {
	out, err := exec.Command("postconf", "-h", "mail_version").Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(out))
}

func findLine(log string, subs ...string) string {
	for _, line := range strings.Split(log, "\n") {
		ok := true
		for _, s := range subs {
			ok = ok && strings.Contains(line, s)
		}
		if ok {
			return line
		}
	}
	return ""
}

// mailRouter is the router's Server running for one test.
type mailRouter struct {
	*Server
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func (r *mailRouter) stop(t *testing.T) {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			assert.NoError(t, err, "router Run")
		case <-time.After(mailTimeout):
			t.Error("router did not stop")
		}
	})
}

// startMailRouter writes keys, certificates and a configuration shaped like
// cmd/ech-router/chatmail.json, and runs the router on loopback.
func startMailRouter(t *testing.T, m *mailEnv, ca *echtest.CA, ks *ech.KeySet, logs *recordHandler) *mailRouter {
	t.Helper()
	dir := filepath.Join(m.Dir, "router")
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "keys"), 0o700))
	for i, k := range ks.Keys() {
		p, err := ech.MarshalPEM(k)
		require.NoError(t, err)
		writeFile(t, filepath.Join(dir, "keys", fmt.Sprintf("%d.ech", i)), string(p), 0o600)
	}
	writeCert := func(name string) {
		c := ca.Certificate(name)
		var chain []byte
		for _, der := range c.Certificate {
			chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
		}
		key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
		require.NoError(t, err)
		writeFile(t, filepath.Join(dir, name+".crt"), string(chain), 0o644)
		writeFile(t, filepath.Join(dir, name+".key"), string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})), 0o600)
	}
	writeCert(mailCover)
	writeCert(mailName)

	imap := net.JoinHostPort("127.0.0.1", strconv.Itoa(m.IMAPPort))
	smtp := net.JoinHostPort("127.0.0.1", strconv.Itoa(m.SMTPPort))
	route := func(name string, alpn []string, backend string) map[string]any {
		r := map[string]any{
			"name": name, "server_names": []string{mailName}, "mode": "terminate",
			"backend": backend, "proxy_protocol": true, "cert": mailName + ".crt", "key": mailName + ".key",
		}
		if alpn != nil {
			r["alpn"] = alpn
		}
		return r
	}
	// Each listener on its own loopback address, port 0: no port race.
	cfg := map[string]any{
		"keys":              map[string]any{"dir": "keys", "reload": "0s"},
		"public":            map[string]any{"name": mailCover, "cert": mailCover + ".crt", "key": mailCover + ".key"},
		"handshake_timeout": "10s",
		"shutdown_timeout":  "2s",
		"listeners": []any{
			map[string]any{"address": "127.0.0.1:0", "routes": []any{
				route("imap-alpn", []string{"imap"}, imap),
				route("smtp-alpn", []string{"smtp"}, smtp),
			}},
			map[string]any{"address": "127.0.1.1:0", "routes": []any{route("imaps", nil, imap)}},
			map[string]any{"address": "127.0.2.1:0", "routes": []any{route("submissions", nil, smtp)}},
		},
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	require.NoError(t, err)
	path := filepath.Join(dir, "router.json")
	writeFile(t, path, string(b), 0o644)

	c, err := LoadConfig(path)
	require.NoError(t, err)
	s, err := New(c, slog.New(logs))
	require.NoError(t, err)
	require.NoError(t, s.Listen())
	ctx, cancel := context.WithCancel(t.Context())
	r := &mailRouter{Server: s, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- s.Run(ctx, nil) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// recordHandler keeps the router's log records.
type recordHandler struct {
	mu    sync.Mutex
	lines []map[string]string
	text  strings.Builder
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordHandler) WithGroup(string) slog.Handler            { return h }

func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		fmt.Fprintf(&b, " %s=%q", a.Key, a.Value.String())
		return true
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lines = append(h.lines, m)
	h.text.WriteString(b.String() + "\n")
	return nil
}

// from returns the connection line of the client at the IP address src.
func (h *recordHandler) from(src string) map[string]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range h.lines {
		if host, _, err := net.SplitHostPort(l["client"]); err == nil && l["msg"] == "connection" && host == src {
			return l
		}
	}
	return nil
}

func (h *recordHandler) String() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.text.String()
}

// textConn speaks a line protocol (IMAP, SMTP) and keeps the transcript.
type textConn struct {
	t  *testing.T
	br *bufio.Reader
	w  io.Writer
}

func newTextConn(t *testing.T, r io.Reader, w io.Writer) *textConn {
	return &textConn{t: t, br: bufio.NewReader(io.LimitReader(r, 1<<20)), w: w}
}

func (c *textConn) send(line string) {
	c.t.Helper()
	c.t.Logf("C: %s", line)
	_, err := io.WriteString(c.w, line+"\r\n")
	require.NoError(c.t, err)
}

func (c *textConn) line() string {
	c.t.Helper()
	l, err := c.br.ReadString('\n')
	require.NoError(c.t, err, "reading a line (got %q)", l)
	l = strings.TrimRight(l, "\r\n")
	c.t.Logf("S: %s", l)
	return l
}

// expect reads an SMTP reply (all its lines) and requires its code.
func (c *textConn) expect(code string) string {
	c.t.Helper()
	var all []string
	for {
		l := c.line()
		all = append(all, l)
		if len(l) < 4 || l[3] != '-' {
			require.True(c.t, strings.HasPrefix(l, code+" ") || l == code, "want %s, got %q", code, l)
			return strings.Join(all, "\n")
		}
	}
}

// imap sends a tagged command and returns the response lines, requiring
// OK.
func (c *textConn) imap(tag, cmd string) string {
	c.t.Helper()
	c.send(tag + " " + cmd)
	var all []string
	for {
		l := c.line()
		all = append(all, l)
		if strings.HasPrefix(l, tag+" ") {
			require.True(c.t, strings.HasPrefix(l, tag+" OK"), "%s: %q", cmd, l)
			return strings.Join(all, "\n")
		}
	}
}

func newToken() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// smtpSession sends one message to the local user and returns its token.
func smtpSession(t *testing.T, c *textConn) string {
	t.Helper()
	token := newToken()
	c.expect("220")
	c.send("EHLO client.example")
	assert.Contains(t, c.expect("250"), "mx."+mailName)
	c.send("AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+mailUser+"\x00"+mailPassword)))
	c.expect("235")
	c.send("MAIL FROM:<bob@example.org>")
	c.expect("250")
	c.send("RCPT TO:<" + mailUser + ">")
	c.expect("250")
	c.send("DATA")
	c.expect("354")
	for _, l := range []string{
		"From: <bob@example.org>", "To: <" + mailUser + ">", "Subject: ech-test " + token,
		"Message-ID: <" + token + "@example.org>", "", "Sent through the ECH router.", ".",
	} {
		c.send(l)
	}
	c.expect("250")
	c.send("QUIT")
	c.expect("221")
	return token
}

// imapSession logs in, lists, optionally reads the subjects of the
// messages in INBOX (returned), and logs out.
func imapSession(t *testing.T, c *textConn, fetch bool) string {
	t.Helper()
	greeting := c.line()
	require.True(t, strings.HasPrefix(greeting, "* OK"), greeting)
	// With disable_plaintext_auth=yes Dovecot announces LOGINDISABLED on a
	// connection it does not consider secured.
	assert.NotContains(t, greeting, "LOGINDISABLED", "Dovecot considers the connection secured")
	c.imap("a1", fmt.Sprintf("LOGIN %s %q", mailUser, mailPassword))
	assert.Contains(t, c.imap("a2", `LIST "" "*"`), "INBOX")
	var subjects string
	if fetch {
		assert.Contains(t, c.imap("a3", "SELECT INBOX"), "EXISTS")
		subjects = c.imap("a4", "FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
	}
	assert.Contains(t, c.imap("a5", "LOGOUT"), "* BYE")
	return subjects
}

// greaseClient connects with bssl-tool -ech-grease: a client with no
// ECHConfig sends a GREASE encrypted_client_hello with the real name in
// the clear (crypto/tls cannot send GREASE ECH). bssl-tool connects to a
// relay that dials the router from src, so that the router and the servers
// see that address.
func greaseClient(t *testing.T, ca *echtest.CA, addr, src, alpn string) *textConn {
	t.Helper()
	bssl, err := exec.LookPath("bssl-tool")
	if err != nil {
		t.Skip("bssl-tool not installed (Debian package android-boringssl):", err)
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "root.pem")
	writeFile(t, root, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root().Raw})), 0o644)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	relayed := make(chan error, 1)
	go func() {
		in, err := ln.Accept()
		ln.Close()
		if err != nil {
			relayed <- err
			return
		}
		defer in.Close()
		d := &net.Dialer{Timeout: mailTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		out, err := d.Dial("tcp", addr)
		if err != nil {
			relayed <- err
			return
		}
		defer out.Close()
		in.SetDeadline(time.Now().Add(mailTimeout))
		out.SetDeadline(time.Now().Add(mailTimeout))
		go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite() }()
		_, err = io.Copy(in, out)
		relayed <- err
	}()

	ctx, cancel := context.WithTimeout(t.Context(), mailTimeout)
	cmd := exec.CommandContext(ctx, bssl, "client", "-connect", ln.Addr().String(),
		"-server-name", mailName, "-ech-grease", "-alpn-protos", alpn, "-root-certs", root, "-min-version", "tls1.3")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close()
		cancel()
		err := cmd.Wait()
		if t.Failed() {
			t.Logf("bssl-tool (%v):\n%s", err, stderr.String())
		}
		select {
		case err := <-relayed:
			if err != nil && !errors.Is(err, net.ErrClosed) {
				t.Logf("relay: %v", err)
			}
		case <-time.After(mailTimeout):
			t.Error("relay did not end")
		}
	})
	return newTextConn(t, stdout, stdin)
}
