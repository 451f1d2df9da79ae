// Package knottest runs Knot DNS (Debian package knot) for tests: an
// authoritative server on a loopback port for one zone, taking RFC 2136
// updates signed with a TSIG key.
package knottest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The TSIG key the server takes updates signed with (hmac-sha256).
const (
	KeyName = "upd."
	Secret  = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="
)

// Start starts knotd authoritative for zone (such as "example.") with
// records in zone file syntax after its SOA and NS, and returns its
// address. The server is stopped by tb's cleanup, and its log shown if tb
// failed. Without knotd, Start skips tb, or fails it under CI, where
// .ci/run installs knot.
func Start(tb testing.TB, zone, records string) string {
	tb.Helper()
	knotd, err := exec.LookPath("knotd")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/knotd"); serr != nil {
			if os.Getenv("CI") != "" {
				tb.Fatal("CI must run this test: knotd not installed (Debian package knot)")
			}
			tb.Skip("knotd not installed (Debian package knot)")
		}
		knotd = "/usr/sbin/knotd"
	}
	dir := tb.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	host, port, _ := net.SplitHostPort(addr)
	conf := fmt.Sprintf(`server:
    listen: %[1]s@%[2]s
    rundir: %[3]s
    pidfile: %[3]s/knot.pid
control:
    listen: %[3]s/knot.sock
log:
  - target: stderr
    any: info
database:
    storage: %[3]s/db
key:
  - id: %[5]s
    algorithm: hmac-sha256
    secret: %[4]s
acl:
  - id: upd_acl
    key: %[5]s
    action: update
zone:
  - domain: %[6]s
    storage: %[3]s
    file: zone
    acl: upd_acl
    zonefile-sync: -1
    journal-content: none
`, host, port, dir, Secret, KeyName, zone)
	z := fmt.Sprintf("$ORIGIN %[1]s\n$TTL 60\n@ SOA ns.%[1]s admin.%[1]s 1 60 60 600 60\n@ NS ns.%[1]s\nns A 127.0.0.1\n", zone) + records
	if err := os.WriteFile(filepath.Join(dir, "knot.conf"), []byte(conf), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "zone"), []byte(z), 0o600); err != nil {
		tb.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "knot.log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(knotd, "-c", filepath.Join(dir, "knot.conf"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
		if tb.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "knot.log"))
			tb.Logf("knotd log:\n%s", b)
		}
	})
	// Wait until it answers, at most ten seconds.
	c := &dns.Client{Net: "tcp", Timeout: time.Second}
	q := new(dns.Msg)
	q.SetQuestion(zone, dns.TypeSOA)
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		r, _, err := c.Exchange(q, addr)
		if err == nil && r.Rcode == dns.RcodeSuccess && len(r.Answer) > 0 {
			return addr
		}
		if time.Since(start) > 10*time.Second {
			tb.Fatalf("knotd does not answer: %v", err)
		}
	}
}

// QueryECH returns the ech parameter of the HTTPS record at name on server,
// asked over UDP as a resolver would, or nil when there is none.
func QueryECH(tb testing.TB, server, name string) []byte {
	tb.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeHTTPS)
	r, _, err := (&dns.Client{Timeout: 2 * time.Second}).Exchange(q, server)
	if err != nil {
		tb.Fatalf("knottest: querying %s: %v", name, err)
	}
	for _, rr := range r.Answer {
		if h, ok := rr.(*dns.HTTPS); ok {
			for _, kv := range h.Value {
				if e, ok := kv.(*dns.SVCBECHConfig); ok {
					return e.ECH
				}
			}
		}
	}
	return nil
}
