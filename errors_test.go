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
