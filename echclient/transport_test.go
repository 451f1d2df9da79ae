package echclient

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTransport(t *testing.T) {
	e := newEnv(t)
	l := newECHListener(t, e.ca, e.ks)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s over %s", r.TLS.ServerName, r.Proto)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	p := l.Addr().(*net.TCPAddr).Port
	e.dns.https(secretName, testTTL, 1, ".", portParam(p), hintParam("127.0.0.1"), echParam(e.list))
	e.dns.a("plain.example", "127.0.0.1")

	tests := []struct {
		name     string
		url      string
		policy   Policy
		accepted bool
		body     string
	}{
		{"ECH accepted", "https://" + secretName + "/", RequireECH, true, "hello secret.example over HTTP/2.0"},
		{"no record", "https://plain.example:" + strconv.Itoa(p) + "/", Opportunistic, false, "hello plain.example over HTTP/2.0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := NewTransport(e.dialer(tc.policy))
			t.Cleanup(tr.CloseIdleConnections)
			client := &http.Client{Transport: tr, Timeout: testTimeout}
			for i := range 2 {
				req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, tc.url, nil)
				require.NoError(t, err)
				resp, err := client.Do(req)
				require.NoError(t, err)
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.NoError(t, err)
				assert.Equal(t, http.StatusOK, resp.StatusCode)
				assert.Equal(t, tc.body, string(body))
				require.NotNil(t, resp.TLS, "request %d", i)
				assert.Equal(t, tc.accepted, resp.TLS.ECHAccepted, "request %d", i)
			}
		})
	}
}

func TestNewTransportDefaults(t *testing.T) {
	tr := NewTransport(&Dialer{})
	def := http.DefaultTransport.(*http.Transport)
	assert.Nil(t, tr.Proxy, "no proxy: a CONNECT tunnel would bypass ECH")
	assert.True(t, tr.ForceAttemptHTTP2)
	assert.Equal(t, def.TLSHandshakeTimeout, tr.TLSHandshakeTimeout)
	assert.Equal(t, def.IdleConnTimeout, tr.IdleConnTimeout)
	assert.Equal(t, def.MaxIdleConns, tr.MaxIdleConns)
	assert.Equal(t, def.ExpectContinueTimeout, tr.ExpectContinueTimeout)
	assert.NotNil(t, tr.DialContext)
	assert.NotNil(t, tr.DialTLSContext)
	nd := (&Dialer{}).netDialer()
	assert.Equal(t, 30*time.Second, nd.Timeout, "connects are bounded as by http.DefaultTransport")
}

// TestNewTransportReplacedDefault checks that a program that replaced
// http.DefaultTransport with another RoundTripper, as tracing wrappers do,
// still gets a transport with bounded timeouts, not a panic.
func TestNewTransportReplacedDefault(t *testing.T) {
	def := http.DefaultTransport
	t.Cleanup(func() { http.DefaultTransport = def })
	http.DefaultTransport = roundTripperFunc(func(r *http.Request) (*http.Response, error) { return def.RoundTrip(r) })
	var tr *http.Transport
	require.NotPanics(t, func() { tr = NewTransport(&Dialer{}) })
	want := def.(*http.Transport)
	assert.Nil(t, tr.Proxy)
	assert.True(t, tr.ForceAttemptHTTP2)
	assert.Equal(t, want.TLSHandshakeTimeout, tr.TLSHandshakeTimeout)
	assert.Equal(t, want.IdleConnTimeout, tr.IdleConnTimeout)
	assert.Equal(t, want.MaxIdleConns, tr.MaxIdleConns)
	assert.Equal(t, want.ExpectContinueTimeout, tr.ExpectContinueTimeout)
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
