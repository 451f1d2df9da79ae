package echkeys

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// clock is a time source for tests, safe for concurrent use.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// managedFiles returns the names of the Manager's key files in dir.
func managedFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range entries {
		if _, ok := parseFileName(e.Name()); ok {
			out = append(out, e.Name())
		}
	}
	return out
}

func configIDs(keys []ech.Key) []int {
	out := make([]int, len(keys))
	for i, k := range keys {
		out[i] = configID(k.Config)
	}
	return out
}

func TestManagerRotateRetire(t *testing.T) {
	clk := newClock()
	t0 := clk.Now()
	dir := t.TempDir()
	ks, err := ech.NewKeySet()
	require.NoError(t, err)
	m := &Manager{
		Dir: dir, PublicName: "public.test",
		Rotate: 24 * time.Hour, Propagation: time.Hour, TTL: time.Hour, Retire: 48 * time.Hour,
		KeySet: ks, Logger: quiet, Now: clk.Now,
	}

	// The first Tick makes a key, advertised at once: there is no other.
	require.NoError(t, m.Tick(t.Context()))
	files := managedFiles(t, dir)
	require.Len(t, files, 1)
	fi, err := os.Stat(filepath.Join(dir, files[0]))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	created, _ := parseFileName(files[0])
	assert.Equal(t, t0, created)
	loaded, err := ech.LoadKeyDir(dir)
	require.NoError(t, err)
	require.Len(t, loaded, 1)
	first := m.Keys()
	require.Len(t, first, 1)
	assert.True(t, first[0].SendAsRetry)
	assert.Equal(t, loaded[0].Config, first[0].Config)
	assert.Equal(t, 1, ks.Len())
	l, err := m.ConfigList()
	require.NoError(t, err)
	kl, err := ks.ConfigList()
	require.NoError(t, err)
	assert.Equal(t, kl, l)

	// Hour by hour for four days.
	var prevFiles []string
	for h := 1; h <= 96; h++ {
		clk.Advance(time.Hour)
		require.NoError(t, m.Tick(t.Context()), "hour %d", h)
		files := managedFiles(t, dir)
		keys := m.Keys()
		require.Equal(t, len(files), len(keys), "hour %d", h)
		assert.Equal(t, len(files), ks.Len(), "hour %d", h)
		// Exactly one key is advertised, and it comes first.
		assert.True(t, keys[0].SendAsRetry, "hour %d", h)
		for _, k := range keys[1:] {
			assert.False(t, k.SendAsRetry, "hour %d", h)
		}
		switch {
		case h%24 == 0:
			// A new key, not yet advertised: the previous one still is.
			require.Len(t, slices.DeleteFunc(slices.Clone(files), func(n string) bool { return slices.Contains(prevFiles, n) }), 1, "hour %d: one new file", h)
			assert.NotEqual(t, files[len(files)-1], advertisedFile(t, files, keys), "hour %d", h)
		case h%24 == 1:
			// Propagation has passed: the newest key is advertised.
			assert.Equal(t, files[len(files)-1], advertisedFile(t, files, keys), "hour %d", h)
		}
		// A key lives Retire from its creation, then goes.
		for _, n := range files {
			c, _ := parseFileName(n)
			assert.Less(t, clk.Now().Sub(c), 48*time.Hour+time.Nanosecond, "hour %d: %s kept too long", h, n)
		}
		for _, n := range prevFiles {
			if !slices.Contains(files, n) {
				c, _ := parseFileName(n)
				assert.Equal(t, 48*time.Hour, clk.Now().Sub(c), "hour %d: %s deleted early", h, n)
			}
		}
		prevFiles = files
	}
	// Keys of t0+72h and t0+96h: the one of t0+48h went at t0+96h.
	assert.Len(t, managedFiles(t, dir), 2)
}

