package ech_test

// Fuzz targets that reach the decrypted path of NewConn. Random client
// bytes never decrypt, so these targets take the EncodedClientHelloInner
// from the fuzzer and seal it themselves, with Go's crypto/hpke (an HPKE
// implementation independent of the one under test), to a fixed test key,
// inside a ClientHelloOuter shaped like the one Go's crypto/tls client
// sends. Every input decrypts: the fuzzer works on ech_outer_extensions
// expansion, padding and the inner-hello checks, for the first ClientHello
// (FuzzDecryptedInner) and for the second one after a HelloRetryRequest
// (FuzzDecryptedSecondHello).
//
// The oracle: no panic, no hang; an error wraps an exported sentinel and
// the client got the matching alert; an accepted hello is replayed as
// exactly the ClientHelloInner that an independent reconstruction
// (fzRebuild, written from RFC 9849, Section 5.1) gives, and one the
// reconstruction refuses is refused.
//
// The seeds in testdata/fuzz/FuzzDecrypted* are EncodedClientHelloInner
// bytes that crypto/tls clients sent, decrypted with crypto/hpke, and
// broken variants of them; go test -run TestFzDecryptedSeeds
// -update-decrypted-seeds writes them again.

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"golang.org/x/crypto/cryptobyte"
)

var fzUpdateSeeds = flag.Bool("update-decrypted-seeds", false,
	"write the seeds of FuzzDecryptedInner and FuzzDecryptedSecondHello (see TestFzDecryptedSeeds)")

const (
	fzPublicName = "public.example"
	fzConfigID   = 0x5a

	fzExtServerName    uint16 = 0
	fzExtPadding       uint16 = 21
	fzExtALPN          uint16 = 16
	fzExtSupportedVers uint16 = 43
	fzExtOuterExts     uint16 = 0xfd00
	fzExtECH           uint16 = 0xfe0d

	// fzMaxInner bounds the fuzzer's EncodedClientHelloInner so that the
	// outer hello stays within its 2^16-1 bytes of extensions.
	fzMaxInner = 1 << 15
	// fzTimeout bounds every exchange: a hang is a failure, not a slow run.
	fzTimeout = 10 * time.Second
)

// Outer-hello knobs, the low bits of the fuzzer's knobs argument.
const (
	fzKnobNoSessionID   = 1 << iota // empty outer legacy_session_id
	fzKnobECHFirst                  // the ECH extension first in the outer hello
	fzKnobOuterExtsExt              // an ech_outer_extensions extension in the outer hello (RFC 9849, Section 5.1: never there)
	fzKnobPadding                   // a padding extension of 512 bytes at the end of the outer hello
	fzKnobFragment                  // the outer hello in records of 97 bytes
	fzKnobRecordVers301             // record version 0x0301, as some clients send
)

// Second-hello knobs, the high byte of the knobs argument.
const (
	fzKnobCCS           = 1 << (8 + iota) // a change_cipher_spec record before the second hello
	fzKnobEnc                             // a non-empty enc in the second hello
	fzKnobOtherConfigID                   // another config_id in the second hello
	fzKnobCorrupt                         // a flipped bit in the second hello's payload
	fzKnobNoECH                           // no ECH extension in the second hello
	fzKnobInnerType                       // an inner ECH extension in the second hello
)

// fzExt is one ClientHello extension.
type fzExt struct {
	typ  uint16
	data []byte
}

// fzHello is a ClientHello body in parts, parsed by this file alone.
type fzHello struct {
	vers                      uint16
	random, sid, suites, comp []byte
	exts                      []fzExt
	hasExts                   bool
	rest                      []byte // bytes after the structure
}

// fzParseHello parses a ClientHello body, leaving the bytes after it in
// rest.
func fzParseHello(body []byte) (*fzHello, bool) {
	s := cryptobyte.String(body)
	h := new(fzHello)
	var sid, suites, comp cryptobyte.String
	if !s.ReadUint16(&h.vers) || !s.ReadBytes(&h.random, 32) || !s.ReadUint8LengthPrefixed(&sid) ||
		!s.ReadUint16LengthPrefixed(&suites) || !s.ReadUint8LengthPrefixed(&comp) ||
		len(sid) > 32 || len(suites) < 2 || len(suites)%2 != 0 || len(comp) < 1 {
		return nil, false
	}
	h.sid, h.suites, h.comp = sid, suites, comp
	if len(s) > 0 {
		var exts cryptobyte.String
		if !s.ReadUint16LengthPrefixed(&exts) {
			return nil, false
		}
		h.hasExts = true
		for !exts.Empty() {
			var e fzExt
			var data cryptobyte.String
			if !exts.ReadUint16(&e.typ) || !exts.ReadUint16LengthPrefixed(&data) {
				return nil, false
			}
			e.data = data
			h.exts = append(h.exts, e)
		}
	}
	h.rest = s
	return h, true
}

func (h *fzHello) body() []byte {
	var b cryptobyte.Builder
	b.AddUint16(h.vers)
	b.AddBytes(h.random)
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(h.sid) })
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(h.suites) })
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(h.comp) })
	if h.hasExts || len(h.exts) > 0 {
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			for _, e := range h.exts {
				b.AddUint16(e.typ)
				b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e.data) })
			}
		})
	}
	b.AddBytes(h.rest)
	return b.BytesOrPanic()
}

