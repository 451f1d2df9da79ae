package browsertest

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/router"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// howToRun is said by every skip.
const howToRun = "the browser test needs root (port 443 on 127.80.0.x, a Chromium policy file) and the Debian packages " +
	"chromium, firefox-esr and libnss3-tools: sudo apt-get install chromium firefox-esr libnss3-tools; " +
	"sudo env PATH=\"$PATH\" go test -count=1 -v ./internal/browsertest/"

// settleTimeout bounds the wait, after the browser has exited, for the
// router and the backends to record its connections.
const settleTimeout = 15 * time.Second

// screenshotGrace bounds the wait for the screenshot once a backend has
// served the page.
const screenshotGrace = 15 * time.Second

// run is one page load by one browser in one scenario.
type run struct {
	t       *testing.T
	e       *env
	browser string
	host    string // the name the browser loads, https://host/
}

// scenario is one thing a browser must do through the router. Its test
// name is "<browser>.<scenario>.test".
type scenario struct {
	name string
	// dns is what the DoH server publishes for the name.
	dns func(r *run) *zoneEntry
	// done reports whether the router and backends have recorded enough
	// to judge the scenario.
	done func(r *run) bool
	// check asserts the scenario and returns its one-line summary.
	check func(r *run) string
}

// The route of each scenario has the scenario's name; terminate is the only
// route with its own certificate and plaintext backend.
var scenarios = []scenario{
	{
		name: "passthrough",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: routerAddr, ECH: r.e.list} },
		done: func(r *run) bool { return r.acceptedLine() != nil && len(r.requests()) > 0 },
		check: func(r *run) string {
			l := r.assertAccepted("passthrough", "passthrough")
			hellos := r.assertInnerHellos()
			reqs := r.requests()
			return fmt.Sprintf("ECH accepted (config_id %s), backend got inner hello %s, served %d request(s) over %s",
				l["config_id"], hellos[0].Wire, len(reqs), reqs[0].Proto)
		},
	},
	{
		name: "terminate",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: routerAddr, ECH: r.e.list} },
		done: func(r *run) bool { return r.acceptedLine() != nil && len(r.e.plain.forHost(r.host)) > 0 },
		check: func(r *run) string {
			l := r.assertAccepted("terminate", "terminate")
			assert.Contains(r.t, []string{"h2", "http/1.1"}, l["alpn_negotiated"], "ALPN the router negotiated: %s", l)
			reqs := r.e.plain.forHost(r.host)
			require.NotEmpty(r.t, reqs)
			hellos, _ := r.e.pass.forName(r.host)
			assert.Empty(r.t, hellos, "the passthrough backend saw the terminate route's name")
			return fmt.Sprintf("ECH accepted (config_id %s), router terminated TLS with ALPN %s, plaintext backend served %d request(s) over %s",
				l["config_id"], l["alpn_negotiated"], len(reqs), reqs[0].Proto)
		},
	},
	{
		name: "hrr",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: routerAddr, ECH: r.e.list} },
		done: func(r *run) bool { return r.acceptedLine() != nil && len(r.requests()) > 0 },
		check: func(r *run) string {
			l := r.assertAccepted("hrr", "passthrough")
			hellos := r.assertInnerHellos()
			for _, h := range hellos {
				assert.Contains(r.t, h.Wire.Groups, tls.CurveP384, "the browser offers P-384 (it must, for the backend to ask for it)")
				assert.NotContains(r.t, h.Wire.KeyShares, tls.CurveP384, "a first hello with a P-384 key share needs no HelloRetryRequest")
			}
			for _, req := range r.requests() {
				assert.True(r.t, req.TLS.HelloRetryRequest, "the backend's handshake went through a HelloRetryRequest")
				assert.Equal(r.t, tls.CurveP384, req.TLS.CurveID)
			}
			return fmt.Sprintf("ECH accepted (config_id %s) through a HelloRetryRequest: first inner hello had key shares %v, handshake keyed with %v",
				l["config_id"], hellos[0].Wire.KeyShares, r.requests()[0].TLS.CurveID)
		},
	},
	{
		name: "stale",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: routerAddr, ECH: r.e.staleList(r.browser)} },
		done: func(r *run) bool {
			return r.rejectedLine() != nil && r.acceptedLine() != nil && len(r.requests()) > 0
		},
		check: func(r *run) string {
			rej := r.rejectedLine()
			require.NotNil(r.t, rej, "the router rejected the stale config")
			assert.Equal(r.t, publicName, rej["outer_sni"])
			assert.Equal(r.t, "public", rej["route"], "the public name's server sends the retry configs")
			acc := r.assertAccepted("stale", "passthrough")
			assert.Equal(r.t, strconv.Itoa(int(r.e.configID())), acc["config_id"],
				"the retry used the config the router sent as retry config: DNS had only the stale one")
			hellos := r.assertInnerHellos()
			return fmt.Sprintf("stale config_id %s rejected by the public name (retry configs sent), retried with config_id %s: accepted, inner hello %s",
				rej["config_id"], acc["config_id"], hellos[0].Wire)
		},
	},
	{
		name: "grease",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: routerAddr} },
		done: func(r *run) bool { return r.outerLine() != nil && len(r.requests()) > 0 },
		check: func(r *run) string {
			l := r.outerLine()
			assert.Equal(r.t, "rejected", l["ech"], "a GREASE extension does not decrypt: %s", l)
			assert.Equal(r.t, "grease", l["route"], "routed by the outer name: %s", l)
			assert.Equal(r.t, "passthrough", l["mode"], "%s", l)
			r.assertHTTPSQuery()
			hellos, reqs := r.e.pass.forName(r.host)
			require.NotEmpty(r.t, hellos)
			for _, h := range hellos {
				require.NotNil(r.t, h.Wire, "hello not parsed: %v", h.Error)
				assert.Equal(r.t, int(echTypeOuter), h.Wire.ECHType, "GREASE: an outer ECH extension in the hello the backend got: %s", h.Wire)
				assert.True(r.t, slices.Contains(h.Extensions, extensionECH), "crypto/tls saw the ECH extension")
				assert.Equal(r.t, r.host, h.Wire.SNI)
			}
			for _, req := range reqs {
				assert.Equal(r.t, r.host, req.Host)
				assert.Equal(r.t, r.host, req.TLS.ServerName)
			}
			return fmt.Sprintf("no HTTPS record: GREASE ECH with the real name in the clear (%s), routed by outer name to its backend, which served %d request(s) with its certificate",
				hellos[0].Wire, len(reqs))
		},
	},
	{
		name: "observer",
		dns:  func(r *run) *zoneEntry { return &zoneEntry{A: r.e.relays[r.browser].addr(), ECH: r.e.list} },
		done: func(r *run) bool { return r.acceptedLine() != nil && len(r.requests()) > 0 },
		check: func(r *run) string {
			r.assertAccepted("observer", "passthrough")
			o := r.e.relays[r.browser].observe(0, r.e.hidden)
			require.Positive(r.t, o.conns, "the browser went through the relay")
			assert.Empty(r.t, o.leaks, "hidden names on the wire")
			assert.Empty(r.t, o.parseEr)
			require.NotEmpty(r.t, o.hellos)
			for _, h := range o.hellos {
				assert.Equal(r.t, publicName, h.SNI, "the only SNI on the wire is the public name: %s", h)
				assert.Equal(r.t, int(echTypeOuter), h.ECHType, "%s", h)
			}
			return fmt.Sprintf("observer saw %d connection(s), %d bytes, %d ClientHello(s), every SNI %q, no hidden name",
				o.conns, o.bytes, len(o.hellos), publicName)
		},
	},
}

