package browsertest

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// dohPath is where the DoH server answers (RFC 8484, Section 4.1).
const dohPath = "/dns-query"

// maxDNSMessage bounds a query: a DNS message is at most 64 KiB.
const maxDNSMessage = 1 << 16

// zoneEntry is what the DoH server knows of one name.
type zoneEntry struct {
	A     netip.Addr
	ECH   ech.ConfigList // published as "1 . alpn=h2 ech=..."; nil: no HTTPS record
	Query []string       // filled by the server: "GET HTTPS", "POST A", ...

	// httpsSent is closed once an HTTPS answer is written: see
	// addressWait.
	httpsSent chan struct{}
}

// addressWait is how long an A or AAAA answer for a name with an HTTPS
// record waits for that record's answer to be written first. A browser
// asks for both at once; Chromium connects without ECH (sending GREASE)
// when the addresses come first and the HTTPS answer not soon after,
// which happened on a loaded 2-core CI machine. The scenarios are about
// the router, so the test's DNS answers the HTTPS record first, as a warm
// cache would.
const addressWait = 3 * time.Second

// dohServer answers A and HTTPS queries for the names of its zone over
// RFC 8484 DNS-over-HTTPS, GET and POST; other names get NXDOMAIN.
type dohServer struct {
	mu   sync.Mutex
	zone map[string]*zoneEntry // by lower-case name without the final dot
	log  []string              // every query, "GET example.test. TypeA -> NXDOMAIN"
	srv  *http.Server
}

func newDoHServer() *dohServer {
	return &dohServer{zone: make(map[string]*zoneEntry)}
}

// set publishes e for name.
func (d *dohServer) set(name string, e *zoneEntry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.zone[strings.ToLower(name)] = e
}

// queries returns the queries seen for name, as "GET TypeHTTPS".
func (d *dohServer) queries(name string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e, ok := d.zone[strings.ToLower(name)]; ok {
		return append([]string(nil), e.Query...)
	}
	return nil
}

// queryLog returns every query so far, one line each.
func (d *dohServer) queryLog() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.log...)
}

// serve serves DoH over TLS on ln with cert until ln is closed.
func (d *dohServer) serve(ln net.Listener, cert tls.Certificate, errorLog *log.Logger) {
	mux := http.NewServeMux()
	mux.HandleFunc(dohPath, d.handle)
	d.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}},
		ErrorLog:          errorLog,
	}
	d.srv.ServeTLS(ln, "", "")
}

// close stops the server and its connections.
func (d *dohServer) close() {
	if d.srv != nil {
		d.srv.Close()
	}
}

// handle is the RFC 8484 endpoint: GET with ?dns=<base64url query>, or
// POST with the query as an application/dns-message body.
func (d *dohServer) handle(w http.ResponseWriter, r *http.Request) {
	var q []byte
	var err error
	switch r.Method {
	case http.MethodGet:
		// RFC 8484, Section 4.1: base64url without padding.
		q, err = base64.RawURLEncoding.DecodeString(r.URL.Query().Get("dns"))
	case http.MethodPost:
		if ct := r.Header.Get("Content-Type"); ct != "application/dns-message" {
			http.Error(w, "want Content-Type application/dns-message", http.StatusUnsupportedMediaType)
			return
		}
		q, err = io.ReadAll(http.MaxBytesReader(w, r.Body, maxDNSMessage))
	default:
		http.Error(w, "GET or POST", http.StatusMethodNotAllowed)
		return
	}
	if err != nil || len(q) == 0 {
		http.Error(w, "bad DNS query", http.StatusBadRequest)
		return
	}
	resp, sent, err := d.answer(r.Method, q)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/dns-message")
	w.Header().Set("Cache-Control", "max-age=60")
	w.Write(resp)
	if sent != nil {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		sent()
	}
}

