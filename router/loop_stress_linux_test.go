//go:build !386

package router

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestLoopManyHandshakes runs many short ECH connections through a
// passthrough route at once, each a handshake, one byte echoed and a
// close, as a browser's or a load test's, so that the hand-over from the
// goroutines to the loops happens in every order.
func TestLoopManyHandshakes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{*e.cert(tlsName)}}
	backend := e.rawBackend(func(c net.Conn) {
		c.SetDeadline(time.Now().Add(20 * time.Second))
		tc := tls.Server(c, cfg)
		io.Copy(tc, tc)
	})
	e.serve(Route{Name: "echo", ServerNames: []string{tlsName}, Mode: ModePassthrough, Backend: backend})
	go func() {
		for range e.logs { // drain
		}
	}()
	const clients, each = 8, 60
	var wg sync.WaitGroup
	errs := make(chan error, clients*each)
	for range clients {
		wg.Go(func() {
			for range each {
				errs <- func() error {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					d := tls.Dialer{Config: e.clientConfig(tlsName, e.list)}
					c, err := d.DialContext(ctx, "tcp", e.addr)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err := c.Write([]byte{1}); err != nil {
						return err
					}
					b := make([]byte, 1)
					if _, err := io.ReadFull(c, b); err != nil {
						return fmt.Errorf("echo: %w (%s)", err, c.LocalAddr())
					}
					return nil
				}()
			}
		})
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			t.Error(err)
			if failed > 5 {
				break
			}
		}
	}
	require.Zero(t, failed)
}