func (h *fzHello) ext(typ uint16) ([]byte, bool) {
	for _, e := range h.exts {
		if e.typ == typ {
			return e.data, true
		}
	}
	return nil, false
}

// fzHandshake returns body as a ClientHello handshake message.
func fzHandshake(typ uint8, body []byte) []byte {
	return append([]byte{typ, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
}

// fzRecords frames msg as records of at most n bytes.
func fzRecords(typ uint8, vers uint16, msg []byte, n int) []byte {
	var out []byte
	for len(msg) > 0 {
		m := min(len(msg), n)
		out = append(out, typ, byte(vers>>8), byte(vers), byte(m>>8), byte(m))
		out = append(out, msg[:m]...)
		msg = msg[m:]
	}
	return out
}

// fzReadMessage reads records from r until one handshake message is
// complete, skipping change_cipher_spec records, and returns the message
// and the version of its first record. It checks the framing of what the
// Conn replays.
func fzReadMessage(r io.Reader) (msg []byte, vers uint16, err error) {
	var hdr [5]byte
	first := true
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, 0, err
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		if hdr[0] == 20 && len(msg) == 0 {
			if _, err := io.ReadFull(r, make([]byte, n)); err != nil {
				return nil, 0, err
			}
			continue
		}
		if hdr[0] != 22 || n == 0 || n > 1<<14 {
			return nil, 0, fmt.Errorf("replayed record header %x", hdr)
		}
		if first {
			vers, first = uint16(hdr[1])<<8|uint16(hdr[2]), false
		}
		rec := make([]byte, n)
		if _, err := io.ReadFull(r, rec); err != nil {
			return nil, 0, err
		}
		msg = append(msg, rec...)
		if len(msg) >= 4 {
			l := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
			switch {
			case len(msg) == 4+l:
				return msg, vers, nil
			case len(msg) > 4+l:
				return nil, 0, fmt.Errorf("replayed record holds %d bytes after the message", len(msg)-4-l)
			}
		}
	}
}

// fzRebuild rebuilds the ClientHelloInner body from an
// EncodedClientHelloInner and the outer hello (RFC 9849, Section 5.1), and
// checks what a client-facing server must check of it (Section 7.1). It
// returns false for a hello the server must refuse.
func fzRebuild(outer *fzHello, encoded []byte) ([]byte, bool) {
	enc, ok := fzParseHello(encoded)
	if !ok || len(enc.sid) != 0 {
		return nil, false
	}
	// The padding is zeros.
	if slices.ContainsFunc(enc.rest, func(b byte) bool { return b != 0 }) {
		return nil, false
	}
	inner := &fzHello{vers: enc.vers, random: enc.random, sid: outer.sid, suites: enc.suites, comp: enc.comp, hasExts: true}
	expanded := false
	for _, e := range enc.exts {
		if e.typ != fzExtOuterExts {
			inner.exts = append(inner.exts, e)
			continue
		}
		if expanded {
			return nil, false
		}
		expanded = true
		s := cryptobyte.String(e.data)
		var refs cryptobyte.String
		if !s.ReadUint8LengthPrefixed(&refs) || !s.Empty() || len(refs) < 2 || len(refs)%2 != 0 {
			return nil, false
		}
		i := 0
		for !refs.Empty() {
			var t uint16
			refs.ReadUint16(&t)
			if t == fzExtECH {
				return nil, false
			}
			for i < len(outer.exts) && outer.exts[i].typ != t {
				i++
			}
			if i == len(outer.exts) {
				return nil, false
			}
			inner.exts = append(inner.exts, outer.exts[i])
			i++
		}
	}
	seen := map[uint16]bool{}
	extLen := 0
	for _, e := range inner.exts {
		if seen[e.typ] {
			return nil, false
		}
		seen[e.typ] = true
		extLen += 4 + len(e.data)
	}
	if extLen > 0xffff || seen[fzExtOuterExts] {
		return nil, false
	}
	if data, ok := inner.ext(fzExtECH); !ok || !bytes.Equal(data, []byte{1}) {
		return nil, false
	}
	if data, ok := inner.ext(fzExtServerName); ok {
		if _, ok := fzServerName(data); !ok {
			return nil, false
		}
	}
	if data, ok := inner.ext(fzExtALPN); ok {
		if _, ok := fzALPN(data); !ok {
			return nil, false
		}
	}
	// Only TLS 1.3 or later, GREASE aside.
	data, ok := inner.ext(fzExtSupportedVers)
	if !ok {
		return nil, false
	}
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint8LengthPrefixed(&list) || !s.Empty() || len(list) < 2 || len(list)%2 != 0 {
		return nil, false
	}
	tls13 := false
	for !list.Empty() {
		var v uint16
		list.ReadUint16(&v)
		switch {
		case v&0x0f0f == 0x0a0a && v>>8 == v&0xff:
		case v >= tls.VersionTLS13:
			tls13 = true
		default:
			return nil, false
		}
	}
	if !tls13 {
		return nil, false
	}
	return inner.body(), true
}

// fzServerName returns the first host_name of a server_name extension.
func fzServerName(data []byte) (string, bool) {
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() || list.Empty() {
		return "", false
	}
	name := ""
	for !list.Empty() {
		var typ uint8
		var host cryptobyte.String
		if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&host) || len(host) == 0 {
			return "", false
		}
		if typ == 0 && name == "" {
			name = string(host)
		}
	}
	return name, true
}

