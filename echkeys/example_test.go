package echkeys_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echkeys"
)

// A single server: the Manager makes the first key, and the server's key
// set follows the directory.
func Example() {
	dir, err := os.MkdirTemp("", "echkeys")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	ks, err := ech.NewKeySet()
	if err != nil {
		log.Fatal(err)
	}
	m := &echkeys.Manager{
		Dir:         dir,
		PublicName:  "public.example.com",
		Propagation: -1, // a single server: no one else to wait for
		KeySet:      ks,
		Logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if err := m.Tick(context.Background()); err != nil {
		log.Fatal(err)
	}
	// In a server: go m.Run(ctx, 5*time.Minute), and
	// ech.NewConn(ctx, conn, ech.WithKeySet(ks)) for each connection.
	keys, _ := ech.LoadKeyDir(dir)
	fmt.Println("keys in the directory:", len(keys))
	fmt.Println("keys in the set:", ks.Len())
	fmt.Println("advertised:", m.Keys()[0].SendAsRetry)
	// Output:
	// keys in the directory: 1
	// keys in the set: 1
	// advertised: true
}

// A fleet member that publishes in DNS through RFC 2136 dynamic updates.
func ExamplePublisher() {
	ks, _ := ech.NewKeySet()
	m := &echkeys.Manager{
		Dir:        "/var/lib/ech", // shared by the fleet
		PublicName: "public.example.com",
		TTL:        time.Hour,
		Peers: []string{
			"https://10.0.0.1/ech-config-list",
			"https://10.0.0.2/ech-config-list",
		},
		KeySet: ks,
		Publisher: &echkeys.Publisher{
			Provider: &echkeys.RFC2136{
				Server:  "ns1.example.com:53",
				Zone:    "example.com",
				KeyName: "ech-update",
				Secret:  os.Getenv("TSIG_SECRET"),
			},
			Names: []echkeys.Name{
				{Name: "www.example.com", ALPN: []string{"h2", "http/1.1"}},
				{Name: "example.com", ALPN: []string{"h2", "http/1.1"}},
			},
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go m.Run(ctx, 5*time.Minute)
}
