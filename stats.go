package smolvm

import (
	"context"
	"io/fs"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/store"
)

// Stats is what a sandbox uses on the host, read from /proc and the file
// system (VM.Stats). A VM that is not running or paused reports its status,
// configured memory and disk, and zeros for the rest.
type Stats struct {
	ID     string    `json:"id"`
	Status Status    `json:"status"`
	Time   time.Time `json:"time"` // when the figures were read
	// UptimeSeconds is how long the VMM process has run (0 when none).
	UptimeSeconds float64     `json:"uptime_s"`
	CPU           CPUStats    `json:"cpu"`
	Memory        MemoryStats `json:"memory"`
	Disk          DiskStats   `json:"disk"`
	// Network is the sidecar's counters (nil without networking, or when
	// the VM is not running or paused).
	Network *NetworkStats `json:"network,omitempty"`
}

// CPUStats is the host CPU time of the VMM and its sidecars (the network
// sidecar), user + system, since they started.
type CPUStats struct {
	Seconds        float64 `json:"seconds"`         // VMM + sidecars
	VMMSeconds     float64 `json:"vmm_seconds"`     // the VMM alone
	SidecarSeconds float64 `json:"sidecar_seconds"` // the sidecars
	// Percent is the CPU used over a short recent window, in percent of
	// one host CPU (200 = two CPUs busy): since the previous Stats of the
	// same VM in this process when that was 0.1 s to 1 min ago, else over
	// a 100 ms window.
	Percent       float64 `json:"percent"`
	WindowSeconds float64 `json:"window_s"`
}

// MemoryStats is the host memory of the VMM (and its sidecars) and the
// guest memory configured.
type MemoryStats struct {
	// RSSBytes and PSSBytes are the resident and proportional set sizes
	// of the VMM and its sidecars (smaps_rollup). Guest RAM counts as it
	// is touched.
	RSSBytes int64 `json:"rss_bytes"`
	PSSBytes int64 `json:"pss_bytes"`
	// VMMPSSBytes is the VMM's own PSS (the sidecars' is the rest).
	VMMPSSBytes int64 `json:"vmm_pss_bytes"`
	GuestBytes  int64 `json:"guest_bytes"` // the guest memory configured
}

// DiskStats is the space the VM's files take on the host.
type DiskStats struct {
	// AllocatedBytes is the space allocated to the files in the VM's
	// directory (its disk overlay or copy, console log, ...), not counting
	// the image it is based on or a RAM file.
	AllocatedBytes int64 `json:"allocated_bytes"`
	Files          int   `json:"files"`
}

// maxStatFiles bounds the walk of a VM's directory.
const maxStatFiles = 10000

// cpuWindow is the window of CPUStats.Percent when no earlier sample fits.
const cpuWindow = 100 * time.Millisecond

// Stats reads what the VM uses on the host: CPU time, memory, disk,
// network. It works for running and paused VMs; others report zeros.
func (vm *VM) Stats(ctx context.Context) (Stats, error) {
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return Stats{}, err
	}
	st := Stats{ID: vm.id, Status: rec.Status, Time: time.Now().UTC(),
		Memory: MemoryStats{GuestBytes: int64(rec.Machine.MemoryMiB) << 20}}
	st.Disk = diskUsage(rec.Machine.Dir, rec.Machine.MemoryFile)
	if rec.Status != store.VMRunning && rec.Status != store.VMPaused || rec.PID <= 0 {
		return st, nil
	}
	s1, ok := sampleCPU(rec.PID, rec.Machine.NetPID)
	if !ok {
		return st, nil // the VMM is gone: its status catches up at the next read
	}
	if boot, err := procfs.BootTime(); err == nil {
		st.UptimeSeconds = max(0, time.Since(s1.started(boot)).Seconds())
	}
	st.CPU = CPUStats{Seconds: s1.total().Seconds(), VMMSeconds: s1.vmm.CPU().Seconds(), SidecarSeconds: s1.sidecar.CPU().Seconds()}
	key := rec.Machine.RunDir
	prev, havePrev := lastCPU.get(key, s1)
	if !havePrev {
		t := time.NewTimer(cpuWindow)
		select {
		case <-ctx.Done():
			t.Stop()
			return st, ctx.Err()
		case <-t.C:
		}
		prev = s1
		if s2, ok := sampleCPU(rec.PID, rec.Machine.NetPID); ok && s2.sameProcs(s1) {
			s1 = s2
			st.CPU = CPUStats{Seconds: s1.total().Seconds(), VMMSeconds: s1.vmm.CPU().Seconds(), SidecarSeconds: s1.sidecar.CPU().Seconds()}
		}
	}
	lastCPU.put(key, s1)
	if w := s1.at.Sub(prev.at); w > 0 && s1.total() >= prev.total() {
		st.CPU.WindowSeconds = w.Seconds()
		st.CPU.Percent = 100 * (s1.total() - prev.total()).Seconds() / w.Seconds()
	}
	for i, pid := range []int{rec.PID, rec.Machine.NetPID} {
		if pid <= 0 {
			continue
		}
		m, err := procfs.Rollup(pid)
		if err != nil {
			continue
		}
		st.Memory.RSSBytes += m.Rss << 10
		st.Memory.PSSBytes += m.Pss << 10
		if i == 0 {
			st.Memory.VMMPSSBytes = m.Pss << 10
		}
	}
	if rec.Machine.Network {
		nctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if ns, err := vm.NetworkStats(nctx); err == nil {
			st.Network = &ns
		}
		cancel()
	}
	return st, nil
}

