package router

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// benchSize is what BenchmarkRouterThroughput copies per operation.
const benchSize = 64 << 20

// sinkBackend is a TCP backend that reads a ClientHello record of helloLen
// bytes, then either reads until EOF and closes (up) or writes benchSize
// bytes and closes (down).
func sinkBackend(tb testing.TB, helloLen int, down bool) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(tb, err)
	tb.Cleanup(func() { ln.Close() })
	go acceptLoop(ln, func(c net.Conn) {
		if helloLen > 0 {
			if _, err := io.ReadFull(c, make([]byte, helloLen)); err != nil {
				return
			}
		}
		if down {
			io.Copy(c, io.LimitReader(zeros{}, benchSize))
			return
		}
		io.Copy(io.Discard, c)
	})
	return ln.Addr().String()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// transfer connects to addr, sends hello, and then sends benchSize bytes
// and waits for the backend's close (up) or reads until EOF (down).
func transfer(b *testing.B, addr string, hello []byte, down bool) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := c.Write(hello); err != nil {
		b.Fatal(err)
	}
	if down {
		n, err := io.Copy(io.Discard, c)
		if err != nil || n != benchSize {
			b.Fatalf("read %d bytes: %v", n, err)
		}
		return
	}
	if n, err := io.Copy(c, io.LimitReader(zeros{}, benchSize)); err != nil || n != benchSize {
		b.Fatalf("wrote %d bytes: %v", n, err)
	}
	c.(*net.TCPConn).CloseWrite()
	if _, err := io.Copy(io.Discard, c); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRouterThroughput copies 64 MiB each way over loopback, directly
// and through a passthrough route (a hello without ECH, then raw bytes),
// forwarded by a loop and, on systems with loops, by two goroutines, so
// that their MB/s compare in one run.
func BenchmarkRouterThroughput(b *testing.B) {
	hello := captureHello(b, &tls.Config{ServerName: tlsName})
	for _, dir := range []struct {
		name string
		down bool
	}{{"up", false}, {"down", true}} {
		b.Run("direct/"+dir.name, func(b *testing.B) {
			addr := sinkBackend(b, len(hello), dir.down)
			b.SetBytes(benchSize)
			for b.Loop() {
				transfer(b, addr, hello, dir.down)
			}
		})
		for _, loops := range []bool{true, false} {
			name := "router/"
			if !loops {
				if !useLoops.Load() {
					continue // no loops on this system: the same as above
				}
				name = "router-no-loops/" // two goroutines with io.Copy and splice
			}
			b.Run(name+dir.name, func(b *testing.B) {
				if !loops {
					useLoops.Store(false)
					defer useLoops.Store(true)
				}
				e := newEnv(b)
				addr := e.serve(Route{Name: "sink", ServerNames: []string{tlsName}, Mode: ModePassthrough,
					Backend: sinkBackend(b, len(hello), dir.down)})
				b.SetBytes(benchSize)
				for b.Loop() {
					transfer(b, addr, hello, dir.down)
				}
			})
		}
	}
}

// BenchmarkRouterNewConnection makes one short connection per operation,
// directly and through a passthrough route: the client sends a hello
// without ECH, the backend reads it, answers one byte and closes, and the
// client reads to EOF. Through the router, a loop connects to the backend
// itself, or without loops Go's dialer does and two goroutines forward;
// the difference from direct is what the router costs a new connection.
func BenchmarkRouterNewConnection(b *testing.B) {
	hello := captureHello(b, &tls.Config{ServerName: tlsName})
	backend := func(b *testing.B) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(b, err)
		b.Cleanup(func() { ln.Close() })
		go acceptLoop(ln, func(c net.Conn) {
			if _, err := io.ReadFull(c, make([]byte, len(hello))); err == nil {
				c.Write([]byte{1})
			}
		})
		return ln.Addr().String()
	}
	connect := func(b *testing.B, addr string) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(hello); err != nil {
			b.Fatal(err)
		}
		if got, err := io.ReadAll(c); err != nil || len(got) != 1 {
			b.Fatalf("read %d bytes: %v", len(got), err)
		}
	}
	b.Run("direct", func(b *testing.B) {
		addr := backend(b)
		for b.Loop() {
			connect(b, addr)
		}
	})
	for _, loops := range []bool{true, false} {
		name := "router"
		if !loops {
			if !useLoops.Load() {
				continue // no loops on this system: the same as above
			}
			name = "router-no-loops" // Go's dialer, two goroutines
		}
		b.Run(name, func(b *testing.B) {
			if !loops {
				useLoops.Store(false)
				defer useLoops.Store(true)
			}
			e := newEnv(b)
			e.r.Logger = slog.New(slog.DiscardHandler)
			addr := e.serve(Route{Name: "one", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend(b)})
			for b.Loop() {
				connect(b, addr)
			}
		})
	}
}

