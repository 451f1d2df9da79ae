package ech_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/testpki"
)

// This example runs a split-mode server on loopback: NewConn decrypts the
// ClientHello of Go's own ECH client, the server routes on the inner name,
// and crypto/tls completes the handshake as the ECH backend.
func Example() {
	// Keys: one X25519 key for the public name, published as a config list.
	key, err := ech.GenerateKey("public.example", nil)
	if err != nil {
		log.Fatal(err)
	}
	ks, err := ech.NewKeySet(key)
	if err != nil {
		log.Fatal(err)
	}
	list, err := ks.ConfigList()
	if err != nil {
		log.Fatal(err)
	}
	ca, _ := testpki.NewCA()
	cert, _ := ca.Leaf("public.example", "secret.example")

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(ks))
		if err != nil {
			return // the client was sent an alert
		}
		fmt.Printf("server: ECH %v, outer name %s, routing to %s\n", c.Status(), c.OuterServerName(), c.ServerName())
		// The backend needs no keys: NewConn decrypted, crypto/tls confirms.
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		fmt.Fprintf(tc, "hello from %s\n", c.ServerName())
		tc.Close()
	}()

	tc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		ServerName:                     "secret.example",
		RootCAs:                        ca.Pool,
		EncryptedClientHelloConfigList: list,
	})
	if err != nil {
		log.Fatal(err)
	}
	greeting, _ := io.ReadAll(tc)
	fmt.Printf("client: ECH accepted %v, read %q\n", tc.ConnectionState().ECHAccepted, greeting)
	// Output:
	// server: ECH accepted, outer name public.example, routing to secret.example
	// client: ECH accepted true, read "hello from secret.example\n"
}

// This example shows what a server sees of a client that has a stale
// config: ECH is rejected, the handshake completes for the public name with
// retry configs, and the client's retry with them is accepted. Keys made with
// GenerateKey's defaults are sent as retry configs.
func ExampleKeySet_PublicNameConfig() {
	old, _ := ech.GenerateKey("public.example", nil)
	current, _ := ech.GenerateKey("public.example", nil)
	ks, _ := ech.NewKeySet(current)
	ca, _ := testpki.NewCA()
	cert, _ := ca.Leaf("public.example", "secret.example")

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c, err := ech.NewConn(context.Background(), conn, ech.WithKeySet(ks))
			if err != nil {
				conn.Close()
				continue
			}
			fmt.Printf("server: ECH %v, name %s\n", c.Status(), c.ServerName())
			var cfg *tls.Config
			if c.Status() == ech.StatusAccepted {
				cfg = &tls.Config{Certificates: []tls.Certificate{cert}} // the backend of secret.example
			} else {
				// The public name: sends retry configs, never decrypts.
				cfg = ks.PublicNameConfig(&tls.Config{Certificates: []tls.Certificate{cert}})
			}
			tc := tls.Server(c, cfg)
			tc.Handshake()
			tc.Close()
		}
	}()

	staleList, _ := ech.MarshalConfigList(mustConfig(old))
	cfg := &tls.Config{ServerName: "secret.example", RootCAs: ca.Pool, EncryptedClientHelloConfigList: staleList}
	_, err = tls.Dial("tcp", ln.Addr().String(), cfg)
	if rej, ok := err.(*tls.ECHRejectionError); ok {
		fmt.Println("client: rejected, retry configs received:", len(rej.RetryConfigList) > 0)
		cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
	}
	tc, err := tls.Dial("tcp", ln.Addr().String(), cfg)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("client: retry accepted:", tc.ConnectionState().ECHAccepted)
	tc.Close()
	// Output:
	// server: ECH rejected, name public.example
	// client: rejected, retry configs received: true
	// server: ECH accepted, name secret.example
	// client: retry accepted: true
}

func mustConfig(k ech.Key) *ech.Config {
	c, err := ech.KeyConfig(k)
	if err != nil {
		log.Fatal(err)
	}
	return c
}
