// Package sysmonhold keeps the Go runtime's monitor thread (sysmon) from
// polling every 20 µs each time a busy server wakes from idle.
//
// The monitor sleeps for good when every processor (P) of the runtime is
// idle, and the next goroutine to enter a system call through the
// runtime (an accept, a read or close on a net.Conn, a log line) wakes it
// and starts it again at its shortest period, 20 µs, doubled only after
// 50 rounds. A proxy that goes idle between the packets of its
// connections does that several times per connection: in
// internal/perf/haproxy, the monitor of ech-router slept and woke 2.4 to
// 2.7 times per new connection, for 58 to 78 µs of CPU per connection (14%
// of the router's), and the router made 7.7 to 8.1 context switches per
// connection (all its threads), against HAProxy's 6.
//
// Start gives the runtime (if it has 2 processors or more) one processor
// more than it had and parks a goroutine on it in a system call that the
// runtime does not see (ppoll, made raw, with a 5 ms timeout): that
// processor never counts as idle, so the monitor never sleeps for good,
// and with nothing to take back from system calls it backs off to its
// longest period, 10 ms. The parked goroutine uses next to no CPU; it
// yields its processor every 5 ms, and at once when a signal interrupts
// its ppoll (the runtime's preemption signal, as when it stops the world
// or scans stacks for the garbage collector): 20 collections of a small
// heap paused the world for 7 to 10 ms in all against 2 to 2.5 ms without
// Start. With GODEBUG=asyncpreemptoff=1 there is no such signal, and a
// stop of the world may wait up to 5 ms for it. With Start, the monitor spent 2 to
// 5 µs per connection, and the router made 5.3 to 5.7 context switches.
//
// The cost: the runtime no longer adjusts GOMAXPROCS to a changed CPU
// limit of its cgroup (Start sets it), timers left on the held processor
// may run up to 5 ms late while the others are busy, and an idle process
// makes about 500 context switches a second (the parked goroutine's
// thread every 5 ms, a thread its yield wakes, and the monitor; about 10
// without Start). It is for servers, in their main package: a library has no business
// changing GOMAXPROCS. Start does nothing on systems other than Linux.
package sysmonhold
