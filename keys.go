package ech

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech/internal/boundedfile"
)

// Key is an ECH key: one serialized ECHConfig, its HPKE private key encoded
// as RFC 9180 SerializePrivateKey, and whether the server sends the config
// to clients as a retry config. It is [tls.EncryptedClientHelloKey], so keys
// move between this package and crypto/tls unchanged, and a []Key is the
// value of [tls.Config.EncryptedClientHelloKeys].
type Key = tls.EncryptedClientHelloKey

// DefaultCipherSuites are the suites [GenerateKey] offers when none are
// given: the mandatory-to-implement HKDF-SHA256/AES-128-GCM (RFC 9849,
// Section 9) first, then AES-256-GCM and ChaCha20-Poly1305.
var DefaultCipherSuites = []CipherSuite{
	{KDFHKDFSHA256, AEADAES128GCM},
	{KDFHKDFSHA256, AEADAES256GCM},
	{KDFHKDFSHA256, AEADChaCha20Poly1305},
}

// KeyOptions are the choices for [GenerateKey]. The zero value gives an
// X25519 key with [DefaultCipherSuites] and a random config_id.
type KeyOptions struct {
	// KEM is the HPKE KEM; zero means KEMX25519.
	KEM KEMID
	// CipherSuites lists the suites clients may use, most preferred first;
	// nil means DefaultCipherSuites.
	CipherSuites []CipherSuite
	// MaxNameLength is the maximum_name_length clients pad the inner
	// server_name to; zero lets clients pick.
	MaxNameLength uint8
	// ConfigID is the config_id. Zero picks a random non-zero value that is
	// not in AvoidConfigIDs (RFC 9849, Section 4: unique within the
	// server's keys, chosen at random).
	ConfigID uint8
	// AvoidConfigIDs are config_ids already in use, such as
	// [KeySet.ConfigIDs].
	AvoidConfigIDs []uint8
	// Extensions are ECHConfig extensions to include.
	Extensions []ConfigExtension
	// NoRetry makes a key whose config is not sent as a retry config nor
	// published by [KeySet.ConfigList] (Key.SendAsRetry false): a key
	// kept only to decrypt for clients that still have its config. By
	// default a new key is sent as a retry config.
	NoRetry bool
	// Rand is the source of randomness; nil means crypto/rand.
	Rand io.Reader
}

// GenerateKey returns a new ECH key for publicName. It refuses a public name
// that [ValidPublicName] rejects.
func GenerateKey(publicName string, opts *KeyOptions) (Key, error) {
	var o KeyOptions
	if opts != nil {
		o = *opts
	}
	if o.KEM == 0 {
		o.KEM = KEMX25519
	}
	if o.CipherSuites == nil {
		o.CipherSuites = DefaultCipherSuites
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	if err := ValidPublicName(publicName); err != nil {
		return Key{}, err
	}
	for _, cs := range o.CipherSuites {
		if !cs.Supported() {
			return Key{}, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, cs)
		}
	}
	id := o.ConfigID
	if id == 0 {
		var err error
		if id, err = randomConfigID(o.Rand, o.AvoidConfigIDs); err != nil {
			return Key{}, err
		}
	}
	priv, pub, err := generateKEMKey(o.KEM, o.Rand)
	if err != nil {
		return Key{}, err
	}
	c := &Config{
		ConfigID:      id,
		KEM:           o.KEM,
		PublicKey:     pub,
		CipherSuites:  o.CipherSuites,
		MaxNameLength: o.MaxNameLength,
		PublicName:    publicName,
		Extensions:    o.Extensions,
	}
	raw, err := c.Marshal()
	if err != nil {
		return Key{}, err
	}
	return Key{Config: raw, PrivateKey: priv, SendAsRetry: !o.NoRetry}, nil
}

