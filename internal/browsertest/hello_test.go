package browsertest

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/cryptobyte"
)

// Wire codepoints the observers read (RFC 8446, RFC 9849).
const (
	recordTypeHandshake     uint8  = 22
	handshakeClientHello    uint8  = 1
	extensionServerName     uint16 = 0
	extensionGroups         uint16 = 10
	extensionALPN           uint16 = 16
	extensionKeyShare       uint16 = 51
	extensionECH            uint16 = 0xfe0d
	echTypeOuter            uint8  = 0
	echTypeInner            uint8  = 1
	maxRecorded                    = 1 << 20 // bytes kept per direction of a connection
	maxHandshakeMessageSize        = 1 << 16
)

var errNotHello = errors.New("browsertest: not a ClientHello")

// hello is what an observer learns from a ClientHello in the clear.
type hello struct {
	SNI       string
	ECHType   int // -1 without encrypted_client_hello, else echTypeOuter or echTypeInner
	ALPN      []string
	Groups    []tls.CurveID // supported_groups
	KeyShares []tls.CurveID // the groups of key_share's entries
}

// ECH reports whether the hello has an encrypted_client_hello extension.
func (h *hello) ECH() bool { return h.ECHType >= 0 }

// Inner reports whether the hello is a ClientHelloInner, as a split-mode
// backend receives it.
func (h *hello) Inner() bool { return h.ECHType == int(echTypeInner) }

func (h *hello) String() string {
	ech := "no ECH"
	switch h.ECHType {
	case int(echTypeOuter):
		ech = "ECH outer"
	case int(echTypeInner):
		ech = "ECH inner"
	}
	return fmt.Sprintf("sni=%q %s alpn=%v groups=%v key_shares=%v", h.SNI, ech, h.ALPN, h.Groups, h.KeyShares)
}

// handshakeMessages returns the handshake messages carried by the
// plaintext handshake records of stream, a byte stream of TLS records in
// one direction; other records are skipped. A message cut short at the end
// of stream is left out.
func handshakeMessages(stream []byte) ([][]byte, error) {
	var msgs [][]byte
	var pending []byte
	s := cryptobyte.String(stream)
	for !s.Empty() {
		var typ uint8
		var vers uint16
		var fragment cryptobyte.String
		if !s.ReadUint8(&typ) || !s.ReadUint16(&vers) || !s.ReadUint16LengthPrefixed(&fragment) {
			break // a record cut short by the end of the recording
		}
		if typ != recordTypeHandshake {
			continue
		}
		pending = append(pending, fragment...)
		for len(pending) >= 4 {
			n := int(pending[1])<<16 | int(pending[2])<<8 | int(pending[3])
			if n > maxHandshakeMessageSize {
				return msgs, fmt.Errorf("browsertest: handshake message of %d bytes", n)
			}
			if len(pending) < 4+n {
				break
			}
			msgs = append(msgs, pending[:4+n:4+n])
			pending = pending[4+n:]
		}
	}
	return msgs, nil
}

// parseHello parses a ClientHello handshake message, header included.
//
//	struct {
//	    ProtocolVersion legacy_version = 0x0303;
//	    Random random;
//	    opaque legacy_session_id<0..32>;
//	    CipherSuite cipher_suites<2..2^16-2>;
//	    opaque legacy_compression_methods<1..2^8-1>;
//	    Extension extensions<8..2^16-1>;
//	} ClientHello;
func parseHello(msg []byte) (*hello, error) {
	s := cryptobyte.String(msg)
	var typ uint8
	var body, sessionID, suites, compression, exts cryptobyte.String
	if !s.ReadUint8(&typ) || typ != handshakeClientHello {
		return nil, errNotHello
	}
	if !s.ReadUint24LengthPrefixed(&body) || !s.Empty() ||
		!body.Skip(2+32) ||
		!body.ReadUint8LengthPrefixed(&sessionID) ||
		!body.ReadUint16LengthPrefixed(&suites) ||
		!body.ReadUint8LengthPrefixed(&compression) ||
		!body.ReadUint16LengthPrefixed(&exts) || !body.Empty() {
		return nil, fmt.Errorf("%w: malformed", errNotHello)
	}
	h := &hello{ECHType: -1}
	for !exts.Empty() {
		var et uint16
		var data cryptobyte.String
		if !exts.ReadUint16(&et) || !exts.ReadUint16LengthPrefixed(&data) {
			return nil, fmt.Errorf("%w: malformed extensions", errNotHello)
		}
		var ok bool
		switch et {
		case extensionServerName:
			// ServerName server_name_list<1..2^16-1>, each a NameType and
			// opaque HostName<1..2^16-1> (RFC 6066, Section 3).
			var list, name cryptobyte.String
			var nameType uint8
			ok = data.ReadUint16LengthPrefixed(&list) && list.ReadUint8(&nameType) && list.ReadUint16LengthPrefixed(&name)
			h.SNI = string(name)
		case extensionECH:
			var t uint8
			ok = data.ReadUint8(&t)
			h.ECHType = int(t)
		case extensionALPN:
			var list cryptobyte.String
			ok = data.ReadUint16LengthPrefixed(&list)
			for ok && !list.Empty() {
				var p cryptobyte.String
				ok = list.ReadUint8LengthPrefixed(&p)
				h.ALPN = append(h.ALPN, string(p))
			}
		case extensionGroups:
			var list cryptobyte.String
			ok = data.ReadUint16LengthPrefixed(&list)
			for ok && !list.Empty() {
				var g uint16
				ok = list.ReadUint16(&g)
				h.Groups = append(h.Groups, tls.CurveID(g))
			}
		case extensionKeyShare:
			// KeyShareEntry client_shares<0..2^16-1>, each a NamedGroup
			// and opaque key_exchange<1..2^16-1> (RFC 8446, Section 4.2.8).
			var list cryptobyte.String
			ok = data.ReadUint16LengthPrefixed(&list)
			for ok && !list.Empty() {
				var g uint16
				var kx cryptobyte.String
				ok = list.ReadUint16(&g) && list.ReadUint16LengthPrefixed(&kx)
				h.KeyShares = append(h.KeyShares, tls.CurveID(g))
			}
		default:
			ok = true
		}
		if !ok {
			return nil, fmt.Errorf("%w: malformed extension %d", errNotHello, et)
		}
	}
	return h, nil
}

