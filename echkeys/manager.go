package echkeys

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/internal/boundedfile"
)

// Defaults of the [Manager] fields.
const (
	// DefaultRotate is how often a new key is made: Caddy's interval.
	DefaultRotate = 30 * 24 * time.Hour
	// DefaultPropagation is how long after its creation a key is
	// advertised when the Manager has no peers to ask.
	DefaultPropagation = time.Hour
	// DefaultTTL is the TTL of the published HTTPS records.
	DefaultTTL = time.Hour
	// DefaultLockTimeout is the age at which the lock of a holder that
	// died is broken.
	DefaultLockTimeout = 5 * time.Minute
	// MinRetire is the shortest default retirement age.
	MinRetire = 48 * time.Hour
	// retireMargin is added to the default retirement age for clients
	// that cache records beyond their TTL.
	retireMargin = 24 * time.Hour
)

// Errors of this package. Others wrap them, with details added.
var (
	// ErrConfig reports an invalid Manager or Publisher setting.
	ErrConfig = errors.New("echkeys: invalid configuration")
	// ErrNoKeys reports a directory without a key the Manager can use.
	ErrNoKeys = errors.New("echkeys: no keys")
	// ErrPeer reports a peer that does not decrypt a config: it did not
	// answer, or it rejected ECH with that config.
	ErrPeer = errors.New("echkeys: peer does not decrypt the config")
	// ErrCNAME reports a name that is a CNAME (or an AliasMode HTTPS
	// record): records are not published over it.
	ErrCNAME = errors.New("echkeys: name is an alias")
	// ErrPublish reports a failed update of the DNS.
	ErrPublish = errors.New("echkeys: publishing failed")
)

// fileTimeLayout is the creation time in a key file's name, UTC to the
// second, so that names sort by age.
const fileTimeLayout = "20060102T150405Z"

// filePrefix starts the name of every file the Manager makes:
// echkeys-20261201T184000Z-a7.ech is a key made at that time with
// config_id 0xa7.
const filePrefix = "echkeys-"

// keyFile is a key in the directory.
type keyFile struct {
	name    string
	key     ech.Key
	created time.Time
	managed bool // made by a Manager: named by fileName
}

// fileName is the name of the file of a key made at created.
func fileName(created time.Time, configID uint8) string {
	return fmt.Sprintf("%s%s-%02x.ech", filePrefix, created.UTC().Format(fileTimeLayout), configID)
}

// parseFileName returns the creation time in a name made by fileName.
func parseFileName(name string) (time.Time, bool) {
	rest, ok := strings.CutPrefix(name, filePrefix)
	if !ok {
		return time.Time{}, false
	}
	rest, ok = strings.CutSuffix(rest, ".ech")
	if !ok {
		return time.Time{}, false
	}
	ts, id, ok := strings.Cut(rest, "-")
	if !ok || len(id) != 2 {
		return time.Time{}, false
	}
	if _, err := hex.DecodeString(id); err != nil {
		return time.Time{}, false
	}
	t, err := time.Parse(fileTimeLayout, ts)
	return t, err == nil
}

