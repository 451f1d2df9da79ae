package ech

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	mathrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech/internal/testpki"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// keysTestPKI is a test CA and a certificate for public.example (the public
// name: rejected handshakes) and secret.example (the inner name).
var keysTestPKI = sync.OnceValues(func() (*testpki.CA, tls.Certificate) {
	ca, err := testpki.NewCA()
	if err != nil {
		panic(err)
	}
	cert, err := ca.Leaf("public.example", "secret.example")
	if err != nil {
		panic(err)
	}
	return ca, cert
})

// tlsServerConfig returns a crypto/tls server configuration for
// keysTestPKI's certificate. The caller sets its ECH keys.
func tlsServerConfig() *tls.Config {
	_, cert := keysTestPKI()
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
}

// tlsClientConfig returns a crypto/tls client configuration that offers ECH
// with list for secret.example.
func tlsClientConfig(list []byte) *tls.Config {
	ca, _ := keysTestPKI()
	return &tls.Config{
		ServerName:                     "secret.example",
		RootCAs:                        ca.Pool,
		MinVersion:                     tls.VersionTLS13,
		EncryptedClientHelloConfigList: list,
	}
}

// tlsHandshake runs a crypto/tls handshake over loopback TCP and returns
// the client's state, the server's state and the client's error.
func tlsHandshake(t *testing.T, client, server *tls.Config) (tls.ConnectionState, tls.ConnectionState, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()

	var serverState tls.ConnectionState
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return // the client's dial fails too
		}
		defer c.Close()
		sc := tls.Server(c, server)
		// The server's error repeats the client's or follows from it.
		_ = sc.HandshakeContext(ctx)
		// Read until the client closes the connection.
		_, _ = io.Copy(io.Discard, sc)
		serverState = sc.ConnectionState()
	}()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	require.NoError(t, err)
	cc := tls.Client(c, client)
	err = cc.HandshakeContext(ctx)
	clientState := cc.ConnectionState()
	cc.Close()
	<-done
	return clientState, serverState, err
}

// mustGenerateKey returns a key for public.example, failing t on error.
func mustGenerateKey(t testing.TB, opts *KeyOptions) Key {
	t.Helper()
	k, err := GenerateKey("public.example", opts)
	require.NoError(t, err)
	return k
}

func TestCryptoTLSInterop(t *testing.T) {
	// X448 has no case: crypto/tls (crypto/hpke) does not implement it, so
	// there is no independent peer; see TestX448CirclRoundTrip.
	tests := []struct {
		name string
		opts KeyOptions
	}{
		{"X25519", KeyOptions{KEM: KEMX25519}},
		{"P-256", KeyOptions{KEM: KEMP256}},
		{"P-384", KeyOptions{KEM: KEMP384}},
		{"P-521", KeyOptions{KEM: KEMP521}},
		{"X-Wing", KeyOptions{KEM: KEMXWing}},
		// crypto/tls picks the first suite it knows: one suite per config
		// makes it use that one.
		{"X25519/AES-128-GCM", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA256, AEADAES128GCM}}}},
		{"X25519/AES-256-GCM", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA256, AEADAES256GCM}}}},
		{"X25519/ChaCha20-Poly1305", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA256, AEADChaCha20Poly1305}}}},
		{"X25519/HKDF-SHA384/AES-256-GCM", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA384, AEADAES256GCM}}}},
		{"X25519/HKDF-SHA512/ChaCha20-Poly1305", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA512, AEADChaCha20Poly1305}}}},
		{"P-256/HKDF-SHA512/AES-128-GCM", KeyOptions{KEM: KEMP256, CipherSuites: []CipherSuite{{KDFHKDFSHA512, AEADAES128GCM}}}},
		{"max name length and extension", KeyOptions{
			MaxNameLength: 64,
			Extensions:    []ConfigExtension{{Type: 0x1234, Data: []byte("ignored")}},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			ks, err := NewKeySet(mustGenerateKey(t, &opts))
			require.NoError(t, err)
			list, err := ks.ConfigList()
			require.NoError(t, err)

			server := tlsServerConfig()
			server.EncryptedClientHelloKeys = ks.Keys()
			cs, ss, err := tlsHandshake(t, tlsClientConfig(list), server)
			require.NoError(t, err)
			assert.True(t, cs.ECHAccepted, "client ECHAccepted")
			assert.True(t, ss.ECHAccepted, "server ECHAccepted")
			assert.Equal(t, "secret.example", ss.ServerName, "the server saw the inner name")
		})
	}
}

func TestCryptoTLSRotation(t *testing.T) {
	ks, err := NewKeySet(mustGenerateKey(t, &KeyOptions{}))
	require.NoError(t, err)
	server := tlsServerConfig()
	server.GetEncryptedClientHelloKeys = ks.GetEncryptedClientHelloKeys
	oldList, err := ks.ConfigList()
	require.NoError(t, err)

	cs, _, err := tlsHandshake(t, tlsClientConfig(oldList), server)
	require.NoError(t, err)
	require.True(t, cs.ECHAccepted, "before rotation")

	next := mustGenerateKey(t, &KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
	// The grace period covers the two handshakes below, on a loaded machine
	// too.
	require.NoError(t, ks.Rotate(time.Second, next))
	newList, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, rawConfigList(next.Config), []byte(newList))

	cs, _, err = tlsHandshake(t, tlsClientConfig(oldList), server)
	require.NoError(t, err)
	assert.True(t, cs.ECHAccepted, "old config during the grace period")
	cs, _, err = tlsHandshake(t, tlsClientConfig(newList), server)
	require.NoError(t, err)
	assert.True(t, cs.ECHAccepted, "new config")

	require.Eventually(t, func() bool { return ks.Len() == 1 }, 5*time.Second, 10*time.Millisecond)

	// The old config is rejected now; the client gets the new one as retry
	// config, after verifying the certificate for public.example.
	_, _, err = tlsHandshake(t, tlsClientConfig(oldList), server)
	var rejected *tls.ECHRejectionError
	require.ErrorAs(t, err, &rejected)
	assert.Equal(t, []byte(newList), rejected.RetryConfigList)

	cs, _, err = tlsHandshake(t, tlsClientConfig(rejected.RetryConfigList), server)
	require.NoError(t, err)
	assert.True(t, cs.ECHAccepted, "retry config")
}