// advertisedFile returns the file of the key marked SendAsRetry.
func advertisedFile(t *testing.T, files []string, keys []ech.Key) string {
	t.Helper()
	for _, n := range files {
		if strings.HasSuffix(n, "-"+hexByte(configID(keys[0].Config))+".ech") {
			return n
		}
	}
	t.Fatalf("no file for config_id %d", configID(keys[0].Config))
	return ""
}

func hexByte(b int) string {
	return string("0123456789abcdef"[b>>4]) + string("0123456789abcdef"[b&15])
}

func TestManagerDefaults(t *testing.T) {
	m := &Manager{Dir: t.TempDir(), PublicName: "public.test", Logger: quiet}
	require.NoError(t, m.Tick(t.Context()))
	assert.Equal(t, DefaultRotate, m.Rotate)
	assert.Equal(t, DefaultRotate+DefaultPropagation+DefaultTTL+24*time.Hour, m.Retire)

	short := &Manager{Dir: t.TempDir(), PublicName: "public.test", Logger: quiet, Rotate: time.Hour, Propagation: -1, TTL: time.Minute}
	require.NoError(t, short.Tick(t.Context()))
	assert.Equal(t, MinRetire, short.Retire, "at least two days")

	bad := &Manager{Dir: t.TempDir(), PublicName: "public.test", Rotate: time.Hour, Retire: time.Hour}
	require.ErrorIs(t, bad.Tick(t.Context()), ErrConfig)
	require.ErrorIs(t, (&Manager{Dir: t.TempDir(), PublicName: "1.2.3.4"}).Tick(t.Context()), ErrConfig)
}

// TestManagerIgnoresLeftovers checks that what a crash leaves, a temporary
// file, is neither loaded by LoadKeyDir nor by the Manager, and that keys
// the Manager did not make are kept, decrypting, never advertised.
func TestManagerIgnoresLeftovers(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".tmp-echkeys-123"), []byte("-----BEGIN PRIV"), 0o600))
	manual, err := ech.GenerateKey("public.test", nil)
	require.NoError(t, err)
	pemData, err := ech.MarshalPEM(manual)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "manual.ech"), pemData, 0o600))

	clk := newClock()
	m := &Manager{Dir: dir, PublicName: "public.test", Logger: quiet, Now: clk.Now, Rotate: 24 * time.Hour, Propagation: -1, TTL: time.Minute}
	require.NoError(t, m.Tick(t.Context()))
	loaded, err := ech.LoadKeyDir(dir)
	require.NoError(t, err)
	assert.Len(t, loaded, 2)
	keys := m.Keys()
	require.Len(t, keys, 2)
	assert.NotEqual(t, manual.Config, keys[0].Config, "the manual key is not advertised")
	assert.Equal(t, manual.Config, keys[1].Config)
	for range 10 {
		clk.Advance(24 * time.Hour)
		require.NoError(t, m.Tick(t.Context()))
	}
	assert.FileExists(t, filepath.Join(dir, "manual.ech"), "never deleted")
}

func TestLock(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	a, err := acquireLock(dir, "a", now, time.Minute)
	require.NoError(t, err)
	_, err = acquireLock(dir, "b", now.Add(30*time.Second), time.Minute)
	require.ErrorIs(t, err, errLocked)
	// a died: after the timeout b breaks its lock.
	b, err := acquireLock(dir, "b", now.Add(2*time.Minute), time.Minute)
	require.NoError(t, err)
	assert.False(t, a.held())
	assert.True(t, b.held())
	a.release() // not a's any more: b's lock stays
	assert.True(t, b.held())
	b.release()
	assert.NoFileExists(t, filepath.Join(dir, lockName))

	// A lock file left empty by a crash is judged by its time on disk.
	require.NoError(t, os.WriteFile(filepath.Join(dir, lockName), nil, 0o600))
	_, err = acquireLock(dir, "c", time.Now(), time.Minute)
	require.ErrorIs(t, err, errLocked)
	old := time.Now().Add(-time.Hour)
	require.NoError(t, os.Chtimes(filepath.Join(dir, lockName), old, old))
	c, err := acquireLock(dir, "c", time.Now(), time.Minute)
	require.NoError(t, err)
	c.release()
}