// randomConfigID picks a config_id at random among the non-zero ones not in
// avoid. It reads two bytes from rnd once, so that a broken source of
// randomness cannot make it loop.
func randomConfigID(rnd io.Reader, avoid []uint8) (uint8, error) {
	var used [256]bool
	used[0] = true // zero asks GenerateKey for a random config_id
	for _, id := range avoid {
		used[id] = true
	}
	free := make([]uint8, 0, 255)
	for id := range used {
		if !used[id] {
			free = append(free, uint8(id))
		}
	}
	if len(free) == 0 {
		return 0, errors.New("ech: no free config_id")
	}
	var b [2]byte
	if _, err := io.ReadFull(rnd, b[:]); err != nil {
		return 0, fmt.Errorf("ech: reading randomness: %w", err)
	}
	// NOTE: the modulo bias (at most 255 in 65536) does not matter: a
	// config_id is public and only needs to differ from the others.
	return free[(int(b[0])<<8|int(b[1]))%len(free)], nil
}

// KeyConfig parses and checks k: its config must be a valid ECHConfig (see
// [Config.Validate]) and its private key must be the one for the config's
// public key.
func KeyConfig(k Key) (*Config, error) {
	pk, err := parseKey(k)
	if err != nil {
		return nil, err
	}
	return pk.config, nil
}

// parsedKey is a key ready for decryption: parsed once, used by many
// connections.
type parsedKey struct {
	key    Key
	config *Config
	sk     *kemPrivateKey
	kscs   []suiteContext // per supported suite of the config
}

// suiteContext is the HPKE key schedule context of a key for one suite,
// computed once.
type suiteContext struct {
	suite CipherSuite
	ksc   []byte
}

// recipient sets up the HPKE context for a client's enc and suite.
func (pk *parsedKey) recipient(cs CipherSuite, enc []byte) (*hpkeRecipient, error) {
	for _, sc := range pk.kscs {
		if sc.suite == cs {
			return newRecipientContext(pk.sk, cs, enc, sc.ksc)
		}
	}
	return nil, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, cs)
}

func parseKey(k Key) (*parsedKey, error) {
	// NOTE: clone the caller's slices: the parsed config aliases k.Config,
	// and a caller that reuses its buffers must not change a KeySet.
	k.Config, k.PrivateKey = slices.Clone(k.Config), slices.Clone(k.PrivateKey)
	c, err := ParseConfig(k.Config)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	sk, err := parseKEMPrivateKey(c.KEM, k.PrivateKey)
	if err != nil {
		return nil, err
	}
	if string(sk.pub) != string(c.PublicKey) {
		return nil, fmt.Errorf("%w: private key does not match config_id %d", ErrInvalidKey, c.ConfigID)
	}
	info := make([]byte, 0, len(hpkeInfoPrefix)+len(k.Config))
	info = append(append(info, hpkeInfoPrefix...), k.Config...)
	pk := &parsedKey{key: k, config: c, sk: sk}
	for _, cs := range c.CipherSuites {
		if cs.Supported() {
			pk.kscs = append(pk.kscs, suiteContext{cs, keyScheduleContext(c.KEM, cs, info)})
		}
	}
	return pk, nil
}

// hpkeInfoPrefix is the HPKE info prefix of RFC 9849, Section 6.1.
const hpkeInfoPrefix = "tls ech\x00"

// MaxKeysPerHello is the most keys [NewConn] tries on one ClientHello. Keys
// are candidates when their config_id is the one the client sent and their
// config lists the client's cipher suite; with unique config_ids (what
// [GenerateKey] picks given [KeyOptions.AvoidConfigIDs]) there is one. A
// [KeySet] does not refuse duplicate config_ids. The cap keeps the HPKE
// work an attacker can cause per connection small.
const MaxKeysPerHello = 4

// KeySet is a server's ECH keys, parsed once and shared by all connections.
// It is safe for concurrent use. Its keys can be replaced at any time
// (for rotation) without disturbing connections in flight: a connection uses
// the keys that were current when its ClientHello arrived.
type KeySet struct {
	mu  sync.Mutex // serializes writers
	cur atomic.Pointer[keyTable]
}

