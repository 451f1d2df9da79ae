package router

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/echkit/ech"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// scrape gets /metrics from h and parses it as Prometheus does.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	require.Equal(t, http.StatusOK, rec.Code)
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(rec.Body)
	require.NoError(t, err)
	return families
}

// metricValue returns the sum of the series of name whose labels include
// labels (for a histogram, of their observation counts), or fails t when
// there is none.
func metricValue(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f, ok := families[name]
	require.True(t, ok, "no metric %s", name)
	sum, found := 0.0, false
	for _, m := range f.GetMetric() {
		match := true
		for _, lp := range m.GetLabel() {
			if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
				match = false
			}
		}
		if !match {
			continue
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	require.True(t, found, "no series of %s with %v", name, labels)
	return sum
}

func TestMetrics(t *testing.T) {
	m := NewMetrics()
	m.Connection(":443", "https", echAccepted, 3*time.Millisecond, 100, 2000)
	m.Connection(":443", "https", echAccepted, 5*time.Millisecond, 50, 10)
	m.Connection(":443", "public", echStale, time.Millisecond, 1, 2)
	m.Refused(":443", "max_connections")
	m.Active(":443", 2)
	m.Active(":443", -1)
	m.DialFailure("https")
	m.Reload(true)
	m.Reload(false)
	a, err := ech.GenerateKey("cover.example", &ech.KeyOptions{ConfigID: 7})
	require.NoError(t, err)
	b, err := ech.GenerateKey("cover.example", &ech.KeyOptions{ConfigID: 9, NoRetry: true})
	require.NoError(t, err)
	ks, err := ech.NewKeySet(a, b)
	require.NoError(t, err)
	m.Keys(ks)
	m.Certificate("cover.example", &x509.Certificate{NotAfter: time.Now().Add(48 * time.Hour)})

	f := scrape(t, m.Handler())
	assert.Equal(t, 2.0, metricValue(t, f, "ech_router_connections_total", map[string]string{"route": "https", "ech": "accepted"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_connections_total", map[string]string{"ech": "stale"}))
	assert.Equal(t, 2.0, metricValue(t, f, "ech_router_hello_seconds", map[string]string{"ech": "accepted"}))
	assert.Equal(t, 150.0, metricValue(t, f, "ech_router_bytes_total", map[string]string{"route": "https", "direction": "in"}))
	assert.Equal(t, 2010.0, metricValue(t, f, "ech_router_bytes_total", map[string]string{"route": "https", "direction": "out"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_active_connections", map[string]string{"listener": ":443"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_refused_connections_total", map[string]string{"reason": "max_connections"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_backend_dial_failures_total", map[string]string{"route": "https"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_reloads_total", map[string]string{"result": "failed"}))
	assert.Equal(t, 2.0, metricValue(t, f, "ech_router_keys", nil))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_key_info", map[string]string{"config_id": "7"}))
	assert.Equal(t, 0.0, metricValue(t, f, "ech_router_key_info", map[string]string{"config_id": "9"}))
	exp := metricValue(t, f, "ech_router_certificate_expiry_seconds", map[string]string{"name": "cover.example"})
	assert.InDelta(t, 48*3600, exp, 60)
	assert.Contains(t, f, "go_goroutines", "runtime metrics")

	var nilMetrics *Metrics
	nilMetrics.Connection("x", "y", echAccepted, 0, 1, 1) // records nothing, does not panic
}

func TestMetricsHealth(t *testing.T) {
	m := NewMetrics()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, _ := get("/healthz")
	assert.Equal(t, http.StatusOK, code)
	code, _ = get("/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "not ready before SetReady")
	ready := false
	m.SetReady(func() bool { return ready })
	code, _ = get("/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	ready = true
	code, body := get("/readyz")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ready\n", body)
}

func TestECHLabel(t *testing.T) {
	for _, tc := range []struct {
		status ech.Status
		outer  string
		want   string
	}{
		{ech.StatusAccepted, "cover.example", echAccepted},
		{ech.StatusNotOffered, "cover.example", echNotOffered},
		{ech.StatusNotOffered, "mail.example", echNotOffered},
		{ech.StatusRejected, "", echStale},
		{ech.StatusRejected, "cover.example", echStale},
		{ech.StatusRejected, "Cover.Example", echStale},
		{ech.StatusRejected, "cover.example.", echStale}, // routed to the public name too
		{ech.StatusRejected, "cover.exampl", echGREASE},
		{ech.StatusRejected, "mail.example", echGREASE},
	} {
		assert.Equal(t, tc.want, echLabel(tc.status, tc.outer, "cover.example"), "%v %q", tc.status, tc.outer)
	}
}

// TestServerMetrics runs a Server with a metrics address, sends it known
// traffic and checks what Prometheus would scrape.
func TestServerMetrics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dir := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(dir, "keys"), 0o700))
	writeKey(t, filepath.Join(dir, "keys"), "1.ech", e.ks.Keys()[0])
	writeCert(t, dir, "cover", e.cert(publicName))
	config := fmt.Sprintf(`{
  "keys": {"dir": "keys", "reload": "0s"},
  "public": {"name": %q, "cert": "cover.crt", "key": "cover.key"},
  "metrics": "127.0.0.1:0",
  "listeners": [
    {"address": "127.0.0.1:0", "routes": [
      {"name": "tls", "server_names": [%q], "mode": "passthrough", "backend": %q},
      {"name": "down", "server_names": ["down.example"], "mode": "passthrough", "backend": %q}
    ]}
  ]
}`, publicName, tlsName, e.tlsBackend(tlsName), closedAddr(t))
	path := filepath.Join(dir, "router.json")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cfg, err := LoadConfig(path)
	require.NoError(t, err)
	srv, err := New(cfg, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx, nil) }()
	defer func() { cancel(); <-done }()
	addr := srv.Addrs()[0].String()
	listener := srv.Addrs()[0].String()
	base := "http://" + srv.MetricsAddr().String()

	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 20*time.Millisecond, "ready once listening with keys")

	// Known traffic: two accepted, one stale, one GREASE, one without ECH,
	// one to a backend that is down.
	for range 2 {
		_, _, state, err := exchange(addr, e.clientConfig(tlsName, e.list))
		require.NoError(t, err)
		require.True(t, state.ECHAccepted)
	}
	stale, err := ech.NewKeySet(newKey(t, e.ks.ConfigIDs()...))
	require.NoError(t, err)
	staleList, err := stale.ConfigList()
	require.NoError(t, err)
	_, _, _, err = exchange(addr, e.clientConfig(tlsName, staleList))
	var rej *tls.ECHRejectionError
	require.ErrorAs(t, err, &rej)
	serverCertificate(t, addr, greaseHello(t, tlsName))
	_, _, _, err = exchange(addr, e.clientConfig(tlsName, nil))
	require.NoError(t, err)
	_, _, _, err = exchange(addr, e.clientConfig("down.example", e.list))
	require.Error(t, err)

	var f map[string]*dto.MetricFamily
	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		p := expfmt.NewTextParser(model.UTF8Validation)
		if f, err = p.TextToMetricFamilies(resp.Body); err != nil {
			return false
		}
		c := f["ech_router_connections_total"]
		total := 0.0
		for _, m := range c.GetMetric() {
			total += m.GetCounter().GetValue()
		}
		return total == 6 // every connection logged and counted
	}, 10*time.Second, 20*time.Millisecond)
	conns := func(route, outcome string) float64 {
		return metricValue(t, f, "ech_router_connections_total", map[string]string{"listener": listener, "route": route, "ech": outcome})
	}
	assert.Equal(t, 2.0, conns("tls", "accepted"))
	assert.Equal(t, 1.0, conns("public", "stale"), "a stale client names the public name")
	assert.Equal(t, 1.0, conns("tls", "grease"), "a GREASE client names its server in the clear")
	assert.Equal(t, 1.0, conns("tls", "not_offered"))
	assert.Equal(t, 1.0, conns("down", "accepted"))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_backend_dial_failures_total", map[string]string{"route": "down"}))
	assert.Equal(t, 6.0, metricValue(t, f, "ech_router_hello_seconds", map[string]string{"listener": listener}), "one observation per connection")
	assert.Positive(t, metricValue(t, f, "ech_router_bytes_total", map[string]string{"route": "tls", "direction": "out"}))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_keys", nil))
	id := strconv.Itoa(int(e.ks.ConfigIDs()[0]))
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_key_info", map[string]string{"config_id": id}))
	assert.Positive(t, metricValue(t, f, "ech_router_certificate_expiry_seconds", map[string]string{"name": publicName}))

	srv.Reload()
	resp, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	f, err = p.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, 1.0, metricValue(t, f, "ech_router_reloads_total", map[string]string{"result": "ok"}))
}

// closedAddr returns a loopback address where nothing listens, for the
// test's duration: a socket bound to it, not listening, keeps it from
// another test's listener, and a connection to it is refused. (A listener
// closed at once would free the port for the listeners of tests running
// in parallel.)
func closedAddr(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	require.NoError(t, err)
	t.Cleanup(func() { syscall.Close(fd) })
	require.NoError(t, syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := syscall.Getsockname(fd)
	require.NoError(t, err)
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
}
