package echclient_test

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echclient"
	"golang.org/x/net/dns/dnsmessage"
)

// exampleConfigList is the ECHConfigList the example's DNS server publishes.
const exampleConfigList = "AEH+DQA9BwAgACDuboUcNwyOUnK3jT+cXapIvMMpKvvScZnxSzX5iRRyRAAEAAEAAQAOcHVibGljLmV4YW1wbGUAAA=="

// serveExampleZone starts a DNS server on loopback, over UDP, that answers
// every HTTPS query for example.com with
//
//	example.com. 300 IN HTTPS 1 . alpn="h2" port=8443 ipv4hint=192.0.2.1 ech="AEH+DQA9..."
//
// and returns its address.
func serveExampleZone() (addr string, stop func()) {
	list, err := ech.ParseConfigListBase64(exampleConfigList)
	if err != nil {
		log.Fatal(err)
	}
	rr := dnsmessage.HTTPSResource{SVCBResource: dnsmessage.SVCBResource{Priority: 1, Target: dnsmessage.MustNewName(".")}}
	rr.SetParam(dnsmessage.SVCParamALPN, []byte("\x02h2"))
	rr.SetParam(dnsmessage.SVCParamPort, binary.BigEndian.AppendUint16(nil, 8443))
	rr.SetParam(dnsmessage.SVCParamIPv4Hint, netip.MustParseAddr("192.0.2.1").AsSlice())
	rr.SetParam(dnsmessage.SVCParamECH, list)

	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var q dnsmessage.Message
			if q.Unpack(buf[:n]) != nil || len(q.Questions) != 1 {
				continue
			}
			resp := dnsmessage.Message{
				Header:    dnsmessage.Header{ID: q.Header.ID, Response: true, RecursionAvailable: true},
				Questions: q.Questions,
			}
			if q.Questions[0].Name.String() == "example.com." && q.Questions[0].Type == dnsmessage.TypeHTTPS {
				resp.Answers = []dnsmessage.Resource{{
					Header: dnsmessage.ResourceHeader{Name: q.Questions[0].Name, Class: dnsmessage.ClassINET, TTL: 300},
					Body:   &rr,
				}}
			}
			if msg, err := resp.Pack(); err == nil {
				pc.WriteTo(msg, from)
			}
		}
	}()
	return pc.LocalAddr().String(), func() { pc.Close() }
}

func ExampleResolver_Lookup() {
	addr, stop := serveExampleZone()
	defer stop()

	r := &echclient.Resolver{Server: addr, Timeout: 5 * time.Second}
	recs, err := r.Lookup(context.Background(), "example.com", 443)
	if err != nil {
		log.Fatal(err)
	}
	for _, rec := range recs {
		fmt.Println("connect to", rec.Target, "port", rec.Port, "at", rec.IPv4Hint, "with", rec.ALPN)
		configs, err := rec.ECH.Configs()
		if err != nil {
			log.Fatal(err)
		}
		for _, c := range configs {
			fmt.Println("ECH config:", c)
		}
		fmt.Println("cache for", rec.TTL)
	}
	// Output:
	// connect to example.com port 8443 at [192.0.2.1] with [h2]
	// ECH config: config_id=7 kem=DHKEM(X25519, HKDF-SHA256) suites=[HKDF-SHA256/AES-128-GCM] public_name="public.example" max_name_length=0 extensions=0
	// cache for 5m0s
}

// ExampleNewTransport fetches a page with ECH, and fails rather than send
// the server name in the clear.
func ExampleNewTransport() {
	d := &echclient.Dialer{
		Resolver: &echclient.Resolver{DoHURL: "https://dns.example/dns-query"},
		Policy:   echclient.RequireECH,
	}
	client := &http.Client{Transport: echclient.NewTransport(d), Timeout: 30 * time.Second}
	resp, err := client.Get("https://secret.example/")
	if err != nil {
		log.Fatal(err) // errors.Is(err, echclient.ErrECHRequired) when ECH was not possible
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("ECH accepted: %v, %d bytes\n", resp.TLS.ECHAccepted, len(body))
}

// ExampleDialer connects with ECH when the server publishes a config, and
// with plain TLS otherwise.
func ExampleDialer() {
	d := &echclient.Dialer{Config: &tls.Config{NextProtos: []string{"http/1.1"}}}
	c, err := d.DialContext(context.Background(), "tcp", "secret.example:443")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	fmt.Println("ECH accepted:", c.(*tls.Conn).ConnectionState().ECHAccepted)
}
