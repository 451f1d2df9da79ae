package ech

import (
	"bytes"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// configListFixtures is the expected result of parsing each file in
// testdata/configlists (see its README.md). A nil ids means no configs.
var configListFixtures = map[string]struct {
	err error
	ids []uint8 // config_ids of the configs kept, in order
}{
	"defo-bad-kem-cccc.b64":       {}, // RFC 9849, Section 4: an unsupported KEM is skipped
	"defo-zero-length-config.b64": {err: ErrMalformedConfig},
	"recordings.b64":              {ids: []uint8{0x2a}},
	"multi-kem.b64":               {ids: []uint8{0x10, 0x11, 0x12, 0x13, 0x14, 0x15}},
	"unknown-version-fe0c.b64":    {ids: []uint8{0x2a}}, // the 0xfe0c config is skipped
	"only-unknown-versions.b64":   {},
	"extensions.b64":              {ids: []uint8{0x33}},
	"duplicate-extension.b64":     {err: ErrMalformedConfig},
	"trailing-byte.b64":           {err: ErrMalformedConfig},
	"trailing-in-list.b64":        {err: ErrMalformedConfig},
}

// readConfigListFixture returns the ECHConfigList in
// testdata/configlists/name, base64-decoded.
func readConfigListFixture(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "configlists", name))
	require.NoError(t, err)
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(data)))
	require.NoError(t, err)
	return b
}

// validConfigLists returns every well-formed ECHConfigList among the
// fixtures: the files of testdata/configlists that parse, and the ECHCONFIG
// blocks of testdata/pem.
func validConfigLists(t testing.TB) map[string][]byte {
	t.Helper()
	out := make(map[string][]byte)
	for name, want := range configListFixtures {
		if want.err == nil {
			out[name] = readConfigListFixture(t, name)
		}
	}
	pems, err := filepath.Glob(filepath.Join("testdata", "pem", "*.pem"))
	require.NoError(t, err)
	require.NotEmpty(t, pems)
	for _, p := range pems {
		data, err := os.ReadFile(p)
		require.NoError(t, err)
		for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
			if block.Type == pemTypeECHConfig {
				out[filepath.Base(p)] = block.Bytes
			}
		}
	}
	return out
}

// splitConfigList splits an ECHConfigList into its serialized ECHConfigs,
// of any version, without parsing them. It reports false if the framing is
// broken.
func splitConfigList(b []byte) ([][]byte, bool) {
	s := cryptobyte.String(b)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() {
		return nil, false
	}
	var out [][]byte
	for !list.Empty() {
		start := list
		var version uint16
		var contents cryptobyte.String
		if !list.ReadUint16(&version) || !list.ReadUint16LengthPrefixed(&contents) {
			return nil, false
		}
		out = append(out, start[:4+len(contents)])
	}
	return out, true
}

// rawECHConfig builds ECHConfigs field by field with cryptobyte, so tests can
// write configs that [Config.Marshal] refuses to write.
type rawECHConfig struct {
	version uint16
	id      uint8
	kem     uint16
	pub     []byte
	suites  []byte // the cipher_suites vector, without its length
	maxName uint8
	name    []byte
	exts    []byte // the extensions vector, without its length
}

// goodRawConfig returns a valid X25519 config.
func goodRawConfig() rawECHConfig {
	return rawECHConfig{
		version: VersionECH,
		id:      7,
		kem:     uint16(KEMX25519),
		pub:     bytes.Repeat([]byte{9}, 32),
		suites:  []byte{0, 1, 0, 1},
		name:    []byte("public.example"),
	}
}

func (c rawECHConfig) bytes() []byte {
	b := cryptobyte.NewBuilder(nil)
	b.AddUint16(c.version)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint8(c.id)
		b.AddUint16(c.kem)
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(c.pub) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(c.suites) })
		b.AddUint8(c.maxName)
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(c.name) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(c.exts) })
	})
	return b.BytesOrPanic()
}

