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
		"quic-go HTTP/3, ECH", "h3-backend", "rejected, retried: accepted", "not offered",
	} {
		assert.Contains(t, out.String(), row)
	}
	assert.NotContains(t, out.String(), "WRONG")
}

// TestFill checks that a row reads the router's log lines in any order, and
// that a wrong value makes the row wrong.
func TestFill(t *testing.T) {
	rejected := map[string]string{"route": "public", "ech": "rejected", "outer_sni": publicName}
	fetched := map[string]string{"route": "public", "ech": "not offered", "outer_sni": publicName}
	accepted := map[string]string{"route": "secret", "ech": "accepted", "outer_sni": publicName, "inner_sni": tlsName}
	w := want{publicName, tlsName, "rejected, retried: accepted", tlsBackend}
	for _, recs := range [][]map[string]string{{rejected, accepted}, {accepted, rejected}} {
		d := &demo{records: make(chan map[string]string, 2)}
		for _, m := range recs {
			d.records <- m
		}
		r := &row{want: w, got: want{backend: tlsBackend}}
		d.fill(r, 2)
		assert.True(t, r.ok(), "%+v", r)
	}
	for _, recs := range [][]map[string]string{{fetched, accepted}, {accepted, fetched}} {
		d := &demo{records: make(chan map[string]string, 2)}
		for _, m := range recs {
			d.records <- m
		}
		r := &row{want: want{publicName, tlsName, "accepted", tlsBackend}, got: want{backend: tlsBackend}}
		d.fill(r, 2)
		assert.True(t, r.ok(), "%+v", r)
	}

	d := &demo{records: make(chan map[string]string, 1)}
	d.records <- map[string]string{"route": "secret", "ech": "not offered", "outer_sni": tlsName}
	r := &row{want: want{publicName, tlsName, "accepted", tlsBackend}, got: want{backend: tlsBackend}}
	d.fill(r, 1)
	assert.False(t, r.ok(), "ECH not used: the row is wrong")
	assert.Equal(t, want{tlsName, "-", "not offered", tlsBackend}, r.got)
}
