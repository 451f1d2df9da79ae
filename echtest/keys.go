package echtest

import (
	"testing"

	"github.com/echkit/ech"
)

// NewKeySet returns a key set holding one fresh X25519 ECH key for
// publicName, with the default cipher suites and a random config_id, marked
// to be sent as a retry config. It fails tb if publicName is not a valid
// public name (see [ech.ValidPublicName]).
//
// For other KEMs or suites, make the keys with [ech.GenerateKey] and give
// them to a server with [WithKeySet].
func NewKeySet(tb testing.TB, publicName string) *ech.KeySet {
	tb.Helper()
	k, err := ech.GenerateKey(publicName, nil)
	if err != nil {
		tb.Fatalf("echtest: generating ECH key: %v", err)
	}
	k.SendAsRetry = true
	ks, err := ech.NewKeySet(k)
	if err != nil {
		tb.Fatalf("echtest: %v", err)
	}
	return ks
}
