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
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/store"
)

// CheckStatus is the outcome of one Doctor check: CheckOK, CheckWarn
// (works but is degraded or optional: its Fix is worth reading) or
// CheckFail (needs fixing before VMs, of some backend, can run, or names
// state to clean up). Backends report theirs with the same values.
type CheckStatus = backend.CheckStatus

// The outcomes.
const (
	CheckOK   = backend.CheckOK
	CheckWarn = backend.CheckWarn
	CheckFail = backend.CheckFail
)

// Check is one line of a health report.
type Check struct {
	Name   string      `json:"name"`
	OK     bool        `json:"ok"` // Status is not CheckFail
	Status CheckStatus `json:"status"`
	Detail string      `json:"detail"`
	Fix    Fix         `json:"fix,omitzero"` // what to do, typed; the CLI and API word it
}

// MinFreeGiB is the free disk space (GiB) below which Doctor fails the
// data and image directories: snapshots and images need a few GiB.
const MinFreeGiB = 4

// Doctor checks this host and the data directory of opts without needing
// an open Manager: what each registered backend needs (its VMM, helpers,
// accelerator, confinement), the images, disk space, the uid drop, cgroup
// limits and the run dir; then it opens the data directory and runs
// Manager.Doctor's state checks. A data directory that cannot be opened is
// a failed "state" check, not an error: the host report still stands.
func Doctor(ctx context.Context, opts Options) []Check {
	opts = opts.withDefaults()
	out := hostChecks(ctx, opts, backend.Registrations())
	m, err := NewManager(ctx, opts)
	if err == nil {
		var state []Check
		state, err = m.stateChecks(ctx)
		m.Close()
		out = append(out, state...)
	}
	if err != nil {
		detail := err.Error()
		if e := (*Error)(nil); errors.As(err, &e) {
			detail = e.Message
		}
		out = append(out, Check{Name: "state", Status: CheckFail, Detail: detail,
			Fix: newFix(FixConfigureHost, ArgEnv, "SMOLVM_DATA_DIR", ArgHint, "check the permissions of "+opts.DataDir+", or set SMOLVM_DATA_DIR")})
	}
	return settle(out)
}

// Doctor checks the host (as the package-level Doctor does) and this
// manager's state: it reconciles recorded VMs with their processes,
// removes what interrupted operations left behind (unfinished snapshots),
// and reports.
func (m *Manager) Doctor(ctx context.Context) ([]Check, error) {
	out := hostChecks(ctx, m.opts, backend.Registrations())
	state, err := m.stateChecks(ctx)
	if err != nil {
		return nil, err
	}
	return settle(append(out, state...)), nil
}

// settle makes every check's OK agree with its Status; a status other
// than ok or warn counts as fail.
func settle(cs []Check) []Check {
	for i := range cs {
		if cs[i].Status != CheckOK && cs[i].Status != CheckWarn {
			cs[i].Status = CheckFail
		}
		cs[i].OK = cs[i].Status != CheckFail
	}
	return cs
}

