package echclient

import (
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

func svcb(priority uint16, target string, params ...dnsmessage.SVCParam) *dnsmessage.SVCBResource {
	r := &dnsmessage.SVCBResource{Priority: priority, Target: dnsmessage.MustNewName(target)}
	for _, p := range params {
		r.SetParam(p.Key, p.Value)
	}
	return r
}

func TestParseRecord(t *testing.T) {
	_, list := newKeySet(t)
	tests := []struct {
		name string
		rr   *dnsmessage.SVCBResource
		want Record
	}{
		{
			name: "every parameter",
			rr: svcb(1, "svc.example.net.",
				alpnParam("h2", "h3"), param(2), portParam(8443),
				hintParam("192.0.2.1", "192.0.2.2"), echParam(list), hintParam("2001:db8::1")),
			want: Record{
				Name: secretName, Priority: 1, Target: "svc.example.net",
				ALPN: []string{"h2", "h3"}, NoDefaultALPN: true, Port: 8443,
				IPv4Hint: []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")},
				IPv6Hint: []netip.Addr{netip.MustParseAddr("2001:db8::1")},
				ECH:      list, TTL: testTTL * time.Second,
			},
		},
		{
			name: "TargetName dot is the owner",
			rr:   svcb(2, "."),
			want: Record{Name: secretName, Priority: 2, Target: secretName, TTL: testTTL * time.Second},
		},
		{
			name: "TargetName in lower case",
			rr:   svcb(1, "SVC.Example.NET."),
			want: Record{Name: secretName, Priority: 1, Target: "svc.example.net", TTL: testTTL * time.Second},
		},
		{
			name: "unknown parameter ignored",
			rr:   svcb(1, ".", portParam(443), param(65000, 1, 2, 3)),
			want: Record{Name: secretName, Priority: 1, Target: secretName, Port: 443, TTL: testTTL * time.Second},
		},
		{
			name: "mandatory known keys",
			rr:   svcb(1, ".", param(0, 0, 1, 0, 3), alpnParam("h2"), portParam(443)),
			want: Record{Name: secretName, Priority: 1, Target: secretName, ALPN: []string{"h2"}, Port: 443, TTL: testTTL * time.Second},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseRecord(secretName, testTTL, tc.rr)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseRecordMalformed(t *testing.T) {
	tests := []struct {
		name string
		rr   *dnsmessage.SVCBResource
	}{
		{"mandatory empty", svcb(1, ".", param(0))},
		{"mandatory odd length", svcb(1, ".", param(0, 0), portParam(1))},
		{"mandatory lists itself", svcb(1, ".", param(0, 0, 0))},
		{"mandatory out of order", svcb(1, ".", param(0, 0, 3, 0, 1), alpnParam("h2"), portParam(1))},
		{"mandatory key missing", svcb(1, ".", param(0, 0, 3))},
		{"alpn empty", svcb(1, ".", param(1))},
		{"alpn empty id", svcb(1, ".", param(1, 0))},
		{"alpn id overruns", svcb(1, ".", param(1, 5, 'h', '2'))},
		{"no-default-alpn with value", svcb(1, ".", alpnParam("h2"), param(2, 0))},
		{"no-default-alpn without alpn", svcb(1, ".", param(2))},
		{"port short", svcb(1, ".", param(3, 1))},
		{"port long", svcb(1, ".", param(3, 0, 1, 2))},
		{"ipv4hint empty", svcb(1, ".", param(4))},
		{"ipv4hint ragged", svcb(1, ".", param(4, 127, 0, 0, 1, 2))},
		{"ipv6hint ragged", svcb(1, ".", param(6, make([]byte, 15)...))},
		{"ech empty", svcb(1, ".", param(5))},
		{"ech garbage", svcb(1, ".", param(5, 0xde, 0xad, 0xbe, 0xef))},
		{"ech bad length", svcb(1, ".", param(5, 0, 9, 0xfe, 0x0d, 0, 0))},
		{"TargetName bad byte", svcb(1, "sv c.example.")},
		{"TargetName IP", svcb(1, "192.0.2.1.")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRecord(secretName, testTTL, tc.rr)
			require.ErrorIs(t, err, ErrMalformedRecord)
			assert.Contains(t, err.Error(), "echclient: malformed HTTPS record: "+secretName+": ")
		})
	}
}

func TestParseRecordIncompatible(t *testing.T) {
	_, err := parseRecord(secretName, testTTL, svcb(1, ".", param(0, 0xfd, 0xe8), param(65000, 1)))
	require.ErrorIs(t, err, errIncompatible)
	assert.NotErrorIs(t, err, ErrMalformedRecord)
}

func TestRecordString(t *testing.T) {
	rec := Record{
		Priority: 1, Target: "svc.example.net", ALPN: []string{"h2", "h3"}, Port: 8443,
		IPv4Hint: []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")},
		IPv6Hint: []netip.Addr{netip.MustParseAddr("2001:db8::1")},
		ECH:      ech.ConfigList{0, 1, 2},
	}
	assert.Equal(t, `1 svc.example.net. alpn="h2,h3" port=8443 ipv4hint=192.0.2.1,192.0.2.2 ech="AAEC" ipv6hint=2001:db8::1`, rec.String())
}

func TestQueryName(t *testing.T) {
	tests := []struct {
		host string
		port int
		want string
	}{
		{"example.com", 443, "example.com"},
		{"example.com.", 0, "example.com"},
		{"api.example.com", 8443, "_8443._https.api.example.com"},
		{"example.com", 80, "_80._https.example.com"},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, QueryName(tc.host, tc.port), "%s:%d", tc.host, tc.port)
	}
}

func TestQueryNameURL(t *testing.T) {
	tests := []struct {
		url  string
		want string
		err  error
	}{
		{url: "https://example.com/path", want: "example.com"},
		{url: "https://example.com:443", want: "example.com"},
		{url: "https://Example.com:8443/", want: "_8443._https.Example.com"},
		{url: "http://example.com", want: "example.com"},
		{url: "http://example.com:8080", want: "_8080._https.example.com"},
		{url: "ftp://example.com", err: ErrInvalidHost},
		{url: "https://192.0.2.1/", err: ErrInvalidHost},
		{url: "https://example.com:0/", err: ErrInvalidHost},
		{url: "https:///nohost", err: ErrInvalidHost},
	}
	for _, tc := range tests {
		t.Run(tc.url, func(t *testing.T) {
			u, err := url.Parse(tc.url)
			require.NoError(t, err)
			got, err := QueryNameURL(u)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestCanonicalName(t *testing.T) {
	long := make([]byte, 64)
	for i := range long {
		long[i] = 'a'
	}
	tests := []struct {
		in, want string
	}{
		{"Example.COM.", "example.com"},
		{"_8443._https.example.com", "_8443._https.example.com"},
		{"", ""},
		{".", ""},
		{"a..b", ""},
		{"a.b..", ""},
		{"exa mple.com", ""},
		{string(long) + ".com", ""},
		{"127.0.0.1", ""},
		{"::1", ""},
	}
	for _, tc := range tests {
		got, err := canonicalName(tc.in)
		if tc.want == "" {
			assert.ErrorIs(t, err, ErrInvalidHost, "%q", tc.in)
			continue
		}
		assert.NoError(t, err, "%q", tc.in)
		assert.Equal(t, tc.want, got)
	}
}

// rdata returns the RDATA of r as an HTTPS record.
func rdata(t testing.TB, r *dnsmessage.SVCBResource) []byte {
	t.Helper()
	var p dnsmessage.Parser
	_, err := p.Start(packMsg(t, dnsmessage.Header{Response: true}, secretName, httpsRR(secretName, r)))
	require.NoError(t, err)
	require.NoError(t, p.SkipAllQuestions())
	_, err = p.AnswerHeader()
	require.NoError(t, err)
	u, err := p.UnknownResource()
	require.NoError(t, err)
	return u.Data
}

// FuzzParseRecord fuzzes the RDATA of one HTTPS record, seeded with records
// of the shapes large CDNs publish and with malformed ones.
func FuzzParseRecord(f *testing.F) {
	_, list := newKeySet(f)
	for _, r := range []*dnsmessage.SVCBResource{
		svcb(1, ".", alpnParam("h3", "h2"), hintParam("192.0.2.1", "192.0.2.2"), echParam(list), hintParam("2001:db8::1", "2001:db8::2")),
		svcb(1, "svc.example.net.", param(0, 0, 3), alpnParam("h2", "http/1.1"), param(2), portParam(8443), echParam(list)),
		svcb(0, "svc.example.net."),
		svcb(0, "."),
		svcb(1, ".", param(0, 0xfd, 0xe8), param(65000, 1)),
		svcb(1, ".", param(5, 0xde, 0xad)),
	} {
		f.Add(rdata(f, r))
	}
	f.Add([]byte{0, 1, 0, 0, 3, 0, 2, 1, 1, 0, 1, 0, 1, 'x'}) // keys out of order
	f.Add([]byte{0, 1, 0xc0, 0x0c})                           // compressed TargetName
	qname := dnsmessage.MustNewName(secretName + ".")
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 60000 {
			return
		}
		msg := packMsg(t, dnsmessage.Header{ID: seedID, Response: true}, secretName, rawRR(secretName, dnsmessage.TypeHTTPS, data))
		resp, err := parseResponse(msg, seedID, qname)
		require.NoError(t, err, "a malformed record is not a malformed response")
		require.Equal(t, 1, len(resp.records)+len(resp.aliases)+len(resp.errs)+resp.incompatible)
		checkResponse(t, resp)
	})
}
