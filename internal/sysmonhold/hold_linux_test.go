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

// TestStart checks that Start adds a processor, once, and that the
// runtime works around the held one: the garbage collector stops the
// world, and timers fire.
func TestStart(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2) // as on a machine with 2 CPUs (see TestStartOneProcessor)
	}
	before := runtime.GOMAXPROCS(0)
	Start()
	Start()
	assert.Equal(t, before+1, runtime.GOMAXPROCS(0), "one processor more, once")
	assert.Equal(t, 1, Held())

	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 5 {
			runtime.GC() // stops the world twice
		}
		time.Sleep(10 * time.Millisecond)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the runtime is stuck behind the held processor")
	}
}

// TestGCWithoutPreemptionSignals runs a process that holds a processor
// and collects garbage with asynchronous preemption off: the world stops
// without the signal that interrupts the parked goroutine's ppoll, within
// its timeout.
func TestGCWithoutPreemptionSignals(t *testing.T) {
	if os.Getenv("SYSMONHOLD_CHILD") == "1" {
		Start()
		for range 20 {
			runtime.GC()
		}
		return
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^TestGCWithoutPreemptionSignals$", "-test.v")
	cmd.Env = append(os.Environ(), "SYSMONHOLD_CHILD=1", "GODEBUG=asyncpreemptoff=1", "GOMAXPROCS=2")
	start := time.Now()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "PASS")
	t.Logf("20 collections in %v", time.Since(start).Round(time.Millisecond))
}

// TestStartOneProcessor runs a process whose runtime has one processor:
// Start holds none (see Start).
func TestStartOneProcessor(t *testing.T) {
	if os.Getenv("SYSMONHOLD_CHILD") == "one" {
		Start()
		if n, h := runtime.GOMAXPROCS(0), Held(); n != 1 || h != 0 {
			t.Fatalf("GOMAXPROCS %d, %d held; want 1, 0", n, h)
		}
		return
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^TestStartOneProcessor$", "-test.v")
	cmd.Env = append(os.Environ(), "SYSMONHOLD_CHILD=one", "GOMAXPROCS=1")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "--- PASS: TestStartOneProcessor")
}
