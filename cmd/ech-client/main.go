// Command ech-client is a TLS client using ECH: it connects to an address
// with an inner name and an ECHConfigList, and prints the ECH outcome, the
// name on the wire and the inner name, and the negotiated ALPN. When the
// server rejects ECH and sends retry configs (a stale config), it says so
// and retries with them, as RFC 9849, Section 6.1.6 asks.
//
// The ECHConfigList comes from -ech: a file (an RFC 9934 PEM file, or the
// list in binary or base64), the base64 list itself, or an https URL
// serving draft-ietf-tls-wkech JSON or the base64 list, as the router
// publishes at /.well-known/origin-svcb and /ech-config-list (for clients
// that cannot read DNS HTTPS records, such as a mail app). Without -ech, it
// looks the list up in the DNS HTTPS records of -name with package
// echclient, and says which record it used. It never sends -name in the
// clear unless -allow-plaintext says it may.
//
//	ech-client -connect 127.0.0.1:443 -name secret.example -ech keys/cover.ech -ca ca.pem
//	ech-client -connect relay.example:993 -name chat.example -ech https://relay.example/.well-known/origin-svcb -alpn imap
//	ech-client -name secret.example    (the config from DNS)
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echclient"
	"github.com/echkit/ech/internal/cli"
)

func main() {
	os.Exit(cli.Run("ech-client", os.Args[1:], os.Stdout, os.Stderr, run))
}

// options are the command's flags.
type options struct {
	connect, name, echArg, alpn, ca string
	dns, doh                        string
	allowPlaintext, connectGiven    bool
	read, timeout                   time.Duration
}

// run runs the client with args. It succeeds when the connection used ECH
// (or, under -allow-plaintext, connected at all).
func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ech-client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.name, "name", "", "the inner server `name`, encrypted in the ClientHello (required)")
	fs.StringVar(&o.connect, "connect", "", "the `host:port` to connect to, and to fetch an -ech URL from (default: name:443)")
	fs.StringVar(&o.echArg, "ech", "", "the ECHConfigList: a `file`, base64, or an https URL; empty: look it up in DNS")
	fs.StringVar(&o.alpn, "alpn", "", "comma-separated ALPN `protocols` to offer, such as imap or h2,http/1.1")
	fs.StringVar(&o.ca, "ca", "", "PEM `file` of the CA certificates to trust (default: the system's)")
	fs.BoolVar(&o.allowPlaintext, "allow-plaintext", false, "without -ech: when DNS has no usable config, connect without ECH, sending -name in the clear")
	fs.StringVar(&o.dns, "dns", "", "without -ech: the DNS server (`host:port`) to ask for HTTPS records (default: the system's)")
	fs.StringVar(&o.doh, "doh", "", "without -ech: ask this DNS-over-HTTPS `URL` (RFC 8484) instead")
	fs.DurationVar(&o.read, "read", time.Second, "how long to wait for the server's first line after the handshake (0: do not wait)")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "bound on each connection and fetch")
	version := fs.Bool("version", false, "print the version and exit")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *version {
		fmt.Fprintln(stdout, cli.Version("ech-client"))
		return nil
	}
	if o.name == "" || fs.NArg() > 0 {
		fs.Usage()
		return cli.Usagef("-name is required, and there are no arguments")
	}
	o.connectGiven = o.connect != ""
	if o.connect == "" {
		o.connect = net.JoinHostPort(o.name, "443")
	}
	return o.run(stdout)
}

func (o *options) tlsConfig() (*tls.Config, error) {
	cfg := &tls.Config{ServerName: o.name}
	for _, p := range strings.Split(o.alpn, ",") {
		if p = strings.TrimSpace(p); p != "" {
			cfg.NextProtos = append(cfg.NextProtos, p)
		}
	}
	if o.ca != "" {
		b, err := os.ReadFile(o.ca)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s: no PEM certificate", o.ca)
		}
	}
	return cfg, nil
}