// answer builds the response to query q, received with method. If sent is
// not nil, the caller calls it once the response is written.
func (d *dohServer) answer(method string, q []byte) (resp []byte, sent func(), err error) {
	var p dnsmessage.Parser
	hdr, err := p.Start(q)
	if err != nil {
		return nil, nil, fmt.Errorf("browsertest: DNS header: %w", err)
	}
	question, err := p.Question()
	if err != nil {
		return nil, nil, fmt.Errorf("browsertest: DNS question: %w", err)
	}
	name := strings.ToLower(strings.TrimSuffix(question.Name.String(), "."))

	d.mu.Lock()
	e, known := d.zone[name]
	var a netip.Addr
	var list ech.ConfigList
	if known {
		e.Query = append(e.Query, method+" "+question.Type.String())
		a, list = e.A, e.ECH
		if e.httpsSent == nil {
			e.httpsSent = make(chan struct{})
		}
	}
	rcode := dnsmessage.RCodeSuccess
	if !known {
		rcode = dnsmessage.RCodeNameError
	}
	d.log = append(d.log, fmt.Sprintf("%s %s %s -> %s", method, question.Name, question.Type, rcode))
	d.mu.Unlock()
	if known && list != nil {
		switch question.Type {
		case dnsmessage.TypeA, dnsmessage.TypeAAAA:
			select {
			case <-e.httpsSent:
			case <-time.After(addressWait):
			}
		case dnsmessage.TypeHTTPS:
			sent = func() {
				d.mu.Lock()
				defer d.mu.Unlock()
				select {
				case <-e.httpsSent:
				default:
					close(e.httpsSent)
				}
			}
		}
	}

	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID:                 hdr.ID,
		Response:           true,
		Authoritative:      true,
		RecursionDesired:   hdr.RecursionDesired,
		RecursionAvailable: true,
		RCode:              rcode,
	})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, nil, err
	}
	if err := b.Question(question); err != nil {
		return nil, nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, nil, err
	}
	rh := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 60}
	switch {
	case !known:
	case question.Type == dnsmessage.TypeA && a.Is4():
		err = b.AResource(rh, dnsmessage.AResource{A: a.As4()})
	case question.Type == dnsmessage.TypeHTTPS && list != nil:
		// RFC 9460 ServiceMode "1 . alpn=h2 ech=<list>"; RFC 9848 puts the
		// whole ECHConfigList, length prefix included, in ech.
		err = b.HTTPSResource(rh, dnsmessage.HTTPSResource{SVCBResource: dnsmessage.SVCBResource{
			Priority: 1,
			Target:   dnsmessage.MustNewName("."),
			Params: []dnsmessage.SVCParam{
				{Key: dnsmessage.SVCParamALPN, Value: []byte("\x02h2")},
				{Key: dnsmessage.SVCParamECH, Value: list},
			},
		}})
	}
	if err != nil {
		return nil, nil, err
	}
	resp, err = b.Finish()
	return resp, sent, err
}

