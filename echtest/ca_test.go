package echtest_test

import (
	"crypto/tls"
	"crypto/x509"
	"sync"
	"testing"

	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCACertificate(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	cert := ca.Certificate("a.example", "b.example", "127.0.0.1", "::1")
	require.NotNil(t, cert.Leaf)
	assert.Equal(t, "a.example", cert.Leaf.Subject.CommonName)
	assert.Len(t, cert.Certificate, 2, "leaf and root")
	for _, name := range []string{"a.example", "b.example", "127.0.0.1", "::1"} {
		_, err := cert.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: ca.Pool()})
		assert.NoError(t, err, name)
	}
	_, err := cert.Leaf.Verify(x509.VerifyOptions{DNSName: "c.example", Roots: ca.Pool()})
	assert.Error(t, err)
	_, err = cert.Leaf.Verify(x509.VerifyOptions{DNSName: "a.example", Roots: echtest.NewCA(t).Pool()})
	assert.Error(t, err, "each CA is fresh")
	assert.Panics(t, func() { ca.Certificate() })
	assert.Equal(t, ca.Root().Raw, cert.Certificate[1], "the chain ends with the root")
	assert.True(t, ca.Root().IsCA)
}

func TestCAGetCertificate(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	var wg sync.WaitGroup
	certs := make([]*tls.Certificate, 8)
	for i := range certs {
		wg.Go(func() {
			c, err := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "a.example"})
			assert.NoError(t, err)
			certs[i] = c
		})
	}
	wg.Wait()
	for _, c := range certs {
		assert.Same(t, certs[0], c, "issued once per name")
	}
	b, err := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "b.example"})
	require.NoError(t, err)
	assert.Equal(t, []string{"b.example"}, b.Leaf.DNSNames)
	_, err = ca.GetCertificate(&tls.ClientHelloInfo{})
	assert.Error(t, err, "no server_name and no connection")
}

func TestCAPoolIsACopy(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	p := ca.Pool()
	p.AddCert(echtest.NewCA(t).Certificate("x.example").Leaf)
	assert.False(t, p.Equal(ca.Pool()))
}