// fzALPN returns the protocols of an ALPN extension.
func fzALPN(data []byte) ([]string, bool) {
	s := cryptobyte.String(data)
	var list cryptobyte.String
	if !s.ReadUint16LengthPrefixed(&list) || !s.Empty() || list.Empty() {
		return nil, false
	}
	var out []string
	for !list.Empty() {
		var p cryptobyte.String
		if !list.ReadUint8LengthPrefixed(&p) || len(p) == 0 {
			return nil, false
		}
		out = append(out, string(p))
	}
	return out, true
}

// fzSentinels are the exported sentinels of package ech, with the alert
// the client gets for each, or -1 where errors.go promises none.
var fzSentinels = []struct {
	err   error
	alert int
}{
	{ech.ErrDecodeError, 50},
	{ech.ErrIllegalParameter, 47},
	{ech.ErrMissingExtension, 109},
	{ech.ErrDecryptError, 51},
	{ech.ErrUnexpectedMessage, 10},
	{ech.ErrRecordOverflow, 22},
	{ech.ErrHelloTooLarge, 50},
	{ech.ErrNotTLS, 10},
	{ech.ErrMalformedConfig, -1},
	{ech.ErrUnsupportedVersion, -1},
	{ech.ErrInvalidPublicName, -1},
	{ech.ErrUnsupportedAlgorithm, -1},
	{ech.ErrInvalidKey, -1},
	{ech.ErrMalformedPEM, -1},
	{ech.ErrNoKeys, -1},
}

// fzCheckError checks that err wraps an exported sentinel and that the
// client received the matching alert, and nothing else, in got.
func fzCheckError(t *testing.T, err error, got []byte) {
	t.Helper()
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hang: %v", err)
	}
	for _, s := range fzSentinels {
		if !errors.Is(err, s.err) {
			continue
		}
		if s.alert >= 0 {
			want := []byte{21, 3, 3, 0, 2, 2, byte(s.alert)}
			if !bytes.Equal(got, want) {
				t.Fatalf("error %q: client got %x, want alert %x", err, got, want)
			}
			// The error the peer was told about is also the alert for code
			// that handles crypto/tls errors.
			var ae tls.AlertError
			if !errors.As(err, &ae) || int(ae) != s.alert {
				t.Fatalf("error %q: no tls.AlertError(%d) in its chain", err, s.alert)
			}
		}
		return
	}
	t.Fatalf("error wraps no exported sentinel: %v", err)
}

// fzCheckInner checks a replayed ClientHelloInner message against the
// independent reconstruction want, and against the Conn's getters.
func fzCheckInner(t *testing.T, c *ech.Conn, msg, want []byte, outerSID []byte) *fzHello {
	t.Helper()
	if len(msg) < 4 || msg[0] != 1 {
		t.Fatalf("replayed message is not a ClientHello: %x", msg[:min(len(msg), 8)])
	}
	if !bytes.Equal(msg[4:], want) {
		t.Fatalf("replayed ClientHelloInner differs from the RFC 9849 reconstruction:\n got %x\nwant %x", msg[4:], want)
	}
	inner, ok := fzParseHello(msg[4:])
	if !ok || len(inner.rest) != 0 || !bytes.Equal(inner.sid, outerSID) {
		t.Fatalf("replayed ClientHelloInner does not parse, or its legacy_session_id is not the outer one")
	}
	name := ""
	if data, ok := inner.ext(fzExtServerName); ok {
		name, _ = fzServerName(data)
	}
	if name != c.ServerName() {
		t.Fatalf("ServerName() = %q, inner server_name %q", c.ServerName(), name)
	}
	var alpn []string
	if data, ok := inner.ext(fzExtALPN); ok {
		alpn, _ = fzALPN(data)
	}
	if got := c.ALPNProtos(); !slices.Equal(got, alpn) {
		t.Fatalf("ALPNProtos() = %q, inner ALPN %q", got, alpn)
	}
	return inner
}

// fzFixture is what every input of the targets shares: the key, its
// crypto/hpke form, and outer hellos from crypto/tls clients.
type fzFixture struct {
	key       ech.Key
	ks        *ech.KeySet
	pub       hpke.PublicKey
	priv      hpke.PrivateKey
	info      []byte
	templates []*fzHello // outer hellos, indexed by the tmpl argument
	inners    [][]byte   // the EncodedClientHelloInner each template carried
}

// fzClientConfigs are the crypto/tls clients whose hellos shape the outer
// hellos: the tmpl argument of the targets picks one.
func fzClientConfigs(list []byte) []*tls.Config {
	return []*tls.Config{
		// Go's defaults: X25519MLKEM768 and X25519 key shares, ALPN.
		{ServerName: "secret.example", NextProtos: []string{"h2", "http/1.1"}, EncryptedClientHelloConfigList: list},
		// X25519 alone, no ALPN, TLS 1.3 only.
		{ServerName: "inner.test", CurvePreferences: []tls.CurveID{tls.X25519}, MinVersion: tls.VersionTLS13,
			EncryptedClientHelloConfigList: list},
	}
}

var (
	fzOnce    sync.Once
	fzShared  *fzFixture
	fzInitErr error
)

// fzSetup returns the shared fixture, made once per process.
func fzSetup(tb testing.TB) *fzFixture {
	tb.Helper()
	fzOnce.Do(func() { fzShared, fzInitErr = fzNewFixture() })
	if fzInitErr != nil {
		tb.Fatal(fzInitErr)
	}
	return fzShared
}