// rawConfigList wraps serialized ECHConfigs in an ECHConfigList.
func rawConfigList(configs ...[]byte) []byte {
	b := cryptobyte.NewBuilder(nil)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		for _, c := range configs {
			b.AddBytes(c)
		}
	})
	return b.BytesOrPanic()
}

func TestConfigListFixtures(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "configlists", "*.b64"))
	require.NoError(t, err)
	require.Len(t, files, len(configListFixtures), "every fixture file needs an expected result")
	for _, file := range files {
		name := filepath.Base(file)
		t.Run(name, func(t *testing.T) {
			want, ok := configListFixtures[name]
			require.True(t, ok, "no expected result for %s", name)
			list := readConfigListFixture(t, name)

			configs, err := ParseConfigList(list)
			if want.err != nil {
				require.ErrorIs(t, err, want.err)
				assert.Nil(t, configs)
				return
			}
			require.NoError(t, err)
			ids := make([]uint8, 0, len(configs))
			for _, c := range configs {
				ids = append(ids, c.ConfigID)
				assert.True(t, c.KEM.Supported(), "kept a config with %v", c.KEM)
			}
			if want.ids == nil {
				assert.Empty(t, ids)
			} else {
				assert.Equal(t, want.ids, ids)
			}

			// The base64 form parses the same way.
			data, err := os.ReadFile(file)
			require.NoError(t, err)
			b64, err := ParseConfigListBase64(string(data))
			require.NoError(t, err)
			assert.Equal(t, ConfigList(list), b64)

			raw, ok := splitConfigList(list)
			require.True(t, ok)
			if len(raw) != len(configs) {
				return // some configs were skipped: the list cannot be rebuilt
			}
			out, err := MarshalConfigList(configs...)
			require.NoError(t, err)
			assert.Equal(t, ConfigList(list), out)
			for i, c := range configs {
				one, err := c.Marshal()
				require.NoError(t, err)
				assert.Equal(t, raw[i], one)
			}
		})
	}
}

func TestConfigListMixedVersions(t *testing.T) {
	good := readConfigListFixture(t, "recordings.b64")[2:]
	unknown := goodRawConfig()
	unknown.version = 0xfe0c
	// The contents of an unknown version are not parsed: this one would be
	// malformed as a 0xfe0d config.
	unknown.suites = []byte{1, 2, 3}

	tests := []struct {
		name    string
		configs [][]byte
	}{
		{"unknown first", [][]byte{unknown.bytes(), good}},
		{"unknown last", [][]byte{good, unknown.bytes()}},
		{"unknown both sides", [][]byte{unknown.bytes(), good, unknown.bytes()}},
		{"opaque unknown", [][]byte{{0xfe, 0x0c, 0x00, 0x01, 0xff}, good}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			configs, err := ParseConfigList(rawConfigList(tc.configs...))
			require.NoError(t, err)
			require.Len(t, configs, 1)
			assert.Equal(t, uint8(0x2a), configs[0].ConfigID)
			assert.Equal(t, "public.example", configs[0].PublicName)
		})
	}
}

func TestConfigRoundTrip(t *testing.T) {
	for name, list := range validConfigLists(t) {
		raw, ok := splitConfigList(list)
		require.True(t, ok, name)
		if configs, err := ParseConfigList(list); err == nil && len(configs) == len(raw) {
			out, err := MarshalConfigList(configs...)
			require.NoError(t, err, name)
			assert.Equal(t, ConfigList(list), out, name)
		}
		for i, r := range raw {
			c, err := ParseConfig(r)
			if err != nil {
				require.ErrorIs(t, err, ErrUnsupportedVersion, "%s config %d", name, i)
				continue
			}
			out, err := c.Marshal()
			require.NoError(t, err, "%s config %d", name, i)
			assert.Equal(t, r, out, "%s config %d", name, i)
		}
	}

	t.Run("struct", func(t *testing.T) {
		in := &Config{
			ConfigID:      200,
			KEM:           KEMP256,
			PublicKey:     []byte{4, 1, 2, 3},
			CipherSuites:  []CipherSuite{{KDFHKDFSHA384, AEADAES256GCM}, {0x1234, 0x5678}},
			MaxNameLength: 42,
			PublicName:    strings.Repeat("a", 255),
			Extensions:    []ConfigExtension{{Type: 1, Data: []byte("x")}, {Type: 0xfffe, Data: []byte{}}},
		}
		b, err := in.Marshal()
		require.NoError(t, err)
		out, err := ParseConfig(b)
		require.NoError(t, err)
		assert.Equal(t, in, out)
	})
}

