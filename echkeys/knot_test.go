package echkeys

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echclient"
	"github.com/echkit/ech/internal/knottest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startKnot starts Knot DNS for the zone "test." with records (see
// [knottest.Start]) and returns its address.
func startKnot(t testing.TB, records string) string {
	t.Helper()
	return knottest.Start(t, "test.", records)
}

// queryECH returns the ech parameter of the HTTPS record at name.
func queryECH(t testing.TB, server, name string) ech.ConfigList {
	t.Helper()
	return knottest.QueryECH(t, server, name)
}

func testProvider(server string) *RFC2136 {
	return &RFC2136{Server: server, Zone: "test", KeyName: "upd", Secret: knottest.Secret, Timeout: 2 * time.Second}
}

// TestPublishKnot runs a fleet of three routers with automatic keys that
// publish to Knot DNS, across two rotations, with clients connecting all
// along: a Go client with echclient that finds the config in DNS, and
// clients that hold the first key's config. It checks the record after
// each rotation and counts failed handshakes (the goal is zero).
func TestPublishKnot(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a name server")
	}
	dir := t.TempDir()
	var f *fleet
	// The routers' addresses are known once they run, the zone before knotd
	// does: start the fleet with a Publisher filled in below.
	pubs := make([]*Publisher, 3)
	f = newFleet(t, dir, func(i int) *Publisher {
		pubs[i] = &Publisher{Logger: quiet}
		return pubs[i]
	})
	_, port, _ := net.SplitHostPort(f.routers[0].Addr)
	p, _ := strconv.Atoi(port)
	name := echclient.QueryName("secret.test", p) // _PORT._https.secret.test
	server := startKnot(t, fmt.Sprintf("%[1]s. A 127.0.0.1\n%[1]s. HTTPS 1 . alpn=h2\nalias CNAME secret.test.\n", name))
	for _, pub := range pubs {
		pub.Provider = testProvider(server)
		pub.Names = []Name{{Name: name, ALPN: []string{"h2", "http/1.1"}}}
	}

	// Start: the first key is made, loaded everywhere, then published.
	f.tick(t, 0, 1, 2)
	f.tick(t, 0, 1, 2)
	l1, err := f.managers[0].ConfigList()
	require.NoError(t, err)
	require.Equal(t, l1, queryECH(t, server, name), "the first key is published")

	// Clients, running until stop: a Go client that looks the config up
	// in DNS, and clients that keep the first config, on every router.
	resolverNet := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, server)
	}}
	dialDNS := func() (bool, error) {
		d := &echclient.Dialer{
			Resolver:  &echclient.Resolver{Server: server, Timeout: 5 * time.Second},
			Config:    &tls.Config{RootCAs: f.ca.Pool()},
			NetDialer: &net.Dialer{Timeout: 5 * time.Second, Resolver: resolverNet},
			Policy:    echclient.RequireECH,
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort("secret.test", port))
		if err != nil {
			return false, err
		}
		defer c.Close()
		return c.(*tls.Conn).ConnectionState().ECHAccepted, nil
	}
	staleCfg := &tls.Config{ServerName: "secret.test", RootCAs: f.ca.Pool(), MinVersion: tls.VersionTLS13, EncryptedClientHelloConfigList: l1}
	var attempts, failures atomic.Int64
	var failMu sync.Mutex
	var failErrs []error
	run := func(stop <-chan struct{}, wg *sync.WaitGroup) {
		for i := range 4 {
			wg.Go(func() {
				for n := 0; n < 2000; n++ {
					select {
					case <-stop:
						return
					default:
					}
					var ok bool
					var err error
					if i == 0 {
						ok, err = dialDNS()
					} else {
						ok, err = handshake(f.routers[i-1].Addr, staleCfg)
					}
					attempts.Add(1)
					if err != nil || !ok {
						failures.Add(1)
						failMu.Lock()
						failErrs = append(failErrs, fmt.Errorf("ECH accepted %v: %w", ok, err))
						failMu.Unlock()
					}
				}
			})
		}
	}
	ok, err := dialDNS()
	require.NoError(t, err)
	require.True(t, ok, "ECH accepted with the config from DNS before the rotation")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	run(stop, &wg)

	// Rotation: the new key is made and loaded, then, once every router
	// decrypts it, advertised and published. Time it.
	f.clk.Advance(24 * time.Hour)
	start := time.Now()
	var publishedAfter time.Duration
	var l2 ech.ConfigList
	for round := 0; round < 3 && publishedAfter == 0; round++ {
		for i := range f.managers {
			f.tick(t, i)
			if got := queryECH(t, server, name); publishedAfter == 0 && !equalList(got, l1) {
				publishedAfter = time.Since(start)
				l2 = got
				// Published only once every router decrypts it.
				cs, err := ech.ParseConfigList(got)
				require.NoError(t, err)
				for j, r := range f.routers {
					assert.Contains(t, r.Keys.ConfigIDs(), cs[0].ConfigID, "router %d decrypts the published key", j)
				}
			}
		}
	}
	require.NotZero(t, publishedAfter, "the new key is published")
	f.tick(t, 0, 1, 2)
	ml, err := f.managers[0].ConfigList()
	require.NoError(t, err)
	assert.Equal(t, ml, l2, "the record holds the new config")
	t.Logf("rotation to published record: %v (three routers, each reloading once, plus the peer checks)", publishedAfter)

	// Just before the first key's retirement it still decrypts.
	f.clk.Advance(24*time.Hour - time.Minute)
	f.tick(t, 0, 1, 2)
	ok, err = handshake(f.routers[2].Addr, staleCfg)
	require.NoError(t, err)
	assert.True(t, ok, "the old config decrypts until retirement")
	close(stop)
	wg.Wait()
	t.Logf("handshakes during the rotation: %d, failed: %d", attempts.Load(), failures.Load())
	assert.Zero(t, failures.Load(), "failed handshakes: %v", failErrs)
	assert.NotZero(t, attempts.Load())

	ok, err = dialDNS()
	require.NoError(t, err)
	assert.True(t, ok, "ECH accepted with the config from DNS after the rotation")

	// Retirement: the first key is deleted, on every router; a client with
	// its config gets retry configs that work.
	f.clk.Advance(time.Minute)
	f.tick(t, 0, 1, 2)
	f.tick(t, 0, 1, 2)
	for i, r := range f.routers {
		_, err := handshake(r.Addr, staleCfg)
		var rej *tls.ECHRejectionError
		require.True(t, errors.As(err, &rej), "router %d: %v", i, err)
		want, err := r.Keys.ConfigList()
		require.NoError(t, err)
		assert.Equal(t, []byte(want), rej.RetryConfigList, "router %d", i)
		retry := staleCfg.Clone()
		retry.EncryptedClientHelloConfigList = rej.RetryConfigList
		ok, err := handshake(r.Addr, retry)
		require.NoError(t, err, "router %d", i)
		assert.True(t, ok, "router %d: retry configs accepted", i)
	}
	files := managedFiles(t, dir)
	for _, n := range files {
		c, _ := parseFileName(n)
		assert.Less(t, f.clk.Now().Sub(c), 48*time.Hour, "%s retired", n)
	}
}