func fzNewFixture() (*fzFixture, error) {
	rnd := rand.NewChaCha8([32]byte{'e', 'c', 'h', 'f', 'u', 'z', 'z'})
	key, err := ech.GenerateKey(fzPublicName, &ech.KeyOptions{
		ConfigID:     fzConfigID,
		CipherSuites: []ech.CipherSuite{{KDF: ech.KDFHKDFSHA256, AEAD: ech.AEADAES128GCM}},
		Rand:         rnd,
	})
	if err != nil {
		return nil, err
	}
	fx := &fzFixture{key: key, info: append([]byte("tls ech\x00"), key.Config...)}
	if fx.ks, err = ech.NewKeySet(key); err != nil {
		return nil, err
	}
	kem := hpke.DHKEM(ecdh.X25519())
	if fx.priv, err = kem.NewPrivateKey(key.PrivateKey); err != nil {
		return nil, err
	}
	cfg, err := ech.KeyConfig(key)
	if err != nil {
		return nil, err
	}
	if fx.pub, err = kem.NewPublicKey(cfg.PublicKey); err != nil {
		return nil, err
	}
	list, err := fx.ks.ConfigList()
	if err != nil {
		return nil, err
	}
	for i, cc := range fzClientConfigs(list) {
		cc.Rand = rand.NewChaCha8([32]byte{byte(i)})
		body, err := fzCaptureHello(cc)
		if err != nil {
			return nil, err
		}
		outer, ok := fzParseHello(body)
		if !ok || len(outer.rest) != 0 {
			return nil, fmt.Errorf("crypto/tls hello %d does not parse", i)
		}
		var r *hpke.Recipient
		encoded, err := fx.open(&r, body, outer)
		if err != nil {
			return nil, fmt.Errorf("crypto/tls hello %d: %w", i, err)
		}
		fx.templates = append(fx.templates, outer)
		fx.inners = append(fx.inners, encoded)
	}
	return fx, nil
}

// open decrypts the EncodedClientHelloInner of a ClientHelloOuter with
// crypto/hpke. With *r nil it sets up the context from the hello's enc; else
// it uses *r, for the second hello after a HelloRetryRequest.
func (fx *fzFixture) open(r **hpke.Recipient, body []byte, outer *fzHello) ([]byte, error) {
	data, ok := outer.ext(fzExtECH)
	if !ok {
		return nil, errors.New("no ECH extension")
	}
	s := cryptobyte.String(data)
	var typ, id uint8
	var kdf, aead uint16
	var enc, payload cryptobyte.String
	if !s.ReadUint8(&typ) || !s.ReadUint16(&kdf) || !s.ReadUint16(&aead) || !s.ReadUint8(&id) ||
		!s.ReadUint16LengthPrefixed(&enc) || !s.ReadUint16LengthPrefixed(&payload) || !s.Empty() {
		return nil, errors.New("malformed ECH extension")
	}
	i := bytes.Index(body, payload) // the payload is random: it occurs once
	aad := slices.Clone(body)
	clear(aad[i : i+len(payload)])
	if *r == nil {
		var err error
		if *r, err = hpke.NewRecipient(enc, fx.priv, hpke.HKDFSHA256(), hpke.AES128GCM(), fx.info); err != nil {
			return nil, err
		}
	}
	return (*r).Open(aad, payload)
}

// fzCaptureHello runs a crypto/tls client against a net.Pipe and returns
// the body of the ClientHello it sends.
func fzCaptureHello(cfg *tls.Config) ([]byte, error) {
	cli, srv := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		tls.Client(cli, cfg).Handshake()
		cli.Close()
	}()
	defer func() { srv.Close(); <-done }()
	srv.SetDeadline(time.Now().Add(fzTimeout))
	msg, _, err := fzReadMessage(srv)
	if err != nil {
		return nil, err
	}
	return msg[4:], nil
}

// fzOuterInput is one outer hello to build around an
// EncodedClientHelloInner.
type fzOuterInput struct {
	tmpl     *fzHello
	mask     uint32 // bit i drops the template's extension i (never ECH)
	knobs    uint16
	enc      []byte // the ECH enc field
	configID uint8
	second   bool
}

// build returns the outer hello body and the AAD for the payload length n,
// and where the payload starts in the body.
func (in *fzOuterInput) build(n int) (body []byte, at int) {
	h := *in.tmpl
	h.exts = nil
	if in.knobs&fzKnobNoSessionID != 0 {
		h.sid = nil
	}
	var echExt *fzExt
	for i, e := range in.tmpl.exts {
		switch {
		case e.typ == fzExtECH:
			echExt = &fzExt{typ: fzExtECH}
		case i < 32 && in.mask&(1<<i) != 0:
		default:
			h.exts = append(h.exts, e)
		}
	}
	if in.knobs&fzKnobOuterExtsExt != 0 {
		h.exts = append([]fzExt{{fzExtOuterExts, []byte{2, 0, 10}}}, h.exts...)
	}
	var b cryptobyte.Builder
	typ := uint8(0)
	if in.second && in.knobs&fzKnobInnerType != 0 {
		typ = 1
	}
	b.AddUint8(typ)
	b.AddUint16(uint16(ech.KDFHKDFSHA256))
	b.AddUint16(uint16(ech.AEADAES128GCM))
	b.AddUint8(in.configID)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(in.enc) })
	b.AddUint16(uint16(n))
	prefix := b.BytesOrPanic()
	echExt.data = append(prefix, make([]byte, n)...)
	if !(in.second && in.knobs&fzKnobNoECH != 0) {
		if in.knobs&fzKnobECHFirst != 0 {
			h.exts = append([]fzExt{*echExt}, h.exts...)
		} else {
			h.exts = append(h.exts, *echExt)
		}
	}
	if in.knobs&fzKnobPadding != 0 {
		h.exts = append(h.exts, fzExt{fzExtPadding, make([]byte, 512)})
	}
	body = h.body()
	// The payload is the last n bytes of the ECH extension: find it by
	// the offset of the extension's data.
	off := 2 + 32 + 1 + len(h.sid) + 2 + len(h.suites) + 1 + len(h.comp) + 2
	for _, e := range h.exts {
		off += 4
		if e.typ == fzExtECH {
			return body, off + len(prefix)
		}
		off += len(e.data)
	}
	return body, -1
}

