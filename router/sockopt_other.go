//go:build !linux

package router

import "syscall"

// deferAccept does nothing where there is no TCP_DEFER_ACCEPT.
func deferAccept(string, string, syscall.RawConn) error { return nil }