// Manager keeps a directory of ECH keys for one public name: it makes the
// first key, a new one every Rotate, deletes old ones at Retire, decides
// which key is advertised (sent as retry configs and published in DNS), and
// publishes it through its [Publisher]. Several Managers, on several hosts,
// may share one directory: see the package documentation for how they
// agree. Call [Manager.Tick] periodically, or [Manager.Run].
//
// The fields are read by the first Tick and must not change after it. A
// Manager is safe for concurrent use.
type Manager struct {
	// Dir is the key directory, made with mode 0700 if missing. The
	// Manager writes RFC 9934 PEM files named
	// echkeys-<UTC time>-<config_id>.ech, which [ech.LoadKeyDir] reads
	// too. Other *.ech and *.pem files are loaded as keys that decrypt,
	// never advertised nor deleted.
	Dir string
	// PublicName is the public_name of the keys made.
	PublicName string
	// KeyOptions are the options of the keys made; nil means the defaults
	// of [ech.GenerateKey]. ConfigID and SendAsRetry are ignored.
	KeyOptions *ech.KeyOptions
	// ReadOnly makes the Manager read the directory without writing it,
	// as on a Kubernetes Secret volume that another process fills.
	ReadOnly bool

	// Rotate is the age at which the newest key is followed by a new one;
	// zero means DefaultRotate.
	Rotate time.Duration
	// Propagation is how long after its creation a key is advertised when
	// Peers is empty: long enough for every server sharing the directory
	// to load it (its reload interval, plus the delay of the volume). Zero
	// means DefaultPropagation; a negative value means none, for a single
	// server.
	Propagation time.Duration
	// TTL is the TTL of the published records; zero means DefaultTTL.
	TTL time.Duration
	// Retire is the age at which a key that is no longer advertised is
	// deleted; zero means Rotate + Propagation + TTL + one day, at least
	// MinRetire. It must be at least Rotate + Propagation + TTL.
	Retire time.Duration
	// LockTimeout is the age of a lock after which its holder is taken
	// for dead; zero means DefaultLockTimeout.
	LockTimeout time.Duration
	// ID names this Manager in the lock file; empty means the host name,
	// the process id and a random suffix.
	ID string

	// Peers are the URLs of the /ech-config-list documents of every
	// server of the fleet, this one included, such as
	// "https://10.0.0.2/ech-config-list". A key is advertised and
	// published only once every peer decrypts it: the Manager connects to
	// each with ECH, offering that key's config with the public name as the
	// inner name, and fetches the document.
	Peers []string
	// PeerTLSConfig is the TLS configuration of those connections, for
	// its RootCAs; nil means the system's roots. It is cloned.
	PeerTLSConfig *tls.Config
	// PeerTimeout bounds each peer check; zero means 10 seconds.
	PeerTimeout time.Duration

	// Publisher, if not nil, publishes the advertised config in DNS.
	Publisher *Publisher
	// KeySet, if not nil, receives the keys after each Tick.
	KeySet *ech.KeySet
	// Logger receives a line for every key made, deleted or advertised
	// and for every failure; nil means slog.Default().
	Logger *slog.Logger
	// Now returns the current time; nil means time.Now. Tests set it.
	Now func() time.Time

	tickMu    sync.Mutex // serializes Ticks; guards the fields below it
	started   bool
	since     map[string]time.Time // config -> when this Manager first advertised it
	confirmed map[string]bool      // config -> every peer decrypts it

	mu         sync.Mutex // guards keys and advertised, written by Tick only
	keys       []ech.Key
	advertised []byte // config of the advertised key
}

// setup checks the fields and fills in the defaults.
func (m *Manager) setup() error {
	if m.started {
		return nil
	}
	if m.Dir == "" {
		return fmt.Errorf("%w: no directory", ErrConfig)
	}
	if err := ech.ValidPublicName(m.PublicName); err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if m.Rotate == 0 {
		m.Rotate = DefaultRotate
	}
	if m.Propagation == 0 {
		m.Propagation = DefaultPropagation
	}
	if m.Propagation < 0 {
		m.Propagation = 0
	}
	if m.TTL == 0 {
		m.TTL = DefaultTTL
	}
	if m.Publisher != nil && m.Publisher.TTL == 0 {
		m.Publisher.TTL = m.TTL
	}
	floor := m.Rotate + m.Propagation + m.TTL
	if m.Retire == 0 {
		m.Retire = max(floor+retireMargin, MinRetire)
	}
	if m.Rotate < 0 || m.TTL < 0 || m.Retire < floor {
		return fmt.Errorf("%w: retire %v is shorter than rotate + propagation + TTL (%v)", ErrConfig, m.Retire, floor)
	}
	if m.LockTimeout == 0 {
		m.LockTimeout = DefaultLockTimeout
	}
	if m.PeerTimeout == 0 {
		m.PeerTimeout = 10 * time.Second
	}
	if m.ID == "" {
		host, _ := os.Hostname()
		var b [4]byte
		rand.Read(b[:])
		m.ID = fmt.Sprintf("%s-%d-%x", host, os.Getpid(), b)
	}
	m.since = make(map[string]time.Time)
	m.confirmed = make(map[string]bool)
	m.started = true
	return nil
}

func (m *Manager) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

func (m *Manager) logger() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.Default()
}

// Keys returns the keys of the last Tick: the advertised key first, marked
// SendAsRetry, then the others, newest first, which only decrypt. The
// caller may modify the returned slice.
func (m *Manager) Keys() []ech.Key {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]ech.Key, len(m.keys))
	for i, k := range m.keys {
		out[i] = ech.Key{Config: slices.Clone(k.Config), PrivateKey: slices.Clone(k.PrivateKey), SendAsRetry: k.SendAsRetry}
	}
	return out
}

