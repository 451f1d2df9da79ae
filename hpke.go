package ech

// This is the only file that imports circl. Everything else in the package
// works with KEMID, KDFID, AEADID and the small wrappers below.

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/cloudflare/circl/dh/x25519"
	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"
	"golang.org/x/crypto/chacha20poly1305"
)

// KEMID identifies an HPKE key encapsulation mechanism (RFC 9180, Section 7.1).
type KEMID uint16

// KDFID identifies an HPKE key derivation function (RFC 9180, Section 7.2).
type KDFID uint16

// AEADID identifies an HPKE AEAD (RFC 9180, Section 7.3).
type AEADID uint16

// The HPKE algorithms this package implements. KEMXWing is the post-quantum
// hybrid MLKEM768-X25519 (X-Wing). The export-only AEAD (0xffff) is not valid
// for ECH and is refused.
const (
	KEMP256   KEMID = 0x0010 // DHKEM(P-256, HKDF-SHA256)
	KEMP384   KEMID = 0x0011 // DHKEM(P-384, HKDF-SHA384)
	KEMP521   KEMID = 0x0012 // DHKEM(P-521, HKDF-SHA512)
	KEMX25519 KEMID = 0x0020 // DHKEM(X25519, HKDF-SHA256)
	KEMX448   KEMID = 0x0021 // DHKEM(X448, HKDF-SHA512)
	KEMXWing  KEMID = 0x647a // MLKEM768-X25519 (X-Wing)

	KDFHKDFSHA256 KDFID = 0x0001
	KDFHKDFSHA384 KDFID = 0x0002
	KDFHKDFSHA512 KDFID = 0x0003

	AEADAES128GCM        AEADID = 0x0001
	AEADAES256GCM        AEADID = 0x0002
	AEADChaCha20Poly1305 AEADID = 0x0003
)

var kemNames = map[KEMID]string{
	KEMP256:   "DHKEM(P-256, HKDF-SHA256)",
	KEMP384:   "DHKEM(P-384, HKDF-SHA384)",
	KEMP521:   "DHKEM(P-521, HKDF-SHA512)",
	KEMX25519: "DHKEM(X25519, HKDF-SHA256)",
	KEMX448:   "DHKEM(X448, HKDF-SHA512)",
	KEMXWing:  "MLKEM768-X25519",
}

var kdfNames = map[KDFID]string{
	KDFHKDFSHA256: "HKDF-SHA256",
	KDFHKDFSHA384: "HKDF-SHA384",
	KDFHKDFSHA512: "HKDF-SHA512",
}

var aeadNames = map[AEADID]string{
	AEADAES128GCM:        "AES-128-GCM",
	AEADAES256GCM:        "AES-256-GCM",
	AEADChaCha20Poly1305: "ChaCha20-Poly1305",
}

// String returns the RFC 9180 name of k, or its hex value if unknown.
func (k KEMID) String() string {
	if n, ok := kemNames[k]; ok {
		return n
	}
	return fmt.Sprintf("KEM(0x%04x)", uint16(k))
}

// String returns the RFC 9180 name of k, or its hex value if unknown.
func (k KDFID) String() string {
	if n, ok := kdfNames[k]; ok {
		return n
	}
	return fmt.Sprintf("KDF(0x%04x)", uint16(k))
}

// String returns the RFC 9180 name of a, or its hex value if unknown.
func (a AEADID) String() string {
	if n, ok := aeadNames[a]; ok {
		return n
	}
	return fmt.Sprintf("AEAD(0x%04x)", uint16(a))
}

// Supported reports whether this package implements k.
func (k KEMID) Supported() bool { _, ok := kemNames[k]; return ok }

// Supported reports whether this package implements k.
func (k KDFID) Supported() bool { _, ok := kdfNames[k]; return ok }

// Supported reports whether this package implements a for ECH.
func (a AEADID) Supported() bool { _, ok := aeadNames[a]; return ok }

// CipherSuite is an HPKE symmetric cipher suite:
//
//	struct {
//	    HpkeKdfId kdf_id;
//	    HpkeAeadId aead_id;
//	} HpkeSymmetricCipherSuite;
type CipherSuite struct {
	KDF  KDFID
	AEAD AEADID
}