// hostChecks runs the checks that need no state: each backend's own
// (the default backend first, then by name), then the SDK's.
func hostChecks(ctx context.Context, opts Options, regs []backend.Registration) []Check {
	var out []Check
	slices.SortStableFunc(regs, func(a, b backend.Registration) int {
		return boolInt(b.Name == DefaultBackend) - boolInt(a.Name == DefaultBackend)
	})
	for _, r := range regs {
		if r.HostChecks == nil {
			continue
		}
		for _, c := range r.HostChecks(ctx) {
			out = append(out, Check{Name: c.Name, Status: c.Status, Detail: c.Detail, Fix: hostFix(c.Fix)})
		}
	}
	out = append(out, imageChecks(opts.ImageDir)...)
	out = append(out, diskCheck("disk (data)", opts.DataDir), diskCheck("disk (images)", opts.ImageDir))
	out = append(out, confinementChecks()...)
	return append(out, runDirCheck(opts.RunDir))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// imageChecks reports each image Build knows whether it is built in dir.
func imageChecks(dir string) []Check {
	var out []Check
	for _, name := range image.Names {
		img, err := image.Open(dir, name)
		if err != nil {
			out = append(out, Check{Name: "image " + name, Status: CheckFail, Detail: "not built in " + dir, Fix: newFix(FixBuildImage, ArgImage, name)})
			continue
		}
		out = append(out, Check{Name: "image " + name, Status: CheckOK,
			Detail: fmt.Sprintf("kernel %s, rootfs %s", img.Manifest.KernelRelease, img.Rootfs)})
	}
	return out
}

// diskCheck reports the free space where dir is (or will be).
func diskCheck(name, dir string) Check {
	free, at, err := hostprobe.FreeSpace(dir)
	if err != nil {
		return Check{Name: name, Status: CheckWarn, Detail: "cannot measure free space: " + err.Error()}
	}
	gib := float64(free) / (1 << 30)
	c := Check{Name: name, Status: CheckOK, Detail: fmt.Sprintf("%.1f GiB free under %s", gib, at)}
	if gib < MinFreeGiB {
		c.Status, c.Fix = CheckFail, newFix(FixConfigureHost, ArgHint, "free space under "+at+" (snapshots and images need a few GiB)")
	}
	return c
}

// stateChecks reconciles recorded VMs with their processes, removes
// unfinished snapshots, and reports both.
func (m *Manager) stateChecks(ctx context.Context) ([]Check, error) {
	var out []Check
	infos, err := m.List(ctx)
	if err != nil {
		return nil, err
	}
	counts := map[Status]int{}
	for _, i := range infos {
		counts[i.Status]++
	}
	out = append(out, Check{Name: "vms", Status: CheckOK, Detail: fmt.Sprintf("%d running, %d paused, %d stopped, %d created, %d failed (state in %s)",
		counts[StatusRunning], counts[StatusPaused], counts[StatusStopped], counts[StatusCreated], counts[StatusError], m.opts.DataDir)})
	if counts[StatusError] > 0 {
		out[len(out)-1].Fix = newFix(FixDeleteFailedVMs)
	}
	out = append(out, m.strayVMMs(ctx, infos)...)
	cleaned, err := m.cleanupSnapshots(ctx)
	if err != nil {
		out = append(out, Check{Name: "snapshots", Status: CheckFail, Detail: err.Error()})
	} else {
		out = append(out, Check{Name: "snapshots", Status: CheckOK, Detail: fmt.Sprintf("removed %d unfinished snapshot(s)", cleaned)})
	}
	return append(out, m.templateCheck(ctx)), nil
}

// templateCheck reports the templates and the stale ones (their image was
// rebuilt or is gone): no create uses them again, so they only take space
// until collected.
func (m *Manager) templateCheck(ctx context.Context) Check {
	list, err := m.ListTemplates(ctx)
	if err != nil {
		return Check{Name: "templates", Status: CheckFail, Detail: err.Error()}
	}
	var stale []string
	var size int64
	for _, t := range list {
		if t.Stale {
			stale = append(stale, t.Key[:12]+" ("+t.StaleReason+")")
			size += t.SizeBytes
		}
	}
	c := Check{Name: "templates", Status: CheckOK, Detail: fmt.Sprintf("%d template(s), none stale", len(list))}
	if len(stale) > 0 {
		c.Status, c.Fix = CheckWarn, newFix(FixCollectTemplates)
		c.Detail = fmt.Sprintf("%d of %d template(s) stale, %.0f MiB: %s", len(stale), len(list), float64(size)/(1<<20), strings.Join(stale, ", "))
	}
	return c
}

// runDirCheck reports whether the base run dir is private (a VM start
// refuses it otherwise, e.g. one left 0755 by an older smolvm).
func runDirCheck(dir string) Check {
	err := fsutil.CheckPrivateDir(dir)
	switch {
	case err == nil:
		return Check{Name: "run dir", Status: CheckOK, Detail: dir + " is private (0700)"}
	case errors.Is(err, fs.ErrNotExist):
		return Check{Name: "run dir", Status: CheckOK, Detail: dir + " does not exist yet (created 0700 by the first start)"}
	}
	return Check{Name: "run dir", Status: CheckFail, Detail: err.Error(),
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
		// A VM that claimed a warm pool member runs in the member's dirs.
		if d := filepath.Base(i.Dir); i.Dir != "" && d != i.ID {
			status[d] = i.Status
		}
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
		c := Check{Name: "stray vmm", Status: CheckFail}
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
