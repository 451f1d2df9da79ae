package echquic_test

import (
	"fmt"
	"log"
	"net"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echquic"
)

// A proxy on UDP port 443 routing QUIC connections by their inner server
// name; the public name goes to a server with [ech.KeySet.PublicNameConfig].
func Example() {
	ks, err := ech.NewKeySet() // in a real server: the keys of the published configs
	if err != nil {
		log.Fatal(err)
	}
	backends := map[string]string{
		"www.example.com":    "10.0.0.2:443",
		"public.example.com": "10.0.0.9:443",
	}
	p := &echquic.Proxy{
		ECHOptions: []ech.Option{ech.WithKeySet(ks)},
		Route: func(info echquic.Info) (net.Addr, error) {
			addr, ok := backends[info.ServerName]
			if !ok {
				return nil, fmt.Errorf("no backend for %q", info.ServerName)
			}
			return net.ResolveUDPAddr("udp", addr)
		},
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0") // ":443" in a real server
	if err != nil {
		log.Fatal(err)
	}
	go p.Serve(pc)
	defer p.Close()
	fmt.Println("serving QUIC")
	// Output: serving QUIC
}
