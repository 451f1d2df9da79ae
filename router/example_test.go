package router_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/testpki"
	"github.com/echkit/ech/router"
)

// This example routes two hidden names in Go, without a configuration
// file: www.example is passed through to an ECH-aware TLS backend, and
// mail.example is terminated by the router and forwarded in plaintext. The
// router serves the public name, cover.example, itself.
func Example() {
	key, _ := ech.GenerateKey("cover.example", nil)
	keys, _ := ech.NewKeySet(key)

	r := &router.Router{
		Keys:              keys,
		PublicName:        "cover.example",
		PublicCertificate: certificate("cover.example"),
		Logger:            slog.New(slog.DiscardHandler),
	}
	routes := []router.Route{
		{Name: "web", ServerNames: []string{"www.example"}, Mode: router.ModePassthrough,
			Backend: tlsBackend("www.example")},
		{Name: "mail", ServerNames: []string{"mail.example"}, Mode: router.ModeTerminate,
			Backend: plainBackend("mail"), Certificate: certificate("mail.example")},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go r.Serve(ln, routes)
	defer r.Close()

	// Clients with the published config list reach both names with ECH.
	list, _ := keys.ConfigList()
	for _, name := range []string{"www.example", "mail.example"} {
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
			ServerName: name, RootCAs: pki.Pool, EncryptedClientHelloConfigList: list,
		})
		if err != nil {
			log.Fatal(err)
		}
		greeting, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Printf("%s: ECH %v, %s", name, c.ConnectionState().ECHAccepted, greeting)
		c.Close()
	}
	// Output:
	// www.example: ECH true, hello from the TLS backend of www.example
	// mail.example: ECH true, hello from the plaintext backend mail
}

// pki is the example's certificate authority.
var pki, _ = testpki.NewCA()

func certificate(name string) *tls.Certificate {
	c, err := pki.Leaf(name)
	if err != nil {
		log.Fatal(err)
	}
	return &c
}

// tlsBackend starts a crypto/tls server for name, the ECH backend of a
// passthrough route, and returns its address.
func tlsBackend(name string) string {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{*certificate(name)}})
	if err != nil {
		log.Fatal(err)
	}
	go serve(ln, "hello from the TLS backend of "+name+"\n")
	return ln.Addr().String()
}

// plainBackend starts a plaintext server and returns its address.
func plainBackend(name string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go serve(ln, "hello from the plaintext backend "+name+"\n")
	return ln.Addr().String()
}

func serve(ln net.Listener, greeting string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.WriteString(c, greeting)
			io.Copy(io.Discard, c)
		}()
	}
}
