package echclient

import (
	"context"
	"crypto/tls"
	"strconv"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// dialResult is what a dial in the tests ends with.
type dialResult struct {
	accepted   bool   // ECH accepted, as the client saw it
	serverName string // the name the server saw
}

func dialAndRead(t *testing.T, d *Dialer, addr string) (dialResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		require.Nil(t, c)
		return dialResult{}, err
	}
	defer c.Close()
	tc, ok := c.(*tls.Conn)
	require.True(t, ok, "DialContext returned %T", c)
	return dialResult{tc.ConnectionState().ECHAccepted, readServerName(t, c)}, nil
}

func TestDialer(t *testing.T) {
	e := newEnv(t)
	// ECH at the default port; the record's port and hint lead to the server.
	e.publish(secretName, testTTL, e.list)
	// A non-default port, with a target resolved through its A record.
	e.dns.https("_"+strconv.Itoa(e.srv.port)+"._https."+secretName, testTTL, 1, "backend.example", echParam(e.list))
	e.dns.a("backend.example", "127.0.0.1")
	// AliasMode chain with a CNAME to the ServiceMode record.
	e.dns.https("other.example", testTTL, 0, "alias.example")
	e.dns.https("alias.example", testTTL, 0, "cname.example")
	e.dns.cname("cname.example", "svc2.example")
	e.publish("svc2.example", testTTL, e.list)
	// AliasMode chain that ends without ServiceMode records.
	e.dns.https("_"+strconv.Itoa(e.srv.port)+"._https.plain.example", testTTL, 0, "backend.example")
	// No HTTPS record.
	e.dns.a("plain.example", "127.0.0.1")
	// HTTPS record without ech.
	e.dns.https("public.example", testTTL, 1, ".", portParam(e.srv.port), hintParam("127.0.0.1"))
	// Failing DNS.
	e.dns.a("other.example", "127.0.0.1")
	e.dns.setRaw("_"+strconv.Itoa(e.srv.port)+"._https.other.example", func(id uint16) []byte {
		return packMsg(t, dnsmessage.Header{ID: id, Response: true, RCode: dnsmessage.RCodeServerFailure},
			"_"+strconv.Itoa(e.srv.port)+"._https.other.example")
	})

	tests := []struct {
		name   string
		addr   string
		policy Policy
		want   dialResult
		err    []error
	}{
		{name: "ECH accepted", addr: secretName + ":443", want: dialResult{true, secretName}},
		{name: "ECH accepted, required", addr: secretName + ":443", policy: RequireECH, want: dialResult{true, secretName}},
		{name: "non-default port", addr: e.hostPort(secretName), policy: RequireECH, want: dialResult{true, secretName}},
		{name: "AliasMode chain", addr: "other.example:443", policy: RequireECH, want: dialResult{true, "other.example"}},
		{name: "AliasMode chain without ServiceMode", addr: e.hostPort("plain.example"), want: dialResult{false, "plain.example"}},
		{name: "AliasMode chain without ServiceMode, required", addr: e.hostPort("plain.example"), policy: RequireECH,
			err: []error{ErrECHRequired, ErrNoECHConfig}},
		{name: "no record, required", addr: e.hostPort("nothing.example"), policy: RequireECH,
			err: []error{ErrECHRequired, ErrNoRecord}},
		{name: "no ech", addr: "public.example:443", want: dialResult{false, publicName}},
		{name: "no ech, required", addr: "public.example:443", policy: RequireECH, err: []error{ErrECHRequired, ErrNoECHConfig}},
		{name: "DNS failure", addr: e.hostPort("other.example"), want: dialResult{false, "other.example"}},
		{name: "DNS failure, required", addr: e.hostPort("other.example"), policy: RequireECH, err: []error{ErrECHRequired, ErrDNSFailure}},
		{name: "IP address", addr: e.hostPort("127.0.0.1"), want: dialResult{false, ""}},
		{name: "IP address, required", addr: e.hostPort("127.0.0.1"), policy: RequireECH, err: []error{ErrECHRequired, ErrNoRecord}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := dialAndRead(t, e.dialer(tc.policy), tc.addr)
			if tc.err != nil {
				for _, want := range tc.err {
					require.ErrorIs(t, err, want)
				}
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

// TestDialerNoRecordFallback checks the fallback to plain TLS of an
// opportunistic dial when the name has no record, which the table cannot:
// the address must resolve.
func TestDialerNoRecordFallback(t *testing.T) {
	e := newEnv(t)
	e.dns.a("plain.example", "127.0.0.1")
	for _, p := range []Policy{Opportunistic, RequireECH} {
		t.Run(p.String(), func(t *testing.T) {
			got, err := dialAndRead(t, e.dialer(p), e.hostPort("plain.example"))
			if p == RequireECH {
				require.ErrorIs(t, err, ErrECHRequired)
				require.ErrorIs(t, err, ErrNoRecord)
				assert.Contains(t, err.Error(), "echclient: ECH required: echclient: no HTTPS record")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, dialResult{false, "plain.example"}, got)
		})
	}
}

// TestDialerRetryConfigs publishes a stale config: the server rejects it
// and sends retry configs, the client retries with them and caches them.
func TestDialerRetryConfigs(t *testing.T) {
	e := newEnv(t)
	_, stale := newKeySet(t)
	e.publish(secretName, testTTL, stale)
	d := e.dialer(RequireECH)

	got, err := dialAndRead(t, d, secretName+":443")
	require.NoError(t, err)
	assert.Equal(t, dialResult{true, secretName}, got)
	assert.Equal(t, int32(2), e.srv.conns.Load(), "one rejected connection, one retry")
	assert.Equal(t, int32(1), e.dns.udpQueries.Load())

	d.mu.Lock()
	cached := d.cache[secretName].records
	d.mu.Unlock()
	require.Len(t, cached, 1)
	assert.Equal(t, e.list, cached[0].ECH, "the retry configs replace the stale config")

	got, err = dialAndRead(t, d, secretName+":443")
	require.NoError(t, err)
	assert.Equal(t, dialResult{true, secretName}, got)
	assert.Equal(t, int32(3), e.srv.conns.Load(), "the cached retry configs work at once")
	assert.Equal(t, int32(1), e.dns.udpQueries.Load(), "the records come from the cache")
}

// TestDialerRetryRejected has the server reject the retry configs too, as
// an inconsistently configured server farm would.
func TestDialerRetryRejected(t *testing.T) {
	for _, p := range []Policy{Opportunistic, RequireECH} {
		t.Run(p.String(), func(t *testing.T) {
			ca, dns := echtest.NewCA(t), newTestDNS(t)
			_, stale := newKeySet(t)
			ks1, _ := newKeySet(t)
			ks2, _ := newKeySet(t)
			srv := startECHServer(t, ca, func(n int) *ech.KeySet { return []*ech.KeySet{ks1, ks2}[n%2] })
			e := &env{ca: ca, dns: dns, srv: srv}
			e.publish(secretName, testTTL, stale)
			_, err := dialAndRead(t, e.dialer(p), secretName+":443")
			require.ErrorIs(t, err, ErrECHRejected)
			var rej *tls.ECHRejectionError
			require.ErrorAs(t, err, &rej)
			assert.Contains(t, err.Error(), "echclient: server rejected ECH: secret.example: retry configs rejected too")
			assert.Equal(t, int32(2), srv.conns.Load(), "no second retry")
		})
	}
}

// TestDialerECHDisabled has a server without ECH keys: it rejects ECH
// without retry configs, which disables ECH securely.
func TestDialerECHDisabled(t *testing.T) {
	for _, p := range []Policy{Opportunistic, RequireECH} {
		t.Run(p.String(), func(t *testing.T) {
			ca, dns := echtest.NewCA(t), newTestDNS(t)
			_, stale := newKeySet(t)
			none, err := ech.NewKeySet()
			require.NoError(t, err)
			srv := startECHServer(t, ca, func(int) *ech.KeySet { return none })
			e := &env{ca: ca, dns: dns, srv: srv}
			e.publish(secretName, testTTL, stale)
			got, err := dialAndRead(t, e.dialer(p), secretName+":443")
			if p == RequireECH {
				require.ErrorIs(t, err, ErrECHRejected)
				assert.Contains(t, err.Error(), "no usable retry configs")
				assert.Equal(t, int32(1), srv.conns.Load())
				return
			}
			require.NoError(t, err)
			assert.Equal(t, dialResult{false, secretName}, got)
			assert.Equal(t, int32(2), srv.conns.Load())
		})
	}
}

func TestDialerCache(t *testing.T) {
	e := newEnv(t)
	e.publish(secretName, testTTL, e.list)
	e.publish("svc2.example", 0, e.list)
	d := e.dialer(RequireECH)
	for range 3 {
		got, err := dialAndRead(t, d, secretName+":443")
		require.NoError(t, err)
		assert.True(t, got.accepted)
	}
	assert.Equal(t, int32(1), e.dns.udpQueries.Load(), "cached for the TTL")
	for range 3 {
		got, err := dialAndRead(t, d, "svc2.example:443")
		require.NoError(t, err)
		assert.True(t, got.accepted)
	}
	assert.Equal(t, int32(4), e.dns.udpQueries.Load(), "a TTL of 0 is not cached")

	d.mu.Lock()
	d.cache[secretName] = cacheEntry{d.cache[secretName].records, time.Now().Add(-time.Second)}
	d.mu.Unlock()
	_, err := dialAndRead(t, d, secretName+":443")
	require.NoError(t, err)
	assert.Equal(t, int32(5), e.dns.udpQueries.Load(), "an expired entry is looked up again")
}

func TestDialerCacheBound(t *testing.T) {
	var d Dialer
	exp := time.Now().Add(time.Hour)
	for i := range maxCacheEntries + 10 {
		d.store(strconv.Itoa(i), cacheEntry{nil, exp})
	}
	assert.Len(t, d.cache, maxCacheEntries)
}

// TestDialerFailover checks that a record whose endpoint does not answer is
// skipped for the next one.
func TestDialerFailover(t *testing.T) {
	e := newEnv(t)
	e.dns.https(secretName, testTTL, 1, ".", portParam(closedPort(t)), hintParam("127.0.0.1"), echParam(e.list))
	e.dns.https(secretName, testTTL, 2, ".", portParam(e.srv.port), hintParam("127.0.0.1"), echParam(e.list))
	// Without ech, so not a candidate while the others have it.
	e.dns.https(secretName, testTTL, 3, ".", portParam(e.srv.port), hintParam("127.0.0.1"))
	got, err := dialAndRead(t, e.dialer(RequireECH), secretName+":443")
	require.NoError(t, err)
	assert.Equal(t, dialResult{true, secretName}, got)

	e2 := newEnv(t)
	e2.dns.https(secretName, testTTL, 1, ".", portParam(closedPort(t)), hintParam("127.0.0.1"), echParam(e2.list))
	_, err = dialAndRead(t, e2.dialer(Opportunistic), secretName+":443")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "echclient: secret.example:443: ")
	assert.Equal(t, int32(0), e2.srv.conns.Load(), "no fallback to a connection without ECH")
}

// TestDialerALPN checks that records are chosen by ALPN.
func TestDialerALPN(t *testing.T) {
	recs := []Record{
		{Priority: 1, Target: "h3.example", ALPN: []string{"h3"}, NoDefaultALPN: true},
		{Priority: 2, Target: "h2.example", ALPN: []string{"h2"}, NoDefaultALPN: true},
		{Priority: 3, Target: "any.example"},
	}
	targets := func(cands []candidate) []string {
		var out []string
		for _, c := range cands {
			out = append(out, c.rec.Target)
		}
		return out
	}
	assert.Equal(t, []string{"h2.example", "any.example"}, targets(candidates(recs, &tls.Config{NextProtos: []string{"h2", "http/1.1"}})))
	assert.Equal(t, []string{"any.example"}, targets(candidates(recs, &tls.Config{NextProtos: []string{"http/1.1"}})))
	assert.Equal(t, []string{"h3.example", "h2.example", "any.example"}, targets(candidates(recs, &tls.Config{})),
		"without ALPN every record is a candidate")
}

func TestUsableConfigList(t *testing.T) {
	_, list := newKeySet(t)
	x448, err := ech.GenerateKey(publicName, &ech.KeyOptions{KEM: ech.KEMX448})
	require.NoError(t, err)
	x448List, err := ech.MarshalConfigList(mustConfig(t, x448.Config))
	require.NoError(t, err)
	badName := mustConfig(t, list[2:])
	badName.PublicName = "192.0.2.1"
	badNameList, err := ech.MarshalConfigList(badName)
	require.NoError(t, err)
	mandatory := mustConfig(t, list[2:])
	mandatory.Extensions = []ech.ConfigExtension{{Type: 0xfa00}}
	mandatoryList, err := ech.MarshalConfigList(mandatory)
	require.NoError(t, err)
	otherVersion := append([]byte{0, 6, 0xfe, 0x0e, 0, 2, 1, 2}, list[2:]...)
	otherVersion[1] = byte(len(otherVersion) - 2)

	tests := []struct {
		name string
		list ech.ConfigList
		want bool
	}{
		{"X25519", list, true},
		{"unknown version first", otherVersion, true},
		{"X448, which crypto/tls lacks", x448List, false},
		{"IP address public name", badNameList, false},
		{"mandatory extension", mandatoryList, false},
		{"nil", nil, false},
		{"truncated", list[:len(list)-1], false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, usableConfigList(tc.list))
		})
	}
}

func mustConfig(t *testing.T, raw []byte) *ech.Config {
	t.Helper()
	c, err := ech.ParseConfig(raw)
	require.NoError(t, err)
	return c
}

func TestDialerContext(t *testing.T) {
	e := newEnv(t)
	e.publish(secretName, testTTL, e.list)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	for _, p := range []Policy{Opportunistic, RequireECH} {
		c, err := e.dialer(p).DialContext(ctx, "tcp", secretName+":443")
		require.ErrorIs(t, err, context.Canceled)
		require.Nil(t, c)
	}

	e.dns.silent.Store(true)
	ctx, cancel = context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := e.dialer(Opportunistic).DialContext(ctx, "tcp", secretName+":443")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 5*time.Second)
}

func TestDialerBadAddress(t *testing.T) {
	var d Dialer
	for _, addr := range []string{"no-port", "host:no-such-service-name"} {
		_, err := d.DialContext(t.Context(), "tcp", addr)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "echclient: ")
	}
}

func TestPolicyString(t *testing.T) {
	assert.Equal(t, "opportunistic", Opportunistic.String())
	assert.Equal(t, "require-ECH", RequireECH.String())
	assert.Equal(t, "Policy(7)", Policy(7).String())
}
