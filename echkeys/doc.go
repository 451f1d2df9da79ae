// Package echkeys keeps ECH keys without a person: it makes them, rotates
// them, retires them, and publishes their configs in DNS, for one server or
// for a fleet of servers that share a key directory.
//
// A [Manager] owns a directory of RFC 9934 PEM files, the format
// [ech.LoadKeyDir] reads, so that a server that loads the directory by
// itself (OpenSSL-based ones do) serves the same keys. Call [Manager.Tick]
// every few minutes, or run [Manager.Run]; hand [Manager.Keys] (or
// [Manager.KeySet]) to the server.
//
//	ks, _ := ech.NewKeySet()
//	m := &echkeys.Manager{Dir: "/var/lib/ech", PublicName: "public.example.com", KeySet: ks}
//	go m.Run(ctx, 5*time.Minute)
//	// ech.NewConn(ctx, conn, ech.WithKeySet(ks)) ...
//
// # Key lifecycle
//
// Each key file is named for its creation time, echkeys-20261201T184000Z-a7.ech,
// so the age of a key is known from the directory alone, on every host, after
// any restart. At each Tick:
//
//   - When the directory has no key, or its newest key is Rotate old
//     (default 30 days), a new key is made.
//   - The advertised key, the only one marked SendAsRetry (sent as retry
//     configs and published), is the newest key that is safe to advertise
//     (see below); the others only decrypt.
//   - A key is deleted when it is Retire old (default Rotate + Propagation +
//     TTL + one day, at least two days), is not advertised, a newer key has
//     been advertised for a TTL, and, with a [Publisher], its config has been
//     out of DNS for a TTL. Retire must be at least Rotate + Propagation + TTL.
//
// Files are written with mode 0600, to a temporary file in the same
// directory that is synced and then renamed, so a crash leaves either a whole
// key or none (a leftover temporary file does not end in ".ech" and is never
// loaded). Other *.ech and *.pem files in the directory are loaded as keys
// that decrypt; they are never advertised nor deleted.
//
// # Fleets
//
// Several Managers may share one directory, on a network file system or
// on a volume. Exactly one of them writes at a time: a Manager that has
// something to make or delete creates the lock file .echkeys.lock with
// O_CREATE|O_EXCL (atomic on local file systems and NFS v3 and later, unlike
// flock, which NFS makes unreliable), writing its ID and the time; it reads
// the directory again under the lock, so that a key another Manager has just
// made is not made twice. A lock older than LockTimeout belongs to a dead
// holder and is broken. The others find the new files at their next Tick. On
// a read-only volume, such as a Kubernetes Secret that another process
// fills (its ..data symlink swap is atomic), set ReadOnly.
//
// A config is safe to advertise only when every server of the fleet
// decrypts it: a retry config sent by server A must work on server B, and a
// client may reach any server with the config it found in DNS. The rule:
//
//   - With Peers (the URL of every server's /ech-config-list, this one
//     included), a key is advertised, and published, once every peer
//     decrypts it. The Manager checks this for real: it connects to each peer
//     with ECH, offering only that key's config, with the public name as the
//     inner name, and fetches the document. A peer that lacks the key
//     rejects ECH and fails the check. Each Tick loads new keys into KeySet
//     before it checks, so the servers confirm one another within one round
//     of reloads. A peer that never loads the key holds the rotation back:
//     the old key stays advertised, and is not deleted.
//   - Without peers, a key is advertised Propagation (default one hour)
//     after its creation: set it longer than the longest delay for a server
//     to load a new file (its reload interval, plus the volume's delay). A
//     single server sets it negative.
//   - The first key of an empty directory is advertised at once (there is no
//     other), and published once the rule above allows.
//
// # Publishing
//
// A [Publisher] keeps one HTTPS record "1 . alpn=... ech=..." at each of its
// names, with the advertised config (RFC 9848), through a [Provider]:
// [RFC2136] sends dynamic updates signed with TSIG to the zone's primary.
// The order never strands a client: a config is published only after every
// peer decrypts it, and a retired key is deleted only after its config has
// been out of DNS for a TTL. The Publisher reads each name before it writes:
// it refuses to write over a CNAME or an AliasMode record ([ErrCNAME]; the
// update also carries the prerequisite that the name has no CNAME), leaves
// alone a name without an HTTPS record unless [Name.Create] is set, never
// replaces a config with an older one of the same directory (several routers
// may publish), and logs each change with the config_ids before and after.
// A failed publish is returned by Tick and tried again at the next one;
// [Manager.Run] ticks sooner after a failure, with backoff, and the keys keep
// rotating meanwhile.
package echkeys
