package ech

// This is the only file that imports circl. Everything else in the package
// works with KEMID, KDFID, AEADID and the small wrappers below.

import (
	"crypto/rand"
	"fmt"
	"io"

	"github.com/cloudflare/circl/hpke"
	"github.com/cloudflare/circl/kem"
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
	kem KEMID
	sk  kem.PrivateKey
	pub []byte // SerializePublicKey(pk)
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
	return &kemPrivateKey{kem: k, sk: sk, pub: pub}, nil
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

// hpkeRecipient is an HPKE base-mode receiver context. It opens messages in
// sequence: the HelloRetryRequest flow opens the second ClientHello with the
// same context (RFC 9849, Section 7.1.1).
type hpkeRecipient struct {
	opener hpke.Opener
}

// newRecipient runs SetupBaseR(enc, skR, info) (RFC 9180, Section 5.1.1).
// A failure means the client's enc does not decapsulate under this key: the
// caller treats it as a failed trial decryption, not as an error.
func newRecipient(sk *kemPrivateKey, cs CipherSuite, enc, info []byte) (*hpkeRecipient, error) {
	if !cs.Supported() {
		return nil, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, cs)
	}
	suite := hpke.NewSuite(hpke.KEM(sk.kem), hpke.KDF(cs.KDF), hpke.AEAD(cs.AEAD))
	r, err := suite.NewReceiver(sk.sk, info)
	if err != nil {
		return nil, ErrDecryptError
	}
	o, err := r.Setup(enc)
	if err != nil {
		return nil, ErrDecryptError
	}
	return &hpkeRecipient{opener: o}, nil
}

// open decrypts ct with the next sequence number. The argument order is
// crypto/hpke's (aad first); circl's Open takes the ciphertext first.
func (r *hpkeRecipient) open(aad, ct []byte) ([]byte, error) {
	pt, err := r.opener.Open(ct, aad)
	if err != nil {
		return nil, ErrDecryptError
	}
	return pt, nil
}
