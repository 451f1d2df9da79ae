package echtest_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
)

// fakeTB stands in for the *testing.T that an Example does not have: its
// cleanups run when runAsTest returns, and Fatal panics.
type fakeTB struct {
	testing.TB // nil: echtest calls only the methods below

	mu       sync.Mutex
	cleanups []func()
	ctx      context.Context
}

func (f *fakeTB) Helper()                  {}
func (f *fakeTB) Context() context.Context { return f.ctx }
func (f *fakeTB) Fatal(args ...any)        { panic(fmt.Sprint(args...)) }
func (f *fakeTB) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}

func (f *fakeTB) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

// runAsTest runs body as the body of a test, with t standing in for the
// test's *testing.T.
func runAsTest(body func(t testing.TB)) {
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeTB{ctx: ctx}
	defer func() {
		cancel()
		f.mu.Lock()
		cleanups := f.cleanups
		f.mu.Unlock()
		for _, fn := range slices.Backward(cleanups) {
			fn()
		}
	}()
	body(f)
}

// A test gets an accepted ECH connection in three lines.
func Example() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, echtest.Echo)
		conn := srv.Dial(t, "secret.example")
		fmt.Println("ECH accepted:", conn.ConnectionState().ECHAccepted)

		info := srv.ConnInfo(t, conn)
		fmt.Println(info.Status, info.ServerName, info.OuterServerName)
	})
	// Output:
	// ECH accepted: true
	// accepted secret.example public.example
}

// A terminating server's handler routes by the inner name.
func ExampleNewServer() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, func(c *tls.Conn, info echtest.ConnInfo) {
			switch info.ServerName {
			case "mail.example":
				io.WriteString(c, "220 mail.example ESMTP")
			default:
				io.WriteString(c, "no route to "+info.ServerName)
			}
		})
		for _, name := range []string{"mail.example", "web.example"} {
			greeting, _ := io.ReadAll(srv.Dial(t, name))
			fmt.Printf("%s: %s\n", name, greeting)
		}
	})
	// Output:
	// mail.example: 220 mail.example ESMTP
	// web.example: no route to web.example
}

// A passthrough handler gets the ech.Conn, which replays the inner
// ClientHello, and completes the handshake itself as a backend would.
func ExampleNewPassthroughServer() {
	runAsTest(func(t testing.TB) {
		ca := echtest.NewCA(t)
		backend := &tls.Config{GetCertificate: ca.GetCertificate}
		srv := echtest.NewPassthroughServer(t, func(c *ech.Conn) {
			tc := tls.Server(c, backend)
			if tc.Handshake() == nil {
				fmt.Fprintf(tc, "backend for %s", tc.ConnectionState().ServerName)
				tc.Close()
			}
		}, echtest.WithCA(ca))
		conn := srv.Dial(t, "secret.example")
		greeting, _ := io.ReadAll(conn)
		fmt.Println(string(greeting), conn.ConnectionState().ECHAccepted)
	})
	// Output:
	// backend for secret.example true
}

// A client configuration can be changed before dialing, here to offer
// ALPN protocols to a server configured to take one of them.
func ExampleServer_ClientConfig() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, nil, echtest.WithBackendConfig(func(c *tls.Config) {
			c.NextProtos = []string{"smtp"}
		}))
		cfg := srv.ClientConfig("mail.example")
		cfg.NextProtos = []string{"h2", "smtp"}
		conn, err := srv.DialConfig(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		info := srv.ConnInfo(t, conn)
		fmt.Println(info.ALPN, info.NegotiatedProtocol)
	})
	// Output:
	// [h2 smtp] smtp
}

// A client with a stale ECHConfigList is rejected and gets retry configs,
// with which it is accepted.
func ExampleServer_StaleClientConfig() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, nil)
		cfg := srv.StaleClientConfig("secret.example")
		_, err := srv.DialConfig(t, cfg)
		var rej *tls.ECHRejectionError
		if !errors.As(err, &rej) {
			t.Fatal("ECH was not rejected")
		}
		fmt.Println("first:", srv.WaitConns(t, 1)[0].Status)

		cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
		conn, err := srv.DialConfig(t, cfg)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println("retry:", srv.ConnInfo(t, conn).Status)
	})
	// Output:
	// first: rejected
	// retry: accepted
}

// A client without ECH shows its server name on the wire.
func ExampleServer_NoECHClientConfig() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, nil)
		conn, err := srv.DialConfig(t, srv.NoECHClientConfig("secret.example"))
		if err != nil {
			t.Fatal(err)
		}
		info := srv.ConnInfo(t, conn)
		fmt.Println(info.Status, info.OuterServerName)
	})
	// Output:
	// not offered secret.example
}

// A config for a key the server never had is rejected, though its
// config_id is the server's.
func ExampleServer_UnknownKeyClientConfig() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, nil)
		_, err := srv.DialConfig(t, srv.UnknownKeyClientConfig("secret.example"))
		var rej *tls.ECHRejectionError
		fmt.Println(errors.As(err, &rej), srv.WaitConns(t, 1)[0].Status)
	})
	// Output:
	// true rejected
}

// A backend that only takes P-256 key shares makes the client's X25519
// share useless: the server asks again with a HelloRetryRequest, and ECH
// carries on through it.
func ExampleWithBackendConfig() {
	runAsTest(func(t testing.TB) {
		srv := echtest.NewServer(t, nil, echtest.WithBackendConfig(func(c *tls.Config) {
			c.CurvePreferences = []tls.CurveID{tls.CurveP256}
		}))
		state := srv.Dial(t, "secret.example").ConnectionState()
		fmt.Println(state.ECHAccepted, state.CurveID)
	})
	// Output:
	// true CurveP256
}

// A key set and a CA made before the server let a test build what must
// exist first, such as a backend; the server then uses them.
func ExampleWithKeySet() {
	runAsTest(func(t testing.TB) {
		ks := echtest.NewKeySet(t, "front.example")
		srv := echtest.NewServer(t, nil, echtest.WithKeySet(ks))
		fmt.Println(srv.PublicName, srv.ConnInfo(t, srv.Dial(t, "secret.example")).OuterServerName)
	})
	// Output:
	// front.example front.example
}

// NewKeySet's config list is what a client would find in DNS.
func ExampleNewKeySet() {
	runAsTest(func(t testing.TB) {
		ks := echtest.NewKeySet(t, "public.example")
		list, err := ks.ConfigList()
		if err != nil {
			t.Fatal(err)
		}
		configs, err := list.Configs()
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println(len(configs), configs[0].PublicName)
	})
	// Output:
	// 1 public.example
}

// A CA's GetCertificate serves any name a client asks for, here in a
// plain TLS server built by hand.
func ExampleCA_GetCertificate() {
	runAsTest(func(t testing.TB) {
		ca := echtest.NewCA(t)
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: ca.GetCertificate})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			if c, err := ln.Accept(); err == nil {
				c.(*tls.Conn).Handshake()
				c.Close()
			}
		}()
		conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{ServerName: "anything.example", RootCAs: ca.Pool()})
		if err != nil {
			t.Fatal(err)
		}
		conn.Close()
		<-done
		fmt.Println(conn.ConnectionState().PeerCertificates[0].DNSNames)
	})
	// Output:
	// [anything.example]
}
