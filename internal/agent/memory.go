package agent

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// releaseAfter is how much the agent allocates before it gives memory back
// to the guest once it is idle.
const releaseAfter = 16 << 20

// releaseDelay is how long after the last request ended the agent
// releases: a file transfer is a series of requests (a chunk every second
// or so under TCG), and releasing between two chunks only makes the next
// one fault the pages in again.
const releaseDelay = time.Second

// The agent returns a burst's memory once it is idle. Many execs or a
// large transfer leave the Go heap grown (encoding/json keeps its grown
// encode buffer in a sync.Pool): measured in a busybox VM, the agent kept
// 44 MiB of RSS (still 40 s later) after a 100 MiB upload and download (7 MiB after
// 3 s of 32 concurrent execs), and the runtime collected and returned some
// of it later by itself, waking an idle agent 1-8 s after the work (single
// bursts of 70-130 context switches within 100 ms, against ~15 a second at
// rest), which TestIdleAgentDoesNotPoll saw as 120-200 switches in a 2 s
// window. Releasing once, releaseDelay after the burst, costs two
// collections and leaves 4 MiB of RSS.

// beginRequest marks a request as running; endRequest must follow.
func (s *Server) beginRequest() { s.active.Add(1) }

// endRequest ends a request. When the last one ends and more than
// releaseAfter bytes were allocated since the last release, a release is
// scheduled releaseDelay later (each such end pushes it back).
func (s *Server) endRequest() {
	if s.active.Add(-1) != 0 {
		return
	}
	s.memMu.Lock()
	defer s.memMu.Unlock()
	if heapAllocs()-s.releasedAt < releaseAfter {
		return
	}
	if s.releaseTimer == nil {
		s.releaseTimer = time.AfterFunc(releaseDelay, s.releaseMemory)
		return
	}
	s.releaseTimer.Reset(releaseDelay)
}

// releaseMemory collects the heap and returns its free pages to the guest.
// Requests still running (a long exec) do not put it off: they may run for
// hours.
func (s *Server) releaseMemory() {
	s.memMu.Lock()
	defer s.memMu.Unlock()
	s.releasedAt = heapAllocs()
	// Two collections: what a sync.Pool held survives the first in the
	// pool's victim cache.
	runtime.GC()
	debug.FreeOSMemory()
}

// heapAllocs is the number of bytes the agent allocated since it started.
func heapAllocs() uint64 {
	sample := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(sample)
	if sample[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return sample[0].Value.Uint64()
}
