package echclient

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// transports returns a resolver per way of asking s.
func transports(s *testDNS) map[string]*Resolver {
	return map[string]*Resolver{"udp": s.resolver(), "doh": s.dohResolver()}
}

func TestLookup(t *testing.T) {
	dns := newTestDNS(t)
	_, list := newKeySet(t)

	// Every parameter, and priorities out of order.
	dns.https(secretName, testTTL, 2, "svc2.example", alpnParam("h2"))
	dns.https(secretName, 60, 1, ".", alpnParam("h2", "h3"), portParam(8443),
		hintParam("192.0.2.1"), echParam(list), hintParam("2001:db8::1"))
	dns.https(secretName, testTTL, 3, "backend.example")
	// A non-default port.
	dns.https("_8443._https.other.example", testTTL, 1, "backend.example", echParam(list))
	// AliasMode chain with a CNAME: other.example -> alias.example ->
	// cname.example = svc2.example.
	dns.https("other.example", 100, 0, "alias.example")
	dns.https("alias.example", testTTL, 0, "cname.example", portParam(1)) // params ignored
	dns.cname("cname.example", "svc2.example")
	dns.https("svc2.example", testTTL, 1, ".", echParam(list))
	// A chain that ends without ServiceMode records.
	dns.https("plain.example", testTTL, 0, "backend.example")
	dns.a("backend.example", "127.0.0.1")
	// AliasMode beats ServiceMode at the same name.
	dns.https("mixed.example", testTTL, 1, ".", echParam(list))
	dns.https("mixed.example", testTTL, 0, "svc2.example")
	// One malformed record next to a good one.
	dns.rawHTTPS("half.example", []byte{0, 1, 0, 0, 3, 0, 1}) // truncated port
	dns.https("half.example", testTTL, 2, ".", portParam(443))

	type want struct {
		name, target string
		priority     uint16
		port         uint16
		hasECH       bool
		ttl          time.Duration
	}
	tests := []struct {
		name string
		host string
		port int
		want []want
	}{
		{
			name: "ServiceMode records in priority order",
			host: secretName,
			want: []want{
				{secretName, secretName, 1, 8443, true, 60 * time.Second},
				{secretName, "svc2.example", 2, 0, false, testTTL * time.Second},
				{secretName, "backend.example", 3, 0, false, testTTL * time.Second},
			},
		},
		{
			name: "non-default port",
			host: "other.example", port: 8443,
			want: []want{{"_8443._https.other.example", "backend.example", 1, 0, true, testTTL * time.Second}},
		},
		{
			name: "AliasMode chain through a CNAME",
			host: "other.example", port: 443,
			want: []want{{"svc2.example", "svc2.example", 1, 0, true, 100 * time.Second}},
		},
		{
			name: "AliasMode chain ends without ServiceMode",
			host: "plain.example",
			want: []want{{"backend.example", "backend.example", 0, 0, false, testTTL * time.Second}},
		},
		{
			name: "AliasMode wins over ServiceMode",
			host: "mixed.example",
			want: []want{{"svc2.example", "svc2.example", 1, 0, true, testTTL * time.Second}},
		},
		{
			name: "malformed record skipped",
			host: "half.example",
			want: []want{{"half.example", "half.example", 2, 443, false, testTTL * time.Second}},
		},
	}
	for tname, r := range transports(dns) {
		for _, tc := range tests {
			t.Run(tname+"/"+tc.name, func(t *testing.T) {
				recs, err := r.Lookup(t.Context(), tc.host, tc.port)
				require.NoError(t, err)
				var got []want
				for _, rec := range recs {
					got = append(got, want{rec.Name, rec.Target, rec.Priority, rec.Port, rec.ECH != nil, rec.TTL})
				}
				assert.Equal(t, tc.want, got)
			})
		}
	}

	t.Run("parameters", func(t *testing.T) {
		recs, err := dns.resolver().Lookup(t.Context(), "SECRET.example.", 443)
		require.NoError(t, err)
		require.Len(t, recs, 3)
		assert.Equal(t, []string{"h2", "h3"}, recs[0].ALPN)
		assert.Equal(t, []netip.Addr{netip.MustParseAddr("192.0.2.1")}, recs[0].IPv4Hint)
		assert.Equal(t, []netip.Addr{netip.MustParseAddr("2001:db8::1")}, recs[0].IPv6Hint)
		assert.Equal(t, list, recs[0].ECH)
	})
}

