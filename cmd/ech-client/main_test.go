package main

import (
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/cli"
	"github.com/echkit/ech/internal/testpki"
	"github.com/echkit/ech/router"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

const (
	publicName = "cover.example"
	innerName  = "secret.example"
)

// setup starts a router on loopback in front of a crypto/tls backend that
// greets with "hello <name> <alpn>", and returns its address, the key's PEM
// file, the CA file and the key set.
func setup(t *testing.T) (addr, keyFile, caFile string, ks *ech.KeySet) {
	t.Helper()
	ca, err := testpki.NewCA()
	require.NoError(t, err)
	key, err := ech.GenerateKey(publicName, &ech.KeyOptions{})
	require.NoError(t, err)
	ks, err = ech.NewKeySet(key)
	require.NoError(t, err)
	dir := t.TempDir()
	keyFile, caFile = filepath.Join(dir, "cover.ech"), filepath.Join(dir, "ca.pem")
	b, err := ech.MarshalPEM(key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(keyFile, b, 0o600))
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}), 0o600))

	cert, err := ca.Leaf(innerName)
	require.NoError(t, err)
	bln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"imap", "h2"}})
	require.NoError(t, err)
	t.Cleanup(func() { bln.Close() })
	go func() {
		for {
			c, err := bln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() == nil {
					cs := tc.ConnectionState()
					fmt.Fprintf(tc, "hello %s %s\r\n", cs.ServerName, cs.NegotiatedProtocol)
					tc.SetReadDeadline(time.Now().Add(5 * time.Second))
					tc.Read(make([]byte, 1)) // until the client closes
				}
			}()
		}
	}()

	pub, err := ca.Leaf(publicName)
	require.NoError(t, err)
	r := &router.Router{Keys: ks, PublicName: publicName, PublicCertificate: &pub,
		Logger: slog.New(slog.DiscardHandler)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go r.Serve(ln, []router.Route{{Name: "secret", ServerNames: []string{innerName}, Mode: router.ModePassthrough, Backend: bln.Addr().String()}})
	t.Cleanup(func() { r.Close() })
	return ln.Addr().String(), keyFile, caFile, ks
}

func client(args ...string) (int, string, string) {
	var o, e strings.Builder
	code := cli.Run("ech-client", args, &o, &e, run)
	return code, o.String(), e.String()
}

func TestClient(t *testing.T) {
	t.Parallel()
	addr, keyFile, caFile, ks := setup(t)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	listFile := filepath.Join(t.TempDir(), "list.bin")
	require.NoError(t, os.WriteFile(listFile, list, 0o600))

	for _, tc := range []struct {
		name, ech string
		from      string
	}{
		{"PEM file", keyFile, "ECHConfigList from " + keyFile},
		{"binary file", listFile, "ECHConfigList from " + listFile},
		{"base64", list.String(), "ECHConfigList from -ech"},
		{"well-known JSON", "https://" + publicName + router.WellKnownPath, router.WellKnownPath},
		{"well-known base64", "https://" + publicName + router.ConfigListPath, router.ConfigListPath},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := client("-connect", addr, "-name", innerName, "-ech", tc.ech, "-ca", caFile, "-alpn", "imap")
			require.Equal(t, 0, code, stderr)
			assert.Contains(t, stdout, tc.from)
			assert.Contains(t, stdout, "ECH:              accepted")
			assert.Contains(t, stdout, "name on the wire: "+publicName)
			assert.Contains(t, stdout, "inner name:       "+innerName+" (encrypted)")
			assert.Contains(t, stdout, "ALPN:             imap")
			assert.Contains(t, stdout, "server says:      hello secret.example imap")
			assert.NotContains(t, stdout, "rejected")
		})
	}
}

func TestClientRetry(t *testing.T) {
	t.Parallel()
	addr, _, caFile, ks := setup(t)
	stale, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
	require.NoError(t, err)
	staleSet, err := ech.NewKeySet(stale)
	require.NoError(t, err)
	staleList, err := staleSet.ConfigList()
	require.NoError(t, err)
	list, err := ks.ConfigList()
	require.NoError(t, err)

	code, stdout, stderr := client("-connect", addr, "-name", innerName, "-ech", staleList.String(), "-ca", caFile, "-read", "0")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "ECH rejected by "+publicName)
	assert.Contains(t, stdout, "retrying with its retry configs")
	assert.Contains(t, stdout, "publish these instead: "+list.String())
	assert.Contains(t, stdout, "ECH:              accepted")
	assert.NotContains(t, stdout, "server says")
}