// keyTable is an immutable snapshot of a KeySet.
type keyTable struct {
	keys []*parsedKey
	byID [256][]*parsedKey
	// retry holds the configs sent as retry configs, without private keys,
	// for [KeySet.PublicNameConfig].
	retry []tls.EncryptedClientHelloKey
}

// NewKeySet parses keys into a KeySet. Every key must pass [KeyConfig]. An
// empty set is allowed: it decrypts nothing until keys are added.
func NewKeySet(keys ...Key) (*KeySet, error) {
	ks := new(KeySet)
	if err := ks.Replace(keys...); err != nil {
		return nil, err
	}
	return ks, nil
}

func newKeyTable(parsed []*parsedKey) *keyTable {
	t := &keyTable{keys: parsed}
	marked := false
	for _, pk := range parsed {
		t.byID[pk.config.ConfigID] = append(t.byID[pk.config.ConfigID], pk)
		marked = marked || pk.key.SendAsRetry
	}
	for _, pk := range parsed {
		if pk.key.SendAsRetry || !marked {
			t.retry = append(t.retry, tls.EncryptedClientHelloKey{Config: pk.key.Config, SendAsRetry: true})
		}
	}
	return t
}

func parseKeys(keys []Key) ([]*parsedKey, error) {
	out := make([]*parsedKey, 0, len(keys))
	for i, k := range keys {
		pk, err := parseKey(k)
		if err != nil {
			return nil, fmt.Errorf("%w (key %d)", err, i)
		}
		out = append(out, pk)
	}
	return out, nil
}

func (ks *KeySet) table() *keyTable {
	if t := ks.cur.Load(); t != nil {
		return t
	}
	return &keyTable{}
}

// Replace makes keys the whole content of ks, atomically. On error ks is
// unchanged.
func (ks *KeySet) Replace(keys ...Key) error {
	parsed, err := parseKeys(keys)
	if err != nil {
		return err
	}
	ks.mu.Lock()
	defer ks.mu.Unlock()
	ks.cur.Store(newKeyTable(parsed))
	return nil
}

// Add adds keys to ks, after the keys it has. On error ks is unchanged.
func (ks *KeySet) Add(keys ...Key) error {
	parsed, err := parseKeys(keys)
	if err != nil {
		return err
	}
	ks.mu.Lock()
	defer ks.mu.Unlock()
	ks.cur.Store(newKeyTable(append(slices.Clone(ks.table().keys), parsed...)))
	return nil
}

// Remove drops every key whose config_id is id.
func (ks *KeySet) Remove(id uint8) {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	keys := slices.DeleteFunc(slices.Clone(ks.table().keys), func(pk *parsedKey) bool {
		return pk.config.ConfigID == id
	})
	ks.cur.Store(newKeyTable(keys))
}

// Rotate puts newKeys first, marked to be sent as retry configs, and keeps
// the keys ks had until then decrypting, no longer sent as retry configs,
// for grace; then they are removed. A key that an earlier Rotate retired
// is removed when the earlier of the two grace periods ends. Pick grace at
// least as long as the DNS TTL of the old config plus client caching time
// (RFC 9849, Section 10.10).
func (ks *KeySet) Rotate(grace time.Duration, newKeys ...Key) error {
	newKeys = slices.Clone(newKeys)
	for i := range newKeys {
		newKeys[i].SendAsRetry = true
	}
	parsed, err := parseKeys(newKeys)
	if err != nil {
		return err
	}
	ks.mu.Lock()
	defer ks.mu.Unlock()
	old := ks.table().keys
	retired := make([]*parsedKey, len(old))
	for i, pk := range old {
		if !pk.key.SendAsRetry {
			// NOTE: keep the same *parsedKey, so that the timer of an
			// earlier rotation that retired it still finds and removes it:
			// a second rotation does not extend an old key's life.
			retired[i] = pk
			continue
		}
		c := *pk
		c.key.SendAsRetry = false
		retired[i] = &c
	}
	ks.cur.Store(newKeyTable(append(parsed, retired...)))
	time.AfterFunc(grace, func() {
		ks.mu.Lock()
		defer ks.mu.Unlock()
		keys := slices.DeleteFunc(slices.Clone(ks.table().keys), func(pk *parsedKey) bool {
			return slices.Contains(retired, pk)
		})
		ks.cur.Store(newKeyTable(keys))
	})
	return nil
}