func TestGenerateKey(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		k := mustGenerateKey(t, nil)
		assert.True(t, k.SendAsRetry, "a new key is sent as a retry config")
		c, err := KeyConfig(k)
		require.NoError(t, err)
		assert.Equal(t, KEMX25519, c.KEM)
		assert.Equal(t, DefaultCipherSuites, c.CipherSuites)
		assert.Equal(t, CipherSuite{KDFHKDFSHA256, AEADAES128GCM}, c.CipherSuites[0], "RFC 9849, Section 9")
		assert.NotZero(t, c.ConfigID)
		assert.Zero(t, c.MaxNameLength)
		assert.Equal(t, "public.example", c.PublicName)
		assert.Empty(t, c.Extensions)
		assert.Len(t, k.PrivateKey, 32)
	})

	t.Run("options", func(t *testing.T) {
		opts := &KeyOptions{
			KEM:            KEMP384,
			CipherSuites:   []CipherSuite{{KDFHKDFSHA384, AEADAES256GCM}},
			MaxNameLength:  77,
			ConfigID:       0xee,
			AvoidConfigIDs: []uint8{0xee}, // applies to random config_ids only
			Extensions:     []ConfigExtension{{Type: 0x8002, Data: []byte{7}}},
			NoRetry:        true,
		}
		k := mustGenerateKey(t, opts)
		assert.False(t, k.SendAsRetry)
		c, err := KeyConfig(k)
		require.NoError(t, err)
		assert.Equal(t, &Config{
			ConfigID:      0xee,
			KEM:           KEMP384,
			PublicKey:     c.PublicKey,
			CipherSuites:  opts.CipherSuites,
			MaxNameLength: 77,
			PublicName:    "public.example",
			Extensions:    opts.Extensions,
		}, c)
		assert.Equal(t, []uint16{0x8002}, c.MandatoryExtensions())
	})

	t.Run("deterministic randomness", func(t *testing.T) {
		for _, id := range allKEMs {
			a := mustGenerateKey(t, &KeyOptions{KEM: id, Rand: mathrand.NewChaCha8([32]byte{2})})
			b := mustGenerateKey(t, &KeyOptions{KEM: id, Rand: mathrand.NewChaCha8([32]byte{2})})
			assert.Equal(t, a, b, "%v", id)
		}
	})

	t.Run("constant randomness does not hang", func(t *testing.T) {
		done := make(chan Key)
		go func() {
			k, err := GenerateKey("public.example", &KeyOptions{Rand: zeroReader{}})
			assert.NoError(t, err)
			done <- k
		}()
		select {
		case k := <-done:
			c, err := KeyConfig(k)
			require.NoError(t, err)
			assert.NotZero(t, c.ConfigID)
		case <-time.After(5 * time.Second):
			t.Fatal("GenerateKey hangs on a reader of zeros")
		}
	})

	tests := []struct {
		name string
		in   string
		opts KeyOptions
		err  error
	}{
		{"invalid public name", "example.com.", KeyOptions{}, ErrInvalidPublicName},
		{"IP address", "192.0.2.1", KeyOptions{}, ErrInvalidPublicName},
		{"unsupported KEM", "public.example", KeyOptions{KEM: 0x0030}, ErrUnsupportedAlgorithm},
		{"unsupported AEAD", "public.example", KeyOptions{CipherSuites: []CipherSuite{{KDFHKDFSHA256, 0xffff}}}, ErrUnsupportedAlgorithm},
		{"unsupported KDF", "public.example", KeyOptions{CipherSuites: []CipherSuite{{0x0010, AEADAES128GCM}}}, ErrUnsupportedAlgorithm},
		{"no cipher suites", "public.example", KeyOptions{CipherSuites: []CipherSuite{}}, ErrMalformedConfig},
		{"duplicate extensions", "public.example", KeyOptions{Extensions: []ConfigExtension{{Type: 1}, {Type: 1}}}, ErrMalformedConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, err := GenerateKey(tc.in, &tc.opts)
			require.ErrorIs(t, err, tc.err)
			assert.Zero(t, k)
		})
	}

	t.Run("failing randomness", func(t *testing.T) {
		_, err := GenerateKey("public.example", &KeyOptions{Rand: bytes.NewReader(nil)})
		require.ErrorIs(t, err, io.EOF)
		_, err = GenerateKey("public.example", &KeyOptions{ConfigID: 1, Rand: bytes.NewReader(make([]byte, 10))})
		require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	})
}

// zeroReader is a source of randomness that returns only zeros.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestRandomConfigIDs(t *testing.T) {
	ks, err := NewKeySet()
	require.NoError(t, err)
	seen := make(map[uint8]bool)
	for range 100 {
		k := mustGenerateKey(t, &KeyOptions{AvoidConfigIDs: ks.ConfigIDs()})
		c, err := KeyConfig(k)
		require.NoError(t, err)
		require.NotZero(t, c.ConfigID)
		require.False(t, seen[c.ConfigID], "config_id %d reused", c.ConfigID)
		seen[c.ConfigID] = true
		require.NoError(t, ks.Add(k))
	}
	assert.Len(t, ks.ConfigIDs(), 100)

	var used []uint8
	for id := 1; id < 255; id++ {
		used = append(used, uint8(id))
	}
	tests := []struct {
		name  string
		avoid []uint8
		want  uint8 // 0: no free config_id
	}{
		{"one free", used, 255},
		{"one free, duplicates and zero in the list", append(append(slices.Clone(used), used...), 0), 255},
		{"one free in the middle", append(slices.DeleteFunc(slices.Clone(used), func(id uint8) bool { return id == 100 }), 255), 100},
		{"none free", append(slices.Clone(used), 255), 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, rnd := range []io.Reader{rand.Reader, zeroReader{}} {
				id, err := randomConfigID(rnd, tc.avoid)
				if tc.want == 0 {
					require.Error(t, err)
					continue
				}
				require.NoError(t, err)
				assert.Equal(t, tc.want, id)
			}
		})
	}
}

