package ech

import (
	"bytes"
	"net"
	"syscall"
)

// arrivedWithoutECH reports whether conn's socket already holds a whole
// ClientHello of at most maxHello bytes without an encrypted_client_hello
// extension, without reading it (a peek of a record's worth: a larger hello
// is read on a goroutine of its own): NewConn then reads it without
// waiting, and decrypts nothing. A hello that does not parse is not one.
func arrivedWithoutECH(conn net.Conn, maxHello int) bool {
	c, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	bp := copyBufPool.Get().(*[]byte)
	buf, n := *bp, 0
	defer func() {
		clear(buf[:n])
		copyBufPool.Put(bp)
	}()
	rc.Control(func(fd uintptr) {
		n, _, err = syscall.Recvfrom(int(fd), buf, syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	})
	if err != nil || n <= 0 {
		n = 0
		return false
	}
	hr := handshakeReader{conn: bytes.NewReader(buf[:n]), maxSize: maxHello, first: true}
	defer hr.release()
	msg, err := readClientHello(&hr)
	if err != nil {
		return false // not all there, or NewConn is to refuse it
	}
	sc := scratchPool.Get().(*scratch)
	defer sc.release()
	return parseClientHello(&sc.outer, msg[handshakeHeaderLen:]) == nil && !sc.outer.hasECH
}