// Keys returns a copy of the keys in ks, in order. The caller may modify
// the copy.
func (ks *KeySet) Keys() []Key {
	t := ks.table()
	out := make([]Key, len(t.keys))
	for i, pk := range t.keys {
		out[i] = Key{
			Config:      slices.Clone(pk.key.Config),
			PrivateKey:  slices.Clone(pk.key.PrivateKey),
			SendAsRetry: pk.key.SendAsRetry,
		}
	}
	return out
}

// Len returns the number of keys in ks.
func (ks *KeySet) Len() int { return len(ks.table().keys) }

// ConfigIDs returns the config_ids in use in ks, for
// [KeyOptions.AvoidConfigIDs].
func (ks *KeySet) ConfigIDs() []uint8 {
	t := ks.table()
	out := make([]uint8, 0, len(t.keys))
	for _, pk := range t.keys {
		out = append(out, pk.config.ConfigID)
	}
	return out
}

// ConfigList returns the ECHConfigList to publish (in DNS, see
// [ConfigList.HTTPSRecord]) and to send as retry configs: the configs of
// the keys marked SendAsRetry, in order. If no key is marked, it returns
// the configs of all keys.
func (ks *KeySet) ConfigList() (ConfigList, error) {
	t := ks.table()
	var raw, all [][]byte
	for _, pk := range t.keys {
		all = append(all, pk.key.Config)
		if pk.key.SendAsRetry {
			raw = append(raw, pk.key.Config)
		}
	}
	if len(raw) == 0 {
		raw = all
	}
	if len(raw) == 0 {
		return nil, ErrNoKeys
	}
	return configListFromRaw(raw)
}

// PublicNameConfig returns a copy of base for the TLS server that completes
// the handshakes [NewConn] did not decrypt and that name the public name: a
// client whose config is stale, or one with no config at all. To a client
// that offered ECH it sends the configs of [KeySet.ConfigList] as retry
// configs (RFC 9849, Section 7.1) and it never decrypts: a crypto/tls server
// given the keys themselves would try every key on every ECH hello, whatever
// its config_id, after NewConn has already decided, costing one HPKE
// operation per key and accepting hellos NewConn rejected. The private keys
// never reach crypto/tls. The returned config follows later changes of ks.
//
// base may be nil. Its EncryptedClientHelloKeys and
// GetEncryptedClientHelloKeys are ignored; its GetConfigForClient, if any, is
// called first and the config it returns gets the retry configs.
func (ks *KeySet) PublicNameConfig(base *tls.Config) *tls.Config {
	cfg := base.Clone()
	if cfg == nil {
		cfg = new(tls.Config)
	}
	cfg.EncryptedClientHelloKeys = nil
	cfg.GetEncryptedClientHelloKeys = nil
	next := cfg.GetConfigForClient
	plain := cfg.Clone() // what a hello gets before the retry configs are added
	plain.GetConfigForClient = nil
	cfg.GetConfigForClient = func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		c := plain
		if next != nil {
			got, err := next(chi)
			if err != nil {
				return nil, err
			}
			if got != nil {
				c = got
			}
		}
		retry := ks.table().retry
		if len(retry) == 0 || !slices.Contains(chi.Extensions, extensionECH) {
			if c == plain && next == nil {
				return nil, nil
			}
			return c, nil
		}
		// crypto/tls reads the keys twice: before the handshake, to decrypt,
		// when this function has not run yet and the config has none; and
		// for the EncryptedExtensions, to send the retry configs.
		c = c.Clone()
		c.GetConfigForClient = nil
		c.GetEncryptedClientHelloKeys = nil
		c.EncryptedClientHelloKeys = retry
		return c, nil
	}
	return cfg
}