func TestNewKeySetRefuses(t *testing.T) {
	good := mustGenerateKey(t, &KeyOptions{ConfigID: 9})
	other := mustGenerateKey(t, nil)
	p256 := mustGenerateKey(t, &KeyOptions{KEM: KEMP256})

	marshal := func(c *Config) []byte {
		b, err := c.Marshal()
		require.NoError(t, err)
		return b
	}
	withConfig := func(modify func(c *Config)) []byte {
		c, err := KeyConfig(good)
		require.NoError(t, err)
		c.PublicKey = slices.Clone(c.PublicKey)
		modify(c)
		return marshal(c)
	}

	tests := []struct {
		name string
		key  Key
		err  error
	}{
		{"private key of another config", Key{Config: good.Config, PrivateKey: other.PrivateKey}, ErrInvalidKey},
		{"private key of another KEM", Key{Config: good.Config, PrivateKey: p256.PrivateKey}, ErrInvalidKey},
		{"short private key", Key{Config: good.Config, PrivateKey: good.PrivateKey[:31]}, ErrInvalidKey},
		{"no private key", Key{Config: good.Config}, ErrInvalidKey},
		{"P-256 scalar out of range", Key{Config: p256.Config, PrivateKey: bytes.Repeat([]byte{0xff}, 32)}, ErrInvalidKey},
		{"truncated config", Key{Config: good.Config[:len(good.Config)-1], PrivateKey: good.PrivateKey}, ErrMalformedConfig},
		{"no config", Key{PrivateKey: good.PrivateKey}, ErrMalformedConfig},
		{"config of another version", Key{Config: append([]byte{0xfe, 0x0c}, good.Config[2:]...), PrivateKey: good.PrivateKey}, ErrUnsupportedVersion},
		{"invalid public name", Key{Config: withConfig(func(c *Config) { c.PublicName = "1.2.3.4" }), PrivateKey: good.PrivateKey}, ErrInvalidPublicName},
		{"unsupported KEM", Key{Config: withConfig(func(c *Config) { c.KEM = 0xcccc }), PrivateKey: good.PrivateKey}, ErrUnsupportedAlgorithm},
		{"no supported suite", Key{Config: withConfig(func(c *Config) {
			c.CipherSuites = []CipherSuite{{KDFHKDFSHA256, 0xffff}}
		}), PrivateKey: good.PrivateKey}, ErrUnsupportedAlgorithm},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ks, err := NewKeySet(good, tc.key)
			require.ErrorIs(t, err, tc.err)
			assert.Nil(t, ks)
			assert.True(t, strings.HasPrefix(err.Error(), "ech: "), "%q", err)
			assert.Contains(t, err.Error(), "key 1", "the error names the key")
			assertNoSecret(t, err, tc.key.PrivateKey)
			assertNoSecret(t, err, good.PrivateKey)

			_, err = KeyConfig(tc.key)
			require.ErrorIs(t, err, tc.err)

			// A failed Replace, Add or Rotate leaves the set unchanged.
			ks, err = NewKeySet(good)
			require.NoError(t, err)
			require.ErrorIs(t, ks.Replace(tc.key), tc.err)
			require.ErrorIs(t, ks.Add(other, tc.key), tc.err)
			require.ErrorIs(t, ks.Rotate(time.Millisecond, other, tc.key), tc.err)
			assert.Equal(t, []Key{good}, ks.Keys())
		})
	}
}

// assertNoSecret checks that err does not show secret, raw or in hex.
func assertNoSecret(t *testing.T, err error, secret []byte) {
	t.Helper()
	if len(secret) < 8 {
		return // too short to tell apart from other text
	}
	msg := err.Error()
	assert.NotContains(t, msg, string(secret))
	assert.NotContains(t, strings.ToLower(msg), hex.EncodeToString(secret))
}

func TestKeySetEditing(t *testing.T) {
	a := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	b := mustGenerateKey(t, &KeyOptions{ConfigID: 2, NoRetry: true})
	c := mustGenerateKey(t, &KeyOptions{ConfigID: 3, KEM: KEMP256})

	var zero KeySet
	assert.Zero(t, zero.Len(), "the zero KeySet is empty")
	_, err := zero.ConfigList()
	require.ErrorIs(t, err, ErrNoKeys)
	require.NoError(t, zero.Add(a))
	assert.Equal(t, []Key{a}, zero.Keys())

	ks, err := NewKeySet()
	require.NoError(t, err)
	assert.Empty(t, ks.Keys())
	assert.Empty(t, ks.ConfigIDs())
	_, err = ks.ConfigList()
	require.ErrorIs(t, err, ErrNoKeys)

	require.NoError(t, ks.Add(a, b))
	require.NoError(t, ks.Add(c))
	assert.Equal(t, []Key{a, b, c}, ks.Keys())
	assert.Equal(t, []uint8{1, 2, 3}, ks.ConfigIDs())
	assert.Equal(t, 3, ks.Len())
	got, err := ks.GetEncryptedClientHelloKeys(nil)
	require.NoError(t, err)
	assert.Equal(t, ks.Keys(), got)

	// Only the keys marked SendAsRetry are published.
	list, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, rawConfigList(a.Config, c.Config), []byte(list))

	ks.Remove(1)
	assert.Equal(t, []Key{b, c}, ks.Keys())
	ks.Remove(1) // not there: no change
	ks.Remove(200)
	assert.Equal(t, []Key{b, c}, ks.Keys())

	ks.Remove(3)
	// With no key marked, the list holds every key.
	list, err = ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, rawConfigList(b.Config), []byte(list))

	require.NoError(t, ks.Replace(c, a))
	assert.Equal(t, []Key{c, a}, ks.Keys())
	list, err = ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, rawConfigList(c.Config, a.Config), []byte(list))

	require.NoError(t, ks.Replace())
	assert.Zero(t, ks.Len())
}

