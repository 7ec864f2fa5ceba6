package smolvm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/store"
)

// MaxClones bounds one Fork.
const MaxClones = 64

// ForkOptions configure Fork.
type ForkOptions struct {
	// Resume leaves the clones running; otherwise each is paused once its
	// new identity is set.
	Resume bool
	// Prefix starts the clones' ids ("<prefix>-clone-<k>-<random>"); the
	// default is the snapshot's VM id.
	Prefix string
}

// ForkError reports the clones that failed; the others keep running.
// errors.Is and errors.As see each clone's cause (Unwrap).
type ForkError struct {
	Failed map[string]error // clone id -> why
}

// Unwrap returns each failed clone's cause, in the order of the clone ids.
func (e *ForkError) Unwrap() []error {
	ids := e.ids()
	errs := make([]error, 0, len(ids))
	for _, id := range ids {
		errs = append(errs, e.Failed[id])
	}
	return errs
}

// ids returns the failed clones' ids, sorted.
func (e *ForkError) ids() []string {
	ids := make([]string, 0, len(e.Failed))
	for id := range e.Failed {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (e *ForkError) Error() string {
	parts := make([]string, 0, len(e.Failed))
	for _, id := range e.ids() {
		parts = append(parts, fmt.Sprintf("%s: %v", id, e.Failed[id]))
	}
	return fmt.Sprintf("%d clone(s) failed and were removed: %s", len(e.Failed), strings.Join(parts, "; "))
}

// Fork restores one snapshot into n new VMs with new ids, in parallel. The
// clones map the snapshot's memory privately, so they share its unchanged
// pages; each gets its own disk overlay and a fresh identity: hostname (its
// id), MAC address, machine-id, reseeded guest random state, clock set
// from the host.
// Clones count as restores of the snapshot for DeleteSnapshot (it is refused
// while any runs) but not for the restore-once rule.
//
// A clone that fails is removed and reported in a *ForkError; the VMs that
// started are returned with it. A fork the host cannot even start (the
// shared memory image plus about 64 MiB per clone over its available
// memory) is refused before anything starts; one that only overcommits
// (n x the guest's RAM over it) is allowed and logged as a warning.
func (m *Manager) Fork(ctx context.Context, snapshotID string, n int, opts ForkOptions) ([]*VM, error) {
	if err := ValidateID(snapshotID); err != nil {
		return nil, err
	}
	if n < 1 || n > MaxClones {
		return nil, newErr("fork", ErrInvalidConfig, newFix(FixSetOption, ArgOption, "Fork.n", ArgMin, "1", ArgMax, strconv.Itoa(MaxClones)),
			fmt.Sprintf("cannot fork %d clones: the number must be between 1 and %d", n, MaxClones))
	}
	if opts.Prefix != "" {
		if err := ValidateID(opts.Prefix); err != nil {
			return nil, err
		}
	}
	if err := m.autoPull(ctx, "fork", snapshotID); err != nil {
		return nil, err
	}
	f := &forkOp{m: m, snapshotID: snapshotID, n: n, opts: opts, locks: heldLocks{dataDir: m.opts.DataDir}}
	// The snapshot's lock is held until every clone runs: a clone still
	// starting is "created", which DeleteSnapshot would not count as a
	// user of the snapshot.
	defer f.locks.release()
	err := m.runSteps(ctx, "fork", []any{"snapshot", snapshotID, "clones", n},
		steps.Step{Name: "lock snapshot", Do: func(ctx context.Context) error { return f.locks.snapshot(ctx, snapshotID) }},
		steps.Step{Name: "check snapshot", Do: f.check},
		steps.Step{Name: "verify snapshot", Do: f.verify},
		steps.Step{Name: "check host memory", Do: f.checkMemory},
		steps.Step{Name: "find backend", Do: f.findBackend},
		steps.Step{Name: "register clones", Do: f.register, Undo: f.unregister},
		steps.Step{Name: "start clones", Do: f.start}, // last: it never fails as a whole
	)
	if err != nil {
		return nil, err
	}
	var out []*VM
	fe := &ForkError{Failed: map[string]error{}}
	for k, id := range f.ids {
		if f.errs[k] != nil {
			fe.Failed[id] = f.errs[k]
			continue
		}
		out = append(out, f.vms[k])
	}
	if len(fe.Failed) > 0 {
		if len(out) == 0 {
			return nil, &Error{Op: "fork", Message: fe.Error(), Fix: newFix(FixRunDoctor), Err: fe}
		}
		return out, &Error{Op: "fork", Message: fe.Error(), Err: fe}
	}
	return out, nil
}

// forkOp is one Fork: its steps and what they share.
type forkOp struct {
	m          *Manager
	snapshotID string
	n          int
	opts       ForkOptions

	locks heldLocks
	man   snapshot.Manifest
	b     backend.Backend
	ids   []string // the clones, registered
	vms   []*VM    // per clone: started, or
	errs  []error  // why not
}

// check refuses a snapshot that does not exist or has no memory.
func (f *forkOp) check(ctx context.Context) error {
	s, err := f.m.store.GetSnapshot(ctx, f.snapshotID)
	if errors.Is(err, store.ErrNotFound) {
		return newErr("fork", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", f.snapshotID))
	}
	if err != nil {
		return err
	}
	if isTemplate(s) {
		return templateNotSnapshot("fork", f.snapshotID)
	}
	if s.Type == SnapshotDisk {
		return newErr("fork", ErrUnsupported,
			newFix(FixRestoreOnce, ArgSnapshot, f.snapshotID),
			fmt.Sprintf("snapshot %s is a disk snapshot: it has no memory to share, so clones would each cold-boot from the disk", f.snapshotID))
	}
	return nil
}

func (f *forkOp) verify(ctx context.Context) (err error) {
	f.man, err = f.m.loadSnapshot(ctx, f.snapshotID, false)
	return err
}

func (f *forkOp) checkMemory(context.Context) error {
	return f.m.checkForkMemory(f.snapshotID, f.man.Result, f.man.Spec.MemoryMiB, f.n)
}

// findBackend finds the snapshot's backend and checks that it can load the
// snapshot on this host (checkHost) before any clone is recorded.
func (f *forkOp) findBackend(ctx context.Context) (err error) {
	if f.b, err = f.m.backend(f.man.Backend); err != nil {
		return err
	}
	return f.m.checkHost(ctx, "fork", f.man, f.b)
}

// register records every clone, in one transaction, before any starts: none
// can be lost, and the snapshot cannot be deleted under them.
func (f *forkOp) register(ctx context.Context) error {
	prefix := f.opts.Prefix
	if prefix == "" {
		prefix = f.man.VMID
	}
	ids := make([]string, f.n)
	err := f.m.store.Tx(ctx, func(tx *store.Tx) error {
		for k := range ids {
			id, err := cloneID(ctx, tx, prefix, k+1)
			if err != nil {
				return err
			}
			spec := f.m.cloneSpec(f.man.Spec, id)
			rec := store.VM{ID: id, Backend: f.b.Name(), Status: store.VMCreated, Config: f.man.VMConfig,
				Machine: backend.Machine{Spec: spec, Backend: f.b.Name()}, RestoredFrom: f.snapshotID}
			if err := tx.CreateVM(ctx, rec); err != nil {
				return err
			}
			ids[k] = id
		}
		return nil
	})
	if err != nil {
		return err
	}
	f.ids = ids
	return nil
}

func (f *forkOp) unregister(ctx context.Context) error {
	return f.m.deleteVMs(ctx, f.ids)
}

// start starts every clone in parallel (startClone). A clone that fails
// undoes its own steps, and is then dropped (dropFailed); the others run.
func (f *forkOp) start(ctx context.Context) error {
	f.vms, f.errs = make([]*VM, f.n), make([]error, f.n)
	snapDir := filepath.Join(f.m.snapRoot(), f.snapshotID)
	var wg sync.WaitGroup
	for k, id := range f.ids {
		wg.Go(func() {
			f.vms[k], f.errs[k] = f.m.startClone(ctx, f.b, f.man.Result, snapDir, f.man.Type, id, f.opts.Resume)
		})
	}
	wg.Wait()
	f.dropFailed(ctx)
	return nil
}

// dropFailed stops and removes whatever the failed clones left and
// deletes their records, in one transaction.
func (f *forkOp) dropFailed(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	var failed []string
	for k, id := range f.ids {
		if f.errs[k] == nil {
			continue
		}
		failed = append(failed, id)
		if rec, err := f.m.store.GetVM(ctx, id); err == nil {
			f.b.Stop(ctx, rec.Machine)
			removeAll(rec.Machine.Dir, rec.Machine.RunDir)
		}
	}
	if err := f.m.deleteVMs(ctx, failed); err != nil {
		f.m.log.Warn("fork: the records of failed clones were not deleted", "clones", failed, "err", err)
	}
}

// deleteVMs deletes the records of ids (those that exist) in one
// transaction.
func (m *Manager) deleteVMs(ctx context.Context, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	return m.store.Tx(ctx, func(tx *store.Tx) error {
		for _, id := range ids {
			if err := tx.DeleteVM(ctx, id); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
		}
		return nil
	})
}

// Fork restores a snapshot into n clones with the default Options. The
// clones share the Manager made for them: it closes when the last clone is
// closed, so closing one clone leaves the others working.
func Fork(ctx context.Context, snapshotID string, n int, opts ForkOptions) ([]*VM, error) {
	m, err := NewManager(ctx, Options{})
	if err != nil {
		return nil, err
	}
	vms, err := m.Fork(ctx, snapshotID, n, opts)
	if len(vms) == 0 {
		m.Close()
		return nil, err
	}
	ownManager(m, vms...) // the last clone closed closes the manager
	return vms, err
}

// cloneID returns a new clone id that no VM in tx has.
func cloneID(ctx context.Context, tx *store.Tx, prefix string, k int) (string, error) {
	for range 16 {
		var b [3]byte
		rand.Read(b[:])
		suffix := fmt.Sprintf("-clone-%d-%s", k, hex.EncodeToString(b[:]))
		p := prefix
		if len(p)+len(suffix) > 64 {
			p = strings.TrimRight(p[:64-len(suffix)], "-_")
		}
		id := p + suffix
		if _, err := tx.GetVM(ctx, id); errors.Is(err, store.ErrNotFound) {
			return id, nil
		} else if err != nil {
			return "", err
		}
	}
	return "", errors.New("fork: could not generate a unique clone id")
}

// cloneSpec gives a snapshot's launch spec a new identity and its own files.
func (m *Manager) cloneSpec(spec backend.Spec, id string) backend.Spec {
	spec.ID = id
	spec.Dir, spec.RunDir = m.vmDir(id), m.runDir(id)
	spec.Disk = filepath.Join(spec.Dir, filepath.Base(spec.Disk))
	spec.MAC = macFor(id)
	spec.MachineID = newMachineID()
	spec.PortForwards = nil // the source's host ports are taken
	// Snapshots of VMs created before identity left the command line
	// carry smol.hostname: a clone that later cold-boots from its disk
	// must boot with its own.
	args := strings.Fields(spec.KernelArgs)
	for i, a := range args {
		if strings.HasPrefix(a, "smol.hostname=") {
			args[i] = "smol.hostname=" + hostnameFor(id)
		}
	}
	spec.KernelArgs = strings.Join(args, " ")
	return spec
}

// startClone starts one registered clone: the steps of cloneOp.steps,
// under the clone's lock. A failed step undoes the ones before it; the
// clone's record is left for Fork to delete.
func (m *Manager) startClone(ctx context.Context, b backend.Backend, res backend.SnapshotResult, snapDir string,
	kind backend.SnapshotKind, id string, resume bool) (*VM, error) {
	c := &cloneOp{m: m, b: b, res: res, snapDir: snapDir, kind: kind, id: id, resume: resume, locks: heldLocks{dataDir: m.opts.DataDir}}
	defer c.locks.release()
	if err := m.runSteps(ctx, "clone", []any{"vm", id}, c.steps()...); err != nil {
		return nil, err
	}
	return c.vm, nil
}

// cloneOp is the start of one clone.
type cloneOp struct {
	m       *Manager
	b       backend.Backend
	res     backend.SnapshotResult
	snapDir string
	kind    backend.SnapshotKind
	id      string
	resume  bool
	// template: the clone is a VM's first start from a template; the
	// caller holds the VM's lock.
	template *templateUse

	locks    heldLocks
	rec      store.VM
	mach     backend.Machine
	vm       *VM
	client   *agentclient.Client
	deadline time.Time // for the agent: its connection, clock and identity
}

func (c *cloneOp) steps() []steps.Step {
	var list []steps.Step
	if c.template == nil {
		list = append(list, steps.Step{Name: "lock clone", Do: func(ctx context.Context) error { return c.locks.vm(ctx, c.id) }}) // its row is written below
	}
	list = append(list, steps.Step{Name: "read clone record", Do: c.read})
	if c.template != nil {
		list = append(list, steps.Step{Name: "clear unstarted vm", Do: c.clearUnstarted})
	}
	list = append(list,
		steps.Step{Name: "make clone dir", Do: c.makeDir, Undo: c.removeDirs},
		steps.Step{Name: "assign uid", Do: c.assignUID}, // released with the record
		steps.Step{Name: "restore vmm", Do: c.restoreVMM, Undo: c.stopVMM},
		steps.Step{Name: "record vmm", Do: c.recordVMM, Undo: c.unrecordVMM},
		steps.Step{Name: "connect agent", Do: c.connectAgent, Undo: c.disconnect},
		steps.Step{Name: "set clock and identity", Do: c.setIdentity},
	)
	if c.template != nil {
		return append(list,
			steps.Step{Name: "set env", Do: c.setEnv},
			steps.Step{Name: "count template use", Do: c.countUse}) // last
	}
	if !c.resume {
		list = append(list, steps.Step{Name: "pause clone", Do: c.pause})
	}
	return list
}

func (c *cloneOp) read(ctx context.Context) (err error) {
	c.rec, err = c.m.store.GetVM(ctx, c.id)
	return err
}

func (c *cloneOp) makeDir(context.Context) error { return os.MkdirAll(c.rec.Machine.Dir, 0o700) }

func (c *cloneOp) removeDirs(context.Context) error {
	return errors.Join(os.RemoveAll(c.rec.Machine.Dir), os.RemoveAll(c.rec.Machine.RunDir))
}

func (c *cloneOp) assignUID(ctx context.Context) error { return c.m.runAs(ctx, &c.rec.Machine.Spec) }

func (c *cloneOp) restoreVMM(ctx context.Context) (err error) {
	c.mach, err = c.b.Restore(ctx, backend.RestoreRequest{Spec: c.rec.Machine.Spec, SnapshotDir: c.snapDir, Kind: c.kind, Result: c.res, Resume: true})
	return err
}

func (c *cloneOp) stopVMM(ctx context.Context) error { return c.b.Stop(ctx, c.mach) }

// recordVMM records the running clone's VMM (from a template: and that
// its disk depends on the template's).
func (c *cloneOp) recordVMM(ctx context.Context) error {
	c.rec.Machine, c.rec.PID, c.rec.Status, c.rec.LastError = c.mach, c.mach.PID, store.VMRunning, ""
	if t := c.template; t != nil {
		c.rec.RestoredFrom, c.rec.Template = t.snapshotID, t.key
	}
	c.vm = &VM{m: c.m, id: c.id}
	return c.m.store.UpdateVM(ctx, c.rec)
}

// unrecordVMM puts a template clone's record back as it was before the
// start (a fork's failed clones are deleted by dropFailed).
func (c *cloneOp) unrecordVMM(ctx context.Context) error {
	if c.template == nil {
		return nil
	}
	return c.m.store.UpdateVM(ctx, c.template.before)
}

// clearUnstarted stops a VMM that an interrupted start of this never
// started VM left, and removes a disk made for a cold boot (New under
// Options.ColdBoot): the restore makes the VM's disk, on the template's.
func (c *cloneOp) clearUnstarted(ctx context.Context) error {
	if err := c.b.Stop(ctx, c.rec.Machine); err != nil {
		return err
	}
	if d := c.rec.Machine.Disk; d != "" {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	return nil
}

// setEnv sets the configured environment of a VM started from a template
// (a cold boot's afterBoot does the same).
func (c *cloneOp) setEnv(ctx context.Context) error {
	if len(c.template.env) == 0 {
		return nil
	}
	cctx, cancel := context.WithDeadline(ctx, c.deadline)
	defer cancel()
	if err := c.client.SetEnv(cctx, c.template.env, nil); err != nil {
		return fmt.Errorf("setting the guest environment: %w", err)
	}
	return nil
}

// countUse counts the VM as a use of its template (never as a restore:
// templates are exempt from restore-once).
func (c *cloneOp) countUse(ctx context.Context) error {
	return c.m.store.Tx(ctx, func(tx *store.Tx) error {
		s, err := tx.GetSnapshot(ctx, c.template.snapshotID)
		if err != nil {
			return err
		}
		s.RestoreCount++
		return tx.UpdateSnapshot(ctx, s)
	})
}

func (c *cloneOp) connectAgent(ctx context.Context) error {
	c.deadline = time.Now().Add(60 * time.Second)
	cctx, cancel := context.WithDeadline(ctx, c.deadline)
	defer cancel()
	client, err := c.m.connectAgent(cctx, c.b, c.mach)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	c.vm.setClient(client)
	c.client = client
	return nil
}

func (c *cloneOp) disconnect(context.Context) error {
	c.vm.closeClient()
	return nil
}

// setIdentity gives the clone its clock, hostname, MAC, machine-id and
// random seed (applyIdentity, as every boot and restore does).
func (c *cloneOp) setIdentity(ctx context.Context) error {
	cctx, cancel := context.WithDeadline(ctx, c.deadline)
	defer cancel()
	if err := c.vm.applyIdentity(cctx, c.client, c.mach.Spec); err != nil {
		return fmt.Errorf("the clone's clock and identity: %w", err)
	}
	return nil
}

func (c *cloneOp) pause(ctx context.Context) error {
	if err := c.b.Pause(ctx, c.mach); err != nil {
		return err
	}
	c.rec.Status = store.VMPaused
	return c.m.store.UpdateVM(ctx, c.rec)
}

// cloneOverheadMiB is what one clone costs the host beyond the shared
// memory image when it starts: its VMM's own memory (about 36 MiB of
// anonymous memory per QEMU under TCG, measured by bench suite) plus the
// first guest pages it copies on write, with a margin.
const cloneOverheadMiB = 64

// checkForkMemory refuses a fork the host surely cannot hold: the memory
// image once (clones map it privately and share its pages) plus each
// clone's overhead; with a "stream" snapshot every clone loads its own copy
// of guest RAM. Clones that later touch all their RAM could need up to
// n x the guest's RAM: that overcommit is the point of sharing pages, so it
// is only logged.
func (m *Manager) checkForkMemory(snapshotID string, res backend.SnapshotResult, guestMiB, n int) error {
	avail, ok := int64(0), false
	if m.memAvailable != nil {
		avail, ok = m.memAvailable()
	} else {
		avail, ok = memAvailableMiB()
	}
	if !ok {
		return nil
	}
	dir := filepath.Join(m.snapRoot(), snapshotID)
	var imageMiB, perClone int64 = 0, cloneOverheadMiB
	for _, a := range res.Artifacts {
		mib := allocatedMiB(filepath.Join(dir, a.Name))
		switch {
		case a.Role == "memory":
			imageMiB += mib
		case a.Role == "state" && res.MemoryFormat != backend.MemoryRaw:
			perClone += mib // RAM inside the state file: loaded by each clone
		}
	}
	need := imageMiB + int64(n)*perClone
	if need > avail {
		return newErr("fork", ErrInvalidConfig, newFix(FixFreeResources, ArgResource, ResourceMemory),
			fmt.Sprintf("not enough memory for %d clones of snapshot %s: starting them needs about %d MiB (%d MiB shared memory image + %d MiB per clone) and the host has %d MiB available",
				n, snapshotID, need, imageMiB, perClone, avail))
	}
	if worst := int64(n) * int64(guestMiB); worst > avail {
		m.log.Warn("fork overcommits host memory: clones that each touch all their RAM would need more than is available",
			"snapshot", snapshotID, "clones", n, "guest_mib", guestMiB, "worst_case_mib", worst, "available_mib", avail)
	}
	return nil
}

// allocatedMiB is the disk space a file uses (0 when it cannot be read).
func allocatedMiB(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return sys.Blocks * 512 >> 20
	}
	return st.Size() >> 20
}

// memAvailableMiB reads MemAvailable from /proc/meminfo.
func memAvailableMiB() (int64, bool) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == "MemAvailable:" {
			kb, err := strconv.ParseInt(fs[1], 10, 64)
			return kb / 1024, err == nil
		}
	}
	return 0, false
}
