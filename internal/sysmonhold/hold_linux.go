package sysmonhold

import (
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// parkNS is how long the parked goroutine holds its processor between
// two yields: less than the 10 ms after which the runtime preempts a
// goroutine that runs on, so that it needs no signal to let go.
const parkNS = 5e6

var (
	once sync.Once
	held atomic.Int32
)

// Start raises GOMAXPROCS by one and parks a goroutine on a processor for
// as long as the process runs, if the runtime has at least 2 processors.
// It does it once; later calls do nothing. Do not lower GOMAXPROCS after
// it: below 2, the parked goroutine lets its processor go for good.
//
// With one processor (a process confined to one CPU), a second one held
// made things far worse: with no processor ever idle, the monitor takes
// the working one from each long system call and hands it to a thread
// that spins for work on the same CPU. The router then spent 1,268 µs of
// CPU per new connection instead of 233 µs.
func Start() {
	once.Do(func() {
		n := runtime.GOMAXPROCS(0)
		if n < 2 {
			return
		}
		runtime.GOMAXPROCS(n + 1)
		held.Store(1)
		go park()
	})
}

// Held returns how many processors Start holds: 1 once it has run, else 0.
// Code that sizes its work by GOMAXPROCS takes it off.
func Held() int { return int(held.Load()) }

func park() {
	for runtime.GOMAXPROCS(0) >= 2 {
		// ppoll with no descriptors sleeps until the timeout or a signal,
		// and leaves what remains of the timeout in ts.
		ts := syscall.Timespec{Nsec: parkNS}
		syscall.RawSyscall6(syscall.SYS_PPOLL, 0, 0, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		// A preemption asked for while it slept (the signal ended ppoll),
		// to stop the world or to scan this goroutine's stack, is taken
		// here: Gosched alone would not (it is nosplit, and the runtime
		// clears the request when it runs the goroutine again), and the
		// garbage collector would ask again every few µs, for tens of ms.
		//lint:ignore SA4017 called for the preemption check in its prologue
		safePoint(1)
		// Let the processor run what waits for it, and its timers.
		runtime.Gosched()
	}
	held.Store(0)
}

// safePoint checks for a preemption in its prologue: it is not inlined,
// and it calls itself, so it is no leaf the compiler would spare the check.
//
//go:noinline
func safePoint(n int) int {
	if n > 0 {
		return safePoint(n-1) + 1
	}
	return 0
}