func TestConfigListTruncated(t *testing.T) {
	for name, list := range validConfigLists(t) {
		t.Run(name, func(t *testing.T) {
			for i := range len(list) {
				configs, err := ParseConfigList(list[:i])
				require.ErrorIs(t, err, ErrMalformedConfig, "prefix of %d bytes", i)
				require.Nil(t, configs)
			}

			// Truncate the contents of each 0xfe0d config and fix up the
			// lengths, to reach every field of the inner parser.
			raw, ok := splitConfigList(list)
			require.True(t, ok)
			for _, r := range raw {
				if r[0] != 0xfe || r[1] != 0x0d {
					continue
				}
				contents := r[4:]
				for i := range len(contents) {
					b := cryptobyte.NewBuilder(nil)
					b.AddUint16(VersionECH)
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(contents[:i]) })
					one := b.BytesOrPanic()
					_, err := ParseConfig(one)
					require.ErrorIs(t, err, ErrMalformedConfig, "contents cut to %d bytes", i)
					_, err = ParseConfigList(rawConfigList(one))
					require.ErrorIs(t, err, ErrMalformedConfig, "contents cut to %d bytes", i)
				}
				for i := range len(r) {
					_, err := ParseConfig(r[:i])
					require.ErrorIs(t, err, ErrMalformedConfig, "config cut to %d bytes", i)
				}
			}
		})
	}
}

func TestConfigTrailingBytes(t *testing.T) {
	list := readConfigListFixture(t, "recordings.b64")
	config := list[2:]

	_, err := ParseConfigList(append(slices.Clone(list), 0))
	assert.ErrorIs(t, err, ErrMalformedConfig, "byte after the list")

	_, err = ParseConfig(append(slices.Clone(config), 0))
	assert.ErrorIs(t, err, ErrMalformedConfig, "byte after the config")

	// A byte after the extensions, inside the config's length.
	b := cryptobyte.NewBuilder(nil)
	b.AddUint16(VersionECH)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(config[4:]); b.AddUint8(0) })
	inner := b.BytesOrPanic()
	_, err = ParseConfig(inner)
	assert.ErrorIs(t, err, ErrMalformedConfig, "byte inside the config")
	_, err = ParseConfigList(rawConfigList(inner))
	assert.ErrorIs(t, err, ErrMalformedConfig, "byte inside the config in a list")

	for n := 1; n < 4; n++ {
		_, err = ParseConfigList(rawConfigList(config, bytes.Repeat([]byte{0xfe}, n)))
		assert.ErrorIs(t, err, ErrMalformedConfig, "%d stray bytes inside the list", n)
	}
}