// TestDoH checks the DoH server with net/http as the client, over TLS, by
// GET and by POST.
func TestDoH(t *testing.T) {
	t.Parallel()
	ca := echtest.NewCA(t)
	ks := echtest.NewKeySet(t, "public.test")
	list, err := ks.ConfigList()
	require.NoError(t, err)

	d := newDoHServer()
	d.set("hidden.test", &zoneEntry{A: netip.MustParseAddr("127.0.0.9"), ECH: list})
	d.set("plain.test", &zoneEntry{A: netip.MustParseAddr("127.0.0.10")})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go d.serve(ln, ca.Certificate("doh.test"), nil)
	t.Cleanup(d.close)
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), ServerName: "doh.test"},
		},
	}
	t.Cleanup(client.CloseIdleConnections)
	url := "https://" + ln.Addr().String() + dohPath

	query := func(method, name string, typ dnsmessage.Type) *dnsmessage.Message {
		t.Helper()
		q := dnsmessage.Message{
			Header:    dnsmessage.Header{ID: 0x4242, RecursionDesired: true},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}},
		}
		raw, err := q.Pack()
		require.NoError(t, err)
		var resp *http.Response
		if method == http.MethodGet {
			resp, err = client.Get(url + "?dns=" + base64.RawURLEncoding.EncodeToString(raw))
		} else {
			resp, err = client.Post(url, "application/dns-message", bytes.NewReader(raw))
		}
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "application/dns-message", resp.Header.Get("Content-Type"))
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		var m dnsmessage.Message
		require.NoError(t, m.Unpack(body))
		assert.Equal(t, uint16(0x4242), m.ID)
		assert.True(t, m.Response)
		return &m
	}

	for _, method := range []string{http.MethodGet, http.MethodPost} {
		start := time.Now()
		answeredA := make(chan time.Time, 1)
		go func() {
			m := query(method, "Hidden.Test.", dnsmessage.TypeA)
			if assert.Len(t, m.Answers, 1) {
				assert.Equal(t, [4]byte{127, 0, 0, 9}, m.Answers[0].Body.(*dnsmessage.AResource).A)
			}
			answeredA <- time.Now()
		}()
		if method == http.MethodGet {
			// The address, asked first, is answered after the HTTPS
			// record (see addressWait), the first time the name is
			// asked: the POST round finds it answered.
			time.Sleep(200 * time.Millisecond)
		}
		askedHTTPS := time.Now()
		m := query(method, "hidden.test.", dnsmessage.TypeHTTPS)
		if a := <-answeredA; method == http.MethodGet {
			assert.True(t, a.After(askedHTTPS), "A answered %v before the HTTPS record was asked", askedHTTPS.Sub(a))
			assert.Less(t, a.Sub(start), addressWait, "A waited for its time limit, not for the HTTPS answer")
		}
		require.Len(t, m.Answers, 1)
		rr := m.Answers[0].Body.(*dnsmessage.HTTPSResource)
		assert.Equal(t, uint16(1), rr.Priority)
		assert.Equal(t, ".", rr.Target.String())
		got, ok := rr.GetParam(dnsmessage.SVCParamECH)
		require.True(t, ok)
		assert.Equal(t, []byte(list), got)
		alpn, _ := rr.GetParam(dnsmessage.SVCParamALPN)
		assert.Equal(t, []byte("\x02h2"), alpn)

		m = query(method, "plain.test.", dnsmessage.TypeHTTPS)
		assert.Equal(t, dnsmessage.RCodeSuccess, m.RCode)
		assert.Empty(t, m.Answers, "no HTTPS record: NODATA")
		m = query(method, "hidden.test.", dnsmessage.TypeAAAA)
		assert.Equal(t, dnsmessage.RCodeSuccess, m.RCode)
		assert.Empty(t, m.Answers)

		m = query(method, "unknown.test.", dnsmessage.TypeA)
		assert.Equal(t, dnsmessage.RCodeNameError, m.RCode)
	}
	q := d.queries("hidden.test")
	require.Len(t, q, 6)
	assert.Equal(t, []string{"GET TypeA", "GET TypeHTTPS", "GET TypeAAAA"}, q[:3])
	// The POST round asks for A and the HTTPS record at once, without the
	// GET round's pause: they reach the server in either order.
	assert.ElementsMatch(t, []string{"POST TypeA", "POST TypeHTTPS"}, q[3:5])
	assert.Equal(t, "POST TypeAAAA", q[5])

	// Bad requests get an HTTP error, not a panic or a hang.
	for _, tc := range []struct {
		method, query, ctype string
		body                 []byte
		status               int
	}{
		{http.MethodGet, "?dns=!!", "", nil, http.StatusBadRequest},
		{http.MethodGet, "", "", nil, http.StatusBadRequest},
		{http.MethodGet, "?dns=AAAA", "", nil, http.StatusBadRequest},
		{http.MethodPost, "", "text/plain", []byte{0}, http.StatusUnsupportedMediaType},
		{http.MethodPost, "", "application/dns-message", make([]byte, maxDNSMessage+1), http.StatusBadRequest},
		{http.MethodPut, "", "", nil, http.StatusMethodNotAllowed},
	} {
		req, err := http.NewRequestWithContext(t.Context(), tc.method, url+tc.query, bytes.NewReader(tc.body))
		require.NoError(t, err)
		if tc.ctype != "" {
			req.Header.Set("Content-Type", tc.ctype)
		}
		resp, err := client.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, tc.status, resp.StatusCode, "%s %s", tc.method, tc.query)
	}
}
