package ech_test

import (
	"crypto/tls"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"path/filepath"
	"strings"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sentinels are the package's exported errors, by name.
var sentinels = map[string]error{
	"ErrDecodeError":          ech.ErrDecodeError,
	"ErrIllegalParameter":     ech.ErrIllegalParameter,
	"ErrMissingExtension":     ech.ErrMissingExtension,
	"ErrDecryptError":         ech.ErrDecryptError,
	"ErrUnexpectedMessage":    ech.ErrUnexpectedMessage,
	"ErrRecordOverflow":       ech.ErrRecordOverflow,
	"ErrHelloTooLarge":        ech.ErrHelloTooLarge,
	"ErrNotTLS":               ech.ErrNotTLS,
	"ErrMalformedConfig":      ech.ErrMalformedConfig,
	"ErrUnsupportedVersion":   ech.ErrUnsupportedVersion,
	"ErrInvalidPublicName":    ech.ErrInvalidPublicName,
	"ErrUnsupportedAlgorithm": ech.ErrUnsupportedAlgorithm,
	"ErrInvalidKey":           ech.ErrInvalidKey,
	"ErrMalformedPEM":         ech.ErrMalformedPEM,
	"ErrNoKeys":               ech.ErrNoKeys,
}

// TestSentinelsListed checks that sentinels lists every exported error
// variable of the package, so that the fuzzers' oracle knows them all.
func TestSentinelsListed(t *testing.T) {
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	var found []string
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.SkipObjectResolution)
		require.NoError(t, err)
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.VAR {
				continue
			}
			for _, spec := range g.Specs {
				for _, name := range spec.(*ast.ValueSpec).Names {
					if name.IsExported() && len(name.Name) > 3 && name.Name[:3] == "Err" {
						found = append(found, name.Name)
					}
				}
			}
		}
	}
	assert.NotEmpty(t, found)
	for _, name := range found {
		assert.Contains(t, sentinels, name, "sentinels lacks %s", name)
	}
	assert.Len(t, sentinels, len(found))
}

// checkError is the fuzzers' oracle for an error of NewConn or Conn.Read:
// it wraps an exported sentinel, or it is the end of the client's stream,
// and when the client was sent an alert it matches tls.AlertError.
func checkError(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return
	}
	var ae tls.AlertError
	for name, s := range sentinels {
		if errors.Is(err, s) {
			if name != "ErrNoKeys" {
				require.ErrorAs(t, err, &ae, "an error the client was alerted of")
			}
			return
		}
	}
	t.Fatalf("error wraps no sentinel: %v", err)
}

func TestHelloError(t *testing.T) {
	ks := echtest.NewKeySet(t, publicName)
	innerECH := baseOuter()
	innerECH.set(tECH, []byte{1}) // ECHClientHelloType inner, from a client
	badALPN := baseOuter()
	badALPN.remove(tECH)
	badALPN.set(tALPN, []byte{0, 5, 3, 'a'}) // a protocol list cut short
	tests := []struct {
		name      string
		in        []byte
		parsed    bool
		presented bool
		sentinel  error
	}{
		{"not TLS", []byte("GET / HTTP/1.1\r\n\r\n"), false, false, ech.ErrNotTLS},
		{"inner ECH from a client", records(innerECH.message(), 1<<14), true, true, ech.ErrIllegalParameter},
		{"no ECH, bad ALPN", records(badALPN.message(), 1<<14), true, false, ech.ErrDecodeError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ech.NewConn(t.Context(), &memConn{data: tc.in}, ech.WithKeySet(ks))
			var he *ech.HelloError
			require.ErrorAs(t, err, &he)
			assert.ErrorIs(t, err, tc.sentinel)
			assert.Equal(t, tc.parsed, he.Parsed)
			assert.Equal(t, tc.presented, he.ECHPresented)
			if tc.parsed {
				assert.Equal(t, publicName, he.OuterServerName)
			} else {
				assert.Empty(t, he.OuterServerName)
			}
			assert.Equal(t, he.Err.Error(), err.Error())
		})
	}
}
