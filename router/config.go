package router

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echquic"
)

// errMissing is the error of a required setting left out.
var errMissing = errors.New("missing")

// Config is the router's configuration file, in JSON:
//
//	{
//	  "keys":   {"dir": "keys", "reload": "5m"},
//	  "public": {"name": "cover.example", "cert": "cover.crt", "key": "cover.key"},
//	  "listeners": [
//	    {"address": ":443", "routes": [
//	      {"name": "web", "server_names": ["www.example"], "mode": "passthrough",
//	       "backend": "10.0.0.2:443", "proxy_protocol": true}
//	    ]},
//	    {"address": ":443", "network": "udp", "routes": [
//	      {"name": "h3", "server_names": ["www.example"], "alpn": ["h3"], "mode": "passthrough",
//	       "backend": "10.0.0.2:443"}
//	    ]}
//	  ]
//	}
//
// A listener with "network": "udp" serves QUIC (see [Router.QUICProxy]):
// its routes are passthrough, to QUIC servers at backend. The router
// serves the public name's QUIC connections itself unless the listener
// has a public_quic_backend.
//
// Relative paths are taken from the directory of the file. Durations are
// Go durations ("90s", "5m", "1h").
type Config struct {
	Keys   KeysConfig   `json:"keys"`
	Public PublicConfig `json:"public"`
	// HandshakeTimeout bounds reading the ClientHello and the handshakes
	// the router completes; default "10s".
	HandshakeTimeout string `json:"handshake_timeout,omitempty"`
	// DialTimeout bounds connecting to a backend; default "10s".
	DialTimeout string `json:"dial_timeout,omitempty"`
	// ShutdownTimeout is how long SIGTERM waits for connections to end
	// before closing them; default "30s".
	ShutdownTimeout string `json:"shutdown_timeout,omitempty"`
	// LogInnerNames, when false, keeps the names clients sent encrypted
	// out of the log (see [Router.HideInnerNames]); default true.
	LogInnerNames *bool `json:"log_inner_names,omitempty"`
	// Metrics is the host:port of the HTTP server of /metrics (Prometheus
	// text format), /healthz and /readyz; none when empty. Keep it on a
	// private address: the metrics name the routes.
	Metrics   string           `json:"metrics,omitempty"`
	Listeners []ListenerConfig `json:"listeners"`

	// Dir is the directory relative paths are taken from.
	Dir string `json:"-"`

	handshakeTimeout, dialTimeout, shutdownTimeout, reload time.Duration
	// keys.auto's durations, parsed.
	rotate, retire, propagation, ttl, lockTimeout time.Duration
}

// KeysConfig says where the ECH keys are.
type KeysConfig struct {
	// Dir holds the RFC 9934 PEM files (*.ech, *.pem), loaded again on
	// SIGHUP and every Reload.
	Dir string `json:"dir"`
	// Reload is the reload interval; default "5m", "0s" for SIGHUP only.
	Reload string `json:"reload,omitempty"`
	// Auto, if set, has the router keep the keys of Dir itself: make the
	// first, rotate, retire, and advertise only the newest key every peer
	// decrypts (package echkeys).
	Auto *AutoKeysConfig `json:"auto,omitempty"`
	// Publish, if set, publishes the advertised config in DNS; it needs
	// Auto.
	Publish *PublishConfig `json:"publish,omitempty"`
}

