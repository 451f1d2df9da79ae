//go:build !linux || 386

package router

import (
	"errors"
	"sync/atomic"

	"github.com/echkit/ech"
)

// useLoops is false: this system has no loops, and every connection is
// forwarded by two goroutines.
var useLoops atomic.Bool

// loopState is empty where there are no loops.
type loopState struct{}

func (p *pipe) handToLoop(int) error { return errors.New("router: no loops on this system") }

// resolveInLoop is never called where there are no loops. p.mu is held,
// and released.
func (p *pipe) resolveInLoop(int, dirResult, bool) { p.mu.Unlock() }

// endLoop is never called where there are no loops. p.mu is held, and
// released.
func (p *pipe) endLoop(int, error, bool) { p.mu.Unlock() }

// passthroughInLoop never takes a connection where there are no loops.
func (r *Router) passthroughInLoop(*ech.Conn, string, *Route, func(in, out int64, err error)) bool {
	return false
}

// routesToLoop is false where there are no loops.
func (r *Router) routesToLoop(*ech.Conn, []Route, dest) bool { return false }