// TestManagerLockedOut checks that a Manager that cannot get the lock does
// not write, and that one whose lock holder died takes over.
func TestManagerLockedOut(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	require.NoError(t, os.WriteFile(filepath.Join(dir, lockName), lockContent("other", clk.Now()), 0o600))
	m := &Manager{Dir: dir, PublicName: "public.test", Logger: quiet, Now: clk.Now, LockTimeout: time.Minute}
	require.ErrorIs(t, m.Tick(t.Context()), ErrNoKeys)
	assert.Empty(t, managedFiles(t, dir))
	clk.Advance(2 * time.Minute)
	require.NoError(t, m.Tick(t.Context()))
	assert.Len(t, managedFiles(t, dir), 1)
	assert.NoFileExists(t, filepath.Join(dir, lockName), "released")
}

// TestThreeManagers runs three Managers on one directory, ticking
// concurrently, across several rotations: exactly one key is made per
// rotation, none is missing, and all three use the same keys.
func TestThreeManagers(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	t0 := clk.Now()
	const rotate = 24 * time.Hour
	ms := make([]*Manager, 3)
	for i := range ms {
		ms[i] = &Manager{
			Dir: dir, PublicName: "public.test", ID: string(rune('a' + i)),
			Rotate: rotate, Propagation: time.Hour, TTL: time.Hour, Retire: 48 * time.Hour,
			Logger: quiet, Now: clk.Now,
		}
	}
	seen := map[string]bool{}
	const step = 2 * time.Hour
	const steps = 12 * 5 // five rotations
	for s := 0; s <= steps; s++ {
		var wg sync.WaitGroup
		errs := make([]error, len(ms))
		for i, m := range ms {
			wg.Go(func() {
				// A Manager that finds the directory empty and locked has
				// no key until the holder has written one.
				for try := 0; try < 200; try++ {
					if errs[i] = m.Tick(t.Context()); errs[i] == nil {
						break
					}
					time.Sleep(5 * time.Millisecond)
				}
			})
		}
		wg.Wait()
		for i, err := range errs {
			require.NoError(t, err, "step %d, manager %d", s, i)
		}
		// The others pick the holder's work up on their next Tick.
		for i, m := range ms {
			require.NoError(t, m.Tick(t.Context()), "step %d, manager %d", s, i)
		}
		files := managedFiles(t, dir)
		for _, n := range files {
			seen[n] = true
		}
		// No key missing: the newest is younger than rotate.
		newestTime, _ := parseFileName(files[len(files)-1])
		assert.Less(t, clk.Now().Sub(newestTime), rotate, "step %d", s)
		// No duplicate: one key per rotation period.
		for i := 1; i < len(files); i++ {
			a, _ := parseFileName(files[i-1])
			b, _ := parseFileName(files[i])
			assert.Equal(t, rotate, b.Sub(a), "step %d: %v", s, files)
		}
		// Every Manager uses what is in the directory, advertising the same key.
		for i, m := range ms {
			keys := m.Keys()
			assert.Len(t, keys, len(files), "step %d, manager %d", s, i)
			assert.Equal(t, configIDs(ms[0].Keys()), configIDs(keys), "step %d, manager %d", s, i)
		}
		clk.Advance(step)
	}
	elapsed := clk.Now().Add(-step).Sub(t0)
	assert.Len(t, seen, int(elapsed/rotate)+1, "one key per rotation: %v", slices.Sorted(func(yield func(string) bool) {
		for n := range seen {
			if !yield(n) {
				return
			}
		}
	}))
	assert.NoFileExists(t, filepath.Join(dir, lockName))
}

// deadProvider is a zone that cannot be reached.
type deadProvider struct{ calls int }

func (p *deadProvider) Lookup(context.Context, string) (Current, error) {
	p.calls++
	return Current{}, errors.New("connection refused")
}