// GetEncryptedClientHelloKeys returns the current keys of ks. It has the
// signature of [tls.Config.GetEncryptedClientHelloKeys], so a tls.Config
// follows rotation:
//
//	cfg.GetEncryptedClientHelloKeys = ks.GetEncryptedClientHelloKeys
func (ks *KeySet) GetEncryptedClientHelloKeys(*tls.ClientHelloInfo) ([]tls.EncryptedClientHelloKey, error) {
	return ks.Keys(), nil
}

// candidates appends to dst the keys that may decrypt a hello with this
// config_id and suite, at most MaxKeysPerHello of them.
func (t *keyTable) candidates(dst []*parsedKey, id uint8, cs CipherSuite) []*parsedKey {
	for _, pk := range t.byID[id] {
		if len(dst) == MaxKeysPerHello {
			break
		}
		if pk.config.supportsSuite(cs) {
			dst = append(dst, pk)
		}
	}
	return dst
}

// PEM block types of RFC 9934.
const (
	pemTypePrivateKey = "PRIVATE KEY"
	pemTypeECHConfig  = "ECHCONFIG"
)

// PEMFile is the content of an ECH PEM file (RFC 9934): an ECHConfigList and
// optionally the private key of one of its configs.
type PEMFile struct {
	// PrivateKey is the HPKE private key as SerializePrivateKey encodes it,
	// or nil when the file has no PRIVATE KEY block.
	PrivateKey []byte
	// ConfigList is the ECHCONFIG block.
	ConfigList ConfigList

	key Key // the key for PrivateKey, found while parsing
}

// ParsePEM parses an ECH PEM file: at most one PKCS#8 PRIVATE KEY block,
// then exactly one ECHCONFIG block (RFC 9934, Section 3). A private key must
// match one config in the list, and that key must pass [KeyConfig]. Keys of
// every KEM of this package are read: X25519, X448 and the NIST curves in
// their standard PKCS#8 forms (as OpenSSL writes them), X-Wing under its
// draft OID. Text before the first block is ignored (RFC 7468, Section 2);
// anything but white space after the last one is an error. Errors wrap
// [ErrMalformedPEM] or, for a private key that does not parse,
// [ErrInvalidKey].
func ParsePEM(data []byte) (*PEMFile, error) {
	f := new(PEMFile)
	var sawKey, sawConfig bool
	var der []byte
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		switch block.Type {
		case pemTypePrivateKey:
			if sawKey || sawConfig {
				return nil, fmt.Errorf("%w: PRIVATE KEY block repeated or after ECHCONFIG", ErrMalformedPEM)
			}
			sawKey, der = true, block.Bytes
		case pemTypeECHConfig:
			if sawConfig {
				return nil, fmt.Errorf("%w: more than one ECHCONFIG block", ErrMalformedPEM)
			}
			sawConfig = true
			if _, err := ParseConfigList(block.Bytes); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrMalformedPEM, err)
			}
			f.ConfigList = block.Bytes
		default:
			return nil, fmt.Errorf("%w: unexpected block %q", ErrMalformedPEM, block.Type)
		}
	}
	if !sawConfig {
		return nil, fmt.Errorf("%w: no ECHCONFIG block", ErrMalformedPEM)
	}
	if strings.TrimSpace(string(data)) != "" {
		return nil, fmt.Errorf("%w: data after the last block", ErrMalformedPEM)
	}
	if !sawKey {
		return f, nil
	}
	kem, priv, err := parsePKCS8(der)
	if err != nil {
		return nil, err
	}
	sk, err := parseKEMPrivateKey(kem, priv)
	if err != nil {
		return nil, err
	}
	configs, _ := ParseConfigList(f.ConfigList)
	for _, c := range configs {
		if c.KEM == kem && string(c.PublicKey) == string(sk.pub) {
			raw, err := c.Marshal()
			if err != nil {
				return nil, err
			}
			k := Key{Config: raw, PrivateKey: priv, SendAsRetry: true}
			// The key must be usable, so that LoadKeyDir names the file of
			// a key that NewKeySet would refuse.
			if _, err := parseKey(k); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrMalformedPEM, err)
			}
			f.PrivateKey, f.key = priv, k
			return f, nil
		}
	}
	return nil, fmt.Errorf("%w: private key matches no config in the file", ErrMalformedPEM)
}