// String returns the suite as "KDF/AEAD".
func (s CipherSuite) String() string { return s.KDF.String() + "/" + s.AEAD.String() }

// Supported reports whether this package implements both halves of s.
func (s CipherSuite) Supported() bool { return s.KDF.Supported() && s.AEAD.Supported() }

// kemPrivateKey is a parsed HPKE private key with its encoded public key.
type kemPrivateKey struct {
	kem    KEMID
	sk     kem.PrivateKey
	pub    []byte      // SerializePublicKey(pk)
	x25519 *x25519.Key // the scalar, for DHKEM(X25519)'s fast path
}

func (k KEMID) scheme() (kem.Scheme, error) {
	if !k.Supported() {
		return nil, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, k)
	}
	return hpke.KEM(k).Scheme(), nil
}

// generateKEMKey returns a new key pair for k, as SerializePrivateKey and
// SerializePublicKey encode them (RFC 9180, Section 7.1.2). The seed comes
// from rnd, or crypto/rand when rnd is nil.
func generateKEMKey(k KEMID, rnd io.Reader) (priv, pub []byte, err error) {
	s, err := k.scheme()
	if err != nil {
		return nil, nil, err
	}
	if rnd == nil {
		rnd = rand.Reader
	}
	seed := make([]byte, s.SeedSize())
	if _, err := io.ReadFull(rnd, seed); err != nil {
		return nil, nil, fmt.Errorf("ech: reading randomness: %w", err)
	}
	pk, sk := s.DeriveKeyPair(seed)
	if priv, err = sk.MarshalBinary(); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalidKey, k)
	}
	if pub, err = pk.MarshalBinary(); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalidKey, k)
	}
	return priv, pub, nil
}

// parseKEMPrivateKey parses an RFC 9180 SerializePrivateKey encoding.
func parseKEMPrivateKey(k KEMID, priv []byte) (*kemPrivateKey, error) {
	s, err := k.scheme()
	if err != nil {
		return nil, err
	}
	if len(priv) != s.PrivateKeySize() {
		return nil, fmt.Errorf("%w: %v private key is %d bytes, want %d", ErrInvalidKey, k, len(priv), s.PrivateKeySize())
	}
	sk, err := s.UnmarshalBinaryPrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("%w: %v private key does not parse", ErrInvalidKey, k)
	}
	pub, err := sk.Public().MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("%w: %v public key", ErrInvalidKey, k)
	}
	out := &kemPrivateKey{kem: k, sk: sk, pub: pub}
	if k == KEMX25519 {
		out.x25519 = new(x25519.Key)
		copy(out.x25519[:], priv)
	}
	return out, nil
}

// validPublicKey reports whether pub is a valid encoded public key for k.
func validPublicKey(k KEMID, pub []byte) bool {
	s, err := k.scheme()
	if err != nil || len(pub) != s.PublicKeySize() {
		return false
	}
	_, err = s.UnmarshalBinaryPublicKey(pub)
	return err == nil
}

// hpkeRecipient is an HPKE base-mode receiver context (RFC 9180, Section
// 5.2). It opens messages in sequence: the HelloRetryRequest flow opens the
// second ClientHello with the same context (RFC 9849, Section 7.1.1).
type hpkeRecipient struct {
	aead      cipher.AEAD
	baseNonce [12]byte
	nonce     [12]byte
	seq       uint64
}

// keyScheduleContext returns mode || psk_id_hash || info_hash for base mode
// (RFC 9180, Section 5.1). It depends only on the key's config and the
// suite, so a parsed key computes it once per suite.
func keyScheduleContext(kem KEMID, cs CipherSuite, info []byte) []byte {
	st := getKDF(cs.KDF)
	defer st.put()
	id := st.hpkeSuiteID(kem, cs)
	out := append(make([]byte, 0, 1+2*st.size), 0) // mode_base
	out = st.labeledExtract(out, id, nil, labelPSKIDHash, nil)
	return st.labeledExtract(out, id, nil, labelInfoHash, info)
}