// ConfigList returns the ECHConfigList of the advertised key, as of the
// last Tick, or an error wrapping [ErrNoKeys].
func (m *Manager) ConfigList() (ech.ConfigList, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.advertised == nil {
		return nil, ErrNoKeys
	}
	return configList(m.advertised)
}

func configList(config []byte) (ech.ConfigList, error) {
	c, err := ech.ParseConfig(config)
	if err != nil {
		return nil, err
	}
	return ech.MarshalConfigList(c)
}

// Tick does one round of the Manager's work: it reads the directory; makes
// a key when there is none or the newest is Rotate old, and deletes the
// keys due for it, if it gets the directory's lock (otherwise the holder
// does, and this Manager picks its work up on a later Tick); picks the key
// to advertise; fills KeySet; and publishes. A failure to write keys or to
// publish is logged and returned, and the keys it could read are still in
// use: call Tick again, as [Manager.Run] does with backoff.
func (m *Manager) Tick(ctx context.Context) error {
	m.tickMu.Lock()
	defer m.tickMu.Unlock()
	if err := m.setup(); err != nil {
		return err
	}
	now := m.now()
	if !m.ReadOnly {
		if err := os.MkdirAll(m.Dir, 0o700); err != nil {
			return fmt.Errorf("echkeys: %w", err)
		}
	}
	files, err := scan(m.Dir)
	if err != nil {
		return err
	}
	var errs []error
	if !m.ReadOnly && m.needsWork(files, now) {
		got, err := m.maintain(now)
		switch {
		case errors.Is(err, errLocked):
			m.logger().Debug("echkeys: another manager holds the lock", slog.String("dir", m.Dir), slog.String("error", err.Error()))
		case err != nil:
			m.logger().Error("echkeys: maintaining keys", slog.String("dir", m.Dir), slog.String("error", err.Error()))
			errs = append(errs, err)
		default:
			files = got
		}
	}
	if !slices.ContainsFunc(files, func(f keyFile) bool { return f.managed }) {
		return errors.Join(append(errs, fmt.Errorf("%w in %s", ErrNoKeys, m.Dir))...)
	}
	// Load the keys first, the advertised one unchanged, so that this
	// server decrypts a new key when its peers check it, this one included.
	before := m.advertised
	prev := slices.IndexFunc(files, func(f keyFile) bool { return bytes.Equal(f.key.Config, before) })
	if prev < 0 {
		prev = 0 // the oldest managed key
	}
	m.use(files, prev, now)
	if err := m.load(); err != nil {
		errs = append(errs, err)
	}
	if adv := m.choose(ctx, files, now); adv != prev {
		m.use(files, adv, now)
		if err := m.load(); err != nil {
			errs = append(errs, err)
		}
	}
	adv := slices.IndexFunc(files, func(f keyFile) bool { return bytes.Equal(f.key.Config, m.advertised) })
	if !bytes.Equal(before, m.advertised) {
		m.logger().Info("echkeys: key advertised", slog.String("dir", m.Dir), slog.String("file", files[adv].name),
			slog.Int("config_id", configID(m.advertised)), slog.Int("keys", len(files)))
	}
	if m.Publisher != nil {
		if err := m.publish(ctx, files, adv, now); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// load puts the keys in KeySet, if any.
func (m *Manager) load() error {
	if m.KeySet == nil {
		return nil
	}
	return m.KeySet.Replace(m.keys...)
}

// scan reads the keys of dir, oldest managed first.
func scan(dir string) ([]keyFile, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("echkeys: %w", err)
	}
	var files []keyFile
	for _, e := range entries {
		n := e.Name()
		if !strings.HasSuffix(n, ".ech") && !strings.HasSuffix(n, ".pem") {
			continue
		}
		path := filepath.Join(dir, n)
		data, err := readBounded(path, ech.MaxKeyFileSize)
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, boundedfile.ErrNotRegular) {
			// Deleted by another Manager since ReadDir, a link left
			// dangling by a volume's swap, or (as LoadKeyDir skips it)
			// a directory, socket, FIFO...
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("echkeys: %w", err)
		}
		pf, err := ech.ParsePEM(data)
		if err != nil {
			return nil, fmt.Errorf("%w (file %s)", err, n)
		}
		k, err := pf.Key()
		if err != nil {
			continue // a config without its key
		}
		f := keyFile{name: n, key: k}
		f.created, f.managed = parseFileName(n)
		files = append(files, f)
	}
	// Managed keys by age; the others after them, by name.
	slices.SortStableFunc(files, func(a, b keyFile) int {
		switch {
		case a.managed != b.managed:
			if a.managed {
				return -1
			}
			return 1
		case a.managed:
			return a.created.Compare(b.created)
		}
		return strings.Compare(a.name, b.name)
	})
	return files, nil
}