func TestParseConfigBounds(t *testing.T) {
	tests := []struct {
		name   string
		modify func(c *rawECHConfig)
		err    error
	}{
		{"good", func(c *rawECHConfig) {}, nil},
		{"one-byte public key", func(c *rawECHConfig) { c.pub = []byte{1} }, nil},
		{"255-byte public name", func(c *rawECHConfig) { c.name = bytes.Repeat([]byte("a"), 255) }, nil},
		{"empty public key", func(c *rawECHConfig) { c.pub = nil }, ErrMalformedConfig},
		{"empty cipher suites", func(c *rawECHConfig) { c.suites = nil }, ErrMalformedConfig},
		{"cipher suites 2 bytes", func(c *rawECHConfig) { c.suites = []byte{0, 1} }, ErrMalformedConfig},
		{"cipher suites 6 bytes", func(c *rawECHConfig) { c.suites = []byte{0, 1, 0, 1, 0, 1} }, ErrMalformedConfig},
		{"cipher suites 7 bytes", func(c *rawECHConfig) { c.suites = []byte{0, 1, 0, 1, 0, 1, 0} }, ErrMalformedConfig},
		{"empty public name", func(c *rawECHConfig) { c.name = nil }, ErrMalformedConfig},
		{"extension header cut", func(c *rawECHConfig) { c.exts = []byte{0, 1, 0} }, ErrMalformedConfig},
		{"extension data cut", func(c *rawECHConfig) { c.exts = []byte{0, 1, 0, 5, 'a'} }, ErrMalformedConfig},
		{"duplicate extensions", func(c *rawECHConfig) { c.exts = []byte{0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 1, 'a'} }, ErrMalformedConfig},
		{"duplicate mandatory extensions", func(c *rawECHConfig) { c.exts = []byte{0xff, 1, 0, 0, 0xff, 1, 0, 0} }, ErrMalformedConfig},
		{"unknown version", func(c *rawECHConfig) { c.version = 0xfe0c }, ErrUnsupportedVersion},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := goodRawConfig()
			tc.modify(&c)
			b := c.bytes()
			parsed, err := ParseConfig(b)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				assert.Nil(t, parsed)
				if tc.err == ErrMalformedConfig {
					_, err := ParseConfigList(rawConfigList(b))
					assert.ErrorIs(t, err, tc.err, "in a list")
				}
				return
			}
			require.NoError(t, err)
			out, err := parsed.Marshal()
			require.NoError(t, err)
			assert.Equal(t, b, out)
		})
	}
}

func TestConfigMarshalBounds(t *testing.T) {
	good := func() *Config {
		return &Config{
			ConfigID:     1,
			KEM:          KEMX25519,
			PublicKey:    make([]byte, 32),
			CipherSuites: []CipherSuite{{KDFHKDFSHA256, AEADAES128GCM}},
			PublicName:   "public.example",
		}
	}
	tests := []struct {
		name   string
		modify func(c *Config)
		ok     bool
	}{
		{"good", func(c *Config) {}, true},
		{"255-byte public name", func(c *Config) { c.PublicName = strings.Repeat("a", 255) }, true},
		{"empty public key", func(c *Config) { c.PublicKey = nil }, false},
		{"public key over 65535 bytes", func(c *Config) { c.PublicKey = make([]byte, 0x10000) }, false},
		{"no cipher suites", func(c *Config) { c.CipherSuites = nil }, false},
		{"empty public name", func(c *Config) { c.PublicName = "" }, false},
		{"256-byte public name", func(c *Config) { c.PublicName = strings.Repeat("a", 256) }, false},
		{"duplicate extensions", func(c *Config) {
			c.Extensions = []ConfigExtension{{Type: 5}, {Type: 6}, {Type: 5}}
		}, false},
		{"extension over 65535 bytes", func(c *Config) {
			c.Extensions = []ConfigExtension{{Type: 5, Data: make([]byte, 0x10000)}}
		}, false},
		{"contents over 65535 bytes", func(c *Config) {
			c.PublicKey = make([]byte, 0xfff0)
			c.Extensions = []ConfigExtension{{Type: 5, Data: make([]byte, 100)}}
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := good()
			tc.modify(c)
			b, err := c.Marshal()
			if !tc.ok {
				require.ErrorIs(t, err, ErrMalformedConfig)
				assert.Nil(t, b)
				_, err = MarshalConfigList(good(), c)
				assert.ErrorIs(t, err, ErrMalformedConfig, "in a list")
				return
			}
			require.NoError(t, err)
			parsed, err := ParseConfig(b)
			require.NoError(t, err)
			assert.Equal(t, c.PublicName, parsed.PublicName)
		})
	}
}

