package echkeys_test

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echkeys"
	"github.com/echkit/ech/echtest"
	"github.com/echkit/ech/router"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPeersRouter checks the peer rule against the project's router: two
// routers share a key directory; after a rotation the new key is advertised
// by neither until both decrypt it, which the Managers learn by ECH
// handshakes with each router's public name.
func TestPeersRouter(t *testing.T) {
	dir := t.TempDir()
	ca := echtest.NewCA(t)
	cert := ca.Certificate("public.test")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	var mu sync.Mutex
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return now
	}

	var sets []*ech.KeySet
	var urls []string
	for range 2 {
		ks, err := ech.NewKeySet()
		require.NoError(t, err)
		r := &router.Router{Keys: ks, PublicName: "public.test", PublicCertificate: &cert, Logger: quiet}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		go r.Serve(ln, nil)
		t.Cleanup(func() { r.Close() })
		sets = append(sets, ks)
		urls = append(urls, "https://"+ln.Addr().String()+"/ech-config-list")
	}
	ms := make([]*echkeys.Manager, 2)
	for i := range ms {
		ms[i] = &echkeys.Manager{
			Dir: dir, PublicName: "public.test", Rotate: 24 * time.Hour, TTL: time.Minute, Retire: 48 * time.Hour,
			Peers: urls, PeerTLSConfig: &tls.Config{RootCAs: ca.Pool()}, PeerTimeout: 5 * time.Second,
			KeySet: sets[i], Logger: quiet, Now: clock,
		}
	}
	tick := func(which ...int) {
		t.Helper()
		for _, i := range which {
			require.NoError(t, ms[i].Tick(t.Context()), "manager %d", i)
		}
	}
	advertised := func(i int) []byte { return ms[i].Keys()[0].Config }

	tick(0, 1)
	tick(0, 1)
	k1 := advertised(0)
	assert.Equal(t, k1, advertised(1))

	mu.Lock()
	now = now.Add(24 * time.Hour)
	mu.Unlock()
	tick(0, 0)
	require.Len(t, ms[0].Keys(), 2, "the new key is made and loaded")
	assert.Equal(t, k1, advertised(0), "router 1 does not decrypt it yet")
	tick(1, 0)
	k2 := advertised(0)
	assert.NotEqual(t, k1, k2, "both routers decrypt it: advertised")
	assert.Equal(t, k2, advertised(1))
	for i, ks := range sets {
		l, err := ks.ConfigList()
		require.NoError(t, err)
		ml, err := ms[i].ConfigList()
		require.NoError(t, err)
		assert.Equal(t, ml, l, "router %d sends only the new config as retry config", i)
	}
}
