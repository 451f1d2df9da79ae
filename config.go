package ech

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/crypto/cryptobyte"
)

// VersionECH is the ECHConfig version and the encrypted_client_hello
// extension codepoint of RFC 9849.
const VersionECH uint16 = 0xfe0d

// ConfigExtension is one ECHConfig extension:
//
//	struct {
//	    ECHConfigExtensionType type;
//	    opaque data<0..2^16-1>;
//	} ECHConfigExtension;
type ConfigExtension struct {
	Type uint16
	Data []byte
}

// Mandatory reports whether a client that does not understand e must ignore
// the config that carries it (the high bit of the type, RFC 9849, Section 4.2).
func (e ConfigExtension) Mandatory() bool { return e.Type&0x8000 != 0 }

// Config is one parsed ECHConfig of version 0xfe0d (RFC 9849, Section 4):
//
//	struct {
//	    HpkeKeyConfig key_config;
//	    uint8 maximum_name_length;
//	    opaque public_name<1..255>;
//	    ECHConfigExtension extensions<0..2^16-1>;
//	} ECHConfigContents;
//
//	struct {
//	    uint8 config_id;
//	    HpkeKemId kem_id;
//	    HpkePublicKey public_key;
//	    HpkeSymmetricCipherSuite cipher_suites<4..2^16-4>;
//	} HpkeKeyConfig;
//
// Slices in a Config returned by [ParseConfig] or [ParseConfigList] alias the
// input bytes.
type Config struct {
	ConfigID      uint8
	KEM           KEMID
	PublicKey     []byte
	CipherSuites  []CipherSuite
	MaxNameLength uint8
	PublicName    string
	Extensions    []ConfigExtension
}

// ConfigList is a serialized ECHConfigList, its two-byte length prefix
// included: the value of the HTTPS record's ech parameter (RFC 9848) and of
// [tls.Config.EncryptedClientHelloConfigList].
//
//	ECHConfig ECHConfigList<4..2^16-1>;
type ConfigList []byte

// ParseConfig parses one serialized ECHConfig (version, length and contents)
// and checks its wire rules: every length bound of RFC 9849, Section 4, and no
// duplicate extension types. It does not judge the public name or the
// algorithms; see [Config.Validate]. An ECHConfig of another version gives an
// error wrapping [ErrUnsupportedVersion].
func ParseConfig(b []byte) (*Config, error) {
	s := cryptobyte.String(b)
	var version uint16
	var contents cryptobyte.String
	if !s.ReadUint16(&version) || !s.ReadUint16LengthPrefixed(&contents) || !s.Empty() {
		return nil, fmt.Errorf("%w: bad length", ErrMalformedConfig)
	}
	if version != VersionECH {
		return nil, fmt.Errorf("%w: 0x%04x", ErrUnsupportedVersion, version)
	}
	return parseConfigContents(contents)
}

func parseConfigContents(s cryptobyte.String) (*Config, error) {
	c := new(Config)
	var kem uint16
	var pub, suites, name, exts cryptobyte.String
	if !s.ReadUint8(&c.ConfigID) || !s.ReadUint16(&kem) ||
		!s.ReadUint16LengthPrefixed(&pub) || !s.ReadUint16LengthPrefixed(&suites) ||
		!s.ReadUint8(&c.MaxNameLength) || !s.ReadUint8LengthPrefixed(&name) ||
		!s.ReadUint16LengthPrefixed(&exts) || !s.Empty() {
		return nil, fmt.Errorf("%w: truncated or trailing data", ErrMalformedConfig)
	}
	c.KEM = KEMID(kem)
	// opaque HpkePublicKey<1..2^16-1>;
	if len(pub) == 0 {
		return nil, fmt.Errorf("%w: empty public_key", ErrMalformedConfig)
	}
	c.PublicKey = pub
	// HpkeSymmetricCipherSuite cipher_suites<4..2^16-4>;
	if len(suites) == 0 || len(suites)%4 != 0 {
		return nil, fmt.Errorf("%w: cipher_suites length %d", ErrMalformedConfig, len(suites))
	}
	c.CipherSuites = make([]CipherSuite, 0, len(suites)/4)
	for !suites.Empty() {
		var kdf, aead uint16
		suites.ReadUint16(&kdf)
		suites.ReadUint16(&aead)
		c.CipherSuites = append(c.CipherSuites, CipherSuite{KDFID(kdf), AEADID(aead)})
	}
	// opaque public_name<1..255>;
	if len(name) == 0 {
		return nil, fmt.Errorf("%w: empty public_name", ErrMalformedConfig)
	}
	c.PublicName = string(name)
	for !exts.Empty() {
		var e ConfigExtension
		var data cryptobyte.String
		if !exts.ReadUint16(&e.Type) || !exts.ReadUint16LengthPrefixed(&data) {
			return nil, fmt.Errorf("%w: truncated extension", ErrMalformedConfig)
		}
		e.Data = data
		c.Extensions = append(c.Extensions, e)
	}
	if t, ok := duplicateExtension(c.Extensions); ok {
		return nil, fmt.Errorf("%w: duplicate extension 0x%04x", ErrMalformedConfig, t)
	}
	return c, nil
}