func TestMarshalConfigListBounds(t *testing.T) {
	_, err := MarshalConfigList()
	require.ErrorIs(t, err, ErrMalformedConfig, "empty list")

	_, err = MarshalConfigList(nil)
	require.ErrorIs(t, err, ErrMalformedConfig, "nil config")

	big := &Config{
		ConfigID:     1,
		KEM:          KEMX25519,
		PublicKey:    make([]byte, 30000),
		CipherSuites: []CipherSuite{{KDFHKDFSHA256, AEADAES128GCM}},
		PublicName:   "public.example",
	}
	list, err := MarshalConfigList(big, big)
	require.NoError(t, err, "two configs fit")
	assert.Len(t, list, 2+2*(4+1+2+2+30000+2+4+1+1+14+2))
	_, err = MarshalConfigList(big, big, big)
	require.ErrorIs(t, err, ErrMalformedConfig, "three configs do not")
}

func TestMandatoryExtensions(t *testing.T) {
	configs, err := ParseConfigList(readConfigListFixture(t, "extensions.b64"))
	require.NoError(t, err)
	require.Len(t, configs, 1)
	c := configs[0]
	assert.Equal(t, []uint16{0x8001, 0xfe01}, c.MandatoryExtensions())
	require.Len(t, c.Extensions, 3)
	assert.Equal(t, ConfigExtension{Type: 0x0001, Data: []byte("ab")}, c.Extensions[0])
	assert.False(t, c.Extensions[0].Mandatory())
	assert.True(t, c.Extensions[1].Mandatory())
	assert.Empty(t, c.Extensions[1].Data)
	assert.Equal(t, []byte{1, 2, 3}, c.Extensions[2].Data)
	// An unknown suite does not make the config invalid while a known one is
	// listed; mandatory extensions do not either (see MandatoryExtensions).
	assert.NoError(t, c.Validate())

	configs, err = ParseConfigList(readConfigListFixture(t, "recordings.b64"))
	require.NoError(t, err)
	assert.Empty(t, configs[0].MandatoryExtensions())
}

func TestConfigValidate(t *testing.T) {
	recordings, err := os.ReadFile(filepath.Join("testdata", "pem", "recordings-ech.config"))
	require.NoError(t, err)
	tests := []struct {
		name   string
		modify func(c *Config)
		err    error
	}{
		{"good", func(c *Config) {}, nil},
		{"invalid public name", func(c *Config) { c.PublicName = "192.0.2.1" }, ErrInvalidPublicName},
		{"unsupported KEM", func(c *Config) { c.KEM = 0xcccc }, ErrUnsupportedAlgorithm},
		{"short public key", func(c *Config) { c.PublicKey = c.PublicKey[:31] }, ErrMalformedConfig},
		{"public key of another KEM", func(c *Config) { c.KEM = KEMP256 }, ErrMalformedConfig},
		{"P-256 point not on the curve", func(c *Config) {
			c.KEM = KEMP256
			c.PublicKey = append([]byte{4}, bytes.Repeat([]byte{1}, 64)...)
		}, ErrMalformedConfig},
		{"no supported suite", func(c *Config) {
			c.CipherSuites = []CipherSuite{{KDFHKDFSHA256, 0xffff}, {0x0004, AEADAES128GCM}}
		}, ErrUnsupportedAlgorithm},
		{"one supported suite among unknown ones", func(c *Config) {
			c.CipherSuites = []CipherSuite{{0x0004, 0x0004}, {KDFHKDFSHA512, AEADChaCha20Poly1305}}
		}, nil},
		{"empty public name", func(c *Config) { c.PublicName = "" }, ErrMalformedConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig(recordings)
			require.NoError(t, err)
			c.PublicKey = slices.Clone(c.PublicKey)
			tc.modify(c)
			err = c.Validate()
			if tc.err == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.err)
		})
	}
}