// newRecipientContext runs SetupBaseR(enc, skR, info) (RFC 9180, Section
// 5.1.1) with the key schedule context precomputed from info. A failure
// means the client's enc does not decapsulate under this key: the caller
// treats it as a failed trial decryption, not as an error.
func newRecipientContext(sk *kemPrivateKey, cs CipherSuite, enc, ksc []byte) (*hpkeRecipient, error) {
	st := getKDF(cs.KDF)
	defer st.put()
	ss, err := st.decap(sk, enc)
	if err != nil {
		return nil, ErrDecryptError
	}
	// RFC 9180, Section 5.1: secret = LabeledExtract(shared_secret, "secret", psk).
	id := st.hpkeSuiteID(sk.kem, cs)
	secret := st.labeledExtract(st.prk[:0], id, ss, labelSecret, nil)
	nk := 16
	if cs.AEAD != AEADAES128GCM {
		nk = 32
	}
	r := new(hpkeRecipient)
	copy(r.baseNonce[:], st.labeledExpand(st.key[:0], secret, id, labelBaseNonce, ksc, len(r.baseNonce)))
	key := st.labeledExpand(st.key[:0], secret, id, labelKey, ksc, nk)
	switch cs.AEAD {
	case AEADChaCha20Poly1305:
		r.aead, err = chacha20poly1305.New(key)
	default:
		var block cipher.Block
		if block, err = aes.NewCipher(key); err == nil {
			r.aead, err = cipher.NewGCM(block)
		}
	}
	if err != nil {
		return nil, ErrDecryptError
	}
	return r, nil
}

// open decrypts ct with the next sequence number and appends the plaintext
// to dst (RFC 9180, Section 5.2). The argument order is crypto/hpke's (aad
// first).
func (r *hpkeRecipient) open(dst, aad, ct []byte) ([]byte, error) {
	r.nonce = r.baseNonce
	for i := range 8 {
		r.nonce[len(r.nonce)-1-i] ^= byte(r.seq >> (8 * i))
	}
	pt, err := r.aead.Open(dst, r.nonce[:], ct, aad)
	if err != nil {
		return nil, ErrDecryptError
	}
	r.seq++
	return pt, nil
}

// Labels of RFC 9180, as package variables so that passing them to a hash
// does not allocate.
var (
	labelHPKEv1       = []byte("HPKE-v1")
	labelEAEPRK       = []byte("eae_prk")
	labelSharedSecret = []byte("shared_secret")
	labelPSKIDHash    = []byte("psk_id_hash")
	labelInfoHash     = []byte("info_hash")
	labelSecret       = []byte("secret")
	labelKey          = []byte("key")
	labelBaseNonce    = []byte("base_nonce")
)

// kdfState is working memory for HKDF with one hash: two reusable digests
// for HMAC and buffers, pooled so that a handshake allocates none of it.
type kdfState struct {
	pool         *sync.Pool
	inner, outer hash.Hash
	size, block  int
	ipad, opad   [128]byte
	tmp          [64]byte // inner digest, and T(i-1) of HKDF-Expand
	prk          [64]byte
	key          [64]byte
	ss           [64]byte // shared secret
	dh           [32]byte
	kemCtx       [64]byte // enc || pkRm for X25519
	suiteID      [10]byte
	kemID        [5]byte
	num          [2]byte
	ctr          [1]byte
}

var kdfPools = map[KDFID]*sync.Pool{
	KDFHKDFSHA256: {New: func() any { return newKDFState(sha256.New) }},
	KDFHKDFSHA384: {New: func() any { return newKDFState(sha512.New384) }},
	KDFHKDFSHA512: {New: func() any { return newKDFState(sha512.New) }},
}

func newKDFState(h func() hash.Hash) *kdfState {
	inner := h()
	return &kdfState{inner: inner, outer: h(), size: inner.Size(), block: inner.BlockSize()}
}

func getKDF(id KDFID) *kdfState {
	p := kdfPools[id]
	st := p.Get().(*kdfState)
	st.pool = p
	return st
}

// put returns st to its pool, with no secret left in it.
func (st *kdfState) put() {
	clear(st.ipad[:])
	clear(st.opad[:])
	clear(st.tmp[:])
	clear(st.prk[:])
	clear(st.key[:])
	clear(st.ss[:])
	clear(st.dh[:])
	st.pool.Put(st)
}