// Key returns the key the file holds, marked SendAsRetry, or an error
// wrapping [ErrNoKeys] if the file has no private key.
func (f *PEMFile) Key() (Key, error) {
	if f.key.PrivateKey == nil {
		return Key{}, fmt.Errorf("%w: PEM file has no private key", ErrNoKeys)
	}
	return f.key, nil
}

// MarshalPEM writes k as an ECH PEM file (RFC 9934): the private key as
// PKCS#8, then an ECHConfigList holding k's config.
func MarshalPEM(k Key) ([]byte, error) {
	pk, err := parseKey(k)
	if err != nil {
		return nil, err
	}
	der, err := marshalPKCS8(pk.config.KEM, k.PrivateKey)
	if err != nil {
		return nil, err
	}
	list, err := configListFromRaw([][]byte{k.Config})
	if err != nil {
		return nil, err
	}
	out := pem.EncodeToMemory(&pem.Block{Type: pemTypePrivateKey, Bytes: der})
	return append(out, pem.EncodeToMemory(&pem.Block{Type: pemTypeECHConfig, Bytes: list})...), nil
}

// MaxKeyFileSize is the largest file [LoadKeyDir] reads. An RFC 9934 file
// holds one private key and one ECHConfigList of at most 64 KiB, which
// base64 and PEM lines make about 90 KiB.
const MaxKeyFileSize = 256 << 10

// LoadKeyDir reads every ECH PEM file in dir whose name ends in ".ech" or
// ".pem" (the names OpenSSL-based servers load), in name order, and returns
// their keys. Files without a private key are skipped, and so are entries
// that are not regular files (directories, sockets, devices, FIFOs; a
// symbolic link counts as what it points to, as in a Kubernetes Secret
// volume). An unreadable or malformed file, or one larger than
// [MaxKeyFileSize], is an error naming the file.
func LoadKeyDir(dir string) ([]Key, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("ech: %w", err)
	}
	var names []string
	for _, e := range entries {
		if n := e.Name(); strings.HasSuffix(n, ".ech") || strings.HasSuffix(n, ".pem") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var keys []Key
	for _, n := range names {
		data, err := boundedfile.Read(filepath.Join(dir, n), MaxKeyFileSize)
		if errors.Is(err, boundedfile.ErrNotRegular) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("ech: %w (file %s)", err, n)
		}
		f, err := ParsePEM(data)
		if err != nil {
			return nil, fmt.Errorf("%w (file %s)", err, n)
		}
		if k, err := f.Key(); err == nil {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// OIDs of the PKCS#8 private key algorithms.
var (
	oidX25519        = asn1.ObjectIdentifier{1, 3, 101, 110} // RFC 8410
	oidX448          = asn1.ObjectIdentifier{1, 3, 101, 111} // RFC 8410
	oidECPublicKey   = asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}
	oidXWing         = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 62253, 25722} // draft-connolly-cfrg-xwing-kem
	curveKEMs        = map[ecdh.Curve]KEMID{ecdh.P256(): KEMP256, ecdh.P384(): KEMP384, ecdh.P521(): KEMP521, ecdh.X25519(): KEMX25519}
	errUnknownPKCS8  = fmt.Errorf("%w: unsupported PKCS#8 key algorithm", ErrInvalidKey)
	errMalformedPKCS = fmt.Errorf("%w: malformed PKCS#8", ErrInvalidKey)
)