// idleConns is how many connections BenchmarkIdleConnectionMemory holds.
const idleConns = 500

// BenchmarkIdleConnectionMemory reports the memory (heap and stacks in
// use) that an idle passthrough connection costs the router: 500
// connections through it minus 500 direct connections to the same backend,
// whose client and backend sides are the same. It reports B/conn for
// both and their difference, router-B/conn, and the router's file
// descriptors per connection (on Linux).
func BenchmarkIdleConnectionMemory(b *testing.B) {
	hello := captureHello(b, &tls.Config{ServerName: tlsName})
	var holding atomic.Int64 // connections the backend holds
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.ReadFull(c, make([]byte, len(hello)))
				holding.Add(1)
				defer holding.Add(-1)
				c.Read(make([]byte, 1)) // until the client closes
			}()
		}
	}()
	e := newEnv(b)
	routed := e.serve(Route{Name: "idle", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: ln.Addr().String()})

	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			return 0 // not Linux
		}
		return len(ents)
	}
	inUse := func() (total, stack uint64) {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse + ms.StackInuse, ms.StackInuse
	}
	open := func(addr string) (perConn, stackPerConn, fdsPerConn float64) {
		base, baseStack := inUse()
		baseFDs := fds()
		var conns []net.Conn
		for range idleConns {
			c, err := net.Dial("tcp", addr)
			require.NoError(b, err)
			_, err = c.Write(hello)
			require.NoError(b, err)
			conns = append(conns, c)
		}
		// Let every connection reach the backend, then its idle state.
		for holding.Load() < idleConns {
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
		used, stack := inUse()
		perConn = (float64(used) - float64(base)) / idleConns
		stackPerConn = (float64(stack) - float64(baseStack)) / idleConns
		fdsPerConn = float64(fds()-baseFDs) / idleConns
		for _, c := range conns {
			c.Close()
		}
		for holding.Load() > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		// And the router's sockets closed, before the next base count
		// (but for the few it opens once, such as its loops' epoll sets).
		for deadline := time.Now().Add(5 * time.Second); fds() > baseFDs+8 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		return perConn, stackPerConn, fdsPerConn
	}
	var direct, viaRouter, directStack, viaRouterStack, directFDs, viaRouterFDs, goroutines float64
	for b.Loop() {
		direct, directStack, directFDs = open(ln.Addr().String())
		viaRouter, viaRouterStack, viaRouterFDs = open(routed)
		if useLoops.Load() {
			// The baseline: two goroutines copying, as without loops.
			useLoops.Store(false)
			goroutines, _, _ = open(routed)
			useLoops.Store(true)
		}
	}
	b.ReportMetric(viaRouterFDs-directFDs, "router-fds/conn")
	b.ReportMetric(direct, "direct-B/conn")
	b.ReportMetric(viaRouter, "routed-B/conn")
	b.ReportMetric(viaRouter-direct, "router-B/conn")
	b.ReportMetric(viaRouterStack-directStack, "router-stack-B/conn")
	if goroutines > 0 {
		b.ReportMetric(goroutines-direct, "router-no-loops-B/conn")
	}
}