func (st *kdfState) hpkeSuiteID(kem KEMID, cs CipherSuite) []byte {
	// suite_id = "HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) || I2OSP(aead_id, 2)
	copy(st.suiteID[:], "HPKE")
	binary.BigEndian.PutUint16(st.suiteID[4:], uint16(kem))
	binary.BigEndian.PutUint16(st.suiteID[6:], uint16(cs.KDF))
	binary.BigEndian.PutUint16(st.suiteID[8:], uint16(cs.AEAD))
	return st.suiteID[:]
}

// hmacStart begins HMAC(key, ...); key is at most one block, as every HKDF
// key here is (a salt or PRK of at most Nh bytes).
func (st *kdfState) hmacStart(key []byte) {
	if len(key) > st.block {
		panic("ech: HMAC key longer than a block") // unreachable: keys are at most Nh bytes
	}
	clear(st.ipad[:st.block])
	copy(st.ipad[:], key)
	st.opad = st.ipad
	for i := range st.block {
		st.ipad[i] ^= 0x36
		st.opad[i] ^= 0x5c
	}
	st.inner.Reset()
	st.inner.Write(st.ipad[:st.block])
}

func (st *kdfState) hmacSum(dst []byte) []byte {
	in := st.inner.Sum(st.tmp[:0])
	st.outer.Reset()
	st.outer.Write(st.opad[:st.block])
	st.outer.Write(in)
	return st.outer.Sum(dst)
}

// labeledExtract appends LabeledExtract(salt, label, ikm) to dst
// (RFC 9180, Section 4).
func (st *kdfState) labeledExtract(dst, suiteID, salt, label, ikm []byte) []byte {
	st.hmacStart(salt)
	st.inner.Write(labelHPKEv1)
	st.inner.Write(suiteID)
	st.inner.Write(label)
	st.inner.Write(ikm)
	return st.hmacSum(dst)
}

// labeledExpand appends LabeledExpand(prk, label, info, l) to dst
// (RFC 9180, Section 4), HKDF-Expand of RFC 5869, Section 2.3.
func (st *kdfState) labeledExpand(dst, prk, suiteID, label, info []byte, l int) []byte {
	binary.BigEndian.PutUint16(st.num[:], uint16(l))
	start := len(dst)
	var prev []byte
	for i := 1; len(dst)-start < l; i++ {
		st.hmacStart(prk)
		st.inner.Write(prev)
		st.inner.Write(st.num[:])
		st.inner.Write(labelHPKEv1)
		st.inner.Write(suiteID)
		st.inner.Write(label)
		st.inner.Write(info)
		st.ctr[0] = byte(i)
		st.inner.Write(st.ctr[:])
		n := len(dst)
		dst = st.hmacSum(dst)
		prev = dst[n:]
	}
	return dst[:start+l]
}

// decap returns the KEM shared secret for enc (RFC 9180, Section 4.1).
// DHKEM(X25519) is done here, without allocating; the other KEMs by circl.
func (st *kdfState) decap(sk *kemPrivateKey, enc []byte) ([]byte, error) {
	if sk.x25519 == nil {
		s, err := sk.kem.scheme()
		if err != nil {
			return nil, err
		}
		return s.Decapsulate(sk.sk, enc)
	}
	if len(enc) != x25519.Size {
		return nil, ErrDecryptError
	}
	// dh = DH(skR, pkE); an all-zero result (a low-order point) is refused.
	if !x25519.Shared((*x25519.Key)(&st.dh), sk.x25519, (*x25519.Key)(enc)) {
		return nil, ErrDecryptError
	}
	// kem_context = enc || pkRm; the KEM's own KDF is HKDF-SHA256.
	kst := st
	if st.size != sha256.Size {
		kst = getKDF(KDFHKDFSHA256)
		defer kst.put()
	}
	ctx := append(append(kst.kemCtx[:0], enc...), sk.pub...)
	copy(kst.kemID[:], "KEM")
	binary.BigEndian.PutUint16(kst.kemID[3:], uint16(KEMX25519))
	prk := kst.labeledExtract(kst.prk[:0], kst.kemID[:], nil, labelEAEPRK, st.dh[:])
	return kst.labeledExpand(st.ss[:0], prk, kst.kemID[:], labelSharedSecret, ctx, sha256.Size), nil
}
