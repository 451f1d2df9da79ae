package echclient

import (
	"context"
	"net"
	"net/http"
	"time"
)

// NewTransport returns an [http.Transport] whose "https" connections are
// made by d, so that an [http.Client] with it uses ECH unchanged. Each
// response reports whether its connection used ECH in
// resp.TLS.ECHAccepted.
//
// It starts from a clone of [http.DefaultTransport], keeping its timeouts
// and pool settings, which the caller may change before first use. Plain
// "http" connections are dialed by d's net.Dialer. It uses no proxy: a
// CONNECT tunnel would not go through d. When d.Config has no NextProtos,
// the transport offers HTTP/2 and HTTP/1.1. If a program replaced
// http.DefaultTransport with another [http.RoundTripper], it starts from the
// settings net/http gives http.DefaultTransport instead.
func NewTransport(d *Dialer) *http.Transport {
	var t *http.Transport
	if dt, ok := http.DefaultTransport.(*http.Transport); ok {
		t = dt.Clone()
	} else {
		t = &http.Transport{
			MaxIdleConns:          100,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ExpectContinueTimeout: time.Second,
		}
	}
	t.Proxy = nil
	t.DialContext = d.netDialer().DialContext
	t.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.dial(ctx, network, addr, []string{"h2", "http/1.1"})
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	t.ForceAttemptHTTP2 = true
	return t
}
