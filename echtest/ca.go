package echtest

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"sync"
	"testing"

	"github.com/echkit/ech/internal/testpki"
)

// CA is a throwaway certificate authority for one test. It lives in memory
// only and signs certificates for any DNS name or IP address. It is safe for
// concurrent use.
type CA struct {
	ca *testpki.CA

	mu    sync.Mutex
	cache map[string]*tls.Certificate // by server name, for GetCertificate
}

// NewCA returns a new CA with a fresh P-256 key, valid for a day.
func NewCA(tb testing.TB) *CA {
	tb.Helper()
	ca, err := testpki.NewCA()
	if err != nil {
		tb.Fatalf("echtest: creating CA: %v", err)
	}
	return &CA{ca: ca, cache: make(map[string]*tls.Certificate)}
}

// Pool returns a new pool holding the CA's root certificate, for
// [tls.Config.RootCAs] (or ClientCAs).
func (ca *CA) Pool() *x509.CertPool { return ca.ca.Pool.Clone() }

// Root returns the CA's self-signed root certificate, for a client that
// takes a file rather than a pool: pem.Encode its Raw bytes for OpenSSL,
// BoringSSL or NSS tools. The caller must not modify it.
func (ca *CA) Root() *x509.Certificate { return ca.ca.Cert }

// Certificate returns a new leaf certificate, with a fresh key, for names:
// DNS names or IP addresses, the first one also its common name. The chain
// holds the leaf and the root. It panics if names is empty.
func (ca *CA) Certificate(names ...string) tls.Certificate {
	if len(names) == 0 {
		panic("echtest: Certificate needs at least one name")
	}
	cert, err := ca.ca.Leaf(names...)
	if err != nil {
		panic("echtest: issuing certificate: " + err.Error())
	}
	return cert
}

// GetCertificate returns a certificate for the server_name of hello,
// issuing it on first use. When the client sent no server_name (it dialed
// an IP address), the certificate is for the local IP address of the
// connection. It has the signature of [tls.Config.GetCertificate], so a
// server built by hand answers for any name:
//
//	cfg := &tls.Config{GetCertificate: ca.GetCertificate}
func (ca *CA) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := hello.ServerName
	if name == "" {
		if hello.Conn == nil {
			return nil, errors.New("echtest: ClientHello has no server_name")
		}
		host, _, err := net.SplitHostPort(hello.Conn.LocalAddr().String())
		if err != nil {
			return nil, errors.New("echtest: ClientHello has no server_name and the local address is not an IP address")
		}
		name = host
	}
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c, ok := ca.cache[name]; ok {
		return c, nil
	}
	c, err := ca.ca.Leaf(name)
	if err != nil {
		return nil, err
	}
	ca.cache[name] = &c
	return &c, nil
}
