package ech_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/echkit/ech/router"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// readmeSkipped are the README commands that cannot run offline on a fresh
// clone, and why. Every other command of a sh block is run.
var readmeSkipped = map[string]string{
	"go test ./...": "the test command itself, which runs this test",
	"./ech-router -check -config cmd/ech-router/chatmail.json":                                                                            "exits 1 listing the example's certificates, missing on a test machine; cmd/ech-router's TestCheck runs it and checks that list",
	"go run ./cmd/ech-client -connect cover.example:443 -name chat.example -alpn imap -ech https://cover.example/.well-known/origin-svcb": "needs a deployed router at cover.example",
	"go test -run '^$' -bench 'NewConn|ServerHandshake|Handshake|HPKEOpen' -count 6 . | tee bench.txt":                                    "takes minutes; .ci/run runs every benchmark once instead",
	"go run golang.org/x/perf/cmd/benchstat@latest bench.txt":                                                                             "needs the output of the benchmark run above",
}

// readmeBlock is a fenced code block of README.md.
type readmeBlock struct {
	lang, text string
	line       int
}

func readmeBlocks(t *testing.T) []readmeBlock {
	t.Helper()
	f, err := os.Open("README.md")
	require.NoError(t, err)
	defer f.Close()
	var blocks []readmeBlock
	var cur *readmeBlock
	s := bufio.NewScanner(f)
	for n := 1; s.Scan(); n++ {
		line := s.Text()
		switch {
		case cur == nil && strings.HasPrefix(line, "```"):
			cur = &readmeBlock{lang: strings.TrimPrefix(line, "```"), line: n}
		case cur != nil && line == "```":
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.text += line + "\n"
		}
	}
	require.NoError(t, s.Err())
	require.Nil(t, cur, "README.md: unclosed code block")
	return blocks
}