// pkcs8 is RFC 5208's PrivateKeyInfo, without the optional attributes.
type pkcs8 struct {
	Version    int
	Algo       pkix.AlgorithmIdentifier
	PrivateKey []byte
}

// parsePKCS8 returns the KEM and SerializePrivateKey encoding of a PKCS#8
// private key.
func parsePKCS8(der []byte) (KEMID, []byte, error) {
	var info pkcs8
	if rest, err := asn1.Unmarshal(der, &info); err != nil || len(rest) != 0 {
		return 0, nil, errMalformedPKCS
	}
	switch {
	case info.Algo.Algorithm.Equal(oidX448), info.Algo.Algorithm.Equal(oidXWing):
		// NOTE: crypto/x509 knows neither; both wrap the raw key in an
		// OCTET STRING, as RFC 8410 does for X25519.
		var raw []byte
		if rest, err := asn1.Unmarshal(info.PrivateKey, &raw); err != nil || len(rest) != 0 {
			return 0, nil, errMalformedPKCS
		}
		if info.Algo.Algorithm.Equal(oidX448) {
			return KEMX448, raw, nil
		}
		return KEMXWing, raw, nil
	case info.Algo.Algorithm.Equal(oidX25519), info.Algo.Algorithm.Equal(oidECPublicKey):
		k, err := x509.ParsePKCS8PrivateKey(der)
		if err != nil {
			return 0, nil, errMalformedPKCS
		}
		var ek *ecdh.PrivateKey
		switch k := k.(type) {
		case *ecdh.PrivateKey:
			ek = k
		case *ecdsa.PrivateKey:
			if ek, err = k.ECDH(); err != nil {
				return 0, nil, errUnknownPKCS8
			}
		default:
			return 0, nil, errUnknownPKCS8
		}
		kem, ok := curveKEMs[ek.Curve()]
		if !ok {
			return 0, nil, errUnknownPKCS8
		}
		return kem, ek.Bytes(), nil
	}
	return 0, nil, errUnknownPKCS8
}

// marshalPKCS8 encodes a SerializePrivateKey encoding as PKCS#8.
func marshalPKCS8(kem KEMID, priv []byte) ([]byte, error) {
	var curve ecdh.Curve
	switch kem {
	case KEMX448, KEMXWing:
		oid := oidX448
		if kem == KEMXWing {
			oid = oidXWing
		}
		inner, err := asn1.Marshal(priv)
		if err != nil {
			return nil, err
		}
		return asn1.Marshal(pkcs8{Algo: pkix.AlgorithmIdentifier{Algorithm: oid}, PrivateKey: inner})
	case KEMX25519:
		curve = ecdh.X25519()
	case KEMP256:
		curve = ecdh.P256()
	case KEMP384:
		curve = ecdh.P384()
	case KEMP521:
		curve = ecdh.P521()
	default:
		return nil, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, kem)
	}
	k, err := curve.NewPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("%w: %v private key", ErrInvalidKey, kem)
	}
	return x509.MarshalPKCS8PrivateKey(k)
}

// HTTPSRecord returns a zone-file line publishing l for name in a DNS HTTPS
// record (RFC 9848, RFC 9460), such as
//
//	example.com. 3600 IN HTTPS 1 . ech="AEX+DQBB..."
//
// alpn, if given, is added as the record's alpn parameter.
func (l ConfigList) HTTPSRecord(name string, ttl time.Duration, alpn ...string) string {
	if !strings.HasSuffix(name, ".") {
		name += "."
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d IN HTTPS 1 .", name, int64(ttl/time.Second))
	if len(alpn) > 0 {
		fmt.Fprintf(&b, " alpn=%q", strings.Join(alpn, ","))
	}
	fmt.Fprintf(&b, " ech=%q", base64.StdEncoding.EncodeToString(l))
	return b.String()
}
