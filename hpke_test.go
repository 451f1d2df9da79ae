package ech

import (
	"bytes"
	"crypto/hpke"
	"crypto/rand"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"slices"
	"testing"

	// Only tests import circl outside hpke.go: it seals for X448, which
	// crypto/hpke lacks.
	circlhpke "github.com/cloudflare/circl/hpke"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allKEMs are the KEMs of this package, in the order tests report them.
var allKEMs = []KEMID{KEMX25519, KEMP256, KEMP384, KEMP521, KEMX448, KEMXWing}

// kemShortNames name the KEMs in subtest and benchmark names.
var kemShortNames = map[KEMID]string{
	KEMX25519: "X25519",
	KEMP256:   "P-256",
	KEMP384:   "P-384",
	KEMP521:   "P-521",
	KEMX448:   "X448",
	KEMXWing:  "X-Wing",
}

// inCryptoHPKE reports whether crypto/hpke implements k: every KEM of this
// package but X448.
func inCryptoHPKE(k KEMID) bool {
	_, err := hpke.NewKEM(uint16(k))
	return err == nil
}

// allSuites are every supported KDF with every supported AEAD.
var allSuites = func() []CipherSuite {
	var out []CipherSuite
	for _, kdf := range []KDFID{KDFHKDFSHA256, KDFHKDFSHA384, KDFHKDFSHA512} {
		for _, aead := range []AEADID{AEADAES128GCM, AEADAES256GCM, AEADChaCha20Poly1305} {
			out = append(out, CipherSuite{kdf, aead})
		}
	}
	return out
}()

func TestAlgorithmNames(t *testing.T) {
	tests := []struct {
		name      string
		got       string
		want      string
		supported bool
	}{
		{"P-256", KEMP256.String(), "DHKEM(P-256, HKDF-SHA256)", KEMP256.Supported()},
		{"P-384", KEMP384.String(), "DHKEM(P-384, HKDF-SHA384)", KEMP384.Supported()},
		{"P-521", KEMP521.String(), "DHKEM(P-521, HKDF-SHA512)", KEMP521.Supported()},
		{"X25519", KEMX25519.String(), "DHKEM(X25519, HKDF-SHA256)", KEMX25519.Supported()},
		{"X448", KEMX448.String(), "DHKEM(X448, HKDF-SHA512)", KEMX448.Supported()},
		{"X-Wing", KEMXWing.String(), "MLKEM768-X25519", KEMXWing.Supported()},
		{"unknown KEM", KEMID(0xcccc).String(), "KEM(0xcccc)", !KEMID(0xcccc).Supported()},
		{"ML-KEM-768 alone", KEMID(0x0041).String(), "KEM(0x0041)", !KEMID(0x0041).Supported()},
		{"SHA-256", KDFHKDFSHA256.String(), "HKDF-SHA256", KDFHKDFSHA256.Supported()},
		{"SHA-384", KDFHKDFSHA384.String(), "HKDF-SHA384", KDFHKDFSHA384.Supported()},
		{"SHA-512", KDFHKDFSHA512.String(), "HKDF-SHA512", KDFHKDFSHA512.Supported()},
		{"SHAKE128", KDFID(0x0010).String(), "KDF(0x0010)", !KDFID(0x0010).Supported()},
		{"AES-128-GCM", AEADAES128GCM.String(), "AES-128-GCM", AEADAES128GCM.Supported()},
		{"AES-256-GCM", AEADAES256GCM.String(), "AES-256-GCM", AEADAES256GCM.Supported()},
		{"ChaCha20", AEADChaCha20Poly1305.String(), "ChaCha20-Poly1305", AEADChaCha20Poly1305.Supported()},
		// RFC 9849, Section 4.1: the export-only AEAD cannot encrypt a ClientHello.
		{"export-only", AEADID(0xffff).String(), "AEAD(0xffff)", !AEADID(0xffff).Supported()},
		{"suite", CipherSuite{KDFHKDFSHA256, AEADAES128GCM}.String(), "HKDF-SHA256/AES-128-GCM",
			CipherSuite{KDFHKDFSHA256, AEADAES128GCM}.Supported()},
		{"suite with unknown KDF", CipherSuite{9, AEADAES128GCM}.String(), "KDF(0x0009)/AES-128-GCM",
			!CipherSuite{9, AEADAES128GCM}.Supported()},
		{"suite with unknown AEAD", CipherSuite{KDFHKDFSHA256, 9}.String(), "HKDF-SHA256/AEAD(0x0009)",
			!CipherSuite{KDFHKDFSHA256, 9}.Supported()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, tc.got)
			assert.True(t, tc.supported)
		})
	}
}