func TestBrowsers(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: " + howToRun)
	}
	if os.Geteuid() != 0 {
		needs(t, "not root: "+howToRun)
	}
	if _, err := exec.LookPath("certutil"); err != nil {
		needs(t, "no certutil: "+howToRun)
	}
	var found []string
	for _, b := range browsers {
		if _, err := exec.LookPath(b.bin); err == nil {
			found = append(found, b.name)
		}
	}
	if len(found) == 0 {
		needs(t, "no browser: "+howToRun)
	}

	artifacts, err := os.MkdirTemp("", "ech-browsertest-")
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("screenshots, browser output and router log kept in %s", artifacts)
			return
		}
		os.RemoveAll(artifacts)
	})

	var routes []router.RouteConfig
	for _, sc := range scenarios {
		rc := router.RouteConfig{Name: sc.name, ServerNames: []string{"*." + sc.name + ".test"}, Mode: "passthrough"}
		if sc.name == "terminate" {
			rc.Mode = "terminate"
			rc.ALPN = []string{"h2", "http/1.1"}
			rc.ServerNames = nil
			for _, b := range browsers {
				rc.ServerNames = append(rc.ServerNames, b.name+".terminate.test")
			}
		}
		routes = append(routes, rc)
	}
	relays := make(map[string]netip.Addr)
	for _, b := range browsers {
		relays[b.name] = b.relay
	}
	e := newEnv(t, artifacts, routes, func(sni string) bool { return strings.HasSuffix(sni, ".hrr.test") }, relays)
	for i, b := range browsers {
		// A stale config per browser: a key the router never had, for the
		// same public name, with a config_id of its own.
		avoid := []uint8{e.configID()}
		for _, k := range e.stale[:i] {
			avoid = append(avoid, mustConfigID(t, k))
		}
		k, err := ech.GenerateKey(publicName, &ech.KeyOptions{AvoidConfigIDs: avoid})
		require.NoError(t, err)
		e.stale = append(e.stale, k)
		for _, sc := range scenarios {
			r := &run{e: e, browser: b.name, host: b.name + "." + sc.name + ".test"}
			e.doh.set(r.host, sc.dns(r))
			if sc.name != "grease" {
				// GREASE names are sent in the clear by design; no
				// observer may see any other.
				e.hidden = append(e.hidden, r.host)
			}
		}
	}

	for _, b := range browsers {
		t.Run(b.name, func(t *testing.T) {
			// The browsers mostly wait (for their start, the page, their
			// exit): side by side, the test takes the time of the slower.
			t.Parallel()
			if !slices.Contains(found, b.name) {
				needs(t, fmt.Sprintf("no %s: %s", b.bin, howToRun))
			}
			load, err := b.setup(t, e)
			require.NoError(t, err)
			for _, sc := range scenarios {
				t.Run(sc.name, func(t *testing.T) {
					r := &run{t: t, e: e, browser: b.name, host: b.name + "." + sc.name + ".test"}
					base := filepath.Join(artifacts, b.name+"-"+sc.name)
					defer func() {
						if t.Failed() {
							r.dump()
							t.Logf("%s %s: FAILED; screenshots, browser output and router log in %s", b.name, sc.name, artifacts)
						}
					}()
					ctx, cancel := context.WithTimeout(t.Context(), loadTimeout)
					defer cancel()
					start := time.Now()
					err := r.load(ctx, cancel, load, base)
					elapsed := time.Since(start)
					if err != nil {
						// The verdict is what the servers saw, not the exit status.
						t.Logf("%s: %v (output in %s.log)", b.name, err, base)
					}
					deadline := time.Now().Add(settleTimeout)
					for !sc.done(r) && time.Now().Before(deadline) {
						time.Sleep(50 * time.Millisecond)
					}
					if !sc.done(r) {
						t.Fatalf("%s %s: the router and backends did not record what the scenario needs within %v of the browser stopping (their records follow; artifacts in %s)", b.name, sc.name, settleTimeout, artifacts)
					}
					summary := sc.check(r)
					t.Logf("%s %s (%.1fs): %s", b.name, sc.name, elapsed.Seconds(), summary)
				})
			}
		})
	}
}