// newest returns the newest managed key, if any.
func newest(files []keyFile) (keyFile, bool) {
	var out keyFile
	found := false
	for _, f := range files {
		if f.managed {
			out, found = f, true
		}
	}
	return out, found
}

// needsWork reports whether a key is to be made or deleted.
func (m *Manager) needsWork(files []keyFile, now time.Time) bool {
	n, ok := newest(files)
	if !ok || !now.Before(n.created.Add(m.Rotate)) {
		return true
	}
	return slices.ContainsFunc(files, func(f keyFile) bool { return m.deletable(files, f, now) })
}

// deletable reports whether f is due for deletion: it is a managed key,
// Retire old, not advertised, a newer key has been advertised for a TTL
// (so clients that had f's config from DNS have dropped it) and, with a
// Publisher, f's config has been out of DNS for a TTL.
func (m *Manager) deletable(files []keyFile, f keyFile, now time.Time) bool {
	if !f.managed || now.Before(f.created.Add(m.Retire)) || bytes.Equal(f.key.Config, m.advertised) {
		return false
	}
	if m.advertised == nil {
		return false
	}
	adv := slices.IndexFunc(files, func(g keyFile) bool { return bytes.Equal(g.key.Config, m.advertised) })
	if adv < 0 || !files[adv].created.After(f.created) {
		return false
	}
	if s, ok := m.since[string(m.advertised)]; !ok || now.Before(s.Add(m.TTL)) {
		return false
	}
	if m.Publisher != nil {
		gone, ok := m.Publisher.absentSince(f.key.Config)
		if !ok || now.Before(gone.Add(m.TTL)) {
			return false
		}
	}
	return true
}

// maintain takes the lock, reads the directory again, makes a key if one is
// due, deletes the keys that are due, and returns the keys then in the
// directory.
func (m *Manager) maintain(now time.Time) ([]keyFile, error) {
	l, err := acquireLock(m.Dir, m.ID, now, m.LockTimeout)
	if err != nil {
		return nil, err
	}
	defer l.release()
	files, err := scan(m.Dir)
	if err != nil {
		return nil, err
	}
	if n, ok := newest(files); !ok || !now.Before(n.created.Add(m.Rotate)) {
		f, err := m.generate(files, now, l)
		if err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	kept := files[:0:0]
	for _, f := range files {
		if !m.deletable(files, f, now) {
			kept = append(kept, f)
			continue
		}
		if !l.held() {
			return nil, errLocked
		}
		if err := os.Remove(filepath.Join(m.Dir, f.name)); err != nil {
			return nil, fmt.Errorf("echkeys: deleting %s: %w", f.name, err)
		}
		delete(m.since, string(f.key.Config))
		delete(m.confirmed, string(f.key.Config))
		m.logger().Info("echkeys: key deleted", slog.String("dir", m.Dir), slog.String("file", f.name),
			slog.Int("config_id", configID(f.key.Config)), slog.Time("created", f.created))
	}
	if err := syncDir(m.Dir); err != nil {
		return nil, err
	}
	return kept, nil
}

// generate makes a key, writes it atomically and returns it.
func (m *Manager) generate(files []keyFile, now time.Time, l *lock) (keyFile, error) {
	var o ech.KeyOptions
	if m.KeyOptions != nil {
		o = *m.KeyOptions
	}
	o.ConfigID, o.NoRetry = 0, true
	o.AvoidConfigIDs = slices.Clone(o.AvoidConfigIDs)
	for _, f := range files {
		o.AvoidConfigIDs = append(o.AvoidConfigIDs, uint8(configID(f.key.Config)))
	}
	k, err := ech.GenerateKey(m.PublicName, &o)
	if err != nil {
		return keyFile{}, err
	}
	pemData, err := ech.MarshalPEM(k)
	if err != nil {
		return keyFile{}, err
	}
	created := now.UTC().Truncate(time.Second)
	name := fileName(created, uint8(configID(k.Config)))
	if !l.held() {
		return keyFile{}, errLocked
	}
	if err := writeAtomic(m.Dir, name, pemData); err != nil {
		return keyFile{}, err
	}
	m.logger().Info("echkeys: key made", slog.String("dir", m.Dir), slog.String("file", name),
		slog.Int("config_id", configID(k.Config)), slog.String("public_name", m.PublicName))
	return keyFile{name: name, key: k, created: created, managed: true}, nil
}

// writeAtomic writes data to dir/name with mode 0600 so that the name
// holds either nothing or all of data: a temporary file in dir (whose name
// LoadKeyDir does not read), synced, then renamed, and dir synced.
func writeAtomic(dir, name string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, ".tmp-echkeys-*")
	if err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	if err := os.Rename(f.Name(), filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	return syncDir(dir)
}

// syncDir makes the directory's entries durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("echkeys: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return fmt.Errorf("echkeys: syncing %s: %w", dir, err)
	}
	return nil
}

