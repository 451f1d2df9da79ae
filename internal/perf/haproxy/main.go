// Command haproxy compares ech-router with HAProxy, the tool operators use
// today to route TLS by SNI, in one run on loopback: the same Go TLS echo
// backend behind HAProxy (mode tcp, req.ssl_sni routing) and behind the
// router (a passthrough route), and reached directly as the baseline.
//
//	go run ./internal/perf/haproxy [-duration 5s] [-clients 8] [-idle 500] [-only name] [-pin] [-rounds 1]
//
// For each path, on a fresh proxy process, it measures the memory (RSS)
// the proxy holds per idle connection (first, before other traffic leaves
// memory behind), new connections per second (TLS handshake, one byte
// echoed, close; the clients run in this process), the CPU the proxy
// process spends per connection (from /proc), the round trip of one byte
// after the handshake, and the throughput of 64 MiB echoed through one
// connection. It needs Linux, haproxy on PATH (Debian package haproxy), and
// builds the router from this checkout. It prints a Markdown table.
//
// Both proxies log each connection, HAProxy with option tcplog, as
// operators run them; the logs go nowhere, or to the files named by
// $ECH_PERF_ROUTER_LOG and $ECH_PERF_HAPROXY_LOG.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/testpki"
)

const (
	backendName = "www.example"
	publicName  = "cover.example"
)