// seal builds the outer hello around encoded, sealed with s, and returns it
// as records.
func (in *fzOuterInput) seal(t *testing.T, s *hpke.Sender, encoded []byte) (records []byte, outer *fzHello) {
	n := len(encoded) + 16 // AES-128-GCM tag
	body, at := in.build(n)
	if at >= 0 {
		// RFC 9849, Section 5.2: the AAD is the outer hello with the
		// payload zeroed, as body is now.
		ct, err := s.Seal(body, encoded)
		if err != nil {
			t.Fatal(err)
		}
		if in.knobs&fzKnobCorrupt != 0 && in.second {
			ct[0] ^= 1
		}
		copy(body[at:], ct)
	}
	outer, ok := fzParseHello(body)
	if !ok {
		t.Fatal("built outer hello does not parse")
	}
	vers, frag := uint16(0x0303), 1<<14
	if in.knobs&fzKnobRecordVers301 != 0 {
		vers = 0x0301
	}
	if in.knobs&fzKnobFragment != 0 {
		frag = 97
	}
	return fzRecords(22, vers, fzHandshake(1, body), frag), outer
}

// fzPeer is the client end of a net.Pipe: it writes the client's bytes and
// collects what the server end writes.
type fzPeer struct {
	cli, srv net.Conn
	wdone    chan struct{}
	rdone    chan struct{}
	got      bytes.Buffer
}

func fzStart(client []byte) *fzPeer {
	p := &fzPeer{wdone: make(chan struct{}), rdone: make(chan struct{})}
	p.cli, p.srv = net.Pipe()
	go func() {
		defer close(p.wdone)
		p.cli.Write(client)
	}()
	go func() {
		defer close(p.rdone)
		io.Copy(&p.got, p.cli)
	}()
	return p
}

// received returns what the server end wrote so far. Writes on a net.Pipe
// return once read, so this holds every completed write.
func (p *fzPeer) received() []byte {
	p.srv.Close()
	<-p.rdone
	return p.got.Bytes()
}

func (p *fzPeer) close() {
	p.srv.Close()
	p.cli.Close()
	<-p.wdone
	<-p.rdone
}

// fzHRR is a HelloRetryRequest from a backend, selecting X25519.
func fzHRR(sid []byte) []byte {
	h := &fzHello{
		vers: 0x0303,
		random: []byte{
			0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
			0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
		},
		sid: sid,
	}
	var b cryptobyte.Builder
	b.AddUint16(h.vers)
	b.AddBytes(h.random)
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(sid) })
	b.AddUint16(tls.TLS_AES_128_GCM_SHA256)
	b.AddUint8(0)
	b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint16(fzExtSupportedVers)
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddUint16(tls.VersionTLS13) })
		b.AddUint16(51) // key_share
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddUint16(uint16(tls.X25519)) })
	})
	return fzRecords(22, 0x0303, fzHandshake(2, b.BytesOrPanic()), 1<<14)
}

func (fx *fzFixture) template(tmpl uint8) *fzHello {
	return fx.templates[int(tmpl)%len(fx.templates)]
}

func FuzzDecryptedInner(f *testing.F) {
	fx := fzSetup(f)
	for i, inner := range fx.inners {
		f.Add(inner, uint8(i), uint32(0), uint16(0))
	}
	f.Fuzz(func(t *testing.T, encoded []byte, tmpl uint8, mask uint32, knobs uint16) {
		if len(encoded) > fzMaxInner {
			return
		}
		in := &fzOuterInput{tmpl: fx.template(tmpl), mask: mask, knobs: knobs & 0xff, configID: fzConfigID}
		enc, s, err := hpke.NewSender(fx.pub, hpke.HKDFSHA256(), hpke.AES128GCM(), fx.info)
		if err != nil {
			t.Fatal(err)
		}
		in.enc = enc
		records, outer := in.seal(t, s, encoded)
		want, wantOK := fzRebuild(outer, encoded)

		p := fzStart(records)
		defer p.close()
		ctx, cancel := context.WithTimeout(t.Context(), fzTimeout)
		defer cancel()
		c, err := ech.NewConn(ctx, p.srv, ech.WithKeySet(fx.ks))
		if err != nil {
			fzCheckError(t, err, p.received())
			if wantOK {
				t.Fatalf("NewConn refused a ClientHelloInner that RFC 9849 allows: %v", err)
			}
			return
		}
		if c.Status() != ech.StatusAccepted || !c.ECHPresented() {
			t.Fatalf("status %v for a hello sealed to the key", c.Status())
		}
		if id, ok := c.ConfigID(); id != fzConfigID || !ok {
			t.Fatalf("ConfigID() = %d, %v", id, ok)
		}
		if !wantOK {
			t.Fatalf("NewConn accepted a ClientHelloInner that RFC 9849 refuses")
		}
		outerName := ""
		if data, ok := outer.ext(fzExtServerName); ok {
			outerName, _ = fzServerName(data)
		}
		if c.OuterServerName() != outerName {
			t.Fatalf("OuterServerName() = %q, want %q", c.OuterServerName(), outerName)
		}
		c.SetDeadline(time.Now().Add(fzTimeout))
		msg, vers, err := fzReadMessage(c)
		if err != nil {
			t.Fatalf("reading the replayed hello: %v", err)
		}
		if wantVers := uint16(records[1])<<8 | uint16(records[2]); vers != wantVers {
			t.Fatalf("replayed record version 0x%04x, client sent 0x%04x", vers, wantVers)
		}
		fzCheckInner(t, c, msg, want, outer.sid)
	})
}

