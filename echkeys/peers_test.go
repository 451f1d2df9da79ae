package echkeys

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fleet is three routers, each with its Manager, sharing one directory;
// every Manager lists the three routers as its peers.
type fleet struct {
	routers  []*testRouter
	managers []*Manager
	ca       *echtest.CA
	clk      *clock
}

func newFleet(t testing.TB, dir string, pub func(i int) *Publisher) *fleet {
	t.Helper()
	f := &fleet{ca: echtest.NewCA(t), clk: newClock()}
	var urls []string
	for range 3 {
		ks, err := ech.NewKeySet()
		require.NoError(t, err)
		r := startRouter(t, ks, f.ca, "public.test")
		f.routers = append(f.routers, r)
		urls = append(urls, r.URL())
	}
	for i, r := range f.routers {
		m := &Manager{
			Dir: dir, PublicName: "public.test", ID: string(rune('a' + i)),
			Rotate: 24 * time.Hour, TTL: time.Minute, Retire: 48 * time.Hour,
			Peers: urls, PeerTLSConfig: &tls.Config{RootCAs: f.ca.Pool()},
			KeySet: r.Keys, Logger: quiet, Now: f.clk.Now,
		}
		if pub != nil {
			m.Publisher = pub(i)
		}
		f.managers = append(f.managers, m)
	}
	return f
}

// tick ticks the managers given, in order, and fails on error.
func (f *fleet) tick(t testing.TB, which ...int) {
	t.Helper()
	for _, i := range which {
		require.NoError(t, f.managers[i].Tick(t.Context()), "manager %d", i)
	}
}

func advertisedID(m *Manager) int { return configID(m.Keys()[0].Config) }

// TestManagerPeers checks the fleet rule: a new key is advertised only once
// every peer decrypts it, checked by an ECH handshake with that key.
func TestManagerPeers(t *testing.T) {
	f := newFleet(t, t.TempDir(), nil)
	f.tick(t, 0, 1, 2)
	k1 := advertisedID(f.managers[0])
	f.tick(t, 0, 1, 2)
	for i, m := range f.managers {
		assert.Equal(t, k1, advertisedID(m), "manager %d", i)
		assert.True(t, m.confirmed[string(m.Keys()[0].Config)], "manager %d: every peer decrypts the first key", i)
	}

	// Rotation; router 2's manager is stuck and does not reload.
	f.clk.Advance(24 * time.Hour)
	for range 3 {
		f.tick(t, 0, 1)
	}
	require.Len(t, f.managers[0].Keys(), 2)
	assert.Equal(t, k1, advertisedID(f.managers[0]), "router 2 lacks the new key: not advertised")
	assert.Equal(t, k1, advertisedID(f.managers[1]))
	assert.Equal(t, 1, f.routers[2].Keys.Len())

	// Router 2 reloads: the new key is served everywhere, then advertised.
	f.tick(t, 2, 0, 1)
	k2 := configID(f.managers[0].Keys()[0].Config)
	assert.NotEqual(t, k1, k2)
	for i, m := range f.managers {
		assert.Equal(t, k2, advertisedID(m), "manager %d", i)
		l, err := f.routers[i].Keys.ConfigList()
		require.NoError(t, err)
		ml, err := m.ConfigList()
		require.NoError(t, err)
		assert.Equal(t, ml, l, "router %d sends the advertised key as retry config", i)
	}
}
