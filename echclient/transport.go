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
// When d.Config has no NextProtos, the transport offers HTTP/2 and
// HTTP/1.1. It uses no proxy: a CONNECT tunnel would not go through d. Its
// other settings are those of [http.DefaultTransport]; the caller may change
// them before first use.
func NewTransport(d *Dialer) *http.Transport {
	return &http.Transport{
		DialContext: d.netDialer().DialContext,
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.dial(ctx, network, addr, []string{"h2", "http/1.1"})
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}