// load runs the browser on the run's page. Once a backend has served the
// page and the screenshot is written (or, under load, a while after the
// page was served) it stops the browser, whose exit takes seconds more and
// tells nothing.
func (r *run) load(ctx context.Context, stop context.CancelFunc, load runner, base string) error {
	errc := make(chan error, 1)
	go func() { errc <- load(ctx, r.t, "https://"+r.host+"/", base+".png", base+".log") }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var servedAt time.Time
	for {
		select {
		case err := <-errc:
			return err
		case <-tick.C:
		}
		if servedAt.IsZero() {
			if !r.served() {
				continue
			}
			servedAt = time.Now()
		}
		fi, err := os.Stat(base + ".png")
		if shot := err == nil && fi.Size() > 0; shot || time.Since(servedAt) > screenshotGrace {
			if shot {
				time.Sleep(200 * time.Millisecond) // the rest of the file
			}
			stop()
			<-errc
			return nil
		}
	}
}

// served reports whether a backend has served a request for the run's name.
func (r *run) served() bool {
	return len(r.requests()) > 0 || len(r.e.plain.forHost(r.host)) > 0
}

// configID returns the config_id of the router's key.
func (e *env) configID() uint8 {
	c, err := ech.KeyConfig(e.key)
	if err != nil {
		panic(err)
	}
	return c.ConfigID
}