// AutoKeysConfig is "keys.auto": the settings of an [echkeys.Manager].
// Durations are Go durations; empty means the echkeys default.
type AutoKeysConfig struct {
	// Rotate is how often a key is made; default "720h" (30 days).
	Rotate string `json:"rotate,omitempty"`
	// Retire is the age at which an old key is deleted; default rotate +
	// propagation + ttl + 24h, at least 48h.
	Retire string `json:"retire,omitempty"`
	// Propagation is how long after its creation a key is advertised when
	// there are no peers; default "1h", "0s" for a single router.
	Propagation string `json:"propagation,omitempty"`
	// TTL is the TTL of the published records; default "1h".
	TTL string `json:"ttl,omitempty"`
	// LockTimeout is the age at which a dead holder's lock is broken;
	// default "5m".
	LockTimeout string `json:"lock_timeout,omitempty"`
	// ReadOnly reads the directory without writing it, as when another
	// process fills a Kubernetes Secret volume.
	ReadOnly bool `json:"read_only,omitempty"`
	// Peers are the https URLs of the /ech-config-list of every router of
	// the fleet, this one included.
	Peers []string `json:"peers,omitempty"`
	// PeerCA is a PEM file of the CA certificates that the peers' public
	// name certificates are checked against; default the system's.
	PeerCA string `json:"peer_ca,omitempty"`
}

// PublishConfig is "keys.publish": where and what to publish.
type PublishConfig struct {
	RFC2136 RFC2136Config `json:"rfc2136"`
	// Names are the names to publish; default every server name of every
	// route that is not a wildcard, with the ALPN of its route.
	Names []PublishName `json:"names,omitempty"`
}

// RFC2136Config is the zone's primary and TSIG key (see [echkeys.RFC2136]).
type RFC2136Config struct {
	Server  string `json:"server"`
	Zone    string `json:"zone"`
	KeyName string `json:"key_name"`
	// SecretFile holds the TSIG secret in base64.
	SecretFile string `json:"secret_file"`
	// Algorithm is the TSIG algorithm; default "hmac-sha256".
	Algorithm string `json:"algorithm,omitempty"`
}

// PublishName is a name whose HTTPS record is kept (see [echkeys.Name]).
type PublishName struct {
	Name string   `json:"name"`
	ALPN []string `json:"alpn,omitempty"`
	// Create allows creating the record if the name has none.
	Create bool `json:"create,omitempty"`
}

// PublicConfig is the public name the router serves itself.
type PublicConfig struct {
	// Name is the public_name of the keys' configs.
	Name string `json:"name"`
	// Cert and Key are PEM files of a certificate for Name that clients
	// trust, and its private key.
	Cert string `json:"cert"`
	Key  string `json:"key"`
}

// ListenerConfig is one listening address and its routes, tried in order.
type ListenerConfig struct {
	Address string `json:"address"`
	// Network is "tcp", the default, for TLS, or "udp" for QUIC. A TCP
	// and a UDP listener may share an address, as ":443".
	Network string        `json:"network,omitempty"`
	Routes  []RouteConfig `json:"routes"`
	// IdleTimeout and FinTimeout are the defaults of the listener's
	// routes: "1h" and "30s" when not set (see [Route]). On UDP,
	// IdleTimeout ends a QUIC flow that forwarded nothing for that long,
	// "30s" when not set; it is set on the listener only, and there is
	// no FinTimeout.
	IdleTimeout string `json:"idle_timeout,omitempty"`
	FinTimeout  string `json:"fin_timeout,omitempty"`
	// MaxConnections caps the connections in progress; 0, the default,
	// means no cap on TCP and [echquic.DefaultMaxFlows] flows on UDP.
	MaxConnections int `json:"max_connections,omitempty"`
	// PublicQUICBackend, on a UDP listener only, is the host:port of a
	// QUIC server for the public name (one configured with
	// [ech.KeySet.PublicNameConfig], which sends retry configs): it gets
	// the QUIC connections for the public name or for no name, as from a
	// client with a stale config. When empty, the router serves them
	// itself as it does on TCP (see [Server.Run]): it sends retry configs
	// and serves the public page over HTTP/3.
	PublicQUICBackend string `json:"public_quic_backend,omitempty"`

	idleTimeout, finTimeout time.Duration
}