func TestKeySetCandidates(t *testing.T) {
	aes := CipherSuite{KDFHKDFSHA256, AEADAES128GCM}
	chacha := CipherSuite{KDFHKDFSHA256, AEADChaCha20Poly1305}
	var keys []Key
	for range MaxKeysPerHello + 2 {
		keys = append(keys, mustGenerateKey(t, &KeyOptions{ConfigID: 5, CipherSuites: []CipherSuite{aes}}))
	}
	chachaKey := mustGenerateKey(t, &KeyOptions{ConfigID: 6, CipherSuites: []CipherSuite{chacha}})
	ks, err := NewKeySet(append(keys, chachaKey)...)
	require.NoError(t, err)
	tbl := ks.table()

	got := tbl.candidates(nil, 5, aes)
	require.Len(t, got, MaxKeysPerHello, "capped")
	for i, pk := range got {
		assert.Equal(t, keys[i], pk.key, "in set order")
	}
	assert.Empty(t, tbl.candidates(nil, 5, chacha), "suite not in the config")
	assert.Empty(t, tbl.candidates(nil, 7, aes), "unknown config_id")
	got = tbl.candidates(nil, 6, chacha)
	require.Len(t, got, 1)
	assert.Equal(t, chachaKey, got[0].key)

	// candidates appends to dst without allocating when dst has room.
	dst := make([]*parsedKey, 0, MaxKeysPerHello)
	assert.Zero(t, testing.AllocsPerRun(100, func() { dst = tbl.candidates(dst[:0], 5, aes) }))
}

func TestKeySetCopies(t *testing.T) {
	k := mustGenerateKey(t, &KeyOptions{})
	want := Key{Config: slices.Clone(k.Config), PrivateKey: slices.Clone(k.PrivateKey), SendAsRetry: true}
	ks, err := NewKeySet(k)
	require.NoError(t, err)
	wantList, err := ks.ConfigList()
	require.NoError(t, err)

	// Changing the caller's key after NewKeySet does not change the set.
	clear(k.Config)
	clear(k.PrivateKey)
	// Nor does changing what Keys returned.
	got := ks.Keys()
	clear(got[0].Config)
	clear(got[0].PrivateKey)

	assert.Equal(t, []Key{want}, ks.Keys())
	list, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, wantList, list)
	c, err := KeyConfig(ks.Keys()[0])
	require.NoError(t, err)
	assert.Equal(t, "public.example", c.PublicName)
}

func TestKeySetRotate(t *testing.T) {
	a := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	b := mustGenerateKey(t, &KeyOptions{ConfigID: 2})
	c := mustGenerateKey(t, &KeyOptions{ConfigID: 3, NoRetry: true})
	ks, err := NewKeySet(a, b)
	require.NoError(t, err)

	require.NoError(t, ks.Rotate(200*time.Millisecond, c))
	keys := ks.Keys()
	require.Len(t, keys, 3)
	assert.Equal(t, c.Config, keys[0].Config, "new key first")
	assert.True(t, keys[0].SendAsRetry, "new key sent as retry config")
	assert.False(t, c.SendAsRetry, "the caller's key is not changed")
	assert.Equal(t, a.Config, keys[1].Config)
	assert.False(t, keys[1].SendAsRetry, "old key no longer sent")
	assert.Equal(t, b.Config, keys[2].Config)
	assert.False(t, keys[2].SendAsRetry, "old key no longer sent")
	list, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, rawConfigList(c.Config), []byte(list), "only the new config is published")
	assert.Len(t, ks.table().candidates(nil, 1, DefaultCipherSuites[0]), 1, "old key still decrypts")

	require.Eventually(t, func() bool { return ks.Len() == 1 }, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, []uint8{3}, ks.ConfigIDs())
	assert.Empty(t, ks.table().candidates(nil, 1, DefaultCipherSuites[0]), "old key gone")
}

// TestKeySetRotateTwice checks that a second rotation does not extend the
// life of keys the first one retired.
func TestKeySetRotateTwice(t *testing.T) {
	a := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	b := mustGenerateKey(t, &KeyOptions{ConfigID: 2})
	c := mustGenerateKey(t, &KeyOptions{ConfigID: 3})
	ks, err := NewKeySet(a)
	require.NoError(t, err)

	require.NoError(t, ks.Rotate(200*time.Millisecond, b))
	require.NoError(t, ks.Rotate(time.Hour, c))
	assert.Equal(t, []uint8{3, 2, 1}, ks.ConfigIDs())
	require.Eventually(t, func() bool { return ks.Len() == 2 }, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, []uint8{3, 2}, ks.ConfigIDs(), "a is removed after its own grace period")
	keys := ks.Keys()
	assert.True(t, keys[0].SendAsRetry)
	assert.False(t, keys[1].SendAsRetry)

	// A Replace in the grace period wins: the timer does not touch the new
	// keys.
	require.NoError(t, ks.Rotate(10*time.Millisecond, a))
	require.NoError(t, ks.Replace(b))
	time.Sleep(50 * time.Millisecond)
	assert.Equal(t, []uint8{2}, ks.ConfigIDs())
}

func TestKeySetConcurrent(t *testing.T) {
	var keys []Key
	for i := range 4 {
		keys = append(keys, mustGenerateKey(t, &KeyOptions{ConfigID: uint8(i + 1), NoRetry: i%2 != 0}))
	}
	ks, err := NewKeySet(keys[0])
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(t.Context())
	var readers sync.WaitGroup
	for r := range 4 {
		readers.Go(func() {
			cs := DefaultCipherSuites[0]
			var dst []*parsedKey
			for ctx.Err() == nil {
				ids := ks.ConfigIDs()
				assert.NotEmpty(t, ids)
				assert.Len(t, slices.Compact(slices.Sorted(slices.Values(ids))), len(ids), "a snapshot has unique config_ids")
				dst = ks.table().candidates(dst[:0], uint8(r+1), cs)
				assert.LessOrEqual(t, len(dst), 1)

				list, err := ks.ConfigList()
				if assert.NoError(t, err) {
					configs, err := list.Configs()
					assert.NoError(t, err)
					assert.NotEmpty(t, configs)
				}
				got, err := ks.GetEncryptedClientHelloKeys(nil)
				assert.NoError(t, err)
				assert.NotEmpty(t, got)
				assert.NotEmpty(t, ks.Keys())
			}
		})
	}

	for range 100 {
		require.NoError(t, ks.Replace(keys[0], keys[1]))
		require.NoError(t, ks.Add(keys[2]))
		require.NoError(t, ks.Rotate(time.Millisecond, keys[3]))
		ks.Remove(keys[2].Config[4]) // config_id, the first byte of the contents
	}
	cancel()
	readers.Wait()
	require.Eventually(t, func() bool { return ks.Len() == 1 }, 5*time.Second, 5*time.Millisecond)
	assert.Equal(t, []uint8{4}, ks.ConfigIDs())
}