// cpuSample is the CPU time of a VM's processes at one moment.
type cpuSample struct {
	at           time.Time
	vmmPID       int
	vmm, sidecar procfs.ProcStat
}

func sampleCPU(pid, netPID int) (cpuSample, bool) {
	s := cpuSample{at: time.Now(), vmmPID: pid}
	var err error
	if s.vmm, err = procfs.Stat(pid); err != nil {
		return s, false
	}
	if netPID > 0 {
		s.sidecar, _ = procfs.Stat(netPID) // a sidecar gone: no CPU of its own
	}
	return s, true
}

func (s cpuSample) total() time.Duration { return s.vmm.CPU() + s.sidecar.CPU() }

func (s cpuSample) started(boot time.Time) time.Time { return s.vmm.Started(boot) }

// sameProcs reports whether both samples are of the same VMM process (a
// pid reused by another process, or a VM restarted, is a new series).
func (s cpuSample) sameProcs(o cpuSample) bool {
	return s.vmmPID == o.vmmPID && s.vmm.StartTicks == o.vmm.StartTicks && s.sidecar.StartTicks == o.sidecar.StartTicks
}

// cpuSamples keeps the last CPU sample of each VM read in this process
// (by run dir), so that repeated Stats (a metrics scrape, a dashboard)
// measure the percent over the time between them without waiting.
type cpuSamples struct {
	mu sync.Mutex
	m  map[string]cpuSample
}

var lastCPU = &cpuSamples{m: map[string]cpuSample{}}

// maxCPUSamples bounds the map; older samples are dropped first.
const maxCPUSamples = 4096

func (c *cpuSamples) get(key string, now cpuSample) (cpuSample, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.m[key]
	if !ok || !p.sameProcs(now) {
		return p, false
	}
	age := now.at.Sub(p.at)
	return p, age >= cpuWindow && age <= time.Minute
}

func (c *cpuSamples) put(key string, s cpuSample) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.m[key]; ok && s.at.Sub(p.at) < cpuWindow && p.sameProcs(s) {
		return // keep the older sample: the next window stays long enough
	}
	if len(c.m) >= maxCPUSamples {
		for k, v := range c.m {
			if s.at.Sub(v.at) > time.Minute {
				delete(c.m, k)
			}
		}
		if len(c.m) >= maxCPUSamples {
			clear(c.m)
		}
	}
	c.m[key] = s
}

// diskUsage sums the space allocated to the regular files under dir
// (symlinks are not followed), except the RAM file skip, visiting at most
// maxStatFiles entries.
func diskUsage(dir, skip string) DiskStats {
	var d DiskStats
	if dir == "" {
		return d
	}
	n := 0
	filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if n++; n > maxStatFiles {
			return fs.SkipAll
		}
		if err != nil || !e.Type().IsRegular() || path == skip {
			return nil
		}
		fi, err := e.Info()
		if err != nil {
			return nil
		}
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			d.AllocatedBytes += sys.Blocks * 512
			d.Files++
		}
		return nil
	})
	return d
}
