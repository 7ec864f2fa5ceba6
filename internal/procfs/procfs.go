// Package procfs reads /proc: the processes (for finding the VMM of a
// machine whose launcher died before recording its pid), the mounts
// (mountinfo, for cgroup detection and for cleaning up chroots), a
// process's memory from its smaps (the benchmarks' memory figures, a VM's
// stats) and its CPU time and start from its stat (a VM's stats).
package procfs

import (
	"os"
	"strconv"
)

// Others returns the pids in /proc other than this process's.
func Others() []int {
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	pids := make([]int, 0, len(ents))
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && pid != self {
			pids = append(pids, pid)
		}
	}
	return pids
}