// pemFixtures are the expected contents of testdata/pem/*.pem.
var pemFixtures = map[string]struct {
	configID   uint8
	publicName string
}{
	"openssl-echconfig.pem": {0xe7, "example.com"},
	"defo-good.pem":         {0xa9, "public.test.defo.ie"},
	"defo-otherpublic.pem":  {0x74, "otherpublic.test.defo.ie"},
	"recordings-key.pem":    {0x2a, "public.example"},
}

func TestPEMFixtures(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "pem", "*.pem"))
	require.NoError(t, err)
	require.Len(t, files, len(pemFixtures), "every fixture file needs an expected result")
	var all []Key
	for _, file := range files {
		name := filepath.Base(file)
		t.Run(name, func(t *testing.T) {
			want, ok := pemFixtures[name]
			require.True(t, ok, "no expected result for %s", name)
			data, err := os.ReadFile(file)
			require.NoError(t, err)
			f, err := ParsePEM(data)
			require.NoError(t, err)
			k, err := f.Key()
			require.NoError(t, err)
			assert.True(t, k.SendAsRetry)
			assert.Equal(t, f.PrivateKey, k.PrivateKey)
			assert.Equal(t, rawConfigList(k.Config), []byte(f.ConfigList))

			c, err := KeyConfig(k)
			require.NoError(t, err)
			assert.Equal(t, want.configID, c.ConfigID)
			assert.Equal(t, want.publicName, c.PublicName)
			assert.Equal(t, KEMX25519, c.KEM)

			// What this package writes reads back the same.
			out, err := MarshalPEM(k)
			require.NoError(t, err)
			again, err := ParsePEM(out)
			require.NoError(t, err)
			assert.Equal(t, f, again)
			all = append(all, k)
		})
	}
	ks, err := NewKeySet(all...)
	require.NoError(t, err)
	assert.Equal(t, len(pemFixtures), ks.Len())
}

// TestRecordingsKey checks that the key of the recorded handshakes loads
// from its PEM file, and that it is the raw key and config published beside
// it.
func TestRecordingsKey(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "pem", "recordings-key.pem"))
	require.NoError(t, err)
	rawKey, err := os.ReadFile(filepath.Join("testdata", "pem", "recordings-ech.key"))
	require.NoError(t, err)
	rawConfig, err := os.ReadFile(filepath.Join("testdata", "pem", "recordings-ech.config"))
	require.NoError(t, err)

	f, err := ParsePEM(data)
	require.NoError(t, err)
	k, err := f.Key()
	require.NoError(t, err)
	assert.Equal(t, Key{Config: rawConfig, PrivateKey: rawKey, SendAsRetry: true}, k)
	assert.Equal(t, ConfigList(readConfigListFixture(t, "recordings.b64")), f.ConfigList)

	ks, err := NewKeySet(Key{Config: rawConfig, PrivateKey: rawKey})
	require.NoError(t, err)
	c, err := KeyConfig(ks.Keys()[0])
	require.NoError(t, err)
	assert.Equal(t, uint8(0x2a), c.ConfigID)
	assert.Equal(t, uint8(32), c.MaxNameLength)
	assert.Equal(t, DefaultCipherSuites, c.CipherSuites)
	require.Len(t, ks.table().candidates(nil, 0x2a, CipherSuite{KDFHKDFSHA256, AEADAES128GCM}), 1)
}

func TestPEMRoundTrip(t *testing.T) {
	for _, id := range allKEMs {
		t.Run(kemShortNames[id], func(t *testing.T) {
			k := mustGenerateKey(t, &KeyOptions{KEM: id})
			data, err := MarshalPEM(k)
			require.NoError(t, err)
			f, err := ParsePEM(data)
			require.NoError(t, err)
			got, err := f.Key()
			require.NoError(t, err)
			k.SendAsRetry = true // a key read from a file is published
			assert.Equal(t, k, got)
			assert.Equal(t, k.PrivateKey, f.PrivateKey)
			assert.Equal(t, rawConfigList(k.Config), []byte(f.ConfigList))

			// The PRIVATE KEY block is PKCS#8 as crypto/x509 reads it, where
			// crypto/x509 knows the algorithm.
			block, rest := pem.Decode(data)
			require.NotNil(t, block)
			require.Equal(t, "PRIVATE KEY", block.Type)
			next, _ := pem.Decode(rest)
			require.NotNil(t, next)
			require.Equal(t, "ECHCONFIG", next.Type)
			parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			switch id {
			case KEMX448, KEMXWing:
				require.Error(t, err, "crypto/x509 does not know %v", id)
			case KEMX25519:
				require.NoError(t, err)
				require.IsType(t, &ecdh.PrivateKey{}, parsed)
				assert.Equal(t, k.PrivateKey, parsed.(*ecdh.PrivateKey).Bytes())
			default:
				require.NoError(t, err)
				require.IsType(t, &ecdsa.PrivateKey{}, parsed)
				ek, err := parsed.(*ecdsa.PrivateKey).ECDH()
				require.NoError(t, err)
				assert.Equal(t, k.PrivateKey, ek.Bytes())
			}
		})
	}

	_, err := MarshalPEM(Key{Config: mustGenerateKey(t, nil).Config, PrivateKey: make([]byte, 32)})
	require.ErrorIs(t, err, ErrInvalidKey)
}

// pemBlock encodes one PEM block.
func pemBlock(typ string, b []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b})
}

// pkcs8Of returns the PKCS#8 DER of k's private key.
func pkcs8Of(t testing.TB, k Key) []byte {
	t.Helper()
	data, err := MarshalPEM(k)
	require.NoError(t, err)
	block, _ := pem.Decode(data)
	require.NotNil(t, block)
	return block.Bytes
}