func (p *deadProvider) Replace(context.Context, Record) error {
	return errors.New("connection refused")
}

// TestManagerPublishFailure checks that a zone that cannot be reached does
// not stop the rotation, and that a key is not deleted while its config may
// still be in DNS.
func TestManagerPublishFailure(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	dead := &deadProvider{}
	m := &Manager{
		Dir: dir, PublicName: "public.test", Rotate: 24 * time.Hour, Propagation: -1, TTL: time.Minute,
		Retire: 48 * time.Hour, Logger: quiet, Now: clk.Now,
		Publisher: &Publisher{Provider: dead, Names: []Name{{Name: "www.test"}}, Logger: quiet},
	}
	for d := 0; d <= 4; d++ {
		err := m.Tick(t.Context())
		require.ErrorIs(t, err, ErrPublish, "day %d", d)
		assert.Len(t, managedFiles(t, dir), d+1, "day %d: keys still rotate", d)
		clk.Advance(24 * time.Hour)
	}
	assert.Equal(t, 5, dead.calls)
}

// TestManagerSecretVolume reads a directory laid out as Kubernetes mounts
// a Secret: files are links through the ..data link, which is swapped to
// update them all at once.
func TestManagerSecretVolume(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	write := func(gen string, created ...time.Time) {
		require.NoError(t, os.Mkdir(filepath.Join(dir, gen), 0o755))
		for _, c := range created {
			k, err := ech.GenerateKey("public.test", nil)
			require.NoError(t, err)
			data, err := ech.MarshalPEM(k)
			require.NoError(t, err)
			n := fileName(c, uint8(configID(k.Config)))
			require.NoError(t, os.WriteFile(filepath.Join(dir, gen, n), data, 0o600))
			os.Symlink(filepath.Join("..data", n), filepath.Join(dir, n))
		}
		tmp := filepath.Join(dir, "..data_tmp")
		require.NoError(t, os.Symlink(gen, tmp))
		require.NoError(t, os.Rename(tmp, filepath.Join(dir, "..data")))
	}
	t0 := clk.Now()
	write("..gen1", t0.Add(-time.Hour))
	m := &Manager{Dir: dir, PublicName: "public.test", ReadOnly: true, Propagation: 30 * time.Minute, Logger: quiet, Now: clk.Now}
	require.NoError(t, m.Tick(t.Context()))
	require.Len(t, m.Keys(), 1)
	// The writer adds a key; the volume swaps.
	// (gen2 has a fresh key for t0-1h: the link to the one of gen1 dangles.)
	write("..gen2", t0.Add(-time.Hour), t0)
	require.NoError(t, m.Tick(t.Context()))
	keys := m.Keys()
	require.Len(t, keys, 2)
	assert.False(t, keys[1].SendAsRetry, "the new key waits for Propagation")
	clk.Advance(30 * time.Minute)
	require.NoError(t, m.Tick(t.Context()))
	assert.NotEqual(t, keys[0].Config, m.Keys()[0].Config, "then it is advertised")
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		assert.NotEqual(t, lockName, e.Name(), "a read-only manager writes nothing")
	}
}

// TestManagerRun checks that Run keeps ticking after failed publishes and
// stops with its context.
func TestManagerRun(t *testing.T) {
	dir := t.TempDir()
	dead := &deadProvider{}
	m := &Manager{
		Dir: dir, PublicName: "public.test", Propagation: -1, Logger: quiet,
		Publisher: &Publisher{Provider: dead, Names: []Name{{Name: "www.test"}}, Logger: quiet},
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		m.Run(ctx, 10*time.Millisecond)
		close(done)
	}()
	require.Eventually(t, func() bool {
		m.tickMu.Lock()
		defer m.tickMu.Unlock()
		return dead.calls >= 3
	}, 10*time.Second, 5*time.Millisecond, "publishing is tried again")
	assert.Len(t, managedFiles(t, dir), 1)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop")
	}
}