func equalList(a, b ech.ConfigList) bool { return string(a) == string(b) }

// TestPublishRefusals checks against Knot DNS that a Publisher does not
// write over a CNAME, does not create a record for a name without one
// unless told to, and that a failed update is an error, not a stop.
func TestPublishRefusals(t *testing.T) {
	server := startKnot(t, "secret A 127.0.0.1\nalias CNAME secret.test.\nbare A 127.0.0.1\n")
	k, err := ech.GenerateKey("public.test", nil)
	require.NoError(t, err)
	list, err := configList(k.Config)
	require.NoError(t, err)
	now := time.Now()

	pub := &Publisher{Provider: testProvider(server), TTL: time.Minute, Logger: quiet, Names: []Name{{Name: "alias.test"}}}
	require.ErrorIs(t, pub.publish(t.Context(), list, nil, now), ErrCNAME)
	// Even if the Lookup is skipped, the update's prerequisite refuses.
	require.ErrorIs(t, testProvider(server).Replace(t.Context(), Record{Name: "alias.test", TTL: time.Minute, Priority: 1, ConfigList: list}), ErrCNAME)
	assert.Nil(t, queryECH(t, server, "alias.test"))

	pub.Names = []Name{{Name: "bare.test"}}
	require.NoError(t, pub.publish(t.Context(), list, nil, now))
	assert.Nil(t, queryECH(t, server, "bare.test"), "no record created")
	pub.Names = []Name{{Name: "bare.test", ALPN: []string{"h2"}, Create: true}}
	require.NoError(t, pub.publish(t.Context(), list, nil, now))
	assert.Equal(t, list, queryECH(t, server, "bare.test"), "created when asked")

	bad := testProvider(server)
	bad.Secret = "d3JvbmdzZWNyZXR3cm9uZ3NlY3JldHdyb25nc2VjcmV0MTI="
	pub = &Publisher{Provider: bad, TTL: time.Minute, Logger: quiet, Names: []Name{{Name: "bare.test", Create: true}}}
	k2, err := ech.GenerateKey("public.test", nil)
	require.NoError(t, err)
	list2, err := configList(k2.Config)
	require.NoError(t, err)
	require.ErrorIs(t, pub.publish(t.Context(), list2, nil, now), ErrPublish, "a wrong TSIG key is refused")
	assert.Equal(t, list, queryECH(t, server, "bare.test"))
}