// recordingConn keeps the first bytes read from and written to a
// connection, up to maxRecorded each way.
type recordingConn struct {
	net.Conn
	mu      sync.Mutex
	in, out []byte
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.in = appendCapped(c.in, p[:n])
	c.mu.Unlock()
	return n, err
}

func (c *recordingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.mu.Lock()
	c.out = appendCapped(c.out, p[:n])
	c.mu.Unlock()
	return n, err
}

// recorded returns copies of the bytes read and written so far.
func (c *recordingConn) recorded() (in, out []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.in), slices.Clone(c.out)
}

// firstHello parses the first ClientHello the connection has read.
func (c *recordingConn) firstHello() (*hello, error) {
	in, _ := c.recorded()
	msgs, err := handshakeMessages(in)
	if err != nil {
		return nil, err
	}
	if len(msgs) == 0 {
		return nil, fmt.Errorf("%w: no handshake message in %d bytes", errNotHello, len(in))
	}
	return parseHello(msgs[0])
}

func appendCapped(dst, p []byte) []byte {
	return append(dst, p[:min(len(p), maxRecorded-len(dst))]...)
}

// recordingListener wraps each accepted connection in a recordingConn.
type recordingListener struct{ net.Listener }

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c}, nil
}

// TestParseHello checks the observers' parser on hellos that Go's
// crypto/tls sends over a socket: the outer hello with ECH, and without.
func TestParseHello(t *testing.T) {
	t.Parallel()
	ks := echtest.NewKeySet(t, "public.test")
	list, err := ks.ConfigList()
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		list ech.ConfigList
		sni  string
		ech  int
	}{
		{"ech", list, "public.test", int(echTypeOuter)},
		{"plain", nil, "hidden.test", -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			defer ln.Close()
			rl := recordingListener{ln}
			got := make(chan *recordingConn, 1)
			go func() {
				c, err := rl.Accept()
				if err != nil {
					close(got)
					return
				}
				// Read until the client gives up: the hello is all it sends.
				buf := make([]byte, 4096)
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
					if h, err := c.(*recordingConn).firstHello(); err == nil && h != nil {
						break
					}
				}
				c.Close()
				got <- c.(*recordingConn)
			}()
			conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
				ServerName:                     "hidden.test",
				EncryptedClientHelloConfigList: tc.list,
				NextProtos:                     []string{"h2", "http/1.1"},
				CurvePreferences:               []tls.CurveID{tls.X25519, tls.CurveP256},
			})
			if err == nil {
				conn.Close()
			}
			rc := <-got
			require.NotNil(t, rc)
			h, err := rc.firstHello()
			require.NoError(t, err)
			assert.Equal(t, tc.sni, h.SNI)
			assert.Equal(t, tc.ech, h.ECHType)
			assert.Equal(t, []tls.CurveID{tls.X25519, tls.CurveP256}, h.Groups)
			assert.Equal(t, []tls.CurveID{tls.X25519}, h.KeyShares)
			if tc.list == nil {
				assert.Equal(t, []string{"h2", "http/1.1"}, h.ALPN)
			}
			in, _ := rc.recorded()
			assert.Equal(t, tc.list != nil, !strings.Contains(string(in), "hidden.test"))

			// Every prefix of the recording parses without error, to the
			// hello or to no message.
			for n := range len(in) {
				msgs, err := handshakeMessages(in[:n])
				require.NoError(t, err)
				assert.LessOrEqual(t, len(msgs), 1)
			}
		})
	}
}