func TestGenerateKEMKey(t *testing.T) {
	sizes := map[KEMID][2]int{ // private, public
		KEMX25519: {32, 32},
		KEMP256:   {32, 65},
		KEMP384:   {48, 97},
		KEMP521:   {66, 133},
		KEMX448:   {56, 56},
		KEMXWing:  {32, 1216},
	}
	for _, id := range allKEMs {
		t.Run(kemShortNames[id], func(t *testing.T) {
			priv, pub, err := generateKEMKey(id, nil)
			require.NoError(t, err)
			assert.Len(t, priv, sizes[id][0])
			assert.Len(t, pub, sizes[id][1])
			assert.True(t, validPublicKey(id, pub))
			assert.False(t, validPublicKey(id, pub[1:]))

			sk, err := parseKEMPrivateKey(id, priv)
			require.NoError(t, err)
			assert.Equal(t, pub, sk.pub)
			assert.Equal(t, id, sk.kem)

			_, err = parseKEMPrivateKey(id, priv[1:])
			require.ErrorIs(t, err, ErrInvalidKey)
			_, err = parseKEMPrivateKey(id, append(priv, 0))
			require.ErrorIs(t, err, ErrInvalidKey)

			// The same randomness gives the same key; other randomness does not.
			seed := [32]byte{1}
			p1, q1, err := generateKEMKey(id, mathrand.NewChaCha8(seed))
			require.NoError(t, err)
			p2, q2, err := generateKEMKey(id, mathrand.NewChaCha8(seed))
			require.NoError(t, err)
			assert.Equal(t, p1, p2)
			assert.Equal(t, q1, q2)
			assert.NotEqual(t, priv, p1)

			_, _, err = generateKEMKey(id, bytes.NewReader([]byte{1, 2, 3}))
			require.Error(t, err, "short randomness")

			// An independent implementation derives the same public key.
			if !inCryptoHPKE(id) {
				return // X448: crypto/hpke lacks it; see TestX448CirclRoundTrip
			}
			kem, err := hpke.NewKEM(uint16(id))
			require.NoError(t, err)
			theirs, err := kem.NewPrivateKey(priv)
			require.NoError(t, err)
			assert.Equal(t, pub, theirs.PublicKey().Bytes())
		})
	}

	_, _, err := generateKEMKey(0xcccc, nil)
	require.ErrorIs(t, err, ErrUnsupportedAlgorithm)
	_, err = parseKEMPrivateKey(0xcccc, make([]byte, 32))
	require.ErrorIs(t, err, ErrUnsupportedAlgorithm)
	assert.False(t, validPublicKey(0xcccc, make([]byte, 32)))
	// A P-256 scalar of zero is not a key.
	_, err = parseKEMPrivateKey(KEMP256, make([]byte, 32))
	require.ErrorIs(t, err, ErrInvalidKey)
}

// newRecipient runs SetupBaseR(enc, skR, info), computing the key schedule
// context that a parsed key keeps per suite.
func newRecipient(sk *kemPrivateKey, cs CipherSuite, enc, info []byte) (*hpkeRecipient, error) {
	if !cs.Supported() {
		return nil, fmt.Errorf("%w: %v", ErrUnsupportedAlgorithm, cs)
	}
	return newRecipientContext(sk, cs, enc, keyScheduleContext(sk.kem, cs, info))
}

// echInfo returns the HPKE info for config (RFC 9849, Section 6.1).
func echInfo(config []byte) []byte {
	return append([]byte("tls ech\x00"), config...)
}

// sealTo encrypts pt for pub as an ECH client does, with crypto/hpke, or
// with circl for X448, which crypto/hpke lacks. It returns enc and the
// ciphertexts of pts, sealed in sequence under one context.
func sealTo(t testing.TB, id KEMID, pub []byte, cs CipherSuite, info, aad []byte, pts ...[]byte) ([]byte, [][]byte) {
	t.Helper()
	var cts [][]byte
	if !inCryptoHPKE(id) {
		pk, err := circlhpke.KEM(id).Scheme().UnmarshalBinaryPublicKey(pub)
		require.NoError(t, err)
		s, err := circlhpke.NewSuite(circlhpke.KEM(id), circlhpke.KDF(cs.KDF), circlhpke.AEAD(cs.AEAD)).NewSender(pk, info)
		require.NoError(t, err)
		enc, sealer, err := s.Setup(rand.Reader)
		require.NoError(t, err)
		for _, pt := range pts {
			ct, err := sealer.Seal(pt, aad)
			require.NoError(t, err)
			cts = append(cts, ct)
		}
		return enc, cts
	}
	kem, err := hpke.NewKEM(uint16(id))
	require.NoError(t, err)
	pk, err := kem.NewPublicKey(pub)
	require.NoError(t, err)
	kdf, err := hpke.NewKDF(uint16(cs.KDF))
	require.NoError(t, err)
	aead, err := hpke.NewAEAD(uint16(cs.AEAD))
	require.NoError(t, err)
	enc, s, err := hpke.NewSender(pk, kdf, aead, info)
	require.NoError(t, err)
	for _, pt := range pts {
		ct, err := s.Seal(aad, pt)
		require.NoError(t, err)
		cts = append(cts, ct)
	}
	return enc, cts
}