func main() {
	duration := flag.Duration("duration", 5*time.Second, "how long each connection-rate run lasts")
	clients := flag.Int("clients", 8, "concurrent clients in the connection-rate runs")
	idle := flag.Int("idle", 500, "idle connections held open for the memory measure")
	pings := flag.Int("pings", 2000, "one-byte round trips in the latency measure")
	bulk := flag.Int("bulk", 64<<20, "bytes echoed through one connection in the throughput measure")
	routerPkg := flag.String("router", "./cmd/ech-router", "the router's package")
	only := flag.String("only", "", "run only the paths whose name contains this")
	routerEnv := flag.String("router-env", "", "environment settings for the router, such as GOMAXPROCS=1 (space-separated)")
	rounds := flag.Int("rounds", 1, "measure every path this many times, in turn, and print the medians")
	pin := flag.Bool("pin", false, "run the proxies on CPU 1 and this process (clients and backend) on CPU 0, as when the proxy has a machine of its own")
	flag.Parse()
	log.SetFlags(0)
	if *pin {
		// Before this process starts more threads, which inherit it.
		if out, err := exec.Command("taskset", "-a", "-p", "-c", "0", strconv.Itoa(os.Getpid())).CombinedOutput(); err != nil {
			log.Fatalf("taskset: %v: %s", err, out)
		}
		proxyPrefix = []string{"taskset", "-c", "1"}
	}

	if _, err := exec.LookPath("haproxy"); err != nil {
		log.Fatal("haproxy not found: apt-get install haproxy")
	}
	dir, err := os.MkdirTemp("", "ech-perf-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	e, err := setup(dir, *routerPkg, strings.Fields(*routerEnv))
	if err != nil {
		log.Fatal(err)
	}
	defer e.stop()

	fmt.Printf("# ech-router vs HAProxy on loopback (%s)\n\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Printf("%d clients for %v per rate run; %d pings; %d MiB bulk; %d idle connections. HAProxy %s.\n\n",
		*clients, *duration, *pings, *bulk>>20, *idle, e.haproxyVersion)
	if *pin {
		fmt.Printf("Pinned: proxies on CPU 1, clients and backend on CPU 0.\n\n")
	}
	if *rounds > 1 {
		fmt.Printf("Medians of %d rounds, the paths in turn in each; memory from the first round, on fresh processes.\n\n", *rounds)
	}
	fmt.Println("| path | new conns/s | proxy CPU µs/conn | endpoints' CPU µs/conn | RTT p50 µs | RTT p99 µs | bulk MB/s | proxy KB/idle conn |")
	fmt.Println("|---|---|---|---|---|---|---|---|")
	var paths []path
	for _, p := range e.paths() {
		if strings.Contains(p.name, *only) {
			paths = append(paths, p)
		}
	}
	results := make([][]result, len(paths))
	for round := range max(*rounds, 1) {
		for i, p := range paths {
			if p.restart {
				// A fresh router for each path, as HAProxy is fresh for
				// its one: the memory measure comes first.
				if err := e.restartRouter(); err != nil {
					log.Fatal(err)
				}
				p.pid = e.router.Process.Pid
			}
			n := *idle
			if round > 0 {
				n = 0 // HAProxy is not fresh any more
			}
			r := measure(p, *duration, *clients, *pings, *bulk, n)
			if *rounds > 1 {
				log.Printf("round %d: %s: %.0f conns/s, %.1f µs/conn, ends %.1f µs/conn, RTT %.0f µs, %.0f MB/s", round+1, p.name, r.rate, r.cpuPerConn, r.endsCPUPerConn, r.rttP50, r.mbps)
			}
			results[i] = append(results[i], r)
		}
	}
	for i, p := range paths {
		r := median(results[i])
		fmt.Printf("| %s | %.0f | %s | %.0f | %.0f | %.0f | %.0f | %s |\n", p.name, r.rate, orDash(r.cpuPerConn), r.endsCPUPerConn, r.rttP50, r.rttP99, r.mbps, orDash(r.kbPerIdle))
	}
}

// median returns each figure's median over rs, and the memory figure of
// the first.
func median(rs []result) result {
	m := func(f func(result) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return result{
		rate:           m(func(r result) float64 { return r.rate }),
		cpuPerConn:     m(func(r result) float64 { return r.cpuPerConn }),
		endsCPUPerConn: m(func(r result) float64 { return r.endsCPUPerConn }),
		rttP50:         m(func(r result) float64 { return r.rttP50 }),
		rttP99:         m(func(r result) float64 { return r.rttP99 }),
		mbps:           m(func(r result) float64 { return r.mbps }),
		kbPerIdle:      rs[0].kbPerIdle,
	}
}

// proxyPrefix runs the proxies on a CPU of their own with -pin.
var proxyPrefix []string

// command returns the command of a proxy.
func command(name string, args ...string) *exec.Cmd {
	if len(proxyPrefix) > 0 {
		return exec.Command(proxyPrefix[0], append(append(proxyPrefix[1:len(proxyPrefix):len(proxyPrefix)], name), args...)...)
	}
	return exec.Command(name, args...)
}

func orDash(v float64) string {
	if v < 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", v)
}

type env struct {
	backend        net.Listener
	haproxy        *exec.Cmd
	router         *exec.Cmd
	haproxyAddr    string
	routerAddr     string
	routerCmd      func() *exec.Cmd
	haproxyVersion string
	rootCAs        *tls.Config
	list           ech.ConfigList
}

func (e *env) stop() {
	for _, c := range []*exec.Cmd{e.haproxy, e.router} {
		if c != nil && c.Process != nil {
			c.Process.Kill()
			c.Wait()
		}
	}
	if e.backend != nil {
		e.backend.Close()
	}
}

// path is one way to the backend.
type path struct {
	name string
	addr string
	cfg  *tls.Config
	pid  int // the proxy process, or 0 for the direct path
	// restart asks for a fresh router process before the path.
	restart bool
}

// restartRouter replaces the router process with a fresh one.
func (e *env) restartRouter() error {
	e.router.Process.Kill()
	e.router.Wait()
	e.router = e.routerCmd()
	if err := e.router.Start(); err != nil {
		return err
	}
	return waitListening(e.routerAddr)
}

func (e *env) paths() []path {
	plain := e.rootCAs.Clone()
	withECH := e.rootCAs.Clone()
	withECH.EncryptedClientHelloConfigList = e.list
	return []path{
		{"direct (baseline)", e.backend.Addr().String(), plain, 0, false},
		{"HAProxy, mode tcp, req.ssl_sni", e.haproxyAddr, plain, e.haproxy.Process.Pid, false},
		{"ech-router passthrough, no ECH", e.routerAddr, plain, e.router.Process.Pid, true},
		{"ech-router passthrough, ECH", e.routerAddr, withECH, e.router.Process.Pid, true},
	}
}

func freeAddr() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func setup(dir, routerPkg string, routerEnv []string) (*env, error) {
	ca, err := testpki.NewCA()
	if err != nil {
		return nil, err
	}
	e := &env{rootCAs: &tls.Config{ServerName: backendName, RootCAs: ca.Pool, MinVersion: tls.VersionTLS13}}

	// The backend: a Go TLS 1.3 echo server, the split-mode backend.
	leaf, err := ca.Leaf(backendName)
	if err != nil {
		return nil, err
	}
	e.backend, err = tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS13})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := e.backend.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()

	// HAProxy.
	e.haproxyAddr = freeAddr()
	// Both proxies log each connection, as operators run them: HAProxy
	// to its standard error with option tcplog, as the router does.
	hcfg := fmt.Sprintf(`global
  maxconn 8000
  log stderr format raw local0 info
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend fe
  bind %s
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
  use_backend be if { req.ssl_sni -i %s }
backend be
  server s1 %s
`, e.haproxyAddr, backendName, e.backend.Addr())
	if err := os.WriteFile(filepath.Join(dir, "haproxy.cfg"), []byte(hcfg), 0o600); err != nil {
		return nil, err
	}
	out, _ := exec.Command("haproxy", "-v").Output()
	e.haproxyVersion = strings.Fields(string(out) + " ? ? ?")[2]
	e.haproxy = command("haproxy", "-db", "-f", filepath.Join(dir, "haproxy.cfg"))
	e.haproxy.Stderr = logSink("ECH_PERF_HAPROXY_LOG")
	if err := e.haproxy.Start(); err != nil {
		return nil, err
	}

	// The router, built from this checkout, with an ECH key.
	key, err := ech.GenerateKey(publicName, nil)
	if err != nil {
		return nil, err
	}
	ks, err := ech.NewKeySet(key)
	if err != nil {
		return nil, err
	}
	if e.list, err = ks.ConfigList(); err != nil {
		return nil, err
	}
	pemKey, err := ech.MarshalPEM(key)
	if err != nil {
		return nil, err
	}
	os.MkdirAll(filepath.Join(dir, "keys"), 0o700)
	if err := os.WriteFile(filepath.Join(dir, "keys", "cover.ech"), pemKey, 0o600); err != nil {
		return nil, err
	}
	cover, err := ca.Leaf(publicName)
	if err != nil {
		return nil, err
	}
	if err := writeCert(cover, filepath.Join(dir, "cover.crt"), filepath.Join(dir, "cover.key")); err != nil {
		return nil, err
	}
	e.routerAddr = freeAddr()
	rcfg := map[string]any{
		"keys":   map[string]any{"dir": "keys", "reload": "0s"},
		"public": map[string]any{"name": publicName, "cert": "cover.crt", "key": "cover.key"},
		"listeners": []any{map[string]any{"address": e.routerAddr, "routes": []any{
			map[string]any{"name": "www", "server_names": []string{backendName}, "mode": "passthrough", "backend": e.backend.Addr().String()},
		}}},
	}
	b, _ := json.Marshal(rcfg)
	if err := os.WriteFile(filepath.Join(dir, "router.json"), b, 0o600); err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "ech-router")
	if out, err := exec.Command("go", "build", "-o", bin, routerPkg).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("building %s: %v\n%s", routerPkg, err, out)
	}
	e.routerCmd = func() *exec.Cmd {
		c := command(bin, "-config", filepath.Join(dir, "router.json"))
		c.Stdout, c.Stderr = io.Discard, logSink("ECH_PERF_ROUTER_LOG")
		c.Env = append(os.Environ(), routerEnv...)
		return c
	}
	e.router = e.routerCmd()
	if err := e.router.Start(); err != nil {
		return nil, err
	}
	for _, a := range []string{e.haproxyAddr, e.routerAddr} {
		if err := waitListening(a); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// writeCert writes the chain and the key of c as PEM files.
func writeCert(c tls.Certificate, certFile, keyFile string) error {
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		return err
	}
	return os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func waitListening(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on %s", addr)
}

type result struct {
	rate, cpuPerConn, rttP50, rttP99, mbps, kbPerIdle float64
	// endsCPUPerConn is the CPU per connection of this process, the
	// clients' and the backend's: what a proxy costs the endpoints.
	endsCPUPerConn float64
}

func dial(p path) (*tls.Conn, error) {
	d := tls.Dialer{Config: p.cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	if p.cfg.EncryptedClientHelloConfigList != nil && !tc.ConnectionState().ECHAccepted {
		tc.Close()
		return nil, errors.New("ECH not accepted")
	}
	return tc, nil
}

func measure(p path, duration time.Duration, clients, pings, bulk, idle int) result {
	var r result
	buf := make([]byte, 1)
	// Memory per idle connection, in the proxy process.
	r.kbPerIdle = -1
	if p.pid != 0 && idle > 0 {
		time.Sleep(500 * time.Millisecond) // let closed connections go
		before := procRSS(p.pid)
		conns := make([]*tls.Conn, 0, idle)
		for range idle {
			c, err := dial(p)
			if err != nil {
				log.Fatalf("%s: idle: %v", p.name, err)
			}
			c.Write([]byte{1})
			io.ReadFull(c, buf)
			conns = append(conns, c)
		}
		time.Sleep(time.Second)
		r.kbPerIdle = float64(procRSS(p.pid)-before) / 1024 / float64(idle)
		for _, c := range conns {
			c.Close()
		}
		time.Sleep(500 * time.Millisecond)
	}

	// New connections per second.
	cpu0, ends0 := procCPU(p.pid), procCPU(os.Getpid())
	var n, failed atomic.Int64
	stop := time.Now().Add(duration)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			buf := make([]byte, 1)
			for time.Now().Before(stop) {
				c, err := dial(p)
				if err != nil {
					failed.Add(1)
					continue
				}
				if _, err := c.Write([]byte{1}); err == nil {
					if _, err := io.ReadFull(c, buf); err == nil {
						n.Add(1)
					}
				}
				c.Close()
			}
		})
	}
	wg.Wait()
	r.rate = float64(n.Load()) / duration.Seconds()
	r.cpuPerConn = -1
	if n.Load() > 0 {
		r.endsCPUPerConn = (procCPU(os.Getpid()) - ends0).Seconds() * 1e6 / float64(n.Load())
	}
	if p.pid != 0 && n.Load() > 0 {
		r.cpuPerConn = (procCPU(p.pid) - cpu0).Seconds() * 1e6 / float64(n.Load())
	}
	if f := failed.Load(); f > 0 {
		log.Printf("%s: %d failed connections", p.name, f)
	}

	// Round trip of one byte after the handshake.
	c, err := dial(p)
	if err != nil {
		log.Fatalf("%s: %v", p.name, err)
	}
	rtts := make([]time.Duration, 0, pings)
	for range pings {
		t := time.Now()
		c.Write(buf)
		if _, err := io.ReadFull(c, buf); err != nil {
			log.Fatalf("%s: ping: %v", p.name, err)
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	r.rttP50 = float64(rtts[len(rtts)/2].Microseconds())
	r.rttP99 = float64(rtts[len(rtts)*99/100].Microseconds())

	// Throughput: bulk bytes echoed through the connection.
	t := time.Now()
	go func() {
		chunk := make([]byte, 64<<10)
		for sent := 0; sent < bulk; sent += len(chunk) {
			c.Write(chunk)
		}
	}()
	if _, err := io.CopyN(io.Discard, c, int64(bulk)); err != nil {
		log.Fatalf("%s: bulk: %v", p.name, err)
	}
	r.mbps = float64(bulk) / 1e6 / time.Since(t).Seconds()
	c.Close()

	return r
}

// procCPU returns the user plus system CPU time of process pid.
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const clockTicks = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / clockTicks
}

// procRSS returns the resident memory of process pid in bytes, all its
// threads and processes' children excluded.
func procRSS(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// logSink is where a proxy's log goes: the file named by $env, or
// nowhere.
func logSink(env string) io.Writer {
	if name := os.Getenv(env); name != "" {
		if f, err := os.Create(name); err == nil {
			return f
		}
	}
	return io.Discard
}
