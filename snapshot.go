package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/store"
)

// SnapshotType is how much of a VM a snapshot stores (one type with the
// backends' snapshot kind).
type SnapshotType = backend.SnapshotKind

const (
	// SnapshotFull (default): memory, CPU/device state and a self-contained
	// disk copy. Restore resumes exactly where the VM was; it depends on no
	// other file.
	SnapshotFull = backend.SnapshotFull
	// SnapshotDiff: memory and device state, and the disk as a qcow2 overlay
	// relative to the VM's base image, which must exist at restore.
	SnapshotDiff = backend.SnapshotDiff
	// SnapshotDisk: the disk only (the guest is synced first). Much faster
	// and smaller; restore boots fresh from the saved disk.
	SnapshotDisk = backend.SnapshotDisk
)

// ParseSnapshotType accepts "full", "diff", "disk" (and "" for full).
func ParseSnapshotType(s string) (SnapshotType, error) {
	switch SnapshotType(strings.ToLower(strings.TrimSpace(s))) {
	case "", SnapshotFull:
		return SnapshotFull, nil
	case SnapshotDiff:
		return SnapshotDiff, nil
	case SnapshotDisk:
		return SnapshotDisk, nil
	}
	return "", newErr("snapshot", ErrInvalidConfig, "use --snapshot-type full, diff or disk",
		fmt.Sprintf("unknown snapshot type %q: use full, diff or disk", s))
}

// SnapshotOptions configure VM.Snapshot.
type SnapshotOptions struct {
	// ID names the snapshot (same rules as VM ids). Empty: snap-<vm>-<unix seconds>.
	ID string
	// Type is full (default), diff or disk.
	Type SnapshotType
	// ResumeSource runs the VM again after the snapshot; by default it stays paused.
	ResumeSource bool
}

// RestoreOptions configure FromSnapshot.
type RestoreOptions struct {
	// Resume runs the restored VM; by default it is left paused.
	Resume bool
	// Force restores a snapshot that was restored before.
	Force bool
}

// SnapshotFilter narrows ListSnapshots.
type SnapshotFilter struct {
	VMID string
}

// SnapshotArtifacts are the files of a snapshot.
type SnapshotArtifacts struct {
	State  string `json:"state_path,omitempty"`
	Memory string `json:"memory_path,omitempty"`
	Disk   string `json:"disk_path,omitempty"`
}

// SnapshotInfo describes a snapshot.
type SnapshotInfo struct {
	ID           string            `json:"snapshot_id"`
	VMID         string            `json:"vm_id"`
	Backend      string            `json:"backend"`
	Type         SnapshotType      `json:"snapshot_type"`
	CreatedAt    time.Time         `json:"created_at"`
	SizeBytes    int64             `json:"size_bytes"`
	Restored     bool              `json:"restored"`
	RestoredVMID string            `json:"restored_vm_id,omitempty"`
	RestoreCount int               `json:"restore_count"`
	ParentImage  string            `json:"parent_image,omitempty"`
	Artifacts    SnapshotArtifacts `json:"artifacts"`
	Dir          string            `json:"dir"`
	MemoryMiB    int               `json:"memory_mib"`
}

func (m *Manager) snapRoot() string { return filepath.Join(m.opts.DataDir, "snapshots") }

func (m *Manager) snapInfo(s store.Snapshot) SnapshotInfo {
	dir := filepath.Join(m.snapRoot(), s.ID)
	info := SnapshotInfo{ID: s.ID, VMID: s.VMID, Backend: s.Backend, Type: SnapshotType(s.Type), CreatedAt: s.CreatedAt,
		SizeBytes: s.SizeBytes, Restored: s.Restored, RestoredVMID: s.RestoredVMID, RestoreCount: s.RestoreCount,
		ParentImage: s.ParentImage, Dir: dir}
	var man snapshot.Manifest
	if json.Unmarshal(s.Manifest, &man) == nil {
		info.MemoryMiB = man.Spec.MemoryMiB
		for _, a := range man.Artifacts {
			p := filepath.Join(dir, a.Name)
			switch a.Role {
			case "state":
				info.Artifacts.State = p
			case "memory":
				info.Artifacts.Memory = p
			case "disk":
				info.Artifacts.Disk = p
			}
		}
	}
	return info
}

