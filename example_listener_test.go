package ech_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/testpki"
)

// This example serves ECH on loopback with a Listener: its Accept returns
// connections whose ClientHello has been read and decrypted, and
// crypto/tls completes each handshake as the ECH backend. A client that
// sends a broken hello is refused without ever reaching Accept.
func ExampleNewListener() {
	ks, list, cert, roots := exampleKeys()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ln := ech.NewListener(raw, ech.WithKeySet(ks))
	refused := make(chan error, 1)
	ln.OnError = func(conn net.Conn, err error) { refused <- err }
	defer ln.Close()

	backend := &tls.Config{
		Certificates:                []tls.Certificate{cert},
		GetEncryptedClientHelloKeys: ks.GetEncryptedClientHelloKeys,
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return // the listener was closed
			}
			c := conn.(*ech.Conn)
			fmt.Printf("server: ECH %v, outer name %s, routing to %s\n", c.Status(), c.OuterServerName(), c.ServerName())
			tc := tls.Server(c, backend)
			fmt.Fprintf(tc, "hello from %s\n", c.ServerName())
			tc.Close()
		}
	}()

	// A client that is not speaking TLS.
	bad, err := net.Dial("tcp", raw.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	io.WriteString(bad, "GET / HTTP/1.1\r\n\r\n")
	fmt.Println("listener: refused:", errors.Is(<-refused, ech.ErrNotTLS))
	bad.Close()

	exampleClient(raw.Addr().String(), list, roots)
	ln.Close()
	<-served
	// Output:
	// listener: refused: true
	// server: ECH accepted, outer name public.example, routing to secret.example
	// client: ECH accepted true, read "hello from secret.example\n"
}

// This example routes each connection on the goroutine that read its
// hello, with Handle, instead of an Accept loop: here crypto/tls completes
// the handshake as the ECH backend.
func ExampleListener_Handle() {
	ks, list, cert, roots := exampleKeys()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	ln := ech.NewListener(raw, ech.WithKeySet(ks))
	backend := &tls.Config{
		Certificates:                []tls.Certificate{cert},
		GetEncryptedClientHelloKeys: ks.GetEncryptedClientHelloKeys,
	}
	ln.Handle = func(c *ech.Conn) {
		defer c.Close()
		tc := tls.Server(c, backend)
		fmt.Fprintf(tc, "hello from %s\n", c.ServerName())
		tc.Close()
	}
	go ln.Accept() // returns when the listener is closed
	defer ln.Close()

	exampleClient(raw.Addr().String(), list, roots)
	// Output:
	// client: ECH accepted true, read "hello from secret.example\n"
}

// exampleKeys returns a key set for public.example, its config list, and a
// certificate for public.example and secret.example with the pool of its
// CA.
func exampleKeys() (*ech.KeySet, ech.ConfigList, tls.Certificate, *x509.CertPool) {
	key, err := ech.GenerateKey("public.example", &ech.KeyOptions{})
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
	ca, err := testpki.NewCA()
	if err != nil {
		log.Fatal(err)
	}
	cert, err := ca.Leaf("public.example", "secret.example")
	if err != nil {
		log.Fatal(err)
	}
	return ks, list, cert, ca.Pool
}

// exampleClient connects to addr as secret.example with ECH and prints
// what it reads.
func exampleClient(addr string, list ech.ConfigList, roots *x509.CertPool) {
	tc, err := tls.Dial("tcp", addr, &tls.Config{
		ServerName:                     "secret.example",
		RootCAs:                        roots,
		EncryptedClientHelloConfigList: list,
	})
	if err != nil {
		log.Fatal(err)
	}
	greeting, _ := io.ReadAll(tc)
	fmt.Printf("client: ECH accepted %v, read %q\n", tc.ConnectionState().ECHAccepted, greeting)
}
