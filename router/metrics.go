package router

import (
	"crypto/x509"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/echkit/ech"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ECH outcomes as the metrics label them. A hello whose ECH did not decrypt
// is "stale" when it names the public name (a client with an old config)
// and "grease" otherwise (a client without a config names its real server
// in the clear, RFC 9849, Section 6.2).
const (
	echAccepted   = "accepted"
	echStale      = "stale"
	echGREASE     = "grease"
	echNotOffered = "not_offered"
	echRefused    = "refused" // NewConn refused the hello
)

// echLabel returns the metrics label of a connection's ECH outcome, from
// its status and the name it sent in the clear. A rejected hello is stale
// when the router's public name serves it (isPublicName).
func echLabel(status ech.Status, outerName, publicName string) string {
	switch status {
	case ech.StatusAccepted:
		return echAccepted
	case ech.StatusRejected:
		if isPublicName(outerName, publicName) {
			return echStale
		}
		return echGREASE
	}
	return echNotOffered
}

// Metrics are the router's Prometheus metrics. A nil *Metrics records
// nothing, so the router calls it unconditionally.
type Metrics struct {
	reg          *prometheus.Registry
	conns        *prometheus.CounterVec
	active       *prometheus.GaugeVec
	handshake    *prometheus.HistogramVec
	bytes        *prometheus.CounterVec
	dialFailures *prometheus.CounterVec
	refused      *prometheus.CounterVec
	reloads      *prometheus.CounterVec
	keys         prometheus.Gauge
	keyInfo      *prometheus.GaugeVec
	certExpiry   *prometheus.GaugeVec

	mu    sync.Mutex
	certs map[string]time.Time // name -> NotAfter
	ready func() bool
}

// NewMetrics returns the router's metrics in a registry of their own, with
// the Go runtime's and the process's collectors.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		conns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ech_router_connections_total",
			Help: "Connections handled, by listener, route and ECH outcome (accepted, stale, grease, not_offered, refused).",
		}, []string{"listener", "route", "ech"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ech_router_active_connections",
			Help: "Connections open now, by listener.",
		}, []string{"listener"}),
		handshake: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ech_router_hello_seconds",
			Help:    "Time from accepting a connection to its ClientHello read and decrypted, by listener and ECH outcome.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"listener", "ech"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ech_router_bytes_total",
			Help: "Bytes forwarded, by listener, route and direction (in: from clients, out: to clients).",
		}, []string{"listener", "route", "direction"}),
		dialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ech_router_backend_dial_failures_total",
			Help: "Backend connections that failed, by route.",
		}, []string{"route"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ech_router_refused_connections_total",
			Help: "Connections refused before routing, by listener and reason (max_connections, hello).",
		}, []string{"listener", "reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ech_router_reloads_total",
			Help: "Reloads of keys and certificates, by result (ok, failed).",
		}, []string{"result"}),
		keys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "ech_router_keys",
			Help: "ECH keys loaded.",
		}),
		keyInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ech_router_key_info",
			Help: "One series per loaded ECH key, by config_id; 1 for the keys sent as retry configs, 0 for the others.",
		}, []string{"config_id"}),
		certExpiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ech_router_certificate_expiry_seconds",
			Help: "Seconds until each certificate expires (negative once expired), by the name it is loaded for.",
		}, []string{"name"}),
		certs: map[string]time.Time{},
	}
	m.reg.MustRegister(m.conns, m.active, m.handshake, m.bytes, m.dialFailures, m.refused,
		m.reloads, m.keys, m.keyInfo, certExpiryCollector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// certExpiryCollector computes the seconds until expiry at scrape time.
type certExpiryCollector struct{ m *Metrics }

func (c certExpiryCollector) Describe(ch chan<- *prometheus.Desc) { c.m.certExpiry.Describe(ch) }

func (c certExpiryCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	now := time.Now()
	c.m.certExpiry.Reset()
	for name, notAfter := range c.m.certs {
		c.m.certExpiry.WithLabelValues(name).Set(notAfter.Sub(now).Seconds())
	}
	c.m.mu.Unlock()
	c.m.certExpiry.Collect(ch)
}

// Connection records a routed connection: its ECH outcome, the time its
// hello took, and the bytes it forwarded each way.
func (m *Metrics) Connection(listener, route, echOutcome string, hello time.Duration, in, out int64) {
	if m == nil {
		return
	}
	m.conns.WithLabelValues(listener, route, echOutcome).Inc()
	m.handshake.WithLabelValues(listener, echOutcome).Observe(hello.Seconds())
	if in > 0 {
		m.bytes.WithLabelValues(listener, route, "in").Add(float64(in))
	}
	if out > 0 {
		m.bytes.WithLabelValues(listener, route, "out").Add(float64(out))
	}
}

// QUICConnection records a QUIC connection routed (or refused) by a UDP
// listener's proxy, which knows neither the bytes nor the time of the
// hello.
func (m *Metrics) QUICConnection(listener, route, echOutcome string) {
	if m == nil {
		return
	}
	m.conns.WithLabelValues(listener, route, echOutcome).Inc()
}

// Refused records a connection refused before it was routed.
func (m *Metrics) Refused(listener, reason string) {
	if m == nil {
		return
	}
	m.refused.WithLabelValues(listener, reason).Inc()
}

// Active adds delta to the open connections of listener.
func (m *Metrics) Active(listener string, delta int) {
	if m == nil {
		return
	}
	m.active.WithLabelValues(listener).Add(float64(delta))
}

// DialFailure records a backend connection that failed.
func (m *Metrics) DialFailure(route string) {
	if m == nil {
		return
	}
	m.dialFailures.WithLabelValues(route).Inc()
}

// Reload records a reload of keys and certificates.
func (m *Metrics) Reload(ok bool) {
	if m == nil {
		return
	}
	result := "ok"
	if !ok {
		result = "failed"
	}
	m.reloads.WithLabelValues(result).Inc()
}

// Keys records the key set now loaded.
func (m *Metrics) Keys(ks *ech.KeySet) {
	if m == nil {
		return
	}
	keys := ks.Keys()
	m.keys.Set(float64(len(keys)))
	m.keyInfo.Reset()
	for _, k := range keys {
		c, err := ech.KeyConfig(k)
		if err != nil {
			continue
		}
		v := 0.0
		if k.SendAsRetry {
			v = 1
		}
		m.keyInfo.WithLabelValues(strconv.Itoa(int(c.ConfigID))).Set(v)
	}
}

// Certificate records the leaf certificate loaded for name.
func (m *Metrics) Certificate(name string, leaf *x509.Certificate) {
	if m == nil || leaf == nil {
		return
	}
	m.mu.Lock()
	m.certs[name] = leaf.NotAfter
	m.mu.Unlock()
}

// SetReady sets the function /readyz asks: the listeners are up and the
// keys loaded.
func (m *Metrics) SetReady(ready func() bool) {
	if m == nil {
		return
	}
	m.mu.Lock()
	m.ready = ready
	m.mu.Unlock()
}

// Handler serves /metrics (the Prometheus text format), /healthz (200 while
// the process serves HTTP) and /readyz (200 once the listeners are up and
// the keys loaded, 503 before).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		ready := m.ready
		m.mu.Unlock()
		if ready == nil || !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return mux
}