// generated snapshot id: snap-<vm>-<unix seconds>[-N], at most 64 chars.
func (m *Manager) snapshotID(ctx context.Context, vmID string) string {
	ts := fmt.Sprint(time.Now().Unix())
	for n := 0; ; n++ {
		suffix := "-" + ts
		if n > 0 {
			suffix += fmt.Sprintf("-%d", n)
		}
		vm := vmID
		if max := 64 - len("snap-") - len(suffix); len(vm) > max {
			vm = strings.TrimRight(vm[:max], "-_")
		}
		id := "snap-" + vm + suffix
		if _, err := m.store.GetSnapshot(ctx, id); errors.Is(err, store.ErrNotFound) {
			if _, err := os.Stat(filepath.Join(m.snapRoot(), id)); errors.Is(err, os.ErrNotExist) {
				return id
			}
		}
	}
}

// Snapshot saves the VM. The VM must be running or paused; it is paused
// while the snapshot is taken and stays paused unless opts.ResumeSource.
func (vm *VM) Snapshot(ctx context.Context, opts SnapshotOptions) (*SnapshotInfo, error) {
	kind, err := ParseSnapshotType(string(opts.Type))
	if err != nil {
		return nil, err
	}
	if opts.ID != "" {
		if err := ValidateID(opts.ID); err != nil {
			return nil, err
		}
	}
	m := vm.m
	unlock, rec, b, err := vm.lock(ctx) // serializes snapshots (and everything else) of one VM
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec.Status != store.VMRunning && rec.Status != store.VMPaused {
		return nil, newErr("snapshot", ErrVMNotRunning, "smolvm sandbox start "+vm.id,
			fmt.Sprintf("cannot snapshot vm %s: it is %s; a VM must be running or paused to be snapshotted", vm.id, rec.Status))
	}
	caps := b.Capabilities()
	if (kind == SnapshotDisk && !caps.DiskSnapshot) || (kind != SnapshotDisk && !caps.MemorySnapshot) {
		return nil, newErr("snapshot", ErrUnsupported, "", fmt.Sprintf("the %s backend cannot take %s snapshots", b.Name(), kind))
	}
	m.cleanupSnapshots(ctx)
	id := opts.ID
	if id == "" {
		id = m.snapshotID(ctx, vm.id)
	}
	wasRunning := rec.Status == store.VMRunning
	row := store.Snapshot{ID: id, VMID: vm.id, Backend: b.Name(), Type: backend.SnapshotKind(kind), CreatedAt: time.Now().UTC()}
	if err := m.store.ReserveSnapshot(ctx, row); err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, newErr("snapshot", ErrSnapshotExists, "choose another --snapshot-id, or smolvm sandbox snapshot delete "+id,
				fmt.Sprintf("snapshot %q already exists", id))
		}
		return nil, err
	}
	tmp := ""
	fail := func(err error) (*SnapshotInfo, error) {
		bg := context.WithoutCancel(ctx)
		if tmp != "" {
			os.RemoveAll(tmp)
		}
		m.store.AbortSnapshot(bg, id)
		if wasRunning {
			if b.Resume(bg, rec.Machine) == nil {
				rec.Status = store.VMRunning
				m.store.UpdateVM(bg, rec)
			}
		}
		var e *Error
		if errors.As(err, &e) {
			return nil, err
		}
		return nil, &Error{Op: "snapshot", Message: fmt.Sprintf("snapshot of vm %s failed: %v", vm.id, err), Err: err}
	}
	if tmp, err = snapshot.TempDir(m.snapRoot(), id); err != nil {
		return fail(err)
	}
	if kind == SnapshotDisk {
		// Flush the guest's page cache: the disk alone must be consistent.
		// A paused guest runs for the moment of the sync.
		if !wasRunning {
			if err := b.Resume(ctx, rec.Machine); err != nil {
				return fail(err)
			}
			rec.Status = store.VMRunning
			m.store.UpdateVM(ctx, rec)
			defer func() {
				if rec.Status == store.VMRunning && !opts.ResumeSource {
					bg := context.WithoutCancel(ctx)
					if b.Pause(bg, rec.Machine) == nil {
						rec.Status = store.VMPaused
						m.store.UpdateVM(bg, rec)
					}
				}
			}()
		}
		c, err := vm.agent(ctx, "snapshot")
		if err != nil {
			return fail(err)
		}
		sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		err = c.Sync(sctx)
		cancel()
		if err != nil {
			return fail(fmt.Errorf("syncing the guest before a disk snapshot: %w", err))
		}
	}
	if kind != SnapshotDisk && wasRunning {
		// Have an agent channel attached while the memory is saved: the
		// guest then restores with a host already on that channel. Without
		// one it must first learn of the restorer's connection (a
		// virtio-serial port-open), which took a restored guest about 200
		// ms before its first reply under TCG. Best effort.
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if _, err := vm.agent(actx, "snapshot"); err != nil {
			m.log.Debug("snapshot without an agent connection", "vm", vm.id, "err", err)
		}
		cancel()
	}
	res, err := b.Snapshot(ctx, rec.Machine, backend.SnapshotKind(kind), tmp)
	if err != nil {
		return fail(err)
	}
	rec.Status = store.VMPaused
	if err := m.store.UpdateVM(ctx, rec); err != nil {
		return fail(err)
	}
	arts, size, err := snapshot.Describe(tmp, res.Artifacts)
	if err != nil {
		return fail(err)
	}
	man := snapshot.Manifest{FormatVersion: snapshot.FormatVersion, ID: id, VMID: vm.id, Backend: b.Name(),
		Type: backend.SnapshotKind(kind), CreatedAt: row.CreatedAt, VMConfig: rec.Config, Spec: rec.Machine.Spec,
		Result: res, Artifacts: arts, BaseImage: res.BaseImage, SizeBytes: size}
	if err := snapshot.WriteManifest(tmp, man); err != nil {
		return fail(err)
	}
	manJSON, _ := json.Marshal(man)
	if _, err := snapshot.Publish(tmp, m.snapRoot(), id); err != nil {
		return fail(err)
	}
	tmp = filepath.Join(m.snapRoot(), id) // removed by fail from here on
	row.SizeBytes, row.ParentImage, row.Manifest = size, res.BaseImage, manJSON
	if err := m.store.CommitSnapshot(ctx, id, row); err != nil {
		return fail(err)
	}
	if opts.ResumeSource {
		if err := b.Resume(ctx, rec.Machine); err != nil {
			return nil, &Error{Op: "snapshot", Message: fmt.Sprintf("snapshot %s was saved, but vm %s did not resume: %v", id, vm.id, err),
				Fix: "smolvm sandbox resume " + vm.id, Err: err}
		}
		rec.Status = store.VMRunning
		if err := m.store.UpdateVM(ctx, rec); err != nil {
			return nil, err
		}
	}
	info := m.snapInfo(row)
	return &info, nil
}

