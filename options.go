package ech

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"time"
)

// DefaultMaxHelloSize is the largest ClientHello [NewConn] accepts unless
// [WithMaxHelloSize] says otherwise.
const DefaultMaxHelloSize = 64 << 10

// DefaultHandshakeTimeout bounds [NewConn] when its context has no deadline.
const DefaultHandshakeTimeout = 10 * time.Second

// An Option configures [NewConn].
type Option func(*options)

type options struct {
	keySet          *KeySet
	keys            []Key
	logger          *slog.Logger
	maxHelloSize    int
	timeout         time.Duration
	checkPublicName bool
}

func defaultOptions() options {
	return options{maxHelloSize: DefaultMaxHelloSize, timeout: DefaultHandshakeTimeout}
}

// WithKeys gives the keys for one connection. Of them, [NewConn] parses
// only the keys whose config_id and cipher suites match the client's ECH,
// on every call, so a broken key is reported only by a hello that names
// it; a server should check and parse its keys once with [NewKeySet] and
// use [WithKeySet]. Keys given by both options are all tried, those of the
// set first.
func WithKeys(keys ...Key) Option {
	return func(o *options) { o.keys = append(o.keys, keys...) }
}

// WithKeySet gives the server's parsed keys. The set may be changed (see
// [KeySet.Rotate]) while connections are accepted; each connection uses the
// keys current when its ClientHello arrives.
func WithKeySet(ks *KeySet) Option {
	return func(o *options) { o.keySet = ks }
}

// WithLogger makes [NewConn] log its decisions at debug level and its
// refusals at info level. The debug lines hold the client's address and the
// inner server name, which ECH hides from the network: keep such logs as
// access logs. No key material is logged. By default nothing is logged.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithMaxHelloSize sets the largest ClientHello accepted, in bytes of the
// handshake message; larger ones are refused with [ErrHelloTooLarge]. The
// default is [DefaultMaxHelloSize]; n is capped at 2^24-1.
func WithMaxHelloSize(n int) Option {
	return func(o *options) { o.maxHelloSize = min(max(n, handshakeHeaderLen), 1<<24-1) }
}

// WithHandshakeTimeout bounds the reading of the ClientHello when the
// context given to [NewConn] has no deadline, and, when ECH was accepted,
// the wait for a second ClientHello after a HelloRetryRequest: the
// timeout runs from the call of NewConn. The default is
// [DefaultHandshakeTimeout]; zero or less means no bound but the context.
func WithHandshakeTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithPublicNameCheck makes [NewConn] refuse, with illegal_parameter, an
// outer ClientHello whose server_name is not the public_name of the config
// the client used (a MAY of RFC 9849, Section 7.1). It is off by default.
func WithPublicNameCheck(on bool) Option {
	return func(o *options) { o.checkPublicName = on }
}

// candidates appends to dst the keys that may decrypt a hello naming
// config_id id and suite cs (RFC 9849, Section 7.1), at most
// MaxKeysPerHello: those of the key set, then those of WithKeys, which are
// parsed here, and only when they match.
func (o *options) candidates(dst []*parsedKey, id uint8, cs CipherSuite) ([]*parsedKey, error) {
	if o.keySet != nil {
		dst = o.keySet.table().candidates(dst, id, cs)
	}
	for i, k := range o.keys {
		if len(dst) == MaxKeysPerHello {
			break
		}
		// ECHConfig: uint16 version, uint16 length, then the config_id of
		// its HpkeKeyConfig (RFC 9849, Section 4): skip other ids unparsed.
		if len(k.Config) < 5 || binary.BigEndian.Uint16(k.Config) != VersionECH || k.Config[4] != id {
			continue
		}
		c, err := ParseConfig(k.Config)
		if err != nil {
			return nil, fmt.Errorf("%w (key %d)", err, i)
		}
		if !c.supportsSuite(cs) {
			continue
		}
		pk, err := parseKey(k)
		if err != nil {
			return nil, fmt.Errorf("%w (key %d)", err, i)
		}
		dst = append(dst, pk)
	}
	return dst, nil
}