func TestValidPublicName(t *testing.T) {
	tests := []struct {
		name  string
		valid bool
	}{
		{"example.com", true},
		{"public.example", true},
		{"localhost", true},
		{"a", true},
		{"A-B.Example.COM", true},
		{"xn--bcher-kva.example", true},
		{"1.2.3.example", true},
		{"123abc.example", true},
		{"example.123abc", true},
		{"example.0x1g", true}, // not hex after 0x: not an IPv4 address
		{"example.x1f", true},  // no 0 before the x
		{"example.0y1f", true}, // not 0x
		{"a-b-c.d-e", true},    // hyphens inside labels
		{strings.Repeat("a", 63) + ".example", true},
		{strings.Repeat(strings.Repeat("a", 63)+".", 3) + strings.Repeat("b", 63), true}, // 255 bytes

		{"", false},
		{".example.com", false},
		{"example.com.", false},
		{".", false},
		{"example..com", false},
		{strings.Repeat("a", 64) + ".example", false},
		{strings.Repeat(strings.Repeat("a", 63)+".", 4), false}, // 256 bytes
		{"foo_bar.example", false},
		{"1.2.3.4", false},
		{"192.0.2.1", false},
		{"example.123", false},
		{"0", false},
		{"foo.0x1f", false},
		{"foo.0X1F", false},
		{"foo.0x", false},
		{"foo.0X", false},
		{"-foo.example", false},
		{"foo-.example", false},
		{"example.-com", false},
		{"example.com-", false},
		{"-", false},
		{"bücher.example", false},
		{"example.cöm", false},
		{"exa mple.com", false},
		{"example.com\x00", false},
		{"*.example.com", false},
		{"example.com:443", false},
		{"[::1]", false},
		{"::1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidPublicName(tc.name)
			if tc.valid {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, ErrInvalidPublicName)
			_, err = GenerateKey(tc.name, nil)
			require.ErrorIs(t, err, ErrInvalidPublicName, "GenerateKey must refuse it")
		})
	}
}

func TestConfigString(t *testing.T) {
	configs, err := ParseConfigList(readConfigListFixture(t, "recordings.b64"))
	require.NoError(t, err)
	require.Len(t, configs, 1)
	assert.Equal(t,
		`config_id=42 kem=DHKEM(X25519, HKDF-SHA256) suites=[HKDF-SHA256/AES-128-GCM HKDF-SHA256/AES-256-GCM HKDF-SHA256/ChaCha20-Poly1305] public_name="public.example" max_name_length=32 extensions=0`,
		configs[0].String())
}

func TestConfigListBase64(t *testing.T) {
	list := readConfigListFixture(t, "recordings.b64")
	const want = "AEn+DQBFKgAgACAosEw8LDQp3ySXkrrFF7wkM7XIV55h7uEdNf6M3RaOdwAMAAEAAQABAAIAAQADIA5wdWJsaWMuZXhhbXBsZQAA"
	assert.Equal(t, want, ConfigList(list).String())

	tests := []struct {
		name string
		in   string
		err  error
	}{
		{"plain", want, nil},
		{"surrounding white space", "\n  " + want + "\r\n", nil},
		{"line breaks inside", want[:40] + "\n" + want[40:], nil},
		{"not base64", want[:10] + "*" + want[11:], ErrMalformedConfig},
		{"unpadded", strings.TrimRight(base64.StdEncoding.EncodeToString(list[:len(list)-1]), "="), ErrMalformedConfig},
		{"base64 of a malformed list", base64.StdEncoding.EncodeToString(list[:len(list)-1]), ErrMalformedConfig},
		{"empty", "", ErrMalformedConfig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseConfigListBase64(tc.in)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				assert.Nil(t, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, ConfigList(list), got)
			assert.Equal(t, want, got.String())
			configs, err := got.Configs()
			require.NoError(t, err)
			require.Len(t, configs, 1)
			assert.Equal(t, "public.example", configs[0].PublicName)
		})
	}
}