// cleanupSnapshots removes what interrupted creates and deletes left: pending
// rows whose creating process is gone, and their directories.
func (m *Manager) cleanupSnapshots(ctx context.Context) (int, error) {
	pending, err := m.store.ListPendingSnapshots(ctx)
	if err != nil {
		return 0, err
	}
	busy := map[string]bool{}
	removed := 0
	for _, p := range pending {
		if processAlive(p.CreatorPID) {
			busy[p.ID] = true
			continue
		}
		if m.store.AbortSnapshot(ctx, p.ID) == nil {
			removed++
		}
	}
	n, err := snapshot.Cleanup(m.snapRoot(), func(id string) bool { return busy[id] }, func(id string) bool {
		_, err := m.store.GetSnapshot(ctx, id)
		return err == nil
	})
	return removed + n, err
}

func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// GetSnapshot returns one snapshot.
func (m *Manager) GetSnapshot(ctx context.Context, id string) (*SnapshotInfo, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	s, err := m.store.GetSnapshot(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, newErr("snapshot", ErrSnapshotNotFound, "smolvm sandbox snapshot list", fmt.Sprintf("snapshot %q not found", id))
	}
	if err != nil {
		return nil, err
	}
	info := m.snapInfo(s)
	return &info, nil
}

// ListSnapshots lists complete snapshots, oldest first.
func (m *Manager) ListSnapshots(ctx context.Context, f SnapshotFilter) ([]SnapshotInfo, error) {
	rows, err := m.store.ListSnapshots(ctx, f.VMID)
	if err != nil {
		return nil, err
	}
	out := make([]SnapshotInfo, 0, len(rows))
	for _, r := range rows {
		out = append(out, m.snapInfo(r))
	}
	return out, nil
}

// VerifySnapshot re-hashes every artifact of a snapshot.
func (m *Manager) VerifySnapshot(ctx context.Context, id string) error {
	info, err := m.GetSnapshot(ctx, id)
	if err != nil {
		return err
	}
	_, err = m.loadSnapshot(ctx, info.ID, true)
	return err
}

