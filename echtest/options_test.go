package echtest_test

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWithPublicName(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil, echtest.WithPublicName("front.example"))
	assert.Equal(t, "front.example", srv.PublicName)
	info := srv.ConnInfo(t, srv.Dial(t, "secret.example"))
	assert.Equal(t, "front.example", info.OuterServerName)
	assert.Equal(t, "secret.example", info.ServerName)
}

func TestWithPublicNameInvalid(t *testing.T) {
	t.Parallel()
	assert.Panics(t, func() {
		runAsTest(func(t testing.TB) { echtest.NewServer(t, nil, echtest.WithPublicName("192.0.2.1")) })
	})
}

func TestWithBackendConfigHRR(t *testing.T) {
	t.Parallel()
	// crypto/tls clients send an X25519MLKEM768 and an X25519 key share: a
	// backend that takes only P-256 asks again with a HelloRetryRequest.
	srv := echtest.NewServer(t, echtest.Echo, echtest.WithBackendConfig(func(c *tls.Config) {
		c.CurvePreferences = []tls.CurveID{tls.CurveP256}
	}))
	conn := srv.Dial(t, "secret.example")
	state := conn.ConnectionState()
	assert.True(t, state.ECHAccepted)
	assert.Equal(t, tls.CurveP256, state.CurveID)
	_, err := conn.Write([]byte("after HRR"))
	require.NoError(t, err)
	buf := make([]byte, len("after HRR"))
	_, err = conn.Read(buf)
	require.NoError(t, err)
	info := srv.ConnInfo(t, conn)
	assert.Equal(t, ech.StatusAccepted, info.Status)
	assert.Equal(t, "secret.example", info.ServerName)
	assert.True(t, info.HelloRetryRequest)
	assert.Equal(t, tls.CurveP256, info.CurveID)
}

func TestWithBackendConfigInOrder(t *testing.T) {
	t.Parallel()
	srv := echtest.NewServer(t, nil,
		echtest.WithBackendConfig(func(c *tls.Config) { c.NextProtos = []string{"smtp"} }),
		echtest.WithBackendConfig(func(c *tls.Config) { c.NextProtos = append(c.NextProtos, "h2") }),
	)
	assert.Equal(t, []string{"smtp", "h2"}, srv.BackendConfig().NextProtos)
	assert.NotSame(t, srv.BackendConfig(), srv.BackendConfig())

	cfg := srv.ClientConfig("mail.example")
	cfg.NextProtos = []string{"h2", "smtp"}
	conn, err := srv.DialConfig(t, cfg)
	require.NoError(t, err)
	assert.Equal(t, "smtp", conn.ConnectionState().NegotiatedProtocol, "the server's preference")
	info := srv.ConnInfo(t, conn)
	assert.Equal(t, []string{"h2", "smtp"}, info.ALPN, "the inner hello's ALPN")
	assert.Equal(t, "smtp", info.NegotiatedProtocol)
}

func TestWithKeySetRotation(t *testing.T) {
	t.Parallel()
	ks := echtest.NewKeySet(t, echtest.DefaultPublicName)
	srv := echtest.NewServer(t, nil, echtest.WithKeySet(ks))
	require.Same(t, ks, srv.Keys)
	old := srv.ClientConfig("secret.example")
	oldID := ks.ConfigIDs()[0]

	k, err := ech.GenerateKey(echtest.DefaultPublicName, &ech.KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
	require.NoError(t, err)
	require.NoError(t, ks.Rotate(time.Hour, k))

	conn, err := srv.DialConfig(t, old)
	require.NoError(t, err)
	assert.Equal(t, oldID, srv.ConnInfo(t, conn).ConfigID, "the old key decrypts during the grace period")
	conn = srv.Dial(t, "secret.example")
	info := srv.ConnInfo(t, conn)
	assert.Equal(t, ech.StatusAccepted, info.Status)
	assert.NotEqual(t, oldID, info.ConfigID, "ClientConfig follows the rotation")
}

func TestWithConnOptions(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer // written before the server records the connection
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv := echtest.NewServer(t, nil, echtest.WithConnOptions(ech.WithLogger(logger)))
	srv.Dial(t, "secret.example")
	assert.Contains(t, buf.String(), "ech=accepted")
	assert.Contains(t, buf.String(), "sni=secret.example")
}
