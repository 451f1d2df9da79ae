package echkeys

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/require"
)

// testRouter is a loopback client-facing server as the router is: ech.NewConn
// with a KeySet; a hello whose ECH decrypted is completed by crypto/tls as
// the backend, with a certificate for its inner name; any other by the
// public name's server, which sends retry configs. Over TLS it answers
// GET /ech-config-list with the base64 list of the KeySet, and any other
// request with the server name.
type testRouter struct {
	Addr       string
	Keys       *ech.KeySet
	PublicName string
	ln         net.Listener
	wg         sync.WaitGroup
}

func startRouter(t testing.TB, ks *ech.KeySet, ca *echtest.CA, publicName string) *testRouter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &testRouter{Addr: ln.Addr().String(), Keys: ks, PublicName: publicName, ln: ln}
	base := &tls.Config{GetCertificate: ca.GetCertificate, MinVersion: tls.VersionTLS13}
	public := ks.PublicNameConfig(base)
	r.wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			r.wg.Go(func() {
				defer conn.Close()
				r.serve(conn, base, public)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		r.wg.Wait()
	})
	return r
}

func (r *testRouter) serve(conn net.Conn, base, public *tls.Config) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ech.NewConn(ctx, conn, ech.WithKeySet(r.Keys))
	if err != nil {
		return
	}
	// As the router does: the public name's server completes a hello whose
	// ECH did not decrypt, and one whose inner name is the public name
	// (a peer check); crypto/tls signals acceptance for the latter.
	cfg := public
	if c.ECHAccepted() && !strings.EqualFold(c.ServerName(), r.PublicName) {
		cfg = base
	}
	tc := tls.Server(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return
	}
	req, err := http.ReadRequest(bufio.NewReader(tc))
	if err != nil {
		return // a client that only shakes hands
	}
	body := "hello " + tc.ConnectionState().ServerName + "\n"
	if req.URL.Path == "/ech-config-list" {
		l, err := r.Keys.ConfigList()
		if err != nil {
			fmt.Fprintf(tc, "HTTP/1.1 503 No keys\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
			return
		}
		body = l.String() + "\n"
	}
	fmt.Fprintf(tc, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

// URL is the router's /ech-config-list.
func (r *testRouter) URL() string { return "https://" + r.Addr + "/ech-config-list" }

// handshake dials the router with cfg and reports whether ECH was accepted.
func handshake(addr string, cfg *tls.Config) (bool, error) {
	d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().ECHAccepted, nil
}