func FuzzDecryptedSecondHello(f *testing.F) {
	fx := fzSetup(f)
	for i, inner := range fx.inners {
		f.Add(inner, uint8(i), uint32(0), uint16(0))
		f.Add(inner, uint8(i), uint32(0), uint16(fzKnobCCS))
	}
	f.Fuzz(func(t *testing.T, encoded []byte, tmpl uint8, mask uint32, knobs uint16) {
		if len(encoded) > fzMaxInner {
			return
		}
		// The first hello: the template's own, as crypto/tls sent it.
		i := int(tmpl) % len(fx.templates)
		first := &fzOuterInput{tmpl: fx.templates[i], configID: fzConfigID}
		enc, s, err := hpke.NewSender(fx.pub, hpke.HKDFSHA256(), hpke.AES128GCM(), fx.info)
		if err != nil {
			t.Fatal(err)
		}
		first.enc = enc
		records1, outer1 := first.seal(t, s, fx.inners[i])
		want1, ok := fzRebuild(outer1, fx.inners[i])
		if !ok {
			t.Fatal("the first hello from crypto/tls does not rebuild")
		}

		// The second hello, sealed with the same context (sequence number 1).
		second := &fzOuterInput{tmpl: fx.templates[i], mask: mask, knobs: knobs, configID: fzConfigID, second: true}
		if knobs&fzKnobEnc != 0 {
			second.enc = enc
		}
		if knobs&fzKnobOtherConfigID != 0 {
			second.configID++
		}
		records2, outer2 := second.seal(t, s, encoded)
		want2, wantOK := fzRebuild(outer2, encoded)
		_, hasECH := outer2.ext(fzExtECH)
		wantOK = wantOK && hasECH && knobs&(fzKnobEnc|fzKnobOtherConfigID|fzKnobCorrupt|fzKnobInnerType) == 0 &&
			fzSameRoute(want1, want2)
		client := records1
		if knobs&fzKnobCCS != 0 {
			client = append(client, 20, 3, 3, 0, 1, 1)
		}
		client = append(client, records2...)

		p := fzStart(client)
		defer p.close()
		ctx, cancel := context.WithTimeout(t.Context(), fzTimeout)
		defer cancel()
		c, err := ech.NewConn(ctx, p.srv, ech.WithKeySet(fx.ks))
		if err != nil {
			t.Fatalf("NewConn refused the first hello from crypto/tls: %v", err)
		}
		c.SetDeadline(time.Now().Add(fzTimeout))
		msg, _, err := fzReadMessage(c)
		if err != nil {
			t.Fatalf("reading the first replayed hello: %v", err)
		}
		fzCheckInner(t, c, msg, want1, outer1.sid)
		// The backend asks for another key share.
		if _, err := c.Write(fzHRR(outer1.sid)); err != nil {
			t.Fatal(err)
		}
		msg, _, err = fzReadMessage(c)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("hang reading the second hello: %v", err)
			}
			fzCheckError(t, err, fzAfterHRR(t, p.received()))
			if wantOK {
				t.Fatalf("Read refused a second ClientHelloInner that RFC 9849 allows: %v", err)
			}
			return
		}
		if !wantOK {
			t.Fatalf("Read accepted a second ClientHello that RFC 9849 refuses")
		}
		if len(msg) < 4 || !bytes.Equal(msg[4:], want2) {
			t.Fatalf("replayed second ClientHelloInner differs from the RFC 9849 reconstruction:\n got %x\nwant %x", msg, want2)
		}
	})
}

// fzSameRoute reports whether two ClientHelloInner bodies have the same
// server_name and ALPN: the route was chosen on the first hello, so the
// second may not change them (RFC 8446, Section 4.1.2; issue 10, item 3).
func fzSameRoute(body1, body2 []byte) bool {
	h1, _ := fzParseHello(body1)
	h2, _ := fzParseHello(body2)
	route := func(h *fzHello) (name string, alpn []string) {
		if data, ok := h.ext(fzExtServerName); ok {
			name, _ = fzServerName(data)
		}
		if data, ok := h.ext(fzExtALPN); ok {
			alpn, _ = fzALPN(data)
		}
		return name, alpn
	}
	n1, a1 := route(h1)
	n2, a2 := route(h2)
	return n1 == n2 && slices.Equal(a1, a2)
}