// loadSnapshot reads, validates and verifies a snapshot's manifest and
// artifacts. The manifest on disk is data, not trust: it must parse and
// validate (snapshot.ParseManifest: plain known artifact names, well-formed
// digests, supported format) and agree with the copy the database took
// when the snapshot was committed, so an edited manifest (with digests to
// match edited files) is refused.
func (m *Manager) loadSnapshot(ctx context.Context, id string, full bool) (snapshot.Manifest, error) {
	dir := filepath.Join(m.snapRoot(), id)
	corrupt := func(err error) (snapshot.Manifest, error) {
		return snapshot.Manifest{}, &Error{Op: "restore", Message: fmt.Sprintf("snapshot %s cannot be restored: %v", id, err),
			Fix: "smolvm sandbox snapshot delete " + id + " and take a new snapshot", Err: errors.Join(ErrSnapshotCorrupt, err)}
	}
	row, err := m.store.GetSnapshot(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return snapshot.Manifest{}, newErr("restore", ErrSnapshotNotFound, "smolvm sandbox snapshot list", fmt.Sprintf("snapshot %q not found", id))
	}
	if err != nil {
		return snapshot.Manifest{}, err
	}
	if len(row.Manifest) == 0 {
		return corrupt(fmt.Errorf("%w: the database holds no manifest for it", snapshot.ErrCorrupt))
	}
	recorded, err := snapshot.ParseManifest(row.Manifest)
	if err != nil {
		return corrupt(fmt.Errorf("the database's copy of its manifest: %w", err))
	}
	if recorded.ID != row.ID || recorded.VMID != row.VMID || recorded.Backend != row.Backend || recorded.Type != row.Type {
		return corrupt(fmt.Errorf("%w: the database's manifest (snapshot %s of vm %s, %s %s) does not match its row (snapshot %s of vm %s, %s %s)",
			snapshot.ErrCorrupt, recorded.ID, recorded.VMID, recorded.Backend, recorded.Type, row.ID, row.VMID, row.Backend, row.Type))
	}
	man, err := snapshot.ReadManifest(dir)
	if err != nil {
		return corrupt(err)
	}
	if !snapshot.Same(man, recorded) {
		return corrupt(fmt.Errorf("%w: %s differs from the copy in the database (it was changed after the snapshot was taken)",
			snapshot.ErrCorrupt, filepath.Join(dir, snapshot.ManifestName)))
	}
	if err := snapshot.Verify(dir, man, full); err != nil {
		return corrupt(err)
	}
	if man.Type == backend.SnapshotKind(SnapshotDiff) && man.BaseImage != "" {
		if _, err := os.Stat(man.BaseImage); err != nil {
			return man, &Error{Op: "restore",
				Message: fmt.Sprintf("snapshot %s is a diff snapshot and its base image %s is missing", id, man.BaseImage),
				Fix:     "restore the base image (smolvm image build), or take a full snapshot (--snapshot-type full) next time",
				Err:     errors.Join(ErrBackingImageMissing, backend.ErrBackingMissing)}
		}
	}
	return man, nil
}

// FromSnapshot restores a snapshot with the default Options. See
// Manager.FromSnapshot.
func FromSnapshot(ctx context.Context, id string, opts RestoreOptions) (*VM, error) {
	m, err := NewManager(ctx, Options{})
	if err != nil {
		return nil, err
	}
	vm, err := m.FromSnapshot(ctx, id, opts)
	if err != nil {
		m.Close()
		return nil, err
	}
	ownManager(m, vm)
	return vm, nil
}