func (o *options) run(w io.Writer) error {
	cfg, err := o.tlsConfig()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	if o.echArg == "" {
		return o.runDNS(ctx, w, cfg)
	}
	list, from, err := o.configList(ctx, cfg)
	if err != nil {
		return err
	}
	return o.connectECH(ctx, w, cfg, list, from)
}

// connectECH connects to -connect with list, retrying once with the
// server's retry configs.
func (o *options) connectECH(ctx context.Context, w io.Writer, cfg *tls.Config, list ech.ConfigList, from string) error {
	configs, err := list.Configs()
	if err != nil {
		return err
	}
	if len(configs) == 0 {
		return fmt.Errorf("the ECHConfigList from %s has no config this client can use", from)
	}
	fmt.Fprintf(w, "ECHConfigList from %s: %d config(s); first: config_id %d, public name %s\n",
		from, len(configs), configs[0].ConfigID, configs[0].PublicName)

	cfg.EncryptedClientHelloConfigList = list
	outer := configs[0].PublicName
	conn, err := o.dial(ctx, cfg)
	var rej *tls.ECHRejectionError
	if errors.As(err, &rej) {
		if len(rej.RetryConfigList) == 0 {
			return fmt.Errorf("ECH rejected by %s without retry configs: the server has disabled ECH", outer)
		}
		retry, perr := ech.ConfigList(rej.RetryConfigList).Configs()
		if perr != nil || len(retry) == 0 {
			return fmt.Errorf("ECH rejected by %s, and its retry configs are unusable: %v", outer, perr)
		}
		fmt.Fprintf(w, "ECH rejected by %s (config_id %d is stale): retrying with its retry configs, first config_id %d\n",
			outer, configs[0].ConfigID, retry[0].ConfigID)
		fmt.Fprintf(w, "  publish these instead: %s\n", ech.ConfigList(rej.RetryConfigList))
		cfg.EncryptedClientHelloConfigList = rej.RetryConfigList
		outer = retry[0].PublicName
		conn, err = o.dial(ctx, cfg)
		if errors.As(err, &rej) {
			return fmt.Errorf("ECH rejected again with the retry configs: %w", err)
		}
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	o.report(w, conn, outer)
	return nil
}

// runDNS looks the ECHConfigList up in the DNS HTTPS records of -name with
// package echclient, says which record it came from, and connects with it.
// Without a usable record it connects only under -allow-plaintext, saying
// that the name goes in the clear.
func (o *options) runDNS(ctx context.Context, w io.Writer, cfg *tls.Config) error {
	r := &echclient.Resolver{Server: o.dns, DoHURL: o.doh, Timeout: o.timeout}
	via := "the system's DNS servers"
	switch {
	case o.doh != "":
		via = "DNS-over-HTTPS " + o.doh
	case o.dns != "":
		via = "DNS server " + o.dns
	}
	// The HTTPS record of the origin https://name (RFC 9460, Section 9.1):
	// -connect only says where to connect.
	const port = 443
	recs, err := r.Lookup(ctx, o.name, port)
	var rec *echclient.Record
	for i := range recs {
		if len(recs[i].ECH) > 0 {
			rec = &recs[i]
			break
		}
	}
	if rec == nil {
		reason := err
		if reason == nil {
			reason = fmt.Errorf("its HTTPS records have no ech parameter")
		}
		if !o.allowPlaintext {
			return fmt.Errorf("no ECHConfigList for %s from %s (%v): not connecting, since %s would be sent in the clear (give -ech, or -allow-plaintext)",
				echclient.QueryName(o.name, port), via, reason, o.name)
		}
		fmt.Fprintf(w, "no ECHConfigList for %s from %s (%v)\n", echclient.QueryName(o.name, port), via, reason)
		fmt.Fprintf(w, "connecting WITHOUT ECH (-allow-plaintext): %s is sent in the clear\n", o.name)
		conn, err := o.dial(ctx, cfg)
		if err != nil {
			return err
		}
		defer conn.Close()
		o.report(w, conn, o.name)
		return nil
	}
	if !o.connectGiven {
		// RFC 9460, Section 7: the record's target, port and address hints.
		host, p := rec.Target, port
		if rec.Port != 0 {
			p = int(rec.Port)
		}
		if hints := append(slices.Clone(rec.IPv4Hint), rec.IPv6Hint...); len(hints) > 0 {
			host = hints[0].String()
		}
		o.connect = net.JoinHostPort(host, strconv.Itoa(p))
	}
	shown := *rec
	shown.ECH = nil // printed below, decoded
	from := fmt.Sprintf("the HTTPS record of %s (%s, TTL %v) from %s", rec.Name, shown, rec.TTL, via)
	return o.connectECH(ctx, w, cfg, rec.ECH, from)
}

func (o *options) dial(ctx context.Context, cfg *tls.Config) (*tls.Conn, error) {
	d := &tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", o.connect)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}

// report prints what the connection shows, and the server's first line.
func (o *options) report(w io.Writer, conn *tls.Conn, outer string) {
	cs := conn.ConnectionState()
	status := "not used"
	if cs.ECHAccepted {
		status = "accepted"
	}
	alpn := cs.NegotiatedProtocol
	if alpn == "" {
		alpn = "(none)"
	}
	fmt.Fprintf(w, "connected to %s\n", conn.RemoteAddr())
	fmt.Fprintf(w, "  ECH:              %s\n", status)
	fmt.Fprintf(w, "  name on the wire: %s\n", outer)
	if cs.ECHAccepted {
		fmt.Fprintf(w, "  inner name:       %s (encrypted)\n", cs.ServerName)
	} else {
		fmt.Fprintf(w, "  inner name:       - (no ECH: %s was sent in the clear)\n", cs.ServerName)
	}
	fmt.Fprintf(w, "  TLS:              %s, %s\n", tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite))
	fmt.Fprintf(w, "  ALPN:             %s\n", alpn)
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		fmt.Fprintf(w, "  certificate:      %s, issued by %s\n", leaf.Subject, leaf.Issuer)
	}
	if o.read > 0 {
		conn.SetReadDeadline(time.Now().Add(o.read))
		if line, err := bufio.NewReader(conn).ReadString('\n'); line != "" || err == nil {
			fmt.Fprintf(w, "  server says:      %s\n", strings.TrimRight(line, "\r\n"))
		}
	}
}