// RouteConfig is a [Route] in the configuration file.
type RouteConfig struct {
	Name          string   `json:"name"`
	ServerNames   []string `json:"server_names"`
	ALPN          []string `json:"alpn,omitempty"`
	Mode          string   `json:"mode"`
	Backend       string   `json:"backend"`
	Cert          string   `json:"cert,omitempty"`
	Key           string   `json:"key,omitempty"`
	ProxyProtocol bool     `json:"proxy_protocol,omitempty"`
	// IdleTimeout and FinTimeout override the listener's.
	IdleTimeout string `json:"idle_timeout,omitempty"`
	FinTimeout  string `json:"fin_timeout,omitempty"`

	idleTimeout, finTimeout time.Duration
}

// ConfigError is an error in a configuration file, at a line.
type ConfigError struct {
	File string
	Line int    // 1-based; 0 when the error is about the whole file
	Path string // the setting, as "listeners[0].routes[1].mode"
	Err  error
}

// Error returns "file:line: setting: problem".
func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Path != "" {
		b.WriteString(e.Path + ": ")
	}
	b.WriteString(e.Err.Error())
	return b.String()
}

// Unwrap returns the underlying error.
func (e *ConfigError) Unwrap() error { return e.Err }

// LoadConfig reads and checks the configuration file at path. Relative
// paths in it are taken from its directory.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("router: %w", err)
	}
	c, err := ParseConfig(filepath.Base(path), data)
	if err != nil {
		return nil, err
	}
	c.Dir = filepath.Dir(path)
	return c, nil
}