// BenchmarkRotateToPublished measures the time from a rotation to the
// record holding the new config, for a fleet of three routers that each
// reload once (make or load the key, check the peers, publish), against
// the baseline of one RFC 2136 update and query alone.
func BenchmarkRotateToPublished(b *testing.B) {
	name := "_443._https.secret.test"
	b.Run("fleet", func(b *testing.B) {
		pubs := make([]*Publisher, 3)
		f := newFleet(b, b.TempDir(), func(i int) *Publisher {
			pubs[i] = &Publisher{Logger: quiet}
			return pubs[i]
		})
		server := startKnot(b, name+". HTTPS 1 . alpn=h2\n")
		for _, pub := range pubs {
			pub.Provider = testProvider(server)
			pub.Names = []Name{{Name: name, ALPN: []string{"h2"}}}
		}
		for _, m := range f.managers {
			m.Retire = 24*time.Hour*time.Duration(b.N+3) + 48*time.Hour // keep every key: no deletion in the loop
		}
		f.tick(b, 0, 1, 2)
		f.tick(b, 0, 1, 2)
		for b.Loop() {
			before := queryECH(b, server, name)
			f.clk.Advance(24 * time.Hour)
			f.tick(b, 0, 1, 2)
			if equalList(queryECH(b, server, name), before) {
				b.Fatal("not published after one round of reloads")
			}
		}
	})
	b.Run("baseline-update", func(b *testing.B) {
		server := startKnot(b, name+". HTTPS 1 . alpn=h2\n")
		p := testProvider(server)
		for b.Loop() {
			k, err := ech.GenerateKey("public.test", nil)
			require.NoError(b, err)
			list, err := configList(k.Config)
			require.NoError(b, err)
			require.NoError(b, p.Replace(b.Context(), Record{Name: name, TTL: time.Minute, Priority: 1, ALPN: []string{"h2"}, ConfigList: list}))
			if !equalList(queryECH(b, server, name), list) {
				b.Fatal("not published")
			}
		}
	})
}