func mustConfigID(t *testing.T, k ech.Key) uint8 {
	c, err := ech.KeyConfig(k)
	require.NoError(t, err)
	return c.ConfigID
}

// staleList returns the stale ECHConfigList published for browser.
func (e *env) staleList(browser string) ech.ConfigList {
	for i, b := range browsers {
		if b.name == browser {
			ks, err := ech.NewKeySet(e.stale[i])
			if err != nil {
				panic(err)
			}
			l, err := ks.ConfigList()
			if err != nil {
				panic(err)
			}
			return l
		}
	}
	panic("no browser " + browser)
}

// lines returns the router's connection lines that match.
func (r *run) lines(match func(logRecord) bool) []logRecord {
	var out []logRecord
	for _, l := range r.e.log.records() {
		if match(l) {
			out = append(out, l)
		}
	}
	return out
}

// acceptedLine returns the router's line of a connection whose ECH was
// accepted for the run's name, or nil.
func (r *run) acceptedLine() logRecord {
	ls := r.lines(func(l logRecord) bool { return strings.EqualFold(l["inner_sni"], r.host) })
	if len(ls) == 0 {
		return nil
	}
	return ls[0]
}

// rejectedLine returns the router's line of the stale config's connection:
// rejected, with the stale config_id, naming the public name. (A GREASE
// hello of the other browser, running at the same time, may carry the same
// config_id by chance, but it names its own test host.)
func (r *run) rejectedLine() logRecord {
	id := strconv.Itoa(int(mustConfigID(r.t, r.e.staleKey(r.browser))))
	ls := r.lines(func(l logRecord) bool {
		return l["ech"] == "rejected" && l["config_id"] == id && strings.EqualFold(l["outer_sni"], publicName)
	})
	if len(ls) == 0 {
		return nil
	}
	return ls[0]
}

// outerLine returns the router's line of a connection whose outer SNI was
// the run's name, or nil.
func (r *run) outerLine() logRecord {
	ls := r.lines(func(l logRecord) bool { return strings.EqualFold(l["outer_sni"], r.host) })
	if len(ls) == 0 {
		return nil
	}
	return ls[0]
}

func (e *env) staleKey(browser string) ech.Key {
	for i, b := range browsers {
		if b.name == browser {
			return e.stale[i]
		}
	}
	panic("no browser " + browser)
}

// requests returns the passthrough backend's requests for the run's name.
func (r *run) requests() []backendRequest {
	_, reqs := r.e.pass.forName(r.host)
	return reqs
}