func TestLookupErrors(t *testing.T) {
	dns := newTestDNS(t)
	_, list := newKeySet(t)
	dns.a("noservice.example", "127.0.0.1")
	dns.https("gone.example", testTTL, 0, ".")
	dns.https("loop1.example", testTTL, 0, "loop2.example")
	dns.https("loop2.example", testTTL, 0, "loop1.example")
	for i := range maxAliasChain + 1 {
		dns.https("chain"+strconv.Itoa(i)+".example", testTTL, 0, "chain"+strconv.Itoa(i+1)+".example")
	}
	dns.cname("cloop1.example", "cloop2.example")
	dns.cname("cloop2.example", "cloop1.example")
	dns.https("unknown.example", testTTL, 1, ".", param(0, 0xfd, 0xe8), param(65000, 1))
	dns.rawHTTPS("bad.example", []byte{0, 1, 0, 0, 3, 0, 1})                        // truncated port
	dns.rawHTTPS("bad.example", []byte{0, 1, 0, 0, 3, 0, 2, 1, 1, 0, 1, 0, 1, 'x'}) // keys out of order
	dns.https("badech.example", testTTL, 1, ".", param(5, list[:len(list)-1]...))
	dns.setRaw("servfail.example", func(id uint16) []byte {
		return packMsg(t, dnsmessage.Header{ID: id, Response: true, RCode: dnsmessage.RCodeServerFailure}, "servfail.example")
	})
	dns.setRaw("garbage.example", func(id uint16) []byte {
		// A header that answers our query, then garbage.
		return append([]byte{byte(id >> 8), byte(id), 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0}, "garbage"...)
	})
	dns.setRaw("truncated.example", func(id uint16) []byte {
		msg := packMsg(t, dnsmessage.Header{ID: id, Response: true}, "truncated.example",
			httpsRR("truncated.example", svcb(1, ".", portParam(443))))
		return msg[:len(msg)-3]
	})
	dns.setRaw("otherq.example", func(id uint16) []byte {
		return packMsg(t, dnsmessage.Header{ID: id, Response: true}, "elsewhere.example")
	})

	tests := []struct {
		host string
		err  error
		msg  string
	}{
		{"nxdomain.example", ErrNoRecord, "echclient: no HTTPS record: nxdomain.example"},
		{"noservice.example", ErrNoRecord, "echclient: no HTTPS record: noservice.example"},
		{"gone.example", ErrNoRecord, `AliasMode to "."`},
		{"loop1.example", ErrAliasChain, "echclient: alias chain too long: AliasMode records from loop1.example"},
		{"chain0.example", ErrAliasChain, "AliasMode records from chain0.example"},
		{"cloop1.example", ErrAliasChain, "CNAMEs from cloop1.example"},
		{"unknown.example", ErrNoRecord, "unknown parameter"},
		{"bad.example", ErrMalformedRecord, "echclient: malformed HTTPS record: bad.example: "},
		{"badech.example", ErrMalformedRecord, "badech.example: ech: "},
		{"servfail.example", ErrDNSFailure, "response code RCodeServerFailure"},
		{"garbage.example", ErrMalformedResponse, "echclient: malformed DNS response: question"},
		{"truncated.example", ErrMalformedResponse, "echclient: malformed DNS response: answer"},
		{"otherq.example", ErrMalformedResponse, "answers another question"},
		{"192.0.2.1", ErrInvalidHost, "IP address"},
		{"bad..name", ErrInvalidHost, "empty label"},
	}
	for tname, r := range transports(dns) {
		for _, tc := range tests {
			t.Run(tname+"/"+tc.host, func(t *testing.T) {
				recs, err := r.Lookup(t.Context(), tc.host, 443)
				require.ErrorIs(t, err, tc.err)
				assert.Contains(t, err.Error(), tc.msg)
				assert.Nil(t, recs)
			})
		}
	}
}

func TestLookupTCPFallback(t *testing.T) {
	dns := newTestDNS(t)
	_, list := newKeySet(t)
	dns.https(secretName, testTTL, 1, ".", echParam(list))
	dns.truncate.Store(true)
	recs, err := dns.resolver().Lookup(t.Context(), secretName, 443)
	require.NoError(t, err)
	require.Len(t, recs, 1)
	assert.Equal(t, list, recs[0].ECH)
	assert.Equal(t, int32(1), dns.udpQueries.Load())
	assert.Equal(t, int32(1), dns.tcpQueries.Load())
}

