package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echkeys"
)

// KeyDir keeps a key set loaded from a directory of RFC 9934 PEM files
// (see [ech.LoadKeyDir]). Reloading replaces the set atomically: connections
// in flight keep the keys they started with.
type KeyDir struct {
	// Dir is the directory.
	Dir string
	// Set receives the keys.
	Set *ech.KeySet
	// Logger receives a line when the keys change or fail to load; nil
	// means slog.Default().
	Logger *slog.Logger
	// PublicName, if set, is the public_name every key's config must
	// have: a directory holding another key is refused.
	PublicName string
	// Manager, if set, keeps the directory (keys.auto): Reload runs one
	// [echkeys.Manager.Tick], which makes, deletes, advertises and
	// publishes, and fills Set itself. Its KeySet must be Set. The Tick
	// has changed Set even when Reload then reports an error (a key for
	// another public name put in the directory by hand); a failure that
	// leaves keys in use, such as a zone that refuses the update, is logged
	// and tried again at the next reload.
	Manager *echkeys.Manager

	mu   sync.Mutex
	last []byte // the configs loaded last, to log changes only
	// tickFailed is set when the last Tick of Manager failed though keys
	// were loaded (a peer or the zone did not answer), so that the
	// server's reload loop tries again sooner, with backoff.
	tickFailed atomic.Bool
}

// TickFailed reports whether the last run of the Manager failed in a way
// worth retrying before the next reload: keys are in use, but a peer check
// or a publish did not go through.
func (k *KeyDir) TickFailed() bool { return k.tickFailed.Load() }

// Reload reads the directory and, if it holds at least one valid key,
// makes its keys the content of the set. On error the set is unchanged.
// It reports whether the keys changed. It logs a warning for each key file
// that anyone may read.
func (k *KeyDir) Reload() (bool, error) {
	k.warnWorldReadable()
	var keys []ech.Key
	var err error
	if k.Manager != nil {
		keys, err = k.tick()
	} else {
		keys, err = ech.LoadKeyDir(k.Dir)
	}
	if err == nil && len(keys) == 0 {
		err = fmt.Errorf("%w in %s", ech.ErrNoKeys, k.Dir)
	}
	if err == nil && k.PublicName != "" {
		for _, key := range keys {
			c, cerr := ech.KeyConfig(key)
			if cerr != nil {
				err = cerr
				break
			}
			if !strings.EqualFold(c.PublicName, k.PublicName) {
				err = fmt.Errorf("%w: config_id %d has public_name %q, not %q", errWrongPublicName, c.ConfigID, c.PublicName, k.PublicName)
				break
			}
		}
	}
	if err == nil && k.Manager == nil {
		err = k.Set.Replace(keys...)
	}
	if err != nil {
		return false, fmt.Errorf("router: loading keys: %w", err)
	}
	var sig bytes.Buffer
	ids := make([]int, 0, len(keys))
	for _, key := range keys {
		sig.Write(key.Config)
		if c, err := ech.ParseConfig(key.Config); err == nil {
			ids = append(ids, int(c.ConfigID))
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if bytes.Equal(sig.Bytes(), k.last) {
		return false, nil
	}
	k.last = sig.Bytes()
	k.logger().Info("keys loaded", slog.String("dir", k.Dir), slog.Int("keys", len(keys)), slog.Any("config_ids", ids))
	return true, nil
}

// errWrongPublicName refuses a key for another public name.
var errWrongPublicName = errors.New("router: key for another public name")

// warnWorldReadable logs a warning for each key file of the directory that
// anyone may read.
func (k *KeyDir) warnWorldReadable() {
	entries, err := os.ReadDir(k.Dir)
	if err != nil {
		return // Reload reports it
	}
	for _, e := range entries {
		if ext := filepath.Ext(e.Name()); ext != ".ech" && ext != ".pem" {
			continue
		}
		warnIfWorldReadable(k.logger(), filepath.Join(k.Dir, e.Name()))
	}
}

// warnIfWorldReadable logs a warning if anyone may read the private key
// file at path.
func warnIfWorldReadable(logger *slog.Logger, path string) {
	fi, err := os.Stat(path)
	if err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o004 != 0 {
		logger.Warn("private key file is world-readable", slog.String("file", path), slog.String("mode", fi.Mode().Perm().String()))
	}
}

// maxTick bounds one Tick of the Manager: its peer checks and publishing.
const maxTick = 2 * time.Minute

// tick runs the Manager once and returns the keys it put in Set. A failure
// that leaves keys in use (a peer that does not answer, a zone that refuses
// the update) is logged, not returned: the keys were reloaded, and the next
// reload tries again.
func (k *KeyDir) tick() ([]ech.Key, error) {
	ctx, cancel := context.WithTimeout(context.Background(), maxTick)
	defer cancel()
	err := k.Manager.Tick(ctx)
	keys := k.Manager.Keys()
	k.tickFailed.Store(err != nil && len(keys) > 0)
	if err != nil && len(keys) > 0 {
		k.logger().Warn("automatic keys", slog.String("dir", k.Dir), slog.String("error", err.Error()))
		err = nil
	}
	return keys, err
}

func (k *KeyDir) logger() *slog.Logger {
	if k.Logger != nil {
		return k.Logger
	}
	return slog.Default()
}

// Watch reloads the keys every interval (if positive) and whenever trigger
// receives, until ctx is done. A failed reload is logged and the keys in use
// stay.
func (k *KeyDir) Watch(ctx context.Context, interval time.Duration, trigger <-chan struct{}) {
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		case <-trigger:
		}
		if _, err := k.Reload(); err != nil {
			k.logger().Error("keys not reloaded", slog.String("dir", k.Dir), slog.String("error", err.Error()))
		}
	}
}
