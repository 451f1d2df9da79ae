package browsertest

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// relay is an on-path observer: a TCP relay between the browser and the
// router that records the bytes of each connection, both ways.
type relay struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []*recordingConn // the browser's side of each connection
	wg     sync.WaitGroup
}

func newRelay(ln net.Listener, target string) *relay {
	r := &relay{ln: ln, target: target}
	r.wg.Add(1)
	go r.serve()
	return r
}

func (r *relay) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		rc := &recordingConn{Conn: c}
		r.mu.Lock()
		r.conns = append(r.conns, rc)
		r.mu.Unlock()
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.forward(rc)
		}()
	}
}

// forward copies between the browser and a new connection to the target
// until both directions end.
func (r *relay) forward(client *recordingConn) {
	defer client.Close()
	server, err := net.DialTimeout("tcp", r.target, 5*time.Second)
	if err != nil {
		return
	}
	defer server.Close()
	closeWrite := func(c net.Conn) {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	// Neither side's Read or Write is bypassed: a recordingConn has no
	// ReadFrom or WriteTo, so io.Copy goes through them.
	cp := func(dst, src, dstTCP net.Conn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			// A reset, or the relay closing: end both directions.
			client.Close()
			server.Close()
			return
		}
		closeWrite(dstTCP)
	}
	go cp(server, client, server)
	go cp(client, server, client.Conn)
	wg.Wait()
}

// close stops the relay and waits for its connections to end.
func (r *relay) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// addr returns the relay's IP address.
func (r *relay) addr() netip.Addr {
	return r.ln.Addr().(*net.TCPAddr).AddrPort().Addr()
}

// observation is what the observer saw on the connections from the first'th on.
type observation struct {
	conns   int
	bytes   int      // in both directions
	hellos  []*hello // every ClientHello in the clear, in order
	leaks   []string // "conn 2, browser to router: secret.test"
	parseEr []string
}

// observe looks at the connections from the first'th on for the names in
// hidden, in both directions and any letter case, and parses the
// ClientHellos the browsers sent in the clear.
func (r *relay) observe(first int, hidden []string) *observation {
	r.mu.Lock()
	conns := append([]*recordingConn(nil), r.conns[first:]...)
	r.mu.Unlock()
	o := &observation{conns: len(conns)}
	for i, c := range conns {
		fromBrowser, toBrowser := c.recorded()
		o.bytes += len(fromBrowser) + len(toBrowser)
		for _, dir := range []struct {
			name string
			b    []byte
		}{{"browser to router", fromBrowser}, {"router to browser", toBrowser}} {
			lower := bytes.ToLower(dir.b)
			for _, h := range hidden {
				if bytes.Contains(lower, []byte(strings.ToLower(h))) {
					o.leaks = append(o.leaks, fmt.Sprintf("conn %d, %s: %s", i, dir.name, h))
				}
			}
		}
		// In TLS 1.3 every handshake message the client sends after its
		// hellos is encrypted: the plaintext handshake records from the
		// browser hold only ClientHellos.
		msgs, err := handshakeMessages(fromBrowser)
		if err != nil {
			o.parseEr = append(o.parseEr, fmt.Sprintf("conn %d: %v", i, err))
		}
		for _, m := range msgs {
			h, err := parseHello(m)
			if err != nil {
				o.parseEr = append(o.parseEr, fmt.Sprintf("conn %d: handshake message type %d: %v", i, m[0], err))
				continue
			}
			o.hellos = append(o.hellos, h)
		}
	}
	return o
}
