//go:build !linux

package sysmonhold

// Start does nothing on this system.
func Start() {}

// Held returns 0: Start holds no processor on this system.
func Held() int { return 0 }