func TestParsePEM(t *testing.T) {
	k := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	other := mustGenerateKey(t, &KeyOptions{ConfigID: 2})
	p256 := mustGenerateKey(t, &KeyOptions{ConfigID: 3, KEM: KEMP256})
	keyBlock := pemBlock("PRIVATE KEY", pkcs8Of(t, k))
	list := rawConfigList(k.Config)
	configBlock := pemBlock("ECHCONFIG", list)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

	_, ed, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	edDER, err := x509.MarshalPKCS8PrivateKey(ed)
	require.NoError(t, err)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	require.NoError(t, err)
	p224DER, err := x509.MarshalPKCS8PrivateKey(p224)
	require.NoError(t, err)

	badName, err := KeyConfig(k)
	require.NoError(t, err)
	badName.PublicKey = slices.Clone(badName.PublicKey)
	badName.PublicName = "192.0.2.1"
	badNameConfig, err := badName.Marshal()
	require.NoError(t, err)
	unknownKEM := goodRawConfig()
	unknownKEM.kem = 0xcccc

	t.Run("valid", func(t *testing.T) {
		tests := []struct {
			name string
			in   []byte
			key  *Key // nil: no private key
		}{
			{"key and config", cat(keyBlock, configBlock), &k},
			{"config only", configBlock, nil},
			{"CRLF line endings", bytes.ReplaceAll(cat(keyBlock, configBlock), []byte("\n"), []byte("\r\n")), &k},
			{"text before the blocks (RFC 7468, Section 2)", cat([]byte("ECH key for public.example\n"), keyBlock, configBlock), &k},
			{"white space after the blocks", cat(keyBlock, configBlock, []byte("\n\n \t\n")), &k},
			{"key matches the second config", cat(keyBlock, pemBlock("ECHCONFIG", rawConfigList(other.Config, k.Config))), &k},
			{"key and a list with an unknown KEM", cat(keyBlock, pemBlock("ECHCONFIG", rawConfigList(unknownKEM.bytes(), k.Config))), &k},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				f, err := ParsePEM(tc.in)
				require.NoError(t, err)
				got, err := f.Key()
				if tc.key == nil {
					require.ErrorIs(t, err, ErrNoKeys)
					assert.Nil(t, f.PrivateKey)
					assert.Zero(t, got)
					assert.NotEmpty(t, f.ConfigList)
					return
				}
				require.NoError(t, err)
				assert.Equal(t, tc.key.Config, got.Config)
				assert.Equal(t, tc.key.PrivateKey, got.PrivateKey)
				assert.True(t, got.SendAsRetry)
			})
		}
	})

	tests := []struct {
		name string
		in   []byte
		err  error
	}{
		{"empty", nil, ErrMalformedPEM},
		{"garbage", []byte("this is not a PEM file\n"), ErrMalformedPEM},
		{"binary garbage", []byte{0x30, 0x82, 0x01, 0x00, 0xff}, ErrMalformedPEM},
		{"no ECHCONFIG", keyBlock, ErrMalformedPEM},
		{"two ECHCONFIG blocks", cat(keyBlock, configBlock, configBlock), ErrMalformedPEM},
		{"two keys", cat(keyBlock, keyBlock, configBlock), ErrMalformedPEM},
		{"key after config", cat(configBlock, keyBlock), ErrMalformedPEM},
		{"unknown block type", cat(pemBlock("CERTIFICATE", []byte{1, 2, 3}), configBlock), ErrMalformedPEM},
		{"unknown block after", cat(keyBlock, configBlock, pemBlock("ECH CONFIG", list)), ErrMalformedPEM},
		{"trailing garbage", cat(keyBlock, configBlock, []byte("garbage")), ErrMalformedPEM},
		{"broken base64", bytes.Replace(cat(keyBlock, configBlock), []byte("ECHCONFIG-----\n"), []byte("ECHCONFIG-----\n!"), 1), ErrMalformedPEM},
		{"malformed ECHCONFIG", cat(keyBlock, pemBlock("ECHCONFIG", list[:len(list)-1])), ErrMalformedConfig},
		{"ECHCONFIG not a list", cat(keyBlock, pemBlock("ECHCONFIG", k.Config)), ErrMalformedPEM},
		{"key matches no config", cat(keyBlock, pemBlock("ECHCONFIG", rawConfigList(other.Config))), ErrMalformedPEM},
		{"key of another KEM", cat(pemBlock("PRIVATE KEY", pkcs8Of(t, p256)), configBlock), ErrMalformedPEM},
		{"key and only unknown KEMs", cat(keyBlock, pemBlock("ECHCONFIG", rawConfigList(unknownKEM.bytes()))), ErrMalformedPEM},
		{"config with an invalid public name", cat(keyBlock, pemBlock("ECHCONFIG", rawConfigList(badNameConfig))), ErrInvalidPublicName},
		{"key not PKCS#8", cat(pemBlock("PRIVATE KEY", []byte{0x30, 0x03, 0x02, 0x01, 0x00}), configBlock), ErrInvalidKey},
		{"key of trailing DER", cat(pemBlock("PRIVATE KEY", append(pkcs8Of(t, k), 0)), configBlock), ErrInvalidKey},
		{"Ed25519 key", cat(pemBlock("PRIVATE KEY", edDER), configBlock), ErrInvalidKey},
		{"P-224 key", cat(pemBlock("PRIVATE KEY", p224DER), configBlock), ErrInvalidKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := ParsePEM(tc.in)
			require.ErrorIs(t, err, tc.err)
			assert.True(t, errors.Is(err, ErrMalformedPEM) || errors.Is(err, ErrInvalidKey),
				"a bad file gives ErrMalformedPEM or ErrInvalidKey: %v", err)
			assert.Nil(t, f)
			assertNoSecret(t, err, k.PrivateKey)
		})
	}
}

