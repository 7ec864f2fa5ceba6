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

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
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
// id), MAC address, reseeded guest random state, clock set from the host.
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
	unlock, err := store.LockSnapshot(ctx, m.opts.DataDir, snapshotID)
	if err != nil {
		return nil, err
	}
	// Held until every clone runs: a clone still starting is "created",
	// which DeleteSnapshot would not count as a user of the snapshot.
	defer unlock()
	s, err := m.store.GetSnapshot(ctx, snapshotID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, newErr("fork", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", snapshotID))
	}
	if err != nil {
		return nil, err
	}
	if s.Type == backend.SnapshotKind(SnapshotDisk) {
		return nil, newErr("fork", ErrUnsupported, newFix(FixRestoreOnce, ArgSnapshot, snapshotID),
			fmt.Sprintf("snapshot %s is a disk snapshot: it has no memory to share, so clones would each cold-boot from the disk", snapshotID))
	}
	man, err := m.loadSnapshot(ctx, snapshotID, false)
	if err != nil {
		return nil, err
	}
	if err := m.checkForkMemory(snapshotID, man.Result, man.Spec.MemoryMiB, n); err != nil {
		return nil, err
	}
	b, err := m.backend(man.Backend)
	if err != nil {
		return nil, err
	}
	prefix := opts.Prefix
	if prefix == "" {
		prefix = man.VMID
	}
	// Register every clone first (so none can be lost, and the snapshot
	// cannot be deleted under them), then start them in parallel.
	ids := make([]string, n)
	for k := range ids {
		id, err := m.cloneID(ctx, prefix, k+1)
		if err != nil {
			m.dropClones(ctx, b, ids[:k])
			return nil, err
		}
		spec := m.cloneSpec(man.Spec, id)
		rec := store.VM{ID: id, Backend: b.Name(), Status: store.VMCreated, Config: man.VMConfig,
			Machine: backend.Machine{Spec: spec, Backend: b.Name()}, RestoredFrom: snapshotID}
		if err := m.store.CreateVM(ctx, rec); err != nil {
			m.dropClones(ctx, b, ids[:k])
			return nil, err
		}
		ids[k] = id
	}
	vms := make([]*VM, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for k, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vms[k], errs[k] = m.startClone(ctx, b, man.Result, filepath.Join(m.snapRoot(), snapshotID), man.Type, id, opts.Resume)
		}()
	}
	wg.Wait()
	var out []*VM
	fe := &ForkError{Failed: map[string]error{}}
	for k, id := range ids {
		if errs[k] != nil {
			m.dropClones(context.WithoutCancel(ctx), b, []string{id})
			fe.Failed[id] = errs[k]
			continue
		}
		out = append(out, vms[k])
	}
	if len(fe.Failed) > 0 {
		if len(out) == 0 {
			return nil, &Error{Op: "fork", Message: fe.Error(), Fix: newFix(FixRunDoctor), Err: fe}
		}
		return out, &Error{Op: "fork", Message: fe.Error(), Err: fe}
	}
	return out, nil
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

func (m *Manager) cloneID(ctx context.Context, prefix string, k int) (string, error) {
	for range 16 {
		var b [3]byte
		rand.Read(b[:])
		suffix := fmt.Sprintf("-clone-%d-%s", k, hex.EncodeToString(b[:]))
		p := prefix
		if len(p)+len(suffix) > 64 {
			p = strings.TrimRight(p[:64-len(suffix)], "-_")
		}
		id := p + suffix
		if _, err := m.store.GetVM(ctx, id); errors.Is(err, store.ErrNotFound) {
			return id, nil
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
	spec.PortForwards = nil // the source's host ports are taken
	args := strings.Fields(spec.KernelArgs)
	for i, a := range args {
		if strings.HasPrefix(a, "smol.hostname=") {
			args[i] = "smol.hostname=" + hostnameFor(id)
		}
	}
	spec.KernelArgs = strings.Join(args, " ")
	return spec
}

func (m *Manager) startClone(ctx context.Context, b backend.Backend, res backend.SnapshotResult, snapDir string,
	kind backend.SnapshotKind, id string, resume bool) (*VM, error) {
	unlock, err := store.LockVM(ctx, m.opts.DataDir, id) // its row is written below
	if err != nil {
		return nil, err
	}
	defer unlock()
	rec, err := m.store.GetVM(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(rec.Machine.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := m.runAs(ctx, &rec.Machine.Spec); err != nil {
		return nil, err
	}
	mach, err := b.Restore(ctx, backend.RestoreRequest{Spec: rec.Machine.Spec, SnapshotDir: snapDir, Kind: kind, Result: res, Resume: true})
	if err != nil {
		return nil, err
	}
	rec.Machine, rec.PID, rec.Status = mach, mach.PID, store.VMRunning
	if err := m.store.UpdateVM(ctx, rec); err != nil {
		return nil, err
	}
	vm := &VM{m: m, id: id}
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c, err := m.connectAgent(cctx, b, mach)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	vm.setClient(c)
	seed := make([]byte, 64)
	rand.Read(seed)
	// The clock request goes first without waiting (the agent applies it
	// before it reads the next request), then the identity: one round trip
	// for both, which counts when many clones share few cores.
	waitTime, err := c.SendSetTime(cctx, time.Now())
	if err != nil {
		return nil, fmt.Errorf("setting the clone's clock: %w", err)
	}
	idErr := c.SetIdentityRequest(cctx, agentproto.SetIdentityRequest{Hostname: hostnameFor(id), Seed: seed, MAC: mach.MAC})
	if err := waitTime(cctx); err != nil {
		return nil, fmt.Errorf("setting the clone's clock: %w", err)
	}
	if idErr != nil {
		return nil, fmt.Errorf("setting the clone's identity: %w", idErr)
	}
	if !resume {
		if err := b.Pause(ctx, mach); err != nil {
			return nil, err
		}
		rec.Status = store.VMPaused
		if err := m.store.UpdateVM(ctx, rec); err != nil {
			return nil, err
		}
	}
	return vm, nil
}

// dropClones stops and removes clones that could not start.
func (m *Manager) dropClones(ctx context.Context, b backend.Backend, ids []string) {
	for _, id := range ids {
		if id == "" {
			continue
		}
		if rec, err := m.store.GetVM(ctx, id); err == nil {
			b.Stop(ctx, rec.Machine)
			removeAll(rec.Machine.Dir, rec.Machine.RunDir)
		}
		m.store.DeleteVM(ctx, id)
	}
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