// FromSnapshot recreates the snapshot's VM (same id, its config) with the
// saved state. It is paused unless opts.Resume. An existing VM with that id
// is stopped and replaced. A snapshot restores once unless opts.Force.
// Every artifact is checked before anything is stopped or replaced.
// The restored VM has no kernel loaded in its VMM (on QEMU): a reboot from
// inside the guest stops it, and Start then boots it cold from its disk.
func (m *Manager) FromSnapshot(ctx context.Context, id string, opts RestoreOptions) (*VM, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	t0 := time.Now()
	phase := func(name string) { m.log.Debug("restore", "snapshot", id, "phase", name, "elapsed", time.Since(t0)) }
	unlockSnap, err := store.LockSnapshot(ctx, m.opts.DataDir, id)
	if err != nil {
		return nil, err
	}
	defer unlockSnap()
	s, err := m.store.GetSnapshot(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, newErr("restore", ErrSnapshotNotFound, "smolvm sandbox snapshot list", fmt.Sprintf("snapshot %q not found", id))
	}
	if err != nil {
		return nil, err
	}
	if s.Restored && !opts.Force {
		return nil, newErr("restore", ErrSnapshotRestored, "smolvm sandbox snapshot restore "+id+" --force",
			fmt.Sprintf("snapshot %s was already restored (into vm %s); a snapshot restores once unless forced", id, s.RestoredVMID))
	}
	man, err := m.loadSnapshot(ctx, id, false)
	if err != nil {
		return nil, err
	}
	phase("verified")
	b, err := m.backend(man.Backend)
	if err != nil {
		return nil, err
	}
	vmID := man.VMID
	unlockVM, err := store.LockVM(ctx, m.opts.DataDir, vmID)
	if err != nil {
		return nil, err
	}
	defer unlockVM()

	spec := man.Spec
	spec.Dir, spec.RunDir = m.vmDir(vmID), m.runDir(vmID)
	spec.Disk = filepath.Join(spec.Dir, filepath.Base(spec.Disk))

	// Stop the VM that has this id and move its files aside: they come
	// back if the restore fails.
	old, oldErr := m.store.GetVM(ctx, vmID)
	if oldErr != nil && !errors.Is(oldErr, store.ErrNotFound) {
		return nil, oldErr
	}
	aside := ""
	if oldErr == nil {
		ob, err := m.backend(old.Backend)
		if err != nil {
			return nil, err
		}
		if err := ob.Stop(ctx, old.Machine); err != nil {
			return nil, fmt.Errorf("restore: stopping vm %s: %w", vmID, err)
		}
		removeReplaced(old.Machine.Dir) // what an interrupted restore left aside
		if _, err := os.Stat(old.Machine.Dir); err == nil {
			aside = old.Machine.Dir + replacedSuffix + fmt.Sprint(time.Now().UnixNano())
			if err := os.Rename(old.Machine.Dir, aside); err != nil {
				return nil, err
			}
		}
		old.Status, old.PID = store.VMStopped, 0
	}
	// The record points at the new VMM's directory before that VMM starts:
	// should this process die mid-restore, the VM is listed (stopped, with
	// a last error saying so) and a new restore, Start or Delete stops the
	// VMM, found through its directory, instead of it running on unseen.
	pending := store.VM{ID: vmID, Backend: b.Name(), Status: store.VMStopped, Config: man.VMConfig,
		Machine: backend.Machine{Spec: spec, Backend: b.Name()}, RestoredFrom: id,
		LastError: "the restore of snapshot " + id + " into this VM was interrupted; restore it again or delete the VM"}
	if oldErr == nil {
		err = m.store.UpdateVM(ctx, pending)
	} else {
		err = m.store.CreateVM(ctx, pending)
	}
	if err != nil {
		if aside != "" {
			os.Rename(aside, old.Machine.Dir)
			m.store.UpdateVM(context.WithoutCancel(ctx), old)
		}
		return nil, err
	}
	rollback := func(cause error) (*VM, error) {
		bg := context.WithoutCancel(ctx)
		os.RemoveAll(spec.Dir)
		os.RemoveAll(spec.RunDir)
		if oldErr == nil {
			if aside != "" {
				os.Rename(aside, old.Machine.Dir)
			}
			old.LastError = "restore of snapshot " + id + " failed: " + cause.Error()
			m.store.UpdateVM(bg, old)
		} else {
			m.store.DeleteVM(bg, vmID)
		}
		var e *Error
		if errors.As(cause, &e) {
			return nil, cause
		}
		if errors.Is(cause, backend.ErrBackingMissing) {
			return nil, &Error{Op: "restore", Message: fmt.Sprintf("restore of %s: %v", id, cause),
				Fix: "take a full snapshot (--snapshot-type full)", Err: errors.Join(ErrBackingImageMissing, cause)}
		}
		return nil, &Error{Op: "restore", Message: fmt.Sprintf("restore of snapshot %s failed: %v", id, cause),
			Fix: "smolvm sandbox logs " + vmID, Err: cause}
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return rollback(err)
	}
	kind := backend.SnapshotKind(man.Type)
	phase("old vm replaced")
	if err := m.runAs(ctx, &spec); err != nil {
		return rollback(err)
	}
	mach, err := b.Restore(ctx, backend.RestoreRequest{Spec: spec, SnapshotDir: filepath.Join(m.snapRoot(), id),
		Kind: kind, Result: man.Result, Resume: opts.Resume})
	if err != nil {
		return rollback(err)
	}
	phase("vmm restored")
	status := store.VMPaused
	if opts.Resume {
		status = store.VMRunning
	}
	rec := pending
	rec.Status, rec.Machine, rec.PID, rec.LastError = status, mach, mach.PID, ""
	if err := m.store.UpdateVM(ctx, rec); err != nil {
		b.Stop(context.WithoutCancel(ctx), mach)
		return rollback(err)
	}
	vm := &VM{m: m, id: vmID}
	if opts.Resume {
		var cfg Config
		json.Unmarshal(man.VMConfig, &cfg)
		cfg = cfg.withDefaults()
		timeout := 30 * time.Second
		if kind == backend.SnapshotKind(SnapshotDisk) {
			timeout = cfg.BootTimeout
		}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		c, err := m.connectAgent(cctx, b, mach)
		cancel()
		phase("agent connected")
		if err == nil {
			vm.setClient(c)
			err = vm.afterBoot(ctx, c, nil)
		}
		phase("clock set")
		if err != nil {
			b.Stop(context.WithoutCancel(ctx), mach)
			return rollback(fmt.Errorf("the restored vm's agent did not answer: %w", err))
		}
	}
	if aside != "" {
		os.RemoveAll(aside)
	}
	s.Restored, s.RestoredVMID, s.RestoreCount = true, vmID, s.RestoreCount+1
	if err := m.store.UpdateSnapshot(ctx, s); err != nil {
		return nil, err
	}
	return vm, nil
}

