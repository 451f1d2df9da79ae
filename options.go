package ech

import (
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

// WithKeys gives the keys for one connection. They are parsed on every call
// of [NewConn]; a server should parse them once with [NewKeySet] and use
// [WithKeySet]. Keys given by both options are all tried.
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
// context given to [NewConn] has no deadline. The default is
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