// TestCryptoHPKEKeys checks that keys made by crypto/hpke load into a
// KeySet, and that what crypto/hpke seals to them opens here.
func TestCryptoHPKEKeys(t *testing.T) {
	for _, id := range allKEMs {
		if !inCryptoHPKE(id) {
			continue // X448: crypto/hpke lacks it; see TestX448CirclRoundTrip
		}
		t.Run(kemShortNames[id], func(t *testing.T) {
			kem, err := hpke.NewKEM(uint16(id))
			require.NoError(t, err)
			sk, err := kem.GenerateKey()
			require.NoError(t, err)
			priv, err := sk.Bytes()
			require.NoError(t, err)
			config, err := (&Config{
				ConfigID:     0x42,
				KEM:          id,
				PublicKey:    sk.PublicKey().Bytes(),
				CipherSuites: allSuites,
				PublicName:   "public.example",
			}).Marshal()
			require.NoError(t, err)

			ks, err := NewKeySet(Key{Config: config, PrivateKey: priv, SendAsRetry: true})
			require.NoError(t, err)
			list, err := ks.ConfigList()
			require.NoError(t, err)
			assert.Equal(t, rawConfigList(config), []byte(list))

			for _, cs := range allSuites {
				t.Run(cs.String(), func(t *testing.T) {
					keys := ks.table().candidates(nil, 0x42, cs)
					require.Len(t, keys, 1)
					pk := keys[0]

					aad1, aad2 := []byte("outer hello 1"), []byte("outer hello 2")
					enc, cts := sealTo(t, id, pk.config.PublicKey, cs, echInfo(config), aad1, []byte("inner 1"))
					_, cts2 := sealTo(t, id, pk.config.PublicKey, cs, echInfo(config), aad1, []byte("x"))
					require.Len(t, cts2, 1)

					r, err := newRecipient(pk.sk, cs, enc, echInfo(pk.key.Config))
					require.NoError(t, err)
					pt, err := r.open(nil, aad1, cts[0])
					require.NoError(t, err)
					assert.Equal(t, []byte("inner 1"), pt)

					// A context opens the messages of its own sender only.
					_, err = r.open(nil, aad2, cts2[0])
					require.ErrorIs(t, err, ErrDecryptError)

					// The wrong AAD does not open.
					r, err = newRecipient(pk.sk, cs, enc, echInfo(pk.key.Config))
					require.NoError(t, err)
					_, err = r.open(nil, aad2, cts[0])
					require.ErrorIs(t, err, ErrDecryptError)

					// The wrong info (another config) does not open.
					r, err = newRecipient(pk.sk, cs, enc, echInfo(append(slices.Clone(config), 0)))
					require.NoError(t, err)
					_, err = r.open(nil, aad1, cts[0])
					require.ErrorIs(t, err, ErrDecryptError)
				})
			}

			// The HelloRetryRequest flow opens the second message with the
			// same context (RFC 9849, Section 7.1.1).
			cs := CipherSuite{KDFHKDFSHA256, AEADAES128GCM}
			pk := ks.table().keys[0]
			aad := []byte("outer")
			enc, cts := sealTo(t, id, pk.config.PublicKey, cs, echInfo(pk.key.Config), aad, []byte("first"), []byte("second"))
			r, err := newRecipient(pk.sk, cs, enc, echInfo(pk.key.Config))
			require.NoError(t, err)
			pt, err := r.open(nil, aad, cts[0])
			require.NoError(t, err)
			assert.Equal(t, []byte("first"), pt)
			pt, err = r.open(nil, aad, cts[1])
			require.NoError(t, err)
			assert.Equal(t, []byte("second"), pt)
		})
	}
}

// TestX448CirclRoundTrip checks X448, which crypto/hpke (Go 1.26) does not
// implement: the only independent check available is circl's sender, so
// this round trip goes through circl on both sides.
func TestX448CirclRoundTrip(t *testing.T) {
	require.False(t, inCryptoHPKE(KEMX448), "crypto/hpke has X448 now: move it to TestCryptoHPKEKeys")
	k, err := GenerateKey("public.example", &KeyOptions{KEM: KEMX448, CipherSuites: allSuites})
	require.NoError(t, err)
	ks, err := NewKeySet(k)
	require.NoError(t, err)
	pk := ks.table().keys[0]
	for _, cs := range allSuites {
		t.Run(cs.String(), func(t *testing.T) {
			aad := []byte("outer")
			enc, cts := sealTo(t, KEMX448, pk.config.PublicKey, cs, echInfo(pk.key.Config), aad, []byte("first"), []byte("second"))
			assert.Len(t, enc, 56)
			r, err := newRecipient(pk.sk, cs, enc, echInfo(pk.key.Config))
			require.NoError(t, err)
			for i, want := range []string{"first", "second"} {
				pt, err := r.open(nil, aad, cts[i])
				require.NoError(t, err)
				assert.Equal(t, []byte(want), pt)
			}
		})
	}
}

