package router

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const goodConfig = `{
  "keys": {"dir": "keys", "reload": "10m"},
  "public": {"name": "cover.example", "cert": "cover.crt", "key": "cover.key"},
  "handshake_timeout": "5s",
  "listeners": [
    {"address": ":443", "routes": [
      {"name": "imap", "server_names": ["chat.example"], "alpn": ["imap"],
       "mode": "terminate", "backend": "127.0.0.1:143", "cert": "chat.crt", "key": "chat.key",
       "proxy_protocol": true},
      {"name": "web", "server_names": ["chat.example", "*.chat.example"],
       "mode": "passthrough", "backend": "[::1]:8443", "idle_timeout": "2h"}
    ]},
    {"address": "127.0.0.1:993", "routes": [], "max_connections": 100, "idle_timeout": "30m"}
  ]
}
`

func TestParseConfig(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig("router.json", []byte(goodConfig))
	require.NoError(t, err)
	assert.Equal(t, "keys", c.Keys.Dir)
	assert.Equal(t, "cover.example", c.Public.Name)
	require.Len(t, c.Listeners, 2)
	require.Len(t, c.Listeners[0].Routes, 2)
	r := c.Listeners[0].Routes[0]
	assert.Equal(t, RouteConfig{Name: "imap", ServerNames: []string{"chat.example"}, ALPN: []string{"imap"},
		Mode: "terminate", Backend: "127.0.0.1:143", Cert: "chat.crt", Key: "chat.key", ProxyProtocol: true,
		idleTimeout: DefaultIdleTimeout, finTimeout: DefaultFinTimeout}, r)
	assert.Equal(t, "10m0s", c.reload.String())
	assert.Equal(t, "5s", c.handshakeTimeout.String())
	assert.Equal(t, "30s", c.shutdownTimeout.String())
	assert.Equal(t, 100, c.Listeners[1].MaxConnections)
	assert.Equal(t, 30*time.Minute, c.Listeners[1].idleTimeout)
	assert.Nil(t, c.LogInnerNames)
	assert.Equal(t, 2*time.Hour, c.Listeners[0].Routes[1].idleTimeout, "a route overrides its listener")

	c.Dir = "/etc/router"
	assert.Equal(t, "/etc/router/keys", c.path(c.Keys.Dir))
	assert.Equal(t, "/abs/x", c.path("/abs/x"))
}