// TestREADME runs, in a copy of the repository, every command of README.md
// that can run offline, in order, as a newcomer on a fresh clone would; it
// also compiles the Go example and checks the router configuration shown.
func TestREADME(t *testing.T) {
	blocks := readmeBlocks(t)
	require.NotEmpty(t, blocks)
	assert.Equal(t, readmeBlock{lang: "sh", text: "go run ./example/demo\ngo test ./...\n", line: 3}, blocks[0],
		"the README starts with exactly the demo and the test command")

	var commands []string
	var goBlocks, jsonBlocks []string
	for _, b := range blocks {
		switch b.lang {
		case "sh":
			for _, c := range strings.Split(strings.TrimSpace(b.text), "\n") {
				require.False(t, strings.HasSuffix(c, "\\"), "README.md:%d: one command a line", b.line)
				commands = append(commands, c)
			}
		case "go":
			goBlocks = append(goBlocks, b.text)
		case "json":
			jsonBlocks = append(jsonBlocks, b.text)
		}
	}

	t.Run("chatmail.json", func(t *testing.T) {
		file, err := os.ReadFile("cmd/ech-router/chatmail.json")
		require.NoError(t, err)
		// One block is the chatmail example as the file has it; the others
		// show settings and must at least be JSON.
		shown := 0
		for _, b := range jsonBlocks {
			if b == string(file) {
				shown++
				_, err = router.ParseConfig("README.md", []byte(b))
				assert.NoError(t, err)
				continue
			}
			assert.True(t, json.Valid([]byte(b)), "a README JSON block is not JSON:\n%s", b)
		}
		assert.Equal(t, 1, shown, "the README shows cmd/ech-router/chatmail.json as it is, once")
	})

	if testing.Short() {
		t.Skip("-short: not building and running the README's commands")
	}
	dir := copyRepo(t)
	// go test puts the go command that runs it first on PATH, so the
	// commands run with the same Go.
	env := os.Environ()

	t.Run("go", func(t *testing.T) {
		// The accept loop, the echclient example, the echtest example and
		// the test of one's own router (the README's accept loop), each in
		// a file with the imports it needs.
		require.Len(t, goBlocks, 5)
		files := map[string]string{
			"main.go": "package main\n\nimport (\n\t\"crypto/tls\"\n\t\"io\"\n\t\"net\"\n\n\t\"github.com/echkit/ech\"\n)\n\n" +
				"var _ = serve // the README's example\n\nfunc main() {}\n\n" + goBlocks[0],
			"client.go": "package main\n\nimport (\n\t\"context\"\n\t\"net/http\"\n\n\t\"github.com/echkit/ech/echclient\"\n)\n\n" +
				"var _ = fetch\n\n" + goBlocks[1],
			"secret_test.go": "package main\n\nimport (\n\t\"testing\"\n\n\t\"github.com/echkit/ech/echtest\"\n\t\"github.com/stretchr/testify/require\"\n)\n\n" + goBlocks[2],
			"router_test.go": "package main\n\nimport (\n\t\"crypto/tls\"\n\t\"net\"\n\t\"testing\"\n\n\t\"github.com/echkit/ech\"\n\t\"github.com/echkit/ech/echtest\"\n\t\"github.com/stretchr/testify/require\"\n)\n\n" +
				"func startMyRouter(t *testing.T, ks *ech.KeySet, backends map[string]string) string {\n" +
				"\tln, err := net.Listen(\"tcp\", \"127.0.0.1:0\")\n\trequire.NoError(t, err)\n\tt.Cleanup(func() { ln.Close() })\n" +
				"\tgo serve(ln, ks, tls.Certificate{}, backends)\n\treturn ln.Addr().String()\n}\n\n" + goBlocks[3],
			"quic.go": "package main\n\nimport (\n\t\"errors\"\n\t\"net\"\n\n\t\"github.com/echkit/ech\"\n\t\"github.com/echkit/ech/echquic\"\n)\n\n" +
				"var _ = serveQUIC\n\n" + goBlocks[4],
		}
		require.NoError(t, os.MkdirAll(filepath.Join(dir, "readmeexample"), 0o755))
		for name, src := range files {
			require.NoError(t, os.WriteFile(filepath.Join(dir, "readmeexample", name), []byte(src), 0o644))
		}
		cmd := exec.Command("go", "test", "-count=1", "./readmeexample") // compiles all five, runs the tests
		cmd.Dir, cmd.Env = dir, env
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "the README's Go examples do not compile or TestSecret fails:\n%s", out)
	})

	// Twice, in the same directory, as a newcomer who follows the README
	// again: what the first pass left (keys, binaries) must not break the
	// second.
	for pass := 1; pass <= 2; pass++ {
		for _, c := range commands {
			if reason, ok := readmeSkipped[c]; ok {
				if pass == 1 {
					t.Logf("not run: %s (%s)", c, reason)
				}
				continue
			}
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
			cmd := exec.CommandContext(ctx, "bash", "-e", "-c", c)
			cmd.Dir, cmd.Env = dir, env
			start := time.Now()
			out, err := cmd.CombinedOutput()
			cancel()
			require.NoError(t, err, "README command failed on pass %d: %s\n%s", pass, c, out)
			t.Logf("pass %d ran in %v: %s", pass, time.Since(start).Round(time.Millisecond), c)
		}
	}
	// What the README makes in a checkout is ignored by git: a "git add ."
	// after following it must not commit a private key or a binary.
	if _, err := exec.LookPath("git"); err == nil {
		cmd := exec.Command("git", "init", "-q")
		cmd.Dir = dir
		require.NoError(t, cmd.Run())
		cmd = exec.Command("git", "status", "--porcelain", "--untracked-files=all")
		cmd.Dir = dir
		out, err := cmd.Output()
		require.NoError(t, err)
		tracked := trackedFiles(t)
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			name := strings.TrimPrefix(line, "?? ")
			if line == "" || tracked[name] || strings.HasPrefix(name, "readmeexample/") {
				continue
			}
			t.Errorf("following the README leaves %s, which .gitignore does not cover", name)
		}
	}
	for skipped := range readmeSkipped {
		assert.Contains(t, commands, skipped, "a skipped command is no longer in the README")
	}
}

// trackedFiles returns the files git tracks in the repository, or nil
// outside a git checkout.
func trackedFiles(t *testing.T) map[string]bool {
	t.Helper()
	out, err := exec.Command("git", "ls-files", "-z").Output()
	if err != nil {
		return nil
	}
	files := map[string]bool{}
	for _, f := range strings.Split(string(out), "\x00") {
		if f != "" {
			files[f] = true
		}
	}
	return files
}

// copyRepo copies the files of the repository that git tracks, as a fresh
// clone has them, into a temporary directory: what a developer made by
// following the README (keys, binaries) is not copied. Outside a git
// checkout it copies every regular file but .git.
func copyRepo(t *testing.T) string {
	t.Helper()
	dst := t.TempDir()
	tracked := trackedFiles(t)
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".git" {
			return filepath.SkipDir
		}
		target := filepath.Join(dst, path)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if !d.Type().IsRegular() || (tracked != nil && !tracked[filepath.ToSlash(path)]) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
	require.NoError(t, err)
	return dst
}