func TestNewRecipientErrors(t *testing.T) {
	cs := CipherSuite{KDFHKDFSHA256, AEADAES128GCM}
	for _, id := range allKEMs {
		t.Run(kemShortNames[id], func(t *testing.T) {
			priv, pub, err := generateKEMKey(id, nil)
			require.NoError(t, err)
			sk, err := parseKEMPrivateKey(id, priv)
			require.NoError(t, err)
			info, aad := []byte("tls ech\x00config"), []byte("aad")
			enc, cts := sealTo(t, id, pub, cs, info, aad, []byte("hello"))

			_, err = newRecipient(sk, CipherSuite{KDFHKDFSHA256, 0xffff}, enc, info)
			require.ErrorIs(t, err, ErrUnsupportedAlgorithm, "export-only AEAD")
			_, err = newRecipient(sk, CipherSuite{0x0010, AEADAES128GCM}, enc, info)
			require.ErrorIs(t, err, ErrUnsupportedAlgorithm, "unknown KDF")

			for _, bad := range [][]byte{nil, enc[:len(enc)-1], append(slices.Clone(enc), 0)} {
				_, err = newRecipient(sk, cs, bad, info)
				require.ErrorIs(t, err, ErrDecryptError, "enc of %d bytes", len(bad))
			}

			r, err := newRecipient(sk, cs, enc, info)
			require.NoError(t, err)
			_, err = r.open(nil, aad, cts[0][:len(cts[0])-1])
			require.ErrorIs(t, err, ErrDecryptError, "truncated ciphertext")

			// A failed open does not advance the sequence number.
			pt, err := r.open(nil, aad, cts[0])
			require.NoError(t, err)
			assert.Equal(t, []byte("hello"), pt)

			flipped := slices.Clone(cts[0])
			flipped[0] ^= 1
			r, err = newRecipient(sk, cs, enc, info)
			require.NoError(t, err)
			_, err = r.open(nil, aad, flipped)
			require.ErrorIs(t, err, ErrDecryptError, "altered ciphertext")
			assert.False(t, errors.Is(err, ErrDecodeError))
		})
	}
}

// BenchmarkHPKEOpen compares the HPKE work of one ECH decryption, SetupBaseR
// then Open of a 512-byte EncodedClientHelloInner with a 600-byte
// ClientHelloOuterAAD, here (circl) and in crypto/hpke, with the private
// key parsed beforehand in both.
func BenchmarkHPKEOpen(b *testing.B) {
	cs := CipherSuite{KDFHKDFSHA256, AEADAES128GCM}
	aad := bytes.Repeat([]byte{0xaa}, 600)
	inner := bytes.Repeat([]byte{0x01}, 512)
	for _, id := range allKEMs {
		k, err := GenerateKey("public.example", &KeyOptions{KEM: id})
		require.NoError(b, err)
		pk, err := parseKey(k)
		require.NoError(b, err)
		info := echInfo(pk.key.Config)
		enc, cts := sealTo(b, id, pk.config.PublicKey, cs, info, aad, inner)
		ct := cts[0]

		b.Run(kemShortNames[id]+"/ech", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r, err := pk.recipient(cs, enc) // as NewConn does
				if err != nil {
					b.Fatal(err)
				}
				if _, err := r.open(nil, aad, ct); err != nil {
					b.Fatal(err)
				}
			}
		})

		if !inCryptoHPKE(id) {
			continue // X448: crypto/hpke lacks it, nothing to compare with
		}
		b.Run(kemShortNames[id]+"/cryptohpke", func(b *testing.B) {
			kem, err := hpke.NewKEM(uint16(id))
			require.NoError(b, err)
			sk, err := kem.NewPrivateKey(k.PrivateKey)
			require.NoError(b, err)
			kdf, err := hpke.NewKDF(uint16(cs.KDF))
			require.NoError(b, err)
			aead, err := hpke.NewAEAD(uint16(cs.AEAD))
			require.NoError(b, err)
			b.ReportAllocs()
			for b.Loop() {
				r, err := hpke.NewRecipient(enc, sk, kdf, aead, info)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := r.Open(aad, ct); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