// fzAfterHRR returns what the client received after the HelloRetryRequest.
func fzAfterHRR(t *testing.T, got []byte) []byte {
	t.Helper()
	if len(got) < 6 || len(got) < 5+(int(got[3])<<8|int(got[4])) || got[0] != 22 || got[5] != 2 {
		t.Fatalf("client did not receive the HelloRetryRequest: %x", got[:min(len(got), 16)])
	}
	return got[5+(int(got[3])<<8|int(got[4])):]
}

// fzSeed is one seed of the decrypted-path targets.
type fzSeed struct {
	name    string
	encoded []byte
	tmpl    uint8
	mask    uint32
	knobs   uint16
}

// fzEdit returns the EncodedClientHelloInner enc with edit applied to its
// parsed form.
func fzEdit(enc []byte, edit func(h *fzHello)) []byte {
	h, ok := fzParseHello(enc)
	if !ok {
		panic("seed does not parse")
	}
	h.exts = slices.Clone(h.exts)
	edit(h)
	return h.body()
}

// fzSetExt replaces (or, with data nil, removes) the extensions of type typ.
func fzSetExt(h *fzHello, typ uint16, data []byte) {
	h.exts = slices.DeleteFunc(h.exts, func(e fzExt) bool { return e.typ == typ && data == nil })
	for i := range h.exts {
		if h.exts[i].typ == typ {
			h.exts[i].data = data
		}
	}
}

// fzSeeds returns the seeds: the EncodedClientHelloInners of crypto/tls
// clients, each with the outer-hello knobs, and broken variants breaking
// one rule of RFC 9849, Section 5.1 or 7.1 at a time.
func fzSeeds(t *testing.T, fx *fzFixture, second bool) []fzSeed {
	var seeds []fzSeed
	knobs := []uint16{fzKnobNoSessionID, fzKnobECHFirst, fzKnobOuterExtsExt, fzKnobPadding, fzKnobFragment, fzKnobRecordVers301}
	if second {
		knobs = append(knobs, fzKnobCCS, fzKnobEnc, fzKnobOtherConfigID, fzKnobCorrupt, fzKnobNoECH, fzKnobInnerType)
	}
	for i, enc := range fx.inners {
		tmpl := uint8(i)
		add := func(name string, b []byte, mask uint32, k uint16) {
			seeds = append(seeds, fzSeed{fmt.Sprintf("tls%d-%s", i, name), b, tmpl, mask, k})
		}
		add("real", enc, 0, 0)
		for _, k := range knobs {
			add(fmt.Sprintf("knob%04x", k), enc, 0, k)
		}
		// Outer extensions dropped: the first and the last referenced one.
		add("drop-first-outer", enc, 1, 0)
		add("drop-outer-4", enc, 1<<4, 0)
		h, _ := fzParseHello(enc)
		refs, _ := h.ext(fzExtOuterExts)
		add("bad-padding", append(slices.Clone(enc), 0, 0, 1), 0, 0)
		add("long-padding", append(slices.Clone(enc), make([]byte, 17000)...), 0, 0)
		add("session-id", fzEdit(enc, func(h *fzHello) { h.sid = []byte{1, 2, 3, 4} }), 0, 0)
		add("no-inner-ech", fzEdit(enc, func(h *fzHello) { fzSetExt(h, fzExtECH, nil) }), 0, 0)
		add("outer-type-inner-ech", fzEdit(enc, func(h *fzHello) { fzSetExt(h, fzExtECH, []byte{0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0}) }), 0, 0)
		add("tls12-only", fzEdit(enc, func(h *fzHello) {
			if slices.ContainsFunc(h.exts, func(e fzExt) bool { return e.typ == fzExtSupportedVers }) {
				fzSetExt(h, fzExtSupportedVers, []byte{2, 3, 3})
			} else {
				// supported_versions is compressed: drop the reference.
				h.exts = append(h.exts, fzExt{fzExtSupportedVers, []byte{4, 3, 4, 3, 3}})
				fzSetExt(h, fzExtOuterExts, nil)
			}
		}), 0, 0)
		add("bad-alpn", fzEdit(enc, func(h *fzHello) { h.exts = append(h.exts, fzExt{fzExtALPN, []byte{0, 2, 0, 0}}) }), 0, 0)
		add("other-sni", fzEdit(enc, func(h *fzHello) {
			fzSetExt(h, fzExtServerName, []byte{0, 10, 0, 0, 7, 'o', 't', 'h', 'e', 'r', '.', 'x'})
		}), 0, 0)
		add("no-sni", fzEdit(enc, func(h *fzHello) { fzSetExt(h, fzExtServerName, nil) }), 0, 0)
		add("no-extensions", fzEdit(enc, func(h *fzHello) { h.exts, h.hasExts, h.rest = nil, false, nil }), 0, 0)
		if len(refs) < 5 {
			continue
		}
		n := int(refs[0])
		list := refs[1 : 1+n]
		withRefs := func(l []byte) []byte {
			return fzEdit(enc, func(h *fzHello) { fzSetExt(h, fzExtOuterExts, append([]byte{byte(len(l))}, l...)) })
		}
		swapped := slices.Concat(list[2:4], list[:2], list[4:])
		add("refs-out-of-order", withRefs(swapped), 0, 0)
		add("refs-repeated", withRefs(slices.Concat(list[:2], list)), 0, 0)
		add("refs-ech", withRefs(slices.Concat(list, []byte{0xfe, 0x0d})), 0, 0)
		add("refs-missing", withRefs(slices.Concat(list, []byte{0x12, 0x34})), 0, 0)
		add("refs-outer-exts", withRefs(slices.Concat([]byte{0xfd, 0x00}, list)), 0, fzKnobOuterExtsExt)
		add("refs-odd", withRefs(list[:3]), 0, 0)
		add("refs-empty", withRefs(nil), 0, 0)
		add("refs-twice", fzEdit(enc, func(h *fzHello) {
			h.exts = append(h.exts, fzExt{fzExtOuterExts, []byte{2, list[0], list[1]}})
		}), 0, 0)
		add("refs-dup-with-inner", fzEdit(enc, func(h *fzHello) {
			h.exts = append(h.exts, fzExt{uint16(list[0])<<8 | uint16(list[1]), []byte{0, 0}})
		}), 0, 0)
	}
	if second {
		real2 := fzRealSecondHello(t, fx)
		seeds = append(seeds,
			fzSeed{"tls1-hrr-real", real2, 1, 0, 0},
			fzSeed{"tls1-hrr-real-ccs", real2, 1, 0, fzKnobCCS},
			fzSeed{"tls1-hrr-real-fragment", real2, 1, 0, fzKnobFragment})
	}
	return seeds
}

