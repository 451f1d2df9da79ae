package echtest

import (
	"crypto/tls"

	"github.com/echkit/ech"
)

// DefaultPublicName is the public name of a [Server]'s key unless
// [WithPublicName] or [WithKeySet] says otherwise.
const DefaultPublicName = "public.example"

// A ServerOption configures [NewServer] and [NewPassthroughServer].
type ServerOption func(*serverOptions)

type serverOptions struct {
	publicName string
	keys       *ech.KeySet
	ca         *CA
	backend    []func(*tls.Config)
	connOpts   []ech.Option
}

// WithPublicName sets the public name of the key the server generates. It
// has no effect with [WithKeySet].
func WithPublicName(name string) ServerOption {
	return func(o *serverOptions) { o.publicName = name }
}

// WithKeySet makes the server use ks instead of a fresh key set, for keys
// made with [ech.GenerateKey], or for a key set the test rotates. The
// server's public name is then the public_name of the first key in ks.
func WithKeySet(ks *ech.KeySet) ServerOption {
	return func(o *serverOptions) { o.keys = ks }
}

// WithCA makes the server's certificates come from ca instead of a fresh
// CA, so that a test can make a backend or a client before the server.
func WithCA(ca *CA) ServerOption {
	return func(o *serverOptions) { o.ca = ca }
}

// WithBackendConfig makes f adjust the configuration [Server.BackendConfig]
// returns, with which a [Handler] server completes every handshake: to set
// NextProtos, to force a HelloRetryRequest with CurvePreferences, to ask
// for client certificates. Several of these options apply in order.
func WithBackendConfig(f func(*tls.Config)) ServerOption {
	return func(o *serverOptions) { o.backend = append(o.backend, f) }
}

// WithConnOptions passes opts to [ech.NewConn] for every connection, after
// the server's own [ech.WithKeySet] and [ech.WithHandshakeTimeout]: for
// example [ech.WithLogger] or [ech.WithPublicNameCheck].
func WithConnOptions(opts ...ech.Option) ServerOption {
	return func(o *serverOptions) { o.connOpts = append(o.connOpts, opts...) }
}