// Marshal returns the serialized ECHConfig. It checks the same wire rules as
// [ParseConfig], so Marshal of a parsed config returns the parsed bytes.
func (c *Config) Marshal() ([]byte, error) {
	return c.appendTo(nil)
}

func (c *Config) appendTo(buf []byte) ([]byte, error) {
	if err := c.checkWire(); err != nil {
		return nil, err
	}
	b := cryptobyte.NewBuilder(buf)
	b.AddUint16(VersionECH)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint8(c.ConfigID)
		b.AddUint16(uint16(c.KEM))
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(c.PublicKey) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			for _, cs := range c.CipherSuites {
				b.AddUint16(uint16(cs.KDF))
				b.AddUint16(uint16(cs.AEAD))
			}
		})
		b.AddUint8(c.MaxNameLength)
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(c.PublicName)) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			for _, e := range c.Extensions {
				b.AddUint16(e.Type)
				b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e.Data) })
			}
		})
	})
	out, err := b.Bytes()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformedConfig, err)
	}
	return out, nil
}

func (c *Config) checkWire() error {
	switch {
	case len(c.PublicKey) == 0 || len(c.PublicKey) > 0xffff:
		return fmt.Errorf("%w: public_key length %d", ErrMalformedConfig, len(c.PublicKey))
	case len(c.CipherSuites) == 0 || len(c.CipherSuites) > 0xfffc/4: // cipher_suites<4..2^16-4>
		return fmt.Errorf("%w: %d cipher suites", ErrMalformedConfig, len(c.CipherSuites))
	case len(c.PublicName) == 0 || len(c.PublicName) > 255:
		return fmt.Errorf("%w: public_name length %d", ErrMalformedConfig, len(c.PublicName))
	}
	if t, ok := duplicateExtension(c.Extensions); ok {
		return fmt.Errorf("%w: duplicate extension 0x%04x", ErrMalformedConfig, t)
	}
	return nil
}

// duplicateExtension returns the first extension type that exts holds twice,
// in time linear in len(exts): a config from DNS may hold thousands of
// extensions. RFC 9849, Section 4.2: extensions follow the TLS rule, at
// most one of each type.
func duplicateExtension(exts []ConfigExtension) (uint16, bool) {
	if len(exts) < 2 {
		return 0, false
	}
	var seen extensionSet
	for _, e := range exts {
		if seen.add(e.Type) {
			return e.Type, true
		}
	}
	return 0, false
}

// MandatoryExtensions returns the types of the extensions in c whose high bit
// is set. A client ignores a config with a mandatory extension it does not
// know (RFC 9849, Section 4.2); this package knows none, so a server should
// refuse to publish such a config unless its clients do.
func (c *Config) MandatoryExtensions() []uint16 {
	var out []uint16
	for _, e := range c.Extensions {
		if e.Mandatory() {
			out = append(out, e.Type)
		}
	}
	return out
}

// Validate reports whether c is a config a client would use: a valid public
// name (see [ValidPublicName]), a supported KEM with a public key of the
// right form, and at least one supported cipher suite. It does not refuse
// mandatory extensions; see [Config.MandatoryExtensions].
func (c *Config) Validate() error {
	if err := c.checkWire(); err != nil {
		return err
	}
	if err := ValidPublicName(c.PublicName); err != nil {
		return err
	}
	if !c.KEM.Supported() {
		return fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, c.KEM)
	}
	if !validPublicKey(c.KEM, c.PublicKey) {
		return fmt.Errorf("%w: public_key is not a valid %v key", ErrMalformedConfig, c.KEM)
	}
	if !slices.ContainsFunc(c.CipherSuites, CipherSuite.Supported) {
		return fmt.Errorf("%w: no supported cipher suite", ErrUnsupportedAlgorithm)
	}
	return nil
}

// supportsSuite reports whether c lists cs.
func (c *Config) supportsSuite(cs CipherSuite) bool {
	return slices.Contains(c.CipherSuites, cs)
}

// String describes c on one line, for logs and tools.
func (c *Config) String() string {
	suites := make([]string, len(c.CipherSuites))
	for i, cs := range c.CipherSuites {
		suites[i] = cs.String()
	}
	return fmt.Sprintf("config_id=%d kem=%v suites=[%s] public_name=%q max_name_length=%d extensions=%d",
		c.ConfigID, c.KEM, strings.Join(suites, " "), c.PublicName, c.MaxNameLength, len(c.Extensions))
}

