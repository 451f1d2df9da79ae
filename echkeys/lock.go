package echkeys

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/echkit/ech/internal/boundedfile"
)

// lockName is the lock file in the key directory. It does not end in
// ".ech" or ".pem", so [ech.LoadKeyDir] never reads it.
const lockName = ".echkeys.lock"

// maxLockSize bounds what is read of a lock file.
const maxLockSize = 1 << 10

// errLocked says another live holder has the lock.
var errLocked = errors.New("echkeys: directory locked by another manager")

// lock is an exclusive lock on a key directory: a file created with
// O_CREATE|O_EXCL, which is atomic on local file systems and on NFS v3 and
// later, holding the holder's id and the time it was taken. A lock older
// than the timeout belongs to a dead holder and is broken.
//
// NOTE: flock(2) is not used: it is advisory per host on many network file
// systems, which is the case this lock is for.
type lock struct {
	path string
	id   string
}

// lockContent is what a holder writes into the lock file.
func lockContent(id string, now time.Time) []byte {
	return fmt.Appendf(nil, "%s\n%s\n", id, now.UTC().Format(time.RFC3339Nano))
}

// parseLock returns the holder and time of a lock file's content.
func parseLock(b []byte) (id string, at time.Time, ok bool) {
	id, rest, found := strings.Cut(string(b), "\n")
	if !found {
		return "", time.Time{}, false
	}
	at, err := time.Parse(time.RFC3339Nano, strings.TrimSpace(rest))
	return id, at, err == nil
}

// acquireLock takes the lock of dir for id, breaking a lock taken more than
// timeout before now. It returns errLocked when a live holder has it.
func acquireLock(dir, id string, now time.Time, timeout time.Duration) (*lock, error) {
	path := filepath.Join(dir, lockName)
	for range 2 {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err == nil {
			_, werr := f.Write(lockContent(id, now))
			if serr := f.Sync(); werr == nil {
				werr = serr
			}
			if cerr := f.Close(); werr == nil {
				werr = cerr
			}
			if werr != nil {
				os.Remove(path)
				return nil, fmt.Errorf("echkeys: writing lock: %w", werr)
			}
			return &lock{path: path, id: id}, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("echkeys: creating lock: %w", err)
		}
		old, err := readBounded(path, maxLockSize)
		if errors.Is(err, fs.ErrNotExist) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("echkeys: reading lock: %w", err)
		}
		holder, at, ok := parseLock(old)
		if ok && now.Sub(at) < timeout {
			return nil, fmt.Errorf("%w (%s since %s)", errLocked, holder, at.Format(time.RFC3339))
		}
		if !ok {
			// A holder that crashed between creating and writing the file,
			// or one being written now: judge it by the file's time.
			// NOTE: the file's time is the file system's, so it is
			// compared with the real clock, not the injected one.
			fi, err := os.Stat(path)
			if err != nil || time.Since(fi.ModTime()) < timeout {
				return nil, errLocked
			}
		}
		if err := breakLock(path, old); err != nil {
			return nil, err
		}
	}
	return nil, errLocked
}

// breakLock removes the stale lock at path whose content is old. It
// renames the file first, which only one breaker can do; if what it renamed
// is not the stale lock (a new holder took the lock meanwhile), it puts it
// back with link(2), which, like O_EXCL, fails if the name exists.
func breakLock(path string, old []byte) error {
	aside := fmt.Sprintf("%s.stale-%d-%d", path, os.Getpid(), time.Now().UnixNano())
	if err := os.Rename(path, aside); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // another breaker was first
		}
		return fmt.Errorf("echkeys: breaking lock: %w", err)
	}
	defer os.Remove(aside)
	got, err := readBounded(aside, maxLockSize)
	if err != nil || bytes.Equal(got, old) {
		return nil
	}
	// If the name was taken again meanwhile, Link fails and that holder
	// keeps the lock; either way, this caller does not hold it.
	os.Link(aside, path)
	return errLocked
}

// held reports whether l is still the lock in its directory. A holder
// checks it right before each write, so that one whose lock was broken
// (it stalled for longer than the timeout) does not write.
//
// NOTE: a holder that stalls between this check and its rename could still
// write after its lock was broken; the timeout (minutes) makes that window
// (microseconds) irrelevant in practice, and the key it would add is a
// whole, valid key, not a corrupt one.
func (l *lock) held() bool {
	b, err := readBounded(l.path, maxLockSize)
	if err != nil {
		return false
	}
	id, _, ok := parseLock(b)
	return ok && id == l.id
}

// release removes the lock if it is still l's.
func (l *lock) release() {
	if l.held() {
		os.Remove(l.path)
	}
}

// readBounded reads the regular file name, of at most limit bytes; its
// errors name the file.
func readBounded(name string, limit int64) ([]byte, error) {
	b, err := boundedfile.Read(name, limit)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(name), err)
	}
	return b, nil
}
