//go:build !linux

package ech

import "net"

// arrivedWithoutECH is false where it is not implemented: every hello is
// read on a goroutine of its own.
func arrivedWithoutECH(net.Conn, int) bool { return false }
