package sysmonhold

import (
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Start acts once per process: each test runs it in a child process of
// its own (this test binary, with SYSMONHOLD_CHILD naming the test), so
// that they hold under -count and -cpu too.

// inChild reports whether this process is the child for test t.
func inChild(t *testing.T) bool { return os.Getenv("SYSMONHOLD_CHILD") == t.Name() }

// runChild runs test t in a child process with env added, and fails
// unless it passed.
func runChild(t *testing.T, env ...string) {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(append(os.Environ(), "SYSMONHOLD_CHILD="+t.Name()), env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "--- PASS: "+t.Name())
	t.Logf("child ran in %v", time.Since(start).Round(time.Millisecond))
}

// TestStart checks that Start adds a processor, once, and that the
// runtime works around the held one: the garbage collector stops the
// world and scans every stack, and timers fire.
func TestStart(t *testing.T) {
	if !inChild(t) {
		runChild(t, "GOMAXPROCS=2")
		return
	}
	Start()
	Start()
	assert.Equal(t, 3, runtime.GOMAXPROCS(0), "one processor more, once")
	assert.Equal(t, 1, Held())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 5 {
			runtime.GC()
		}
		time.Sleep(10 * time.Millisecond)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the runtime is stuck behind the held processor")
	}
}

// TestGCWithoutPreemptionSignals collects garbage while a processor is
// held, with asynchronous preemption off: the world stops without the
// signal that interrupts the parked goroutine's ppoll, at its timeout.
func TestGCWithoutPreemptionSignals(t *testing.T) {
	if !inChild(t) {
		runChild(t, "GOMAXPROCS=2", "GODEBUG=asyncpreemptoff=1")
		return
	}
	Start()
	require.Equal(t, 1, Held())
	for range 20 {
		runtime.GC()
	}
}

// TestStartOneProcessor: with one processor, Start holds none (see Start).
func TestStartOneProcessor(t *testing.T) {
	if !inChild(t) {
		runChild(t, "GOMAXPROCS=1")
		return
	}
	Start()
	assert.Equal(t, 1, runtime.GOMAXPROCS(0))
	assert.Equal(t, 0, Held())
}

// TestStartThenOneProcessor lowers GOMAXPROCS to 1 after Start: the
// parked goroutine lets its processor go, and Held says so.
func TestStartThenOneProcessor(t *testing.T) {
	if !inChild(t) {
		runChild(t, "GOMAXPROCS=2")
		return
	}
	Start()
	require.Equal(t, 1, Held())
	runtime.GOMAXPROCS(1)
	deadline := time.Now().Add(10 * time.Second)
	for Held() != 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	assert.Equal(t, 0, Held(), "still held after GOMAXPROCS went to 1")
}