// ValidPublicName reports whether name may be an ECHConfig public_name: a
// dot-separated sequence of LDH labels (RFC 5890, Section 2.3.1) of at most
// 255 bytes, with no leading or trailing dot, whose last label is not all
// digits nor "0x" followed by hex digits, so it cannot be read as an IPv4
// address (RFC 9849, Section 4).
func ValidPublicName(name string) error {
	if len(name) == 0 || len(name) > 255 {
		return fmt.Errorf("%w: length %d", ErrInvalidPublicName, len(name))
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if len(l) == 0 || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("%w: bad label in %q", ErrInvalidPublicName, name)
		}
		for i := 0; i < len(l); i++ {
			ch := l[i]
			if !('a' <= ch && ch <= 'z' || 'A' <= ch && ch <= 'Z' || '0' <= ch && ch <= '9' || ch == '-') {
				return fmt.Errorf("%w: bad character in %q", ErrInvalidPublicName, name)
			}
		}
	}
	last := labels[len(labels)-1]
	if strings.Trim(last, "0123456789") == "" {
		return fmt.Errorf("%w: %q is an IP address", ErrInvalidPublicName, name)
	}
	if len(last) >= 2 && last[0] == '0' && (last[1] == 'x' || last[1] == 'X') &&
		strings.Trim(last[2:], "0123456789abcdefABCDEF") == "" {
		return fmt.Errorf("%w: %q is an IP address", ErrInvalidPublicName, name)
	}
	return nil
}

// ParseConfigList parses a serialized ECHConfigList. Configs of a version
// other than 0xfe0d and configs whose KEM this package does not implement are
// skipped, as a client skips them (RFC 9849, Section 4); the result may be
// empty. A malformed list gives an error wrapping [ErrMalformedConfig].
func ParseConfigList(b []byte) ([]*Config, error) {
	s := cryptobyte.String(b)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() {
		return nil, fmt.Errorf("%w: bad ECHConfigList length", ErrMalformedConfig)
	}
	// ECHConfig ECHConfigList<4..2^16-1>;
	if len(list) < 4 {
		return nil, fmt.Errorf("%w: ECHConfigList shorter than 4 bytes", ErrMalformedConfig)
	}
	var configs []*Config
	for !list.Empty() {
		var version uint16
		var contents cryptobyte.String
		if !list.ReadUint16(&version) || !list.ReadUint16LengthPrefixed(&contents) {
			return nil, fmt.Errorf("%w: truncated ECHConfig", ErrMalformedConfig)
		}
		if version != VersionECH {
			continue // RFC 9849, Section 4: skip unknown versions
		}
		c, err := parseConfigContents(contents)
		if err != nil {
			return nil, err
		}
		if !c.KEM.Supported() {
			continue // a client skips configs it cannot use
		}
		configs = append(configs, c)
	}
	return configs, nil
}

// MarshalConfigList serializes configs, in order of preference, as an
// ECHConfigList.
func MarshalConfigList(configs ...*Config) (ConfigList, error) {
	if len(configs) == 0 {
		return nil, fmt.Errorf("%w: empty ECHConfigList", ErrMalformedConfig)
	}
	out := []byte{0, 0}
	for _, c := range configs {
		if c == nil {
			return nil, fmt.Errorf("%w: nil Config", ErrMalformedConfig)
		}
		var err error
		if out, err = c.appendTo(out); err != nil {
			return nil, err
		}
	}
	if len(out)-2 > 0xffff {
		return nil, fmt.Errorf("%w: ECHConfigList longer than 65535 bytes", ErrMalformedConfig)
	}
	out[0], out[1] = byte((len(out)-2)>>8), byte(len(out)-2)
	return out, nil
}

// configListFromRaw builds an ECHConfigList from serialized ECHConfigs.
func configListFromRaw(raw [][]byte) (ConfigList, error) {
	n := 0
	for _, r := range raw {
		n += len(r)
	}
	if n == 0 || n > 0xffff {
		return nil, fmt.Errorf("%w: ECHConfigList length %d", ErrMalformedConfig, n)
	}
	out := make([]byte, 2, 2+n)
	out[0], out[1] = byte(n>>8), byte(n)
	for _, r := range raw {
		out = append(out, r...)
	}
	return out, nil
}

// Configs parses l; see [ParseConfigList].
func (l ConfigList) Configs() ([]*Config, error) { return ParseConfigList(l) }

// String returns l in standard base64, as the HTTPS record's ech parameter
// carries it (RFC 9848, Section 3).
func (l ConfigList) String() string { return base64.StdEncoding.EncodeToString(l) }

// ParseConfigListBase64 decodes the base64 form of an ECHConfigList (the
// HTTPS record's ech value, or a file holding it), ignoring surrounding
// white space, and checks that it parses.
func ParseConfigListBase64(s string) (ConfigList, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("%w: bad base64", ErrMalformedConfig)
	}
	if _, err := ParseConfigList(b); err != nil {
		return nil, err
	}
	return b, nil
}