func TestLookupTimeout(t *testing.T) {
	dns := newTestDNS(t)
	dns.silent.Store(true)
	for tname, r := range transports(dns) {
		t.Run(tname+"/Timeout", func(t *testing.T) {
			r := *r
			r.Timeout = 300 * time.Millisecond
			start := time.Now()
			_, err := r.Lookup(t.Context(), secretName, 443)
			require.ErrorIs(t, err, ErrDNSFailure)
			require.ErrorIs(t, err, context.DeadlineExceeded)
			assert.Less(t, time.Since(start), 5*time.Second)
		})
		t.Run(tname+"/context", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
			defer cancel()
			_, err := r.Lookup(ctx, secretName, 443)
			require.ErrorIs(t, err, ErrDNSFailure)
			require.ErrorIs(t, err, context.DeadlineExceeded)
		})
		t.Run(tname+"/canceled", func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			time.AfterFunc(100*time.Millisecond, cancel)
			_, err := r.Lookup(ctx, secretName, 443)
			require.ErrorIs(t, err, context.Canceled)
		})
	}
	// A UDP server that retransmits and the one answering late still works:
	// the first query is lost, the second answered.
	t.Run("retransmit", func(t *testing.T) {
		dns := newTestDNS(t)
		dns.https(secretName, testTTL, 1, ".")
		dns.silent.Store(true)
		time.AfterFunc(udpRetransmit/2, func() { dns.silent.Store(false) })
		recs, err := dns.resolver().Lookup(t.Context(), secretName, 443)
		require.NoError(t, err)
		assert.Len(t, recs, 1)
		assert.GreaterOrEqual(t, dns.udpQueries.Load(), int32(2))
	})
}

func TestLookupDoHErrors(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/text":
			w.Header().Set("Content-Type", "text/plain")
			w.Write([]byte("hello"))
		case "/huge":
			w.Header().Set("Content-Type", dohContentType)
			w.Write(make([]byte, maxMessageSize+1))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	tests := []struct {
		name string
		url  string
		err  error
		msg  string
	}{
		{"not found", srv.URL + "/missing", ErrDNSFailure, "HTTP status 404"},
		{"wrong content type", srv.URL + "/text", ErrMalformedResponse, `content type "text/plain"`},
		{"too long", srv.URL + "/huge", ErrMalformedResponse, "longer than"},
		{"bad URL", "://", ErrDNSFailure, "DoH"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &Resolver{DoHURL: tc.url, HTTPClient: srv.Client(), Timeout: testTimeout}
			_, err := r.Lookup(t.Context(), secretName, 443)
			require.ErrorIs(t, err, tc.err)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}

func TestParseResolvConf(t *testing.T) {
	conf := `# comment
nameserver 192.0.2.53
search example.com
nameserver 2001:db8::53
nameserver not-an-address
nameserver
options ndots:2
`
	assert.Equal(t, []string{"192.0.2.53:53", "[2001:db8::53]:53"}, parseResolvConf(strings.NewReader(conf)))

	old := resolvConfPath
	t.Cleanup(func() { resolvConfPath = old })
	resolvConfPath = t.TempDir() + "/missing"
	assert.Equal(t, []string{"127.0.0.1:53", "[::1]:53"}, systemServers())
}

// TestParseResponseTruncated checks that every proper prefix of a response
// fails cleanly.
func TestParseResponseTruncated(t *testing.T) {
	for i, msg := range seedResponses(t) {
		for n := range len(msg) {
			_, err := parseResponse(msg[:n], seedID, dnsmessage.MustNewName(secretName+"."))
			require.Error(t, err, "seed %d, prefix %d", i, n)
		}
	}
}

// FuzzParseResponse fuzzes the parsing of a whole DNS response, seeded with
// responses of every record shape the tests use.
func FuzzParseResponse(f *testing.F) {
	for _, msg := range seedResponses(f) {
		f.Add(msg)
	}
	qname := dnsmessage.MustNewName(secretName + ".")
	f.Fuzz(func(t *testing.T, msg []byte) {
		resp, err := parseResponse(msg, seedID, qname)
		if err != nil {
			return
		}
		checkResponse(t, resp)
	})
}

// checkResponse checks what parseResponse promises of a response it accepts.
func checkResponse(t *testing.T, resp *response) {
	for _, rec := range resp.records {
		require.NotZero(t, rec.Priority)
		_, err := canonicalName(rec.Target)
		require.NoError(t, err)
		if rec.ECH != nil {
			_, err := rec.ECH.Configs()
			require.NoError(t, err)
		}
		if rec.NoDefaultALPN {
			require.NotEmpty(t, rec.ALPN)
		}
		_ = rec.String()
	}
	for _, a := range resp.aliases {
		if a.target != "" {
			_, err := canonicalName(a.target)
			require.NoError(t, err)
		}
	}
	for _, err := range resp.errs {
		require.ErrorIs(t, err, ErrMalformedRecord)
	}
}