// TestParseConfigErrors checks that each error names the line of the
// setting that is wrong.
func TestParseConfigErrors(t *testing.T) {
	t.Parallel()
	edit := func(old, new string) string {
		require.Contains(t, goodConfig, old)
		return strings.Replace(goodConfig, old, new, 1)
	}
	for _, tc := range []struct {
		name, config, want string
	}{
		{"syntax", edit(`"10m"},`, `"10m"}`), `router.json:3: invalid character '"' after object key:value pair`},
		{"trailing comma", edit(`"proxy_protocol": true}`, `"proxy_protocol": true,}`), `router.json:9: invalid character '}' looking for beginning of object key string`},
		{"truncated", goodConfig[:200], `router.json:6: unexpected end of file`},
		{"unknown key", edit(`"handshake_timeout"`, `"handshake_timout"`), `router.json:4: handshake_timout: unknown setting`},
		{"unknown nested key", edit(`"proxy_protocol"`, `"proxy"`), `router.json:9: listeners[0].routes[0].proxy: unknown setting`},
		{"repeated key", edit(`"mode": "passthrough"`, `"mode": "passthrough", "mode": "terminate"`), `router.json:11: listeners[0].routes[1].mode: set twice`},
		{"wrong type", edit(`"proxy_protocol": true`, `"proxy_protocol": "yes"`), `router.json:9: listeners[0].routes[0].proxy_protocol: want true or false, not "yes"`},
		{"string for list", edit(`"alpn": ["imap"]`, `"alpn": "imap"`), `router.json:7: listeners[0].routes[0].alpn: want a list [...], not "imap"`},
		{"number", edit(`"reload": "10m"`, `"reload": 600`), `router.json:2: keys.reload: want a string, not 600`},
		{"bad duration", edit(`"reload": "10m"`, `"reload": "10 minutes"`), `router.json:2: keys.reload: "10 minutes" is not a duration`},
		{"bad mode", edit(`"mode": "passthrough"`, `"mode": "pass"`), `router.json:11: listeners[0].routes[1].mode: "pass" is not "passthrough" or "terminate"`},
		{"missing mode", edit(`"mode": "passthrough", `, ``), `router.json:10: listeners[0].routes[1].mode: missing`},
		{"terminate without cert", edit(`"cert": "chat.crt", `, ``), `router.json:7: listeners[0].routes[0].cert: missing`},
		{"passthrough with cert", edit(`"backend": "[::1]:8443"`, `"backend": "[::1]:8443", "cert": "x"`), `router.json:11: listeners[0].routes[1].cert: a passthrough route has no certificate`},
		{"bad backend", edit(`"127.0.0.1:143"`, `"127.0.0.1"`), `router.json:8: listeners[0].routes[0].backend: "127.0.0.1" is not host:port`},
		{"bad port", edit(`"127.0.0.1:143"`, `"127.0.0.1:imap"`), `router.json:8: listeners[0].routes[0].backend: "127.0.0.1:imap": bad port`},
		{"bad server name", edit(`"*.chat.example"`, `"chat..example"`), `router.json:10: listeners[0].routes[1].server_names[1]: "chat..example" is not a server name`},
		{"public name routed", edit(`"*.chat.example"`, `"cover.example"`), `router.json:10: listeners[0].routes[1].server_names[1]: "cover.example" is the public name`},
		{"bad public name", edit(`"name": "cover.example"`, `"name": "192.0.2.1"`), `router.json:3: public.name: ech: invalid public_name`},
		{"missing keys dir", edit(`"dir": "keys", `, ``), `router.json:2: keys.dir: missing`},
		{"duplicate listener", edit(`"127.0.0.1:993"`, `":443"`), `router.json:13: listeners[1].address: ":443" is already a listener`},
		{"duplicate route name", edit(`"name": "web"`, `"name": "imap"`), `router.json:10: listeners[0].routes[1].name: "imap" names two routes`},
		{"no listeners", edit(`"listeners": [`, `"listeners": [], "x": [`), `router.json:5: x: unknown setting`},
		{"empty ALPN", edit(`["imap"]`, `[""]`), `router.json:7: listeners[0].routes[0].alpn[0]: an ALPN protocol is 1 to 255 bytes`},
		{"data after", goodConfig + "{}", `router.json:16: data after the closing }`},
		{"not an object", `[]`, `router.json:1: want an object, not a list`},
		{"bad idle timeout", edit(`"proxy_protocol": true}`, `"proxy_protocol": true, "idle_timeout": "long"}`), `router.json:9: listeners[0].routes[0].idle_timeout: "long" is not a duration`},
		{"bad fin timeout", edit(`"max_connections": 100`, `"max_connections": 100, "fin_timeout": "-1s"`), `router.json:13: listeners[1].fin_timeout: "-1s" is not a duration`},
		{"negative max", edit(`"max_connections": 100`, `"max_connections": -1`), `router.json:13: listeners[1].max_connections: must not be negative`},
		{"fractional max", edit(`"max_connections": 100`, `"max_connections": 1.5`), `router.json:13: listeners[1].max_connections: want a whole number, not 1.5`},
		{"log_inner_names string", edit(`"handshake_timeout": "5s",`, `"handshake_timeout": "5s", "log_inner_names": "no",`), `router.json:4: log_inner_names: want true or false, not "no"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("router.json", []byte(tc.config))
			require.Error(t, err)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			assert.Contains(t, err.Error(), tc.want)
			assert.True(t, strings.HasPrefix(err.Error(), tc.want[:strings.Index(tc.want, ": ")]), "error starts with file:line: %v", err)
		})
	}
}

const quicConfig = `{
  "keys": {"dir": "keys"},
  "public": {"name": "cover.example", "cert": "cover.crt", "key": "cover.key"},
  "listeners": [
    {"address": ":443", "routes": [
      {"name": "web", "server_names": ["www.example"], "mode": "passthrough", "backend": "10.0.0.2:443"}
    ]},
    {"address": ":443", "network": "udp", "public_quic_backend": "10.0.0.9:443", "routes": [
      {"name": "h3", "server_names": ["www.example"], "alpn": ["h3"],
       "mode": "passthrough", "backend": "10.0.0.2:443"}
    ]}
  ]
}
`

func TestParseConfigQUIC(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig("router.json", []byte(quicConfig))
	require.NoError(t, err, "a TCP and a UDP listener share :443")
	require.Len(t, c.Listeners, 2)
	assert.Equal(t, "", c.Listeners[0].Network)
	assert.Equal(t, "udp", c.Listeners[1].Network)
	assert.Equal(t, "10.0.0.9:443", c.Listeners[1].PublicQUICBackend)
	assert.Equal(t, DefaultIdleTimeout, c.Listeners[0].idleTimeout)
	assert.Equal(t, 30*time.Second, c.Listeners[1].idleTimeout, "QUIC's idle timeout by default")
	assert.Equal(t, 30*time.Second, c.Listeners[1].Routes[0].idleTimeout)
}

func TestParseConfigQUICErrors(t *testing.T) {
	t.Parallel()
	edit := func(old, new string) string {
		require.Contains(t, quicConfig, old)
		return strings.Replace(quicConfig, old, new, 1)
	}
	for _, tc := range []struct {
		name, config, want string
	}{
		{"terminate on UDP", edit(`"mode": "passthrough", "backend": "10.0.0.2:443"}
    ]}
  ]`, `"mode": "terminate", "backend": "10.0.0.2:443", "cert": "c.crt", "key": "c.key"}
    ]}
  ]`), `router.json:10: listeners[1].routes[0].mode: a route of a UDP listener is "passthrough"`},
		{"bad network", edit(`"network": "udp"`, `"network": "quic"`), `router.json:8: listeners[1].network: "quic" is not "tcp" or "udp"`},
		{"duplicate UDP listener", edit(`"address": ":443", "routes"`, `"address": ":443", "network": "udp", "routes"`), `router.json:8: listeners[1].address: ":443" is already a listener`},
		{"public backend on TCP", edit(`"address": ":443", "routes"`, `"address": ":443", "public_quic_backend": "10.0.0.9:443", "routes"`), `router.json:5: listeners[0].public_quic_backend: only a listener with "network": "udp" has one`},
		{"bad public backend", edit(`"10.0.0.9:443"`, `"10.0.0.9"`), `router.json:8: listeners[1].public_quic_backend: "10.0.0.9" is not host:port`},
		{"PROXY header on UDP", edit(`"alpn": ["h3"],`, `"alpn": ["h3"], "proxy_protocol": true,`), `router.json:9: listeners[1].routes[0].proxy_protocol: a route of a UDP listener has no PROXY header`},
		{"route idle timeout on UDP", edit(`"alpn": ["h3"],`, `"alpn": ["h3"], "idle_timeout": "1m",`), `router.json:9: listeners[1].routes[0].idle_timeout: set it on the UDP listener`},
		{"fin timeout on UDP", edit(`"network": "udp",`, `"network": "udp", "fin_timeout": "1s",`), `router.json:8: listeners[1].fin_timeout: a UDP listener has none`},
		{"public name on UDP", edit(`"server_names": ["www.example"], "alpn"`, `"server_names": ["cover.example"], "alpn"`), `router.json:9: listeners[1].routes[0].server_names[0]: "cover.example" is the public name`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("router.json", []byte(tc.config))
			require.Error(t, err)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			assert.Contains(t, err.Error(), tc.want)
			assert.True(t, strings.HasPrefix(err.Error(), tc.want[:strings.Index(tc.want, ": ")]), "error starts with file:line: %v", err)
		})
	}
}

func TestLoadConfigMissingFile(t *testing.T) {
	t.Parallel()
	_, err := LoadConfig(filepath.Join(t.TempDir(), "none.json"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestChatmailExample(t *testing.T) {
	t.Parallel()
	c, err := LoadConfig("../cmd/ech-router/chatmail.json")
	require.NoError(t, err)
	var addrs []string
	for _, l := range c.Listeners {
		addrs = append(addrs, l.Address)
	}
	assert.Equal(t, []string{":443", ":993", ":465"}, addrs)
	var alpn []string
	for _, r := range c.Listeners[0].Routes {
		alpn = append(alpn, r.ALPN...)
	}
	assert.Subset(t, alpn, []string{"imap", "smtp"}, "port 443 multiplexes IMAP and SMTP by ALPN")
}