func TestClientErrors(t *testing.T) {
	t.Parallel()
	addr, keyFile, caFile, _ := setup(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-connect", addr}, 2, "-name is required"},
		{[]string{"-name", innerName, "extra"}, 2, "-name is required"},
		{[]string{"-bogus"}, 2, "flag provided but not defined"},
		{[]string{"-connect", addr, "-name", innerName, "-ech", "not a list", "-ca", caFile}, 1, "not a PEM file"},
		{[]string{"-connect", addr, "-name", innerName, "-ech", keyFile}, 1, "certificate signed by unknown authority"},
		{[]string{"-connect", addr, "-name", innerName, "-ech", keyFile, "-ca", keyFile}, 1, "no PEM certificate"},
		{[]string{"-connect", addr, "-name", innerName, "-ech", "https://" + publicName + "/nothing", "-ca", caFile}, 1, "404"},
		{[]string{"-connect", addr, "-name", "other.example", "-ech", keyFile, "-ca", caFile}, 1, "unrecognized name"},
	} {
		code, _, stderr := client(tc.args...)
		assert.Equal(t, tc.code, code, "%q: %s", tc.args, stderr)
		assert.Contains(t, stderr, tc.want, "%q", tc.args)
	}
}

// TestClientDoH finds the config in an HTTPS record served by a loopback
// DNS-over-HTTPS endpoint, through package echclient.
func TestClientDoH(t *testing.T) {
	t.Parallel()
	addr, _, caFile, ks := setup(t)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	_, portStr, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	port, err := strconv.Atoi(portStr)
	require.NoError(t, err)

	doh := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		var q dnsmessage.Message
		if err != nil || q.Unpack(body) != nil || len(q.Questions) != 1 {
			http.Error(w, "bad query", http.StatusBadRequest)
			return
		}
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: q.ID, Response: true, Authoritative: true})
		b.StartQuestions()
		b.Question(q.Questions[0])
		b.StartAnswers()
		if q.Questions[0].Type == dnsmessage.TypeHTTPS && q.Questions[0].Name.String() == innerName+"." {
			rr := dnsmessage.HTTPSResource{SVCBResource: dnsmessage.SVCBResource{Priority: 1, Target: dnsmessage.MustNewName(".")}}
			rr.SetParam(dnsmessage.SVCParamALPN, []byte("\x04imap")) // the relay's IMAP
			rr.SetParam(dnsmessage.SVCParamPort, []byte{byte(port >> 8), byte(port)})
			rr.SetParam(dnsmessage.SVCParamIPv4Hint, []byte{127, 0, 0, 1})
			rr.SetParam(dnsmessage.SVCParamECH, list)
			b.HTTPSResource(dnsmessage.ResourceHeader{Name: q.Questions[0].Name, Class: dnsmessage.ClassINET, TTL: 60}, rr)
		}
		msg, err := b.Finish()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/dns-message")
		w.Write(msg)
	}))
	t.Cleanup(doh.Close)

	code, stdout, stderr := client("-name", innerName, "-doh", doh.URL, "-ca", caFile, "-alpn", "imap")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "ECHConfigList from the HTTPS record of "+innerName+" (1 "+innerName+`. alpn="imap" port=`)
	assert.Contains(t, stdout, "from DNS-over-HTTPS "+doh.URL)
	assert.Contains(t, stdout, "ECH:              accepted")
	assert.Contains(t, stdout, "server says:      hello secret.example imap")

	// -connect an IP address: the record is still that of -name.
	code, stdout, stderr = client("-name", innerName, "-connect", addr, "-doh", doh.URL, "-ca", caFile, "-alpn", "imap")
	require.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "ECHConfigList from the HTTPS record of "+innerName)
	assert.Contains(t, stdout, "ECH:              accepted")

	// A name without a record: never in the clear unless asked.
	code, stdout, stderr = client("-name", "other.example", "-connect", addr, "-doh", doh.URL, "-ca", caFile)
	assert.Equal(t, 1, code)
	assert.Contains(t, stderr, "no ECHConfigList for other.example from DNS-over-HTTPS")
	assert.Contains(t, stderr, "not connecting, since other.example would be sent in the clear")
	assert.NotContains(t, stdout, "connected to", "no connection was made")

	// The DoH server has no record for the public name either.
	code, stdout, stderr = client("-name", publicName, "-connect", addr, "-doh", doh.URL, "-ca", caFile, "-allow-plaintext")
	assert.Equal(t, 0, code, stderr)
	assert.Contains(t, stdout, "connecting WITHOUT ECH (-allow-plaintext): "+publicName+" is sent in the clear")
	assert.Contains(t, stdout, "inner name:       - (no ECH: "+publicName+" was sent in the clear)")
}

func TestClientVersion(t *testing.T) {
	code, stdout, stderr := client("-version")
	require.Equal(t, 0, code, stderr)
	assert.Regexp(t, `^ech-client github.com/echkit/ech \S+ .*go1\.`, stdout)
}
