package ech

import (
	"context"
	"crypto/tls"
	"net"
	"testing"

	"github.com/echkit/ech/internal/testpki"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNothingKeptAfterHandshake checks that once the handshake messages are
// through, a Conn holds no buffer, HPKE context or watch state: an idle
// connection costs the wrapped conn and a few words.
func TestNothingKeptAfterHandshake(t *testing.T) {
	for _, hrr := range []bool{false, true} {
		t.Run(map[bool]string{false: "accepted", true: "accepted after HRR"}[hrr], func(t *testing.T) {
			key, err := GenerateKey("public.example", nil)
			require.NoError(t, err)
			ks, err := NewKeySet(key)
			require.NoError(t, err)
			list, err := ks.ConfigList()
			require.NoError(t, err)
			ca, err := testpki.NewCA()
			require.NoError(t, err)
			cert, err := ca.Leaf("secret.example")
			require.NoError(t, err)

			// TCP, not net.Pipe: with HRR both sides write a
			// change_cipher_spec at once, which an unbuffered pipe deadlocks.
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			defer ln.Close()
			client, err := net.Dial("tcp", ln.Addr().String())
			require.NoError(t, err)
			defer client.Close()
			server, err := ln.Accept()
			require.NoError(t, err)
			defer server.Close()
			done := make(chan error, 1)
			go func() {
				tc := tls.Client(client, &tls.Config{ServerName: "secret.example", RootCAs: ca.Pool, EncryptedClientHelloConfigList: list})
				err := tc.Handshake()
				if err == nil && !tc.ConnectionState().ECHAccepted {
					err = assert.AnError
				}
				if err == nil {
					_, err = tc.Write([]byte("ping"))
				}
				done <- err
			}()
			c, err := NewConn(t.Context(), server, WithKeySet(ks))
			require.NoError(t, err)
			require.True(t, c.ECHAccepted())
			cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
			if hrr {
				cfg.CurvePreferences = []tls.CurveID{tls.CurveP256}
			}
			tc := tls.Server(c, cfg)
			require.NoError(t, tc.HandshakeContext(context.Background()))
			buf := make([]byte, 4)
			_, err = tc.Read(buf)
			require.NoError(t, err)
			require.NoError(t, <-done)
			assert.Equal(t, hrr, tc.ConnectionState().HelloRetryRequest)

			assert.True(t, c.replay.empty(), "replay drained")
			assert.Nil(t, c.replay.buf, "replay buffer returned")
			assert.True(t, c.bound.IsZero(), "read deadline restored")
			assert.Nil(t, c.watch, "no second-hello state")
			assert.Nil(t, c.wwatch, "no server-flight state")
			assert.Equal(t, "secret.example", c.ServerName())
		})
	}
}