func TestLoadKeyDir(t *testing.T) {
	dir := t.TempDir()
	a := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	b := mustGenerateKey(t, &KeyOptions{ConfigID: 2, KEM: KEMP256})
	write := func(name string, data []byte) {
		t.Helper()
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), data, 0o600))
	}
	pa, err := MarshalPEM(a)
	require.NoError(t, err)
	pb, err := MarshalPEM(b)
	require.NoError(t, err)
	write("b.pem", pa)
	write("a.ech", pb)
	write("c.pem", pemBlock("ECHCONFIG", rawConfigList(a.Config))) // no key: skipped
	write("notes.txt", []byte("not a PEM file"))                   // not .pem or .ech: not read
	write("d.pem.bak", []byte("garbage"))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "e.pem"), 0o700)) // a directory: not read
	// A FIFO would block a reader forever; a socket cannot be read at all.
	require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "f.ech"), 0o600))
	ln, err := net.Listen("unix", filepath.Join(dir, "g.ech"))
	require.NoError(t, err)
	defer ln.Close()
	// A Kubernetes Secret volume: the file is a link to a link.
	require.NoError(t, os.Mkdir(filepath.Join(dir, "..data"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "..data", "k.ech"), pb, 0o600))
	require.NoError(t, os.Symlink("..data/k.ech", filepath.Join(dir, "k.ech")))
	require.NoError(t, os.Symlink("nowhere.ech", filepath.Join(dir, "l.ech"))) // dangling

	_, err = LoadKeyDir(dir)
	require.ErrorIs(t, err, os.ErrNotExist, "a dangling link is an error")
	assert.Contains(t, err.Error(), "l.ech")
	require.NoError(t, os.Remove(filepath.Join(dir, "l.ech")))

	keys, err := LoadKeyDir(dir)
	require.NoError(t, err)
	a.SendAsRetry, b.SendAsRetry = true, true
	assert.Equal(t, []Key{b, a, b}, keys, "in name order, the link followed")
	require.NoError(t, os.Remove(filepath.Join(dir, "k.ech")))
	keys, err = LoadKeyDir(dir)
	require.NoError(t, err)
	ks, err := NewKeySet(keys...)
	require.NoError(t, err)
	assert.Equal(t, []uint8{2, 1}, ks.ConfigIDs())

	// Sizes are capped before the file is read whole.
	write("y.ech", append(pa, bytes.Repeat([]byte("\n"), MaxKeyFileSize)...))
	_, err = LoadKeyDir(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "y.ech")
	assert.Contains(t, err.Error(), "more than")
	require.NoError(t, os.Remove(filepath.Join(dir, "y.ech")))

	write("z.pem", []byte("garbage"))
	_, err = LoadKeyDir(dir)
	require.ErrorIs(t, err, ErrMalformedPEM)
	assert.Contains(t, err.Error(), "z.pem", "the error names the file")
	assert.True(t, strings.HasPrefix(err.Error(), "ech: "), "%q", err)

	_, err = LoadKeyDir(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)

	keys, err = LoadKeyDir(t.TempDir())
	require.NoError(t, err)
	assert.Empty(t, keys)
}

func TestHTTPSRecord(t *testing.T) {
	list := ConfigList(readConfigListFixture(t, "recordings.b64"))
	const ech = `ech="AEn+DQBFKgAgACAosEw8LDQp3ySXkrrFF7wkM7XIV55h7uEdNf6M3RaOdwAMAAEAAQABAAIAAQADIA5wdWJsaWMuZXhhbXBsZQAA"`
	tests := []struct {
		name string
		got  string
		want string
	}{
		{"name without dot", list.HTTPSRecord("example.com", time.Hour), "example.com. 3600 IN HTTPS 1 . " + ech},
		{"name with dot", list.HTTPSRecord("example.com.", 300*time.Second), "example.com. 300 IN HTTPS 1 . " + ech},
		{"alpn", list.HTTPSRecord("www.example.com", 90*time.Second, "h2", "http/1.1"),
			`www.example.com. 90 IN HTTPS 1 . alpn="h2,http/1.1" ` + ech},
		{"sub-second TTL", list.HTTPSRecord("example.com", 1500*time.Millisecond, "h3"),
			`example.com. 1 IN HTTPS 1 . alpn="h3" ` + ech},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, tc.got)
		})
	}
}

// fuzzSeedPEMs returns the PEM files that seed FuzzParsePEM: the fixtures
// and files of every KEM written by MarshalPEM.
func fuzzSeedPEMs(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	files, err := filepath.Glob(filepath.Join("testdata", "pem", "*.pem"))
	require.NoError(f, err)
	for _, file := range files {
		data, err := os.ReadFile(file)
		require.NoError(f, err)
		seeds = append(seeds, data)
	}
	rnd := mathrand.NewChaCha8([32]byte{'p', 'e', 'm'})
	for _, id := range allKEMs {
		k, err := GenerateKey("public.example", &KeyOptions{KEM: id, Rand: rnd})
		require.NoError(f, err)
		data, err := MarshalPEM(k)
		require.NoError(f, err)
		seeds = append(seeds, data)
		_, rest := pem.Decode(data)
		seeds = append(seeds, rest) // no key
	}
	return seeds
}

func FuzzParsePEM(f *testing.F) {
	for _, s := range fuzzSeedPEMs(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		pf, err := ParsePEM(in)
		if err != nil {
			require.Nil(t, pf)
			require.True(t, errors.Is(err, ErrMalformedPEM) || errors.Is(err, ErrInvalidKey), "%v", err)
			return
		}
		_, err = ParseConfigList(pf.ConfigList)
		require.NoError(t, err)
		k, err := pf.Key()
		if err != nil {
			require.ErrorIs(t, err, ErrNoKeys)
			require.Nil(t, pf.PrivateKey)
			return
		}
		_, err = KeyConfig(k)
		require.NoError(t, err, "a key read from a file is usable")
		out, err := MarshalPEM(k)
		require.NoError(t, err)
		again, err := ParsePEM(out)
		require.NoError(t, err)
		got, err := again.Key()
		require.NoError(t, err)
		require.Equal(t, k, got)
	})
}