// ParseConfig parses and checks a configuration file; name is used in
// errors, which are [*ConfigError]s naming the line. It checks every
// setting but opens no file.
func ParseConfig(name string, data []byte) (*Config, error) {
	pos, err := scanPositions(name, data, reflect.TypeFor[Config]())
	if err != nil {
		return nil, err
	}
	c := new(Config)
	if err := json.Unmarshal(data, c); err != nil {
		// scanPositions has checked the types; this is unexpected.
		return nil, &ConfigError{File: name, Err: err}
	}
	if err := c.check(func(path string, err error) error {
		return &ConfigError{File: name, Line: pos.line(path), Path: path, Err: err}
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// check checks every setting; at makes the error for a setting.
func (c *Config) check(at func(path string, err error) error) error {
	dur := func(path, s string, def time.Duration) (time.Duration, error) {
		if s == "" {
			return def, nil
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 {
			return 0, at(path, fmt.Errorf("%q is not a duration such as \"30s\" or \"5m\"", s))
		}
		return d, nil
	}
	var err error
	if c.handshakeTimeout, err = dur("handshake_timeout", c.HandshakeTimeout, DefaultHandshakeTimeout); err != nil {
		return err
	}
	if c.dialTimeout, err = dur("dial_timeout", c.DialTimeout, DefaultDialTimeout); err != nil {
		return err
	}
	if c.shutdownTimeout, err = dur("shutdown_timeout", c.ShutdownTimeout, 30*time.Second); err != nil {
		return err
	}
	if c.reload, err = dur("keys.reload", c.Keys.Reload, 5*time.Minute); err != nil {
		return err
	}
	if c.Metrics != "" {
		if err := checkHostPort(c.Metrics); err != nil {
			return at("metrics", err)
		}
	}
	if err := c.checkAuto(dur, at); err != nil {
		return err
	}
	switch {
	case c.Keys.Dir == "":
		return at("keys.dir", errMissing)
	case c.Public.Name == "":
		return at("public.name", errMissing)
	case c.Public.Cert == "":
		return at("public.cert", errMissing)
	case c.Public.Key == "":
		return at("public.key", errMissing)
	case len(c.Listeners) == 0:
		return at("listeners", errors.New("no listener"))
	}
	if err := ech.ValidPublicName(c.Public.Name); err != nil {
		return at("public.name", err)
	}
	var addrs []string
	for i := range c.Listeners {
		l := &c.Listeners[i]
		p := fmt.Sprintf("listeners[%d]", i)
		if err := checkHostPort(l.Address); err != nil {
			return at(p+".address", err)
		}
		udp := false
		switch l.Network {
		case "", "tcp":
			if l.PublicQUICBackend != "" {
				return at(p+".public_quic_backend", errors.New(`only a listener with "network": "udp" has one`))
			}
		case "udp":
			udp = true
			if l.FinTimeout != "" {
				return at(p+".fin_timeout", errors.New("a UDP listener has none: QUIC has no half-closed connections to time"))
			}
			if l.PublicQUICBackend != "" {
				if err := checkHostPort(l.PublicQUICBackend); err != nil {
					return at(p+".public_quic_backend", err)
				}
			}
		default:
			return at(p+".network", fmt.Errorf(`%q is not "tcp" or "udp"`, l.Network))
		}
		idle := DefaultIdleTimeout
		if udp {
			// A QUIC flow left by its client is not closed: it waits for
			// its idle timeout, so the default is QUIC's, not TCP's.
			idle = echquic.DefaultIdleTimeout
		}
		if l.idleTimeout, err = dur(p+".idle_timeout", l.IdleTimeout, idle); err != nil {
			return err
		}
		if l.finTimeout, err = dur(p+".fin_timeout", l.FinTimeout, DefaultFinTimeout); err != nil {
			return err
		}
		if l.MaxConnections < 0 {
			return at(p+".max_connections", errors.New("must not be negative"))
		}
		key := l.Address
		if udp {
			key = "udp " + key
		}
		if slices.Contains(addrs, key) {
			return at(p+".address", fmt.Errorf("%q is already a listener", l.Address))
		}
		addrs = append(addrs, key)
		var names []string
		for j := range l.Routes {
			r := &l.Routes[j]
			rp := fmt.Sprintf("%s.routes[%d]", p, j)
			if udp {
				if err := checkQUICRoute(rp, *r, at); err != nil {
					return err
				}
			}
			if err := c.checkRoute(rp, *r, at); err != nil {
				return err
			}
			if r.idleTimeout, err = dur(rp+".idle_timeout", r.IdleTimeout, l.idleTimeout); err != nil {
				return err
			}
			if r.finTimeout, err = dur(rp+".fin_timeout", r.FinTimeout, l.finTimeout); err != nil {
				return err
			}
			if slices.Contains(names, r.Name) {
				return at(fmt.Sprintf("%s.routes[%d].name", p, j), fmt.Errorf("%q names two routes of this listener", r.Name))
			}
			names = append(names, r.Name)
		}
	}
	return nil
}

// checkAuto checks keys.auto and keys.publish.
func (c *Config) checkAuto(dur func(path, s string, def time.Duration) (time.Duration, error), at func(string, error) error) error {
	a := c.Keys.Auto
	if a == nil {
		if c.Keys.Publish != nil {
			return at("keys.publish", errors.New("needs keys.auto"))
		}
		return nil
	}
	var err error
	for _, d := range []struct {
		name string
		s    string
		dst  *time.Duration
	}{
		{"rotate", a.Rotate, &c.rotate},
		{"retire", a.Retire, &c.retire},
		{"ttl", a.TTL, &c.ttl},
		{"lock_timeout", a.LockTimeout, &c.lockTimeout},
	} {
		if *d.dst, err = dur("keys.auto."+d.name, d.s, 0); err != nil {
			return err
		}
	}
	// Propagation "0s" means none, which echkeys spells negative.
	if c.propagation, err = dur("keys.auto.propagation", a.Propagation, 0); err != nil {
		return err
	}
	if a.Propagation != "" && c.propagation == 0 {
		c.propagation = -1
	}
	for i, u := range a.Peers {
		if !strings.HasPrefix(u, "https://") {
			return at(fmt.Sprintf("keys.auto.peers[%d]", i), fmt.Errorf("%q is not an https URL", u))
		}
	}
	p := c.Keys.Publish
	if p == nil {
		return nil
	}
	switch {
	case p.RFC2136.Server == "":
		return at("keys.publish.rfc2136.server", errMissing)
	case p.RFC2136.Zone == "":
		return at("keys.publish.rfc2136.zone", errMissing)
	case p.RFC2136.KeyName == "":
		return at("keys.publish.rfc2136.key_name", errMissing)
	case p.RFC2136.SecretFile == "":
		return at("keys.publish.rfc2136.secret_file", errMissing)
	}
	if err := checkHostPort(p.RFC2136.Server); err != nil {
		return at("keys.publish.rfc2136.server", err)
	}
	for i, n := range p.Names {
		if err := checkNamePattern(n.Name); err != nil || strings.Contains(n.Name, "*") {
			return at(fmt.Sprintf("keys.publish.names[%d].name", i), fmt.Errorf("%q is not a DNS name", n.Name))
		}
	}
	return nil
}

func (c *Config) checkRoute(p string, r RouteConfig, at func(string, error) error) error {
	if r.Name == "" {
		return at(p+".name", errMissing)
	}
	if len(r.ServerNames) == 0 {
		return at(p+".server_names", errMissing)
	}
	for k, n := range r.ServerNames {
		if err := checkNamePattern(n); err != nil {
			return at(fmt.Sprintf("%s.server_names[%d]", p, k), err)
		}
		if strings.EqualFold(n, c.Public.Name) {
			return at(fmt.Sprintf("%s.server_names[%d]", p, k),
				fmt.Errorf("%q is the public name, which the router serves itself", n))
		}
	}
	for k, a := range r.ALPN {
		if a == "" || len(a) > 255 {
			return at(fmt.Sprintf("%s.alpn[%d]", p, k), errors.New("an ALPN protocol is 1 to 255 bytes"))
		}
	}
	switch r.Mode {
	case "passthrough":
		if r.Cert != "" || r.Key != "" {
			return at(p+".cert", errors.New("a passthrough route has no certificate: the backend has it"))
		}
	case "terminate":
		if r.Cert == "" {
			return at(p+".cert", errors.New("missing: a terminate route needs a certificate"))
		}
		if r.Key == "" {
			return at(p+".key", errors.New("missing: a terminate route needs a private key"))
		}
	case "":
		return at(p+".mode", errors.New(`missing: "passthrough" or "terminate"`))
	default:
		return at(p+".mode", fmt.Errorf(`%q is not "passthrough" or "terminate"`, r.Mode))
	}
	if r.Backend == "" {
		return at(p+".backend", errMissing)
	}
	if err := checkHostPort(r.Backend); err != nil {
		return at(p+".backend", err)
	}
	return nil
}

// checkQUICRoute checks what a route of a UDP listener cannot have.
func checkQUICRoute(p string, r RouteConfig, at func(string, error) error) error {
	switch {
	case r.Mode == "terminate":
		return at(p+".mode", errors.New(`a route of a UDP listener is "passthrough": the router does not terminate QUIC, its backend is a QUIC server`))
	case r.ProxyProtocol:
		return at(p+".proxy_protocol", errors.New("a route of a UDP listener has no PROXY header"))
	case r.IdleTimeout != "":
		return at(p+".idle_timeout", errors.New("set it on the UDP listener: its QUIC flows share one idle timeout"))
	case r.FinTimeout != "":
		return at(p+".fin_timeout", errors.New("a UDP listener has none: QUIC has no half-closed connections to time"))
	}
	return nil
}

func checkHostPort(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 && port != "0" {
		return fmt.Errorf("%q: bad port %q", s, port)
	}
	return nil
}

func checkNamePattern(n string) error {
	if n == "*" {
		return nil
	}
	name := strings.TrimPrefix(n, "*.")
	for _, l := range strings.Split(name, ".") {
		if l == "" || len(l) > 63 || strings.Trim(strings.ToLower(l), "abcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
			return fmt.Errorf("%q is not a server name, \"*.\" and a name, or \"*\"", n)
		}
	}
	return nil
}

// path resolves a file name of the configuration.
func (c *Config) path(p string) string {
	if filepath.IsAbs(p) || c.Dir == "" {
		return p
	}
	return filepath.Join(c.Dir, p)
}

// positions maps each setting of a JSON document, as "a.b[2].c", to the
// offset where its key (or array element) ends.
type positions struct {
	data []byte
	off  map[string]int64
}

// line returns the line of path or, for a setting that is missing, of the
// closest enclosing one.
func (p *positions) line(path string) int {
	for {
		if off, ok := p.off[path]; ok {
			return lineAt(p.data, off)
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			return 1
		}
		path = path[:i]
	}
}

func lineAt(data []byte, off int64) int {
	off = min(max(off, 0), int64(len(data)))
	return 1 + bytes.Count(data[:off], []byte("\n"))
}

// scanPositions walks data as JSON of type t: it records where each setting
// is, and reports syntax errors, unknown or repeated keys and values of the
// wrong JSON type, each at its line.
func scanPositions(name string, data []byte, t reflect.Type) (*positions, error) {
	p := &positions{data: data, off: make(map[string]int64)}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	fail := func(path string, err error) error {
		var se *json.SyntaxError
		off := dec.InputOffset()
		if errors.As(err, &se) {
			off = se.Offset
			err = errors.New(strings.TrimPrefix(se.Error(), "json: "))
			path = ""
		} else if err == io.ErrUnexpectedEOF || err == io.EOF {
			off = int64(len(data))
			err = errors.New("unexpected end of file")
			path = ""
		}
		return &ConfigError{File: name, Line: lineAt(data, off), Path: path, Err: err}
	}
	var walk func(path string, t reflect.Type) error
	walk = func(path string, t reflect.Type) error {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		tok, err := dec.Token()
		if err != nil {
			return fail(path, err)
		}
		if _, ok := p.off[path]; !ok {
			p.off[path] = dec.InputOffset()
		}
		want := "an object"
		switch t.Kind() {
		case reflect.Struct:
			if tok != json.Delim('{') {
				break
			}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return fail(path, err)
				}
				key := kt.(string)
				kp := key
				if path != "" {
					kp = path + "." + key
				}
				f, ok := fieldByTag(t, key)
				if !ok {
					return fail(kp, errors.New("unknown setting"))
				}
				if _, dup := p.off[kp]; dup {
					return fail(kp, errors.New("set twice"))
				}
				p.off[kp] = dec.InputOffset()
				if err := walk(kp, f.Type); err != nil {
					return err
				}
			}
			_, err := dec.Token() // '}'
			if err != nil {
				return fail(path, err)
			}
			return nil
		case reflect.Slice:
			want = "a list [...]"
			if tok != json.Delim('[') {
				break
			}
			for i := 0; dec.More(); i++ {
				if err := walk(fmt.Sprintf("%s[%d]", path, i), t.Elem()); err != nil {
					return err
				}
			}
			if _, err := dec.Token(); err != nil { // ']'
				return fail(path, err)
			}
			return nil
		case reflect.String:
			want = "a string"
			if _, ok := tok.(string); ok {
				return nil
			}
		case reflect.Bool:
			want = "true or false"
			if _, ok := tok.(bool); ok {
				return nil
			}
		case reflect.Int:
			want = "a whole number"
			if n, ok := tok.(json.Number); ok {
				if _, err := strconv.ParseInt(string(n), 10, 32); err == nil {
					return nil
				}
			}
		}
		return fail(path, fmt.Errorf("want %s, not %s", want, describe(tok)))
	}
	if err := walk("", t); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		if err == nil {
			err = errors.New("data after the closing }")
		}
		return nil, fail("", err)
	}
	return p, nil
}

// fieldByTag finds the field of struct type t whose JSON name is key.
func fieldByTag(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if tag != "" && tag != "-" && tag == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func describe(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return "an object"
		}
		return "a list"
	case string:
		return strconv.Quote(v)
	case nil:
		return "null"
	}
	return fmt.Sprint(tok)
}
