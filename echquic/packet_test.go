package echquic

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestInitialKeys checks the client Initial keys against RFC 9001,
// Appendix A.1 and RFC 9369, Appendix A.1: the IV directly, the AEAD and
// header protection keys through ciphers built from the RFCs' values.
func TestInitialKeys(t *testing.T) {
	dcid, _ := hex.DecodeString("8394c8f03e515708")
	sample, _ := hex.DecodeString("d1b1c98dd7689fb8ec11d242b123dc9b")
	for _, tc := range []struct {
		name        string
		version     uint32
		key, iv, hp string
	}{
		{"v1", version1, "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2"},
		{"v2", version2, "8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f", "45b95e15235d6f45a6b19cbcb0294ba9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := newInitialKeys(tc.version, dcid, false)
			require.NoError(t, err)
			assert.Equal(t, tc.iv, hex.EncodeToString(k.iv[:]))

			hpKey, _ := hex.DecodeString(tc.hp)
			hp, err := aes.NewCipher(hpKey)
			require.NoError(t, err)
			var want, got [aes.BlockSize]byte
			hp.Encrypt(want[:], sample)
			k.hp.Encrypt(got[:], sample)
			assert.Equal(t, want, got, "header protection key")

			key, _ := hex.DecodeString(tc.key)
			block, err := aes.NewCipher(key)
			require.NoError(t, err)
			gcm, err := cipher.NewGCM(block)
			require.NoError(t, err)
			nonce := k.nonce(2)
			assert.Equal(t, gcm.Seal(nil, nonce[:], sample, dcid), k.aead.Seal(nil, nonce[:], sample, dcid), "AEAD key")
		})
	}
	// RFC 9001, Appendix A.2: the mask of the client's first Initial.
	k, err := newInitialKeys(version1, dcid, false)
	require.NoError(t, err)
	var m [aes.BlockSize]byte
	k.hp.Encrypt(m[:], sample)
	assert.Equal(t, "437b9aec36", hex.EncodeToString(m[:5]))
}

func TestDecodePacketNumber(t *testing.T) {
	// RFC 9000, Appendix A.3.
	assert.Equal(t, uint64(0xa82f9b32), decodePacketNumber(0xa82f30ea, 0x9b32, 2))
	assert.Equal(t, uint64(0), decodePacketNumber(-1, 0, 1))
	assert.Equal(t, uint64(256), decodePacketNumber(250, 0, 1))
}