// replacedSuffix names a VM directory that a restore moved aside (it comes
// back should the restore fail).
const replacedSuffix = ".replaced-"

// removeReplaced removes the directories a restore of the VM in dir moved
// aside and never put back or removed, because its process died. The
// caller holds the VM's lock, so no restore of it is in flight.
func removeReplaced(dir string) {
	if dir == "" {
		return
	}
	left, _ := filepath.Glob(dir + replacedSuffix + "*")
	removeAll(left...)
}

// DeleteSnapshot removes a snapshot and every artifact of it, permanently.
// It is refused while a VM restored from it is running or paused; stopped
// VMs restored from it get their disks made self-contained first.
func (m *Manager) DeleteSnapshot(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	unlock, err := store.LockSnapshot(ctx, m.opts.DataDir, id)
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := m.store.GetSnapshot(ctx, id); errors.Is(err, store.ErrNotFound) {
		return newErr("snapshot delete", ErrSnapshotNotFound, "smolvm sandbox snapshot list", fmt.Sprintf("snapshot %q not found", id))
	} else if err != nil {
		return err
	}
	users, err := m.store.VMsRestoredFrom(ctx, id)
	if err != nil {
		return err
	}
	// Each VM restored from it stays locked until its disk is detached and
	// its row updated: one started meanwhile would run on a disk whose
	// backing file is going away. (The snapshot's lock is taken first, as
	// in FromSnapshot and Fork.)
	var stopped []store.VM
	for _, u := range users {
		unlockVM, err := store.LockVM(ctx, m.opts.DataDir, u.ID)
		if err != nil {
			return err
		}
		defer unlockVM()
		rec, err := m.record(ctx, u.ID)
		if err != nil || rec.RestoredFrom != id {
			continue // deleted, or restored from another snapshot, meanwhile
		}
		if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
			return newErr("snapshot delete", ErrSnapshotInUse, "smolvm sandbox stop "+u.ID,
				fmt.Sprintf("snapshot %s is in use: vm %s restored from it is %s", id, u.ID, rec.Status))
		}
		stopped = append(stopped, rec)
	}
	for _, rec := range stopped {
		if err := m.detachFromSnapshot(ctx, rec); err != nil {
			return err
		}
	}
	if err := snapshot.Remove(m.snapRoot(), id); err != nil {
		return err
	}
	return m.store.DeleteSnapshot(ctx, id)
}

// detachFromSnapshot makes a stopped VM's disk independent of the snapshot
// it was restored from, so deleting the snapshot loses none of its data.
func (m *Manager) detachFromSnapshot(ctx context.Context, rec store.VM) error {
	b, err := m.backend(rec.Backend)
	if err != nil {
		return err
	}
	d, err := detacher(b)
	if err != nil {
		return err
	}
	if d != nil {
		if err := d.Detach(ctx, rec.Machine); err != nil {
			return fmt.Errorf("making the disk of vm %s independent of its snapshot: %w", rec.ID, err)
		}
	}
	rec.RestoredFrom = ""
	return m.store.UpdateVM(ctx, rec)
}
