// Command ech-keygen does ECH key management with package ech: it generates
// an ECH key and writes it as an RFC 9934 PEM file (the format of the
// router's key directory and of OpenSSL-based servers), prints the DNS
// HTTPS record that publishes it (RFC 9848), and inspects existing PEM
// files and ECHConfigLists in readable form.
//
// Usage:
//
//	ech-keygen new -public-name cover.example -out keys/cover.ech -dns secret.example
//	ech-keygen inspect keys/cover.ech
//	ech-keygen inspect -dns secret.example AEj+DQBE...   (a base64 ECHConfigList)
//	ech-keygen -version
//
// new never overwrites a file: when -out already holds a key for the same
// public name, it keeps it and prints its records again, so that the
// command can be run more than once.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/cli"
)

func main() {
	os.Exit(cli.Run("ech-keygen", os.Args[1:], os.Stdout, os.Stderr, run))
}

// run runs ech-keygen with args.
func run(args []string, stdout, stderr io.Writer) error {
	if len(args) < 1 {
		usage(stderr)
		return cli.Usagef("a command is needed")
	}
	switch args[0] {
	case "new":
		return cmdNew(args[1:], stdout, stderr)
	case "inspect":
		return cmdInspect(args[1:], stdout, stderr)
	case "-version", "--version", "version":
		fmt.Fprintln(stdout, cli.Version("ech-keygen"))
		return nil
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return nil
	default:
		usage(stderr)
		return cli.Usagef("unknown command %q", args[0])
	}
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage:
  ech-keygen new -public-name NAME -out FILE [-dns NAMES] [-kem KEM] [-suites SUITES] [flags]
      generate a key, write it as an RFC 9934 PEM file, print the DNS record
  ech-keygen inspect [-dns NAMES] FILE|BASE64...
      describe a PEM file, an ECHConfigList file (binary or base64) or a base64 list
  ech-keygen -version
run "ech-keygen new -h" or "ech-keygen inspect -h" for the flags
`)
}

// dnsFlags are the flags that shape the printed HTTPS records.
type dnsFlags struct {
	names *string
	ttl   *time.Duration
	alpn  *string
}

func addDNSFlags(fs *flag.FlagSet) dnsFlags {
	return dnsFlags{
		names: fs.String("dns", "", "comma-separated `names` to print an HTTPS record for: the names clients connect to (default: the public name)"),
		ttl:   fs.Duration("ttl", 5*time.Minute, "`TTL` of the printed HTTPS records"),
		alpn:  fs.String("alpn", "", "comma-separated `protocols` for the records' alpn parameter, such as h2,http/1.1"),
	}
}

func (d dnsFlags) print(w io.Writer, list ech.ConfigList, publicName string) {
	names := splitList(*d.names)
	if len(names) == 0 {
		names = []string{publicName}
	}
	fmt.Fprintln(w, "DNS HTTPS record to publish (zone file):")
	for _, n := range names {
		fmt.Fprintln(w, "  "+list.HTTPSRecord(n, *d.ttl, splitList(*d.alpn)...))
	}
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// kems are the KEM names keygen accepts.
var kems = map[string]ech.KEMID{
	"x25519": ech.KEMX25519,
	"p256":   ech.KEMP256,
	"p384":   ech.KEMP384,
	"p521":   ech.KEMP521,
	"x448":   ech.KEMX448,
	"xwing":  ech.KEMXWing,
}

// normAlg normalizes an algorithm name: "HKDF-SHA256" and "sha256" are
// both "sha256", "AES-128-GCM" is "aes128gcm".
func normAlg(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimPrefix(s, "hkdf-")
	return strings.ReplaceAll(s, "-", "")
}

// parseSuites parses "sha256/aes128gcm,sha256/chacha20poly1305"; names may
// also be written as package ech prints them, "HKDF-SHA256/AES-128-GCM".
func parseSuites(s string) ([]ech.CipherSuite, error) {
	kdfs := map[string]ech.KDFID{}
	for _, k := range []ech.KDFID{ech.KDFHKDFSHA256, ech.KDFHKDFSHA384, ech.KDFHKDFSHA512} {
		kdfs[normAlg(k.String())] = k
	}
	aeads := map[string]ech.AEADID{}
	for _, a := range []ech.AEADID{ech.AEADAES128GCM, ech.AEADAES256GCM, ech.AEADChaCha20Poly1305} {
		aeads[normAlg(a.String())] = a
	}
	var out []ech.CipherSuite
	for _, f := range splitList(s) {
		kdf, aead, ok := strings.Cut(f, "/")
		k, ok1 := kdfs[normAlg(kdf)]
		a, ok2 := aeads[normAlg(aead)]
		if !ok || !ok1 || !ok2 {
			return nil, fmt.Errorf("-suites: %q is not KDF/AEAD, such as sha256/aes128gcm (KDFs: sha256 sha384 sha512; AEADs: aes128gcm aes256gcm chacha20poly1305)", f)
		}
		out = append(out, ech.CipherSuite{KDF: k, AEAD: a})
	}
	return out, nil
}

func cmdNew(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ech-keygen new", flag.ContinueOnError)
	fs.SetOutput(stderr)
	publicName := fs.String("public-name", "", "the ECHConfig public_name: the name the router has a certificate for (required)")
	out := fs.String("out", "", "the PEM `file` to write, such as keys/cover.ech (required; never overwritten: an existing key for -public-name is kept)")
	kemName := fs.String("kem", "x25519", "the HPKE KEM: x25519, p256, p384, p521, x448 or xwing")
	suites := fs.String("suites", "", "comma-separated cipher suites, most preferred first (default sha256/aes128gcm,sha256/aes256gcm,sha256/chacha20poly1305)")
	configID := fs.Uint("config-id", 0, "the config_id, 1 to 255 (default random)")
	maxName := fs.Uint("max-name-length", 0, "the maximum_name_length clients pad inner names to (default 0: clients choose)")
	dns := addDNSFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *publicName == "" || *out == "" || fs.NArg() > 0 {
		fs.Usage()
		return cli.Usagef("new needs -public-name and -out, and no other argument")
	}
	kem, ok := kems[strings.ToLower(*kemName)]
	if !ok {
		return fmt.Errorf("-kem: %q is not one of x25519, p256, p384, p521, x448, xwing", *kemName)
	}
	if *configID > 255 || *maxName > 255 {
		return cli.Usagef("-config-id and -max-name-length are at most 255")
	}
	opts := &ech.KeyOptions{KEM: kem, ConfigID: uint8(*configID), MaxNameLength: uint8(*maxName)}
	if *suites != "" {
		var err error
		if opts.CipherSuites, err = parseSuites(*suites); err != nil {
			return err
		}
	}
	if kept, err := keepExisting(*out, *publicName); kept != nil || err != nil {
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "kept %s: it already holds a key for %s (remove it to generate another)\n", *out, *publicName)
		fmt.Fprintf(stdout, "  %s\n", kept.config)
		dns.print(stdout, kept.list, *publicName)
		return nil
	}
	key, err := ech.GenerateKey(*publicName, opts)
	if err != nil {
		return err
	}
	data, err := ech.MarshalPEM(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(*out), 0o700); err != nil {
		return err
	}
	// O_EXCL: a key file is never overwritten by mistake.
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	c, err := ech.KeyConfig(key)
	if err != nil {
		return err
	}
	list, err := ech.MarshalConfigList(c)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (private key: keep it secret; mode 0600)\n", *out)
	fmt.Fprintf(stdout, "  %s\n", c)
	dns.print(stdout, list, *publicName)
	return nil
}

// existingKey is a key file that ech-keygen new keeps.
type existingKey struct {
	config *ech.Config
	list   ech.ConfigList
}

// keepExisting looks at an existing -out: nil if there is none, the key if
// it is a key for publicName, an error otherwise. A key file is never
// overwritten.
func keepExisting(out, publicName string) (*existingKey, error) {
	data, err := os.ReadFile(out)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	f, err := ech.ParsePEM(data)
	if err != nil {
		return nil, fmt.Errorf("%s exists and is not an ECH key file (%w); not overwritten", out, err)
	}
	k, err := f.Key()
	if err != nil {
		return nil, fmt.Errorf("%s exists without a private key; not overwritten", out)
	}
	c, err := ech.KeyConfig(k)
	if err != nil {
		return nil, err
	}
	if !strings.EqualFold(c.PublicName, publicName) {
		return nil, fmt.Errorf("%s exists with a key for %s, not %s; not overwritten", out, c.PublicName, publicName)
	}
	return &existingKey{config: c, list: f.ConfigList}, nil
}

func cmdInspect(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ech-keygen inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dns := addDNSFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return cli.Usagef("inspect needs a file or a base64 ECHConfigList")
	}
	for i, arg := range fs.Args() {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		if err := inspect(stdout, arg, dns); err != nil {
			return err
		}
	}
	return nil
}

// inspect describes a PEM file, a file holding an ECHConfigList in binary
// or base64, or a base64 ECHConfigList given on the command line.
func inspect(w io.Writer, arg string, dns dnsFlags) error {
	data, err := os.ReadFile(arg)
	what := arg
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrInvalid) {
		data, what = []byte(arg), "argument"
	} else if err != nil {
		return err
	}
	var list ech.ConfigList
	switch {
	case strings.Contains(string(data), "-----BEGIN"):
		f, err := ech.ParsePEM(data)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		list = f.ConfigList
		if k, err := f.Key(); err == nil {
			c, _ := ech.KeyConfig(k)
			fmt.Fprintf(w, "%s: RFC 9934 PEM file with a private key, for config_id %d\n", what, c.ConfigID)
		} else {
			fmt.Fprintf(w, "%s: RFC 9934 PEM file without a private key\n", what)
		}
	default:
		if list, err = ech.ParseConfigListBase64(string(data)); err != nil {
			if _, err2 := ech.ParseConfigList(data); err2 != nil {
				if what == "argument" {
					return fmt.Errorf("%q is neither a file nor a base64 ECHConfigList: %w", arg, err)
				}
				return fmt.Errorf("%s: not a PEM file, nor an ECHConfigList in base64 or binary: %w", what, err)
			}
			list = data
			fmt.Fprintf(w, "%s: binary ECHConfigList\n", what)
		} else {
			fmt.Fprintf(w, "%s: base64 ECHConfigList\n", what)
		}
	}
	configs, err := list.Configs()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "ECHConfigList: %d bytes, %d config(s) this package can use, most preferred first\n", len(list), len(configs))
	for _, c := range configs {
		fmt.Fprintf(w, "  %s\n", c)
		if err := c.Validate(); err != nil {
			fmt.Fprintf(w, "    not usable by clients: %v\n", err)
		}
		if m := c.MandatoryExtensions(); len(m) > 0 {
			fmt.Fprintf(w, "    mandatory extensions %#04x: clients that do not know them ignore this config\n", m)
		}
	}
	fmt.Fprintf(w, "base64: %s\n", list)
	if len(configs) > 0 {
		dns.print(w, list, configs[0].PublicName)
	}
	return nil
}
