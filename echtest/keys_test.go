package echtest_test

import (
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewKeySet(t *testing.T) {
	t.Parallel()
	ks := echtest.NewKeySet(t, "public.example")
	keys := ks.Keys()
	require.Len(t, keys, 1)
	assert.True(t, keys[0].SendAsRetry)
	c, err := ech.KeyConfig(keys[0])
	require.NoError(t, err)
	assert.Equal(t, "public.example", c.PublicName)
	assert.Equal(t, ech.KEMX25519, c.KEM)
	assert.NotEqual(t, keys[0].PrivateKey, echtest.NewKeySet(t, "public.example").Keys()[0].PrivateKey, "fresh keys")
}

func TestNewKeySetInvalidName(t *testing.T) {
	t.Parallel()
	assert.Panics(t, func() {
		runAsTest(func(t testing.TB) { echtest.NewKeySet(t, "not a name") })
	})
}