func TestKeySetPublicNameConfig(t *testing.T) {
	current := mustGenerateKey(t, &KeyOptions{ConfigID: 1})
	retired := mustGenerateKey(t, &KeyOptions{ConfigID: 2, NoRetry: true})
	ks, err := NewKeySet(current, retired)
	require.NoError(t, err)
	list, err := ks.ConfigList()
	require.NoError(t, err)
	require.Equal(t, rawConfigList(current.Config), []byte(list))
	stale := rawConfigList(mustGenerateKey(t, &KeyOptions{ConfigID: 3}).Config)

	server := ks.PublicNameConfig(tlsServerConfig())
	assert.Nil(t, server.EncryptedClientHelloKeys)
	assert.Nil(t, server.GetEncryptedClientHelloKeys)

	tests := []struct {
		name string
		list []byte
	}{
		// A config the set holds: a crypto/tls server given the keys
		// accepts it; the public-name server must not decrypt it.
		{"current config", list},
		{"retired config", rawConfigList(retired.Config)},
		{"stale config", stale},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cs, ss, err := tlsHandshake(t, tlsClientConfig(tc.list), server)
			var rej *tls.ECHRejectionError
			require.ErrorAs(t, err, &rej)
			assert.Equal(t, []byte(list), rej.RetryConfigList, "the retry configs are the set's list")
			assert.False(t, cs.ECHAccepted)
			assert.False(t, ss.ECHAccepted, "the public-name server never accepts ECH")
			assert.Equal(t, "public.example", ss.ServerName, "the handshake was the outer one")
		})
	}

	t.Run("no ECH", func(t *testing.T) {
		client := tlsClientConfig(nil)
		client.ServerName = "public.example"
		cs, _, err := tlsHandshake(t, client, server)
		require.NoError(t, err)
		assert.False(t, cs.ECHAccepted)
	})

	t.Run("follows the set", func(t *testing.T) {
		next := mustGenerateKey(t, &KeyOptions{ConfigID: 4})
		require.NoError(t, ks.Rotate(time.Hour, next))
		_, _, err := tlsHandshake(t, tlsClientConfig(list), server)
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Equal(t, rawConfigList(next.Config), rej.RetryConfigList)
	})

	t.Run("base GetConfigForClient", func(t *testing.T) {
		base := tlsServerConfig()
		called := 0
		base.GetConfigForClient = func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			called++
			c := tlsServerConfig()
			c.NextProtos = []string{"h2"}
			return c, nil
		}
		client := tlsClientConfig(stale)
		client.NextProtos = []string{"h2"}
		cs, _, err := tlsHandshake(t, client, ks.PublicNameConfig(base))
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.NotEmpty(t, rej.RetryConfigList)
		assert.Equal(t, 1, called)
		assert.Equal(t, "h2", cs.NegotiatedProtocol, "the config base returned was used")
	})

	t.Run("empty set", func(t *testing.T) {
		empty, err := NewKeySet()
		require.NoError(t, err)
		_, _, err = tlsHandshake(t, tlsClientConfig(stale), empty.PublicNameConfig(tlsServerConfig()))
		var rej *tls.ECHRejectionError
		require.ErrorAs(t, err, &rej)
		assert.Empty(t, rej.RetryConfigList, "nothing to retry with")
	})
}

// BenchmarkPublicNameHandshake is the server's cost of completing a
// rejected ECH handshake for the public name, with 1 and 8 keys in the set:
// PublicNameConfig never decrypts, so the cost does not grow with the keys,
// where a crypto/tls server given the keys tries each of them.
func BenchmarkPublicNameHandshake(b *testing.B) {
	for _, n := range []int{1, 8} {
		keys := make([]Key, n)
		for i := range keys {
			keys[i] = mustGenerateKey(b, &KeyOptions{ConfigID: uint8(i + 1)})
		}
		ks, err := NewKeySet(keys...)
		require.NoError(b, err)
		// A stale config, as GREASE: no key decrypts it.
		stale := rawConfigList(mustGenerateKey(b, &KeyOptions{ConfigID: 200}).Config)
		hello := captureClientHello(b, tlsClientConfig(stale))
		configs := map[string]*tls.Config{
			"PublicNameConfig": ks.PublicNameConfig(tlsServerConfig()),
			"crypto-tls-keys": func() *tls.Config {
				c := tlsServerConfig()
				c.GetEncryptedClientHelloKeys = ks.GetEncryptedClientHelloKeys
				c.GetConfigForClient = nil
				return c
			}(),
		}
		for _, name := range []string{"PublicNameConfig", "crypto-tls-keys"} {
			b.Run(fmt.Sprintf("%s/keys=%d", name, n), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					serverFirstFlight(b, configs[name], hello)
				}
			})
		}
	}
}

// helloConn replays a client's first flight and discards what the server
// writes; its reads end with io.EOF after the flight.
type helloConn struct {
	net.Conn // nil: only the methods below are called
	in       []byte
	off      int
	out      []byte
}

func (c *helloConn) Read(p []byte) (int, error) {
	if c.off == len(c.in) {
		return 0, io.EOF
	}
	n := copy(p, c.in[c.off:])
	c.off += n
	return n, nil
}

func (c *helloConn) Write(p []byte) (int, error) {
	if c.out != nil {
		c.out = append(c.out, p...)
		return 0, io.ErrClosedPipe
	}
	return len(p), nil
}

func (c *helloConn) Close() error                     { return nil }
func (c *helloConn) SetDeadline(time.Time) error      { return nil }
func (c *helloConn) SetReadDeadline(time.Time) error  { return nil }
func (c *helloConn) SetWriteDeadline(time.Time) error { return nil }

// captureClientHello returns the records of the ClientHello that a
// crypto/tls client sends with cfg.
func captureClientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &helloConn{out: make([]byte, 0, 4096)}
	require.Error(t, tls.Client(c, cfg).Handshake())
	require.NotEmpty(t, c.out)
	return c.out
}

// serverFirstFlight runs a crypto/tls server with cfg on hello until it
// waits for the client's second flight.
func serverFirstFlight(b *testing.B, cfg *tls.Config, hello []byte) {
	c := &helloConn{in: hello}
	err := tls.Server(c, cfg).Handshake()
	if !errors.Is(err, io.EOF) {
		b.Fatalf("server handshake: %v, want EOF after the first flight", err)
	}
}