// configList reads -ech: an https URL, a file, or base64.
func (o *options) configList(ctx context.Context, cfg *tls.Config) (ech.ConfigList, string, error) {
	arg := o.echArg
	if strings.HasPrefix(arg, "https://") {
		l, err := o.fetch(ctx, cfg, arg)
		return l, arg, err
	}
	data, err := os.ReadFile(arg)
	from := arg
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrInvalid) {
		data, from = []byte(arg), "-ech"
	} else if err != nil {
		return nil, "", err
	}
	if strings.Contains(string(data), "-----BEGIN") {
		f, err := ech.ParsePEM(data)
		if err != nil {
			return nil, "", fmt.Errorf("%s: %w", from, err)
		}
		return f.ConfigList, from, nil
	}
	if l, err := ech.ParseConfigListBase64(string(data)); err == nil {
		return l, from, nil
	}
	if _, err := ech.ParseConfigList(data); err != nil {
		return nil, "", fmt.Errorf("%s: not a PEM file, nor an ECHConfigList in base64 or binary: %w", from, err)
	}
	return data, from, nil
}

// fetch gets the ECHConfigList from an https URL serving the JSON of
// draft-ietf-tls-wkech or the base64 list, connecting to -connect.
func (o *options) fetch(ctx context.Context, cfg *tls.Config, url string) (ech.ConfigList, error) {
	tcfg := cfg.Clone()
	tcfg.ServerName, tcfg.NextProtos = "", nil // the URL's host
	hc := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   tcfg,
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, o.connect)
		},
	}}
	return echclient.FetchConfigList(ctx, hc, url)
}
