package smolvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/store"
)

// Check is one line of a health report.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    Fix    `json:"fix,omitzero"`
}

// Doctor reconciles recorded VMs with their processes, removes what
// interrupted operations left behind (unfinished snapshots), and reports.
func (m *Manager) Doctor(ctx context.Context) ([]Check, error) {
	var out []Check
	infos, err := m.List(ctx)
	if err != nil {
		return nil, err
	}
	counts := map[Status]int{}
	for _, i := range infos {
		counts[i.Status]++
	}
	out = append(out, Check{Name: "vms", OK: true, Detail: fmt.Sprintf("%d running, %d paused, %d stopped, %d created, %d failed (state in %s)",
		counts[StatusRunning], counts[StatusPaused], counts[StatusStopped], counts[StatusCreated], counts[StatusError], m.opts.DataDir)})
	if counts[StatusError] > 0 {
		out[len(out)-1].Fix = newFix(FixDeleteFailedVMs)
	}
	out = append(out, m.strayVMMs(ctx, infos)...)
	out = append(out, confinementChecks()...)
	out = append(out, runDirCheck(m.opts.RunDir))
	cleaned, err := m.cleanupSnapshots(ctx)
	if err != nil {
		out = append(out, Check{Name: "snapshots", OK: false, Detail: err.Error()})
	} else {
		out = append(out, Check{Name: "snapshots", OK: true, Detail: fmt.Sprintf("removed %d unfinished snapshot(s)", cleaned)})
	}
	return out, nil
}

// runDirCheck reports whether the base run dir is private (a VM start
// refuses it otherwise, e.g. one left 0755 by an older smolvm).
func runDirCheck(dir string) Check {
	err := fsutil.CheckPrivateDir(dir)
	switch {
	case err == nil:
		return Check{Name: "run dir", OK: true, Detail: dir + " is private (0700)"}
	case errors.Is(err, fs.ErrNotExist):
		return Check{Name: "run dir", OK: true, Detail: dir + " does not exist yet (created 0700 by the first start)"}
	}
	return Check{Name: "run dir", OK: false, Detail: err.Error(),
		Fix: newFix(FixRemoveDir, ArgPath, dir, ArgEnv, "SMOLVM_RUN_DIR")}
}

// strayVMMs reports VMM processes of this data dir that no VM accounts for:
// a process whose command line names a VM directory here, for a VM that has
// no record or is recorded as neither running nor paused (what a process
// killed while it launched a VMM could leave). A VM whose lock is held is
// skipped: an operation on it is under way (a boot records "running" only
// once the guest answers).
func (m *Manager) strayVMMs(ctx context.Context, infos []Info) []Check {
	status := map[string]Status{}
	for _, i := range infos {
		status[i.ID] = i.Status
	}
	vms := []byte(filepath.Join(m.opts.DataDir, "vms") + "/")
	var comms [][]byte // the VMM process names the registered backends run
	for _, r := range backend.Registrations() {
		for _, c := range r.VMMComms {
			comms = append(comms, []byte(c))
		}
	}
	isVMM := func(comm []byte) bool {
		return slices.ContainsFunc(comms, func(c []byte) bool { return bytes.HasPrefix(comm, c) })
	}
	var out []Check
	for _, pid := range procfs.Others() {
		proc := "/proc/" + strconv.Itoa(pid)
		comm, _ := os.ReadFile(proc + "/comm")
		if !isVMM(comm) {
			continue
		}
		cmdline, err := os.ReadFile(proc + "/cmdline")
		i := bytes.Index(cmdline, vms)
		if err != nil || i < 0 {
			continue
		}
		id := cmdline[i+len(vms):]
		if j := bytes.IndexAny(id, "/,\x00"); j >= 0 {
			id = id[:j]
		}
		st, known := status[string(id)]
		if known && (st == StatusRunning || st == StatusPaused) {
			continue
		}
		if store.ValidID(string(id)) == nil {
			lctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			unlock, err := store.LockVM(lctx, m.opts.DataDir, string(id))
			cancel()
			if err != nil {
				continue // busy: an operation on it is under way
			}
			unlock()
		}
		c := Check{Name: "stray vmm", OK: false}
		if known {
			c.Detail = fmt.Sprintf("vm %s is %s, but its VMM (pid %d) still runs", id, st, pid)
			c.Fix = newFix(FixResolveStrayVMM, ArgVM, string(id))
		} else {
			c.Detail = fmt.Sprintf("pid %d runs a VMM for vm %s, which %s does not know", pid, id, m.opts.DataDir)
			c.Fix = newFix(FixKillProcess, ArgPID, strconv.Itoa(pid))
		}
		out = append(out, c)
	}
	return out
}
