//go:build !linux

package router

import (
	"errors"
	"sync/atomic"
)

// useLoops is false: this system has no loops, and every connection is
// forwarded by two goroutines.
var useLoops atomic.Bool

// loopState is empty where there are no loops.
type loopState struct{}

func (p *pipe) handToLoop([2]bool) error { return errors.New("router: no loops on this system") }

// endLoop is never called where there are no loops. p.mu is held, and
// released.
func (p *pipe) endLoop(int, error) { p.mu.Unlock() }
