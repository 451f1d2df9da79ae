package ech

import (
	"bytes"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// frame cuts msg into handshake records of at most 2^14 bytes.
func frame(msg []byte, vers uint16) []byte {
	var out []byte
	for len(msg) > 0 {
		n := min(len(msg), maxPlaintext)
		out = append(out, recordTypeHandshake, byte(vers>>8), byte(vers), byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

// handshakeMsg returns a ClientHello-typed handshake message with a body
// of n bytes.
func handshakeMsg(n int) []byte {
	m := []byte{typeClientHello, byte(n >> 16), byte(n >> 8), byte(n)}
	for i := range n {
		m = append(m, byte(i))
	}
	return m
}

func TestReplayFraming(t *testing.T) {
	for _, size := range []int{1, maxPlaintext - 4, maxPlaintext, maxPlaintext + 1, 40000} {
		msg := handshakeMsg(size)
		want := frame(msg, 0x0301)
		for _, chunk := range []int{1, 7, recordHeaderLen, maxPlaintext + recordHeaderLen, 1 << 17} {
			var r replay
			r.message(msg, 0x0301, nil)
			var got []byte
			p := make([]byte, chunk)
			for !r.empty() {
				n := r.read(p)
				require.Positive(t, n)
				got = append(got, p[:n]...)
			}
			assert.Equal(t, want, got, "message of %d bytes read %d at a time", len(msg), chunk)
		}
	}
	var r replay
	rec := []byte{20, 3, 3, 0, 1, 1}
	r.record(rec)
	p := make([]byte, 100)
	assert.Equal(t, len(rec), r.read(p))
	assert.Equal(t, rec, p[:len(rec)], "a record passes as received")
	assert.True(t, r.empty())
}

// trickle returns at most n bytes per Read.
type trickle struct {
	r io.Reader
	n int
}

func (t *trickle) Read(p []byte) (int, error) { return t.r.Read(p[:min(len(p), t.n)]) }

// TestHandshakeReaderGrowth checks that the buffer grows with the bytes
// that arrive, never past what the headers announce.
func TestHandshakeReaderGrowth(t *testing.T) {
	for _, size := range []int{100, 3000, 60000} {
		msg := handshakeMsg(size)
		// A buffer of its own: one from the pool may be larger.
		h := handshakeReader{conn: &trickle{bytes.NewReader(frame(msg, 0x0303)), 1000}, maxSize: 1 << 16, first: true, buf: new([]byte)}
		var got []byte
		for got == nil {
			m, rec, err := h.next()
			require.NoError(t, err)
			require.Nil(t, rec)
			got = m
		}
		assert.Equal(t, msg, got)
		assert.Equal(t, len(msg), cap(*h.buf), "buffer sized by the headers")
		h.release()
	}
	// A record header announcing 2^14 bytes, then 100 of them.
	stream := append([]byte{recordTypeHandshake, 3, 1, 0x40, 0}, handshakeMsg(96)...)
	h := handshakeReader{conn: bytes.NewReader(stream), maxSize: 1 << 16, first: true, buf: new([]byte)}
	_, _, err := h.next()
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.LessOrEqual(t, cap(*h.buf), firstReadSize, "no buffer grown before the bytes arrive")
	h.release()
}

// TestHandshakeReaderTruncated checks that every truncated prefix of a
// two-record message fails cleanly with io.ErrUnexpectedEOF (io.EOF at
// the start).
func TestHandshakeReaderTruncated(t *testing.T) {
	stream := frame(handshakeMsg(maxPlaintext+10), 0x0303)
	for i := range len(stream) {
		h := handshakeReader{conn: bytes.NewReader(stream[:i]), maxSize: 1 << 16, first: true}
		var err error
		for err == nil {
			var msg []byte
			msg, _, err = h.next()
			require.Nil(t, msg, "prefix of %d bytes", i)
		}
		if i == 0 {
			assert.Equal(t, io.EOF, err)
		} else {
			assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "prefix of %d bytes", i)
		}
		h.release()
	}
}

func TestAlertString(t *testing.T) {
	for a, name := range map[alert]string{
		alertUnexpectedMessage: "unexpected_message",
		alertRecordOverflow:    "record_overflow",
		alertIllegalParameter:  "illegal_parameter",
		alertDecodeError:       "decode_error",
		alertDecryptError:      "decrypt_error",
		alertInternalError:     "internal_error",
		alertMissingExtension:  "missing_extension",
		99:                     "alert(99)",
	} {
		assert.Equal(t, name, a.String())
	}
}