// TestFzDecryptedSeeds checks that the seeds of FuzzDecryptedInner and
// FuzzDecryptedSecondHello are in testdata/fuzz, and writes them with
// -update-decrypted-seeds. Their crypto/tls hellos are random, so they are
// written once, not compared.
func TestFzDecryptedSeeds(t *testing.T) {
	fx := fzSetup(t)
	for _, target := range []string{"FuzzDecryptedInner", "FuzzDecryptedSecondHello"} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range fzSeeds(t, fx, target == "FuzzDecryptedSecondHello") {
			file := filepath.Join(dir, s.name)
			if !*fzUpdateSeeds {
				_, err := os.Stat(file)
				if err != nil {
					t.Errorf("seed missing: %v (run go test -run TestFzDecryptedSeeds -update-decrypted-seeds)", err)
				}
				continue
			}
			data := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\nuint8(%d)\nuint32(%d)\nuint16(%d)\n",
				s.encoded, s.tmpl, s.mask, s.knobs)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// fzTap records what is read from a net.Conn.
type fzTap struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *fzTap) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.buf.Write(p[:n])
	c.mu.Unlock()
	return n, err
}

// fzRealSecondHello runs a crypto/tls client through NewConn to a
// crypto/tls backend that prefers P-256 while the client sends an X25519
// key share, so the backend answers with a HelloRetryRequest. It returns
// the EncodedClientHelloInner of the client's second hello, decrypted with
// crypto/hpke. The client is that of template 1 with P-256 added.
func fzRealSecondHello(t *testing.T, fx *fzFixture) []byte {
	list, err := fx.ks.ConfigList()
	if err != nil {
		t.Fatal(err)
	}
	cc := fzClientConfigs(list)[1]
	cc.CurvePreferences = []tls.CurveID{tls.X25519, tls.CurveP256}
	ca := echtest.NewCA(t)
	cc.RootCAs = ca.Pool()
	backendCfg := &tls.Config{
		GetCertificate:   ca.GetCertificate,
		CurvePreferences: []tls.CurveID{tls.CurveP256},
		MinVersion:       tls.VersionTLS13,
	}
	ctx, cancel := context.WithTimeout(t.Context(), fzTimeout)
	defer cancel()

	cli, front := net.Pipe()
	tap := &fzTap{Conn: front}
	back, backend := net.Pipe()
	defer func() { cli.Close(); front.Close(); back.Close(); backend.Close() }()
	go tls.Client(cli, cc).HandshakeContext(ctx)
	go tls.Server(backend, backendCfg).HandshakeContext(ctx)

	c, err := ech.NewConn(ctx, tap, ech.WithKeySet(fx.ks))
	if err != nil || !c.ECHAccepted() {
		t.Fatalf("NewConn: %v, accepted %v", err, err == nil && c.ECHAccepted())
	}
	c.SetDeadline(time.Now().Add(fzTimeout))
	back.SetDeadline(time.Now().Add(fzTimeout))
	go io.Copy(c, back) // the backend's HelloRetryRequest goes through c.Write
	for range 2 {
		msg, vers, err := fzReadMessage(c)
		if err != nil {
			t.Fatalf("reading the replayed hellos: %v", err)
		}
		if _, err := back.Write(fzRecords(22, vers, msg, 1<<14)); err != nil {
			t.Fatal(err)
		}
	}

	// What the client sent: its first hello, then its second.
	tap.mu.Lock()
	sent := bytes.NewReader(slices.Clone(tap.buf.Bytes()))
	tap.mu.Unlock()
	var r *hpke.Recipient
	var encoded []byte
	for i := range 2 {
		msg, _, err := fzReadMessage(sent)
		if err != nil {
			t.Fatal(err)
		}
		outer, ok := fzParseHello(msg[4:])
		if !ok {
			t.Fatalf("client hello %d does not parse", i)
		}
		if encoded, err = fx.open(&r, msg[4:], outer); err != nil {
			t.Fatalf("client hello %d: %v", i, err)
		}
	}
	return encoded
}
