package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDemo(t *testing.T) {
	var out strings.Builder
	code := run(&out)
	t.Log("\n" + out.String())
	require.Equal(t, 0, code)
	assert.Contains(t, out.String(), "ok: all")
	for _, row := range []string{
		"Go crypto/tls, ECH", "Go, stale ECH config", "Go, config from /.well-known/origin-svcb", "Go, no ECH",
		"rejected, retried: accepted", "not offered",
	} {
		assert.Contains(t, out.String(), row)
	}
	assert.NotContains(t, out.String(), "WRONG")
}
