package router

import (
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
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

// metricValue returns the value of the series of name with labels, or
// fails t.
func metricValue(t *testing.T, families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f, ok := families[name]
	require.True(t, ok, "no metric %s", name)
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
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	t.Fatalf("no series of %s with %v", name, labels)
	return 0
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
	a.SendAsRetry = true
	b, err := ech.GenerateKey("cover.example", &ech.KeyOptions{ConfigID: 9})
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
	assert.True(t, equalFoldASCII("Cover.Example", "cover.example"))
	assert.False(t, equalFoldASCII("cover.example", "cover.exampl"))
	assert.False(t, equalFoldASCII("a", "b"))
}