// configID returns the config_id of a serialized ECHConfig, or -1.
func configID(config []byte) int {
	c, err := ech.ParseConfig(config)
	if err != nil {
		return -1
	}
	return int(c.ConfigID)
}

// choose returns the index in files of the key to advertise: the newest
// managed key that is ready (Propagation old without peers; decrypted by
// every peer with them), else the oldest managed key.
func (m *Manager) choose(ctx context.Context, files []keyFile, now time.Time) int {
	first := -1
	for i := len(files) - 1; i >= 0; i-- {
		f := files[i]
		if !f.managed {
			continue
		}
		first = i
		if m.ready(ctx, f, now) {
			return i
		}
	}
	return first
}

// ready reports whether f may be advertised.
func (m *Manager) ready(ctx context.Context, f keyFile, now time.Time) bool {
	if len(m.Peers) == 0 {
		return !now.Before(f.created.Add(m.Propagation))
	}
	if m.confirmed[string(f.key.Config)] {
		return true
	}
	if err := m.checkPeers(ctx, f.key.Config); err != nil {
		m.logger().Info("echkeys: key not yet served by every peer", slog.String("file", f.name),
			slog.Int("config_id", configID(f.key.Config)), slog.String("error", err.Error()))
		return false
	}
	m.confirmed[string(f.key.Config)] = true
	return true
}

// use makes files the Manager's keys, with files[adv] advertised.
func (m *Manager) use(files []keyFile, adv int, now time.Time) {
	keys := make([]ech.Key, 0, len(files))
	a := files[adv].key
	a.SendAsRetry = true
	keys = append(keys, a)
	for i := len(files) - 1; i >= 0; i-- {
		if i == adv {
			continue
		}
		k := files[i].key
		k.SendAsRetry = false
		keys = append(keys, k)
	}
	m.mu.Lock()
	m.keys, m.advertised = keys, a.Config
	m.mu.Unlock()
	if _, ok := m.since[string(a.Config)]; !ok {
		m.since[string(a.Config)] = now
	}
}

// publish publishes the advertised key's config, if every peer decrypts it
// (or, without peers, it is Propagation old).
func (m *Manager) publish(ctx context.Context, files []keyFile, adv int, now time.Time) error {
	f := files[adv]
	if !m.ready(ctx, f, now) {
		return nil // the bootstrap key, not yet everywhere
	}
	list, err := configList(f.key.Config)
	if err != nil {
		return err
	}
	created := make(map[string]time.Time, len(files))
	for _, g := range files {
		if g.managed {
			created[string(g.key.Config)] = g.created
		}
	}
	return m.Publisher.publish(ctx, list, created, now)
}

// Run calls Tick every interval until ctx is done. After a failed Tick it
// tries again sooner, with a backoff from one second up to interval.
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	backoff := time.Second
	for {
		wait := interval
		if err := m.Tick(ctx); err != nil {
			m.logger().Error("echkeys: tick failed", slog.String("dir", m.Dir), slog.String("error", err.Error()))
			wait = min(backoff, interval)
			backoff = min(2*backoff, interval)
		} else {
			backoff = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
