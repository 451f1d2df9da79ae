// Package cli is what the commands under cmd/ share: exit codes from
// errors, and the -version text from the build information.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime/debug"
)

// UsageError reports a command line the command cannot run: exit code 2.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a [UsageError] with a formatted message.
func Usagef(format string, args ...any) error {
	return &UsageError{fmt.Errorf(format, args...)}
}

// Run calls run and returns the exit code for its error, having printed the
// error to stderr prefixed by prog: 0 for none (or -h), 2 for a
// [UsageError] or a flag parsing error (the flag package printed it), 1
// otherwise.
func Run(prog string, args []string, stdout, stderr io.Writer, run func(args []string, stdout, stderr io.Writer) error) int {
	err := run(args, stdout, stderr)
	var usage *UsageError
	switch {
	case err == nil || errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &usage):
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		return 2
	case errors.Is(err, errFlag):
		return 2
	default:
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		return 1
	}
}

var errFlag = errors.New("bad flags")

// Parse parses args with fs, turning its errors, which fs has already
// printed with the usage, into exit code 2 for [Run].
func Parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errFlag, err)
	}
	return nil
}

// Version returns the -version text of prog: the module version it was
// built from ("(devel)" in a checkout), the VCS revision and time when the
// go command recorded them, and the Go version.
func Version(prog string) string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return prog + " (no build information)"
	}
	return versionOf(prog, bi)
}

func versionOf(prog string, bi *debug.BuildInfo) string {
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	s := fmt.Sprintf("%s %s %s", prog, bi.Main.Path, v)
	settings := map[string]string{}
	for _, kv := range bi.Settings {
		settings[kv.Key] = kv.Value
	}
	if rev := settings["vcs.revision"]; rev != "" {
		s += " revision " + rev
		if t := settings["vcs.time"]; t != "" {
			s += " " + t
		}
		if settings["vcs.modified"] == "true" {
			s += " (modified)"
		}
	}
	return s + " " + bi.GoVersion
}