// fuzzSeedConfigLists returns the ECHConfigLists that seed the fuzz
// targets: every fixture, malformed ones included, and lists of generated
// keys of every KEM.
func fuzzSeedConfigLists(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	files, err := filepath.Glob(filepath.Join("testdata", "configlists", "*.b64"))
	require.NoError(f, err)
	for _, file := range files {
		seeds = append(seeds, readConfigListFixture(f, filepath.Base(file)))
	}
	for _, list := range validConfigLists(f) {
		seeds = append(seeds, list)
	}
	rnd := rand.NewChaCha8([32]byte{'f', 'u', 'z', 'z'})
	var all [][]byte
	for _, kem := range allKEMs {
		k, err := GenerateKey("public.example", &KeyOptions{
			KEM:        kem,
			Rand:       rnd,
			Extensions: []ConfigExtension{{Type: 0x8001, Data: []byte{1}}},
		})
		require.NoError(f, err)
		seeds = append(seeds, rawConfigList(k.Config))
		all = append(all, k.Config)
	}
	return append(seeds, rawConfigList(all...))
}

func FuzzParseConfigList(f *testing.F) {
	for _, s := range fuzzSeedConfigLists(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		configs, err := ParseConfigList(in)
		if err != nil {
			require.ErrorIs(t, err, ErrMalformedConfig)
			require.Nil(t, configs)
			return
		}
		raw, ok := splitConfigList(in)
		require.True(t, ok, "a list that parses has sound framing")
		for _, c := range configs {
			_ = c.Validate()
			_ = c.String()
			b, err := c.Marshal()
			require.NoError(t, err)
			again, err := ParseConfig(b)
			require.NoError(t, err)
			require.Equal(t, c, again)
		}
		if len(configs) == 0 || len(configs) != len(raw) {
			return // configs were skipped
		}
		out, err := MarshalConfigList(configs...)
		require.NoError(t, err)
		require.Equal(t, ConfigList(in), out)
	})
}

func FuzzParseConfig(f *testing.F) {
	for _, list := range fuzzSeedConfigLists(f) {
		raw, ok := splitConfigList(list)
		if !ok {
			continue
		}
		for _, r := range raw {
			f.Add(r)
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := ParseConfig(in)
		if err != nil {
			if !errors.Is(err, ErrUnsupportedVersion) {
				require.ErrorIs(t, err, ErrMalformedConfig)
			}
			require.Nil(t, c)
			return
		}
		_ = c.Validate()
		_ = c.String()
		_ = c.MandatoryExtensions()
		out, err := c.Marshal()
		require.NoError(t, err)
		require.Equal(t, in, out)
		list, err := MarshalConfigList(c)
		require.NoError(t, err)
		require.Equal(t, in, []byte(list[2:]))
	})
}

// manyExtensions returns the extensions vector of n empty extensions of
// distinct types, then the type of the first one again when dup is set.
func manyExtensions(n int, dup bool) []byte {
	var b []byte
	for i := range n {
		b = append(b, byte(i>>8), byte(i), 0, 0)
	}
	if dup {
		b = append(b, 0, 0, 0, 0)
	}
	return b
}

func TestParseConfigManyExtensions(t *testing.T) {
	c := goodRawConfig()
	c.exts = manyExtensions(2000, false)
	parsed, err := ParseConfig(c.bytes())
	require.NoError(t, err)
	assert.Len(t, parsed.Extensions, 2000)
	out, err := parsed.Marshal()
	require.NoError(t, err)
	assert.Equal(t, c.bytes(), out, "exact round trip")

	c.exts = manyExtensions(2000, true)
	_, err = ParseConfig(c.bytes())
	require.ErrorIs(t, err, ErrMalformedConfig)
	assert.ErrorContains(t, err, "duplicate extension 0x0000")

	parsed.Extensions = append(parsed.Extensions, ConfigExtension{Type: 1999})
	_, err = parsed.Marshal()
	assert.ErrorIs(t, err, ErrMalformedConfig, "Marshal checks duplicates too")
}

// BenchmarkParseConfigExtensions shows that the cost of a config grows
// linearly with its extensions (the duplicate check once grew as n^2).
func BenchmarkParseConfigExtensions(b *testing.B) {
	for _, n := range []int{16, 2000, 16000} {
		c := goodRawConfig()
		c.exts = manyExtensions(n, false)
		raw := c.bytes()
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ParseConfig(raw); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