// assertHTTPSQuery checks that the browser asked the DoH server for the
// name's HTTPS record. Chromium's template has no {?dns} variable, so it
// must POST; Firefox ESR 153 uses GET by default (network.trr.useGET),
// though its older documentation says POST: either is accepted from it.
func (r *run) assertHTTPSQuery() {
	r.t.Helper()
	qs := r.e.doh.queries(r.host)
	switch r.browser {
	case "chromium":
		assert.Contains(r.t, qs, "POST TypeHTTPS", "the browser asked for the HTTPS record: %v", qs)
	default:
		assert.True(r.t, slices.Contains(qs, "GET TypeHTTPS") || slices.Contains(qs, "POST TypeHTTPS"),
			"the browser asked for the HTTPS record: %v", qs)
	}
}

// assertAccepted checks every router line for the run's name: ECH
// accepted, outer name the public name, on route, in mode. It returns the
// first.
func (r *run) assertAccepted(route, mode string) logRecord {
	r.t.Helper()
	ls := r.lines(func(l logRecord) bool { return strings.EqualFold(l["inner_sni"], r.host) })
	require.NotEmpty(r.t, ls, "no connection with ECH accepted for %s", r.host)
	for _, l := range ls {
		assert.Equal(r.t, "accepted", l["ech"], "%s", l)
		assert.Equal(r.t, publicName, l["outer_sni"], "%s", l)
		assert.Equal(r.t, route, l["route"], "%s", l)
		assert.Equal(r.t, mode, l["mode"], "%s", l)
	}
	assert.Empty(r.t, r.lines(func(l logRecord) bool { return strings.EqualFold(l["outer_sni"], r.host) }),
		"a connection named %s in the clear", r.host)
	r.assertHTTPSQuery()
	return ls[0]
}

// assertInnerHellos checks that the passthrough backend got only inner
// hellos for the run's name and served it, and returns the hellos.
func (r *run) assertInnerHellos() []tlsHello {
	r.t.Helper()
	hellos, reqs := r.e.pass.forName(r.host)
	require.NotEmpty(r.t, hellos, "the backend got no hello for %s", r.host)
	for _, h := range hellos {
		require.NotNil(r.t, h.Wire, "hello not parsed: %v", h.Error)
		assert.True(r.t, h.Wire.Inner(), "the backend got the ClientHelloInner: %s", h.Wire)
		assert.True(r.t, slices.Contains(h.Extensions, extensionECH), "crypto/tls saw the ECH extension")
		assert.Equal(r.t, r.host, h.Wire.SNI)
		assert.Contains(r.t, h.ALPN, "h2", "%s", h.Wire)
	}
	require.NotEmpty(r.t, reqs, "the backend served no request for %s", r.host)
	for _, req := range reqs {
		assert.Equal(r.t, r.host, req.Host)
	}
	return hellos
}

// dump logs what the servers recorded for the run's name.
func (r *run) dump() {
	r.t.Helper()
	for _, l := range r.e.log.records() {
		r.t.Logf("router: %s", l)
	}
	hellos, reqs := r.e.pass.forName(r.host)
	for _, h := range hellos {
		r.t.Logf("backend hello: %s (parse error: %v)", h.Wire, h.Error)
	}
	for _, q := range reqs {
		r.t.Logf("backend request: host=%s proto=%s hrr=%v curve=%v", q.Host, q.Proto, q.TLS.HelloRetryRequest, q.TLS.CurveID)
	}
	for _, q := range r.e.plain.forHost(r.host) {
		r.t.Logf("plain backend request: host=%s proto=%s", q.Host, q.Proto)
	}
	for _, q := range r.e.doh.queryLog() {
		r.t.Logf("doh: %s", q)
	}
}

// needs skips t for a missing requirement, except under CI, where .ci/run
// installs every requirement and a missing one is a failure.
func needs(t testing.TB, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(append([]any{"CI must run this test:"}, args...)...)
	}
	t.Skip(args...)
}
