package router

import "syscall"

// deferAccept sets TCP_DEFER_ACCEPT on a listening socket: the kernel
// completes the accept once the client's first bytes have come, or after
// DefaultHandshakeTimeout without them.
func deferAccept(network, _ string, rc syscall.RawConn) error {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil
	}
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT, int(DefaultHandshakeTimeout.Seconds()))
	})
	if err != nil {
		return err
	}
	return serr
}
