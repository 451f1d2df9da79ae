package cli

import (
	"errors"
	"flag"
	"io"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRun(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		code   int
		stderr string
	}{
		{"ok", nil, 0, ""},
		{"help", flag.ErrHelp, 0, ""},
		{"usage", Usagef("no arguments, please"), 2, "prog: no arguments, please\n"},
		{"flags", Parse(flag.NewFlagSet("x", flag.ContinueOnError), []string{"-nope"}), 2, ""},
		{"failure", errors.New("boom"), 1, "prog: boom\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stderr strings.Builder
			code := Run("prog", nil, io.Discard, &stderr, func([]string, io.Writer, io.Writer) error { return tc.err })
			assert.Equal(t, tc.code, code)
			assert.Equal(t, tc.stderr, stderr.String())
		})
	}
}

func TestVersion(t *testing.T) {
	bi := &debug.BuildInfo{
		GoVersion: "go1.26.8",
		Main:      debug.Module{Path: "github.com/echkit/ech", Version: "v0.3.0"},
		Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "af1b526"},
			{Key: "vcs.time", Value: "2026-12-01T18:00:00Z"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	assert.Equal(t, "ech-router github.com/echkit/ech v0.3.0 revision af1b526 2026-12-01T18:00:00Z (modified) go1.26.8", versionOf("ech-router", bi))
	bi.Main.Version, bi.Settings = "", nil
	assert.Equal(t, "ech-router github.com/echkit/ech (devel) go1.26.8", versionOf("ech-router", bi))
	assert.True(t, strings.HasPrefix(Version("x"), "x "), Version("x"))
}
