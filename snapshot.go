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

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/steps"
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
	return "", newErr("snapshot", ErrInvalidConfig, newFix(FixSetOption, ArgOption, "SnapshotOptions.Type", ArgChoices, "full,diff,disk"),
		fmt.Sprintf("unknown snapshot type %q: use full, diff or disk", s))
}

// SnapshotOptions configure VM.Snapshot.
type SnapshotOptions struct {
	// ID names the snapshot (same rules as VM ids). Empty: snap-<vm>-<unix seconds>.
	ID string
	// Type is full (default), diff or disk.
	Type SnapshotType
	// ResumeSource runs the VM again as soon as its state is captured
	// (before the snapshot is hashed, fsynced and published); by default it
	// stays paused.
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
	// Host is what a memory snapshot needs of the host that restores it
	// (recorded by format-2 manifests; nil otherwise): a scheduler places a
	// restore on a host that matches (docs/scale-out.md).
	Host *SnapshotHost `json:"host,omitempty"`
}

// SnapshotHost describes the host a snapshot was taken on, as its
// manifest records it: restore refuses a host that differs unsafely
// (ErrHostIncompatible).
type SnapshotHost struct {
	Accel         string   `json:"accel"`
	VMM           string   `json:"vmm"`
	VMMVersion    string   `json:"vmm_version"`
	MachineType   string   `json:"machine_type"`
	CPUVendor     string   `json:"cpu_vendor,omitempty"`
	CPUModel      string   `json:"cpu_model,omitempty"`
	CPUFlags      []string `json:"cpu_flags,omitempty"` // under hardware acceleration only
	Image         string   `json:"image,omitempty"`
	ImageSHA256   string   `json:"image_sha256,omitempty"`
	KernelRelease string   `json:"kernel_release,omitempty"`
}

// snapshotHost is the SDK's view of a manifest's host section (nil when
// it has none).
func snapshotHost(h *snapshot.Host) *SnapshotHost {
	if h == nil {
		return nil
	}
	return &SnapshotHost{Accel: string(h.Accel), VMM: h.VMM, VMMVersion: h.VMMVersion, MachineType: h.MachineType,
		CPUVendor: h.CPUVendor, CPUModel: h.CPUModel, CPUFlags: h.CPUFlags, Image: h.Image, ImageSHA256: h.ImageSHA256,
		KernelRelease: h.KernelRelease}
}

func (m *Manager) snapRoot() string { return filepath.Join(m.opts.DataDir, "snapshots") }

func (m *Manager) snapInfo(s store.Snapshot) SnapshotInfo {
	dir := filepath.Join(m.snapRoot(), s.ID)
	info := SnapshotInfo{ID: s.ID, VMID: s.VMID, Backend: s.Backend, Type: s.Type, CreatedAt: s.CreatedAt,
		SizeBytes: s.SizeBytes, Restored: s.Restored, RestoredVMID: s.RestoredVMID, RestoreCount: s.RestoreCount,
		ParentImage: s.ParentImage, Dir: dir}
	var man snapshot.Manifest
	if json.Unmarshal(s.Manifest, &man) == nil {
		info.MemoryMiB = man.Spec.MemoryMiB
		info.Host = snapshotHost(man.Host)
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
//
// It runs as the steps of snapshotOp.steps. The snapshot is written into a
// temporary directory and published (renamed into place, its row made
// ready) only when complete; a failed step undoes the ones before it, so a
// failed snapshot leaves no directory or row, and the VM as it was.
func (vm *VM) Snapshot(ctx context.Context, opts SnapshotOptions) (*SnapshotInfo, error) {
	if _, err := ParseSnapshotType(string(opts.Type)); err != nil {
		return nil, err
	}
	if opts.ID != "" {
		if err := ValidateID(opts.ID); err != nil {
			return nil, err
		}
	}
	return vm.snapshot(ctx, opts, nil)
}

// snapshot is Snapshot; with tmpl the snapshot is that template.
func (vm *VM) snapshot(ctx context.Context, opts SnapshotOptions, tmpl *templateMark) (*SnapshotInfo, error) {
	kind, err := ParseSnapshotType(string(opts.Type))
	if err != nil {
		return nil, err
	}
	op := &snapshotOp{vm: vm, m: vm.m, kind: kind, opts: opts, tmpl: tmpl}
	defer op.unlock()
	if err := vm.m.runSteps(ctx, "snapshot", []any{"vm", vm.id}, op.steps()...); err != nil {
		return nil, op.failed(err)
	}
	// Saved and committed: a failure to resume is reported, not rolled back.
	if err := op.resumeErr; err != nil {
		return nil, &Error{Op: "snapshot", Message: fmt.Sprintf("snapshot %s was saved, but vm %s did not resume: %v", op.id, vm.id, err),
			Fix: newFix(FixResumeVM, ArgVM, vm.id), Err: err}
	}
	info := vm.m.snapInfo(op.row)
	return &info, nil
}

// snapshotOp is one VM.Snapshot: its steps and what they share.
type snapshotOp struct {
	vm   *VM
	m    *Manager
	kind SnapshotType
	opts SnapshotOptions
	tmpl *templateMark // the snapshot is this template (nil: a user's)

	unlockVM   func()
	rec        store.VM
	b          backend.Backend
	wasRunning bool
	id         string
	row        store.Snapshot
	reserved   bool   // the id is reserved: failures are the snapshot's
	tmp        string // the directory being written
	res        backend.SnapshotResult
	man        snapshot.Manifest
	resumed    bool  // resumeSource ran the VM again
	resumeErr  error // resumeSource could not (reported after the commit)
}

// steps lists the snapshot. The VM's lock serializes snapshots (and
// everything else) of one VM.
func (op *snapshotOp) steps() []steps.Step {
	list := []steps.Step{
		{Name: "lock vm", Do: op.lockVM},
		{Name: "check vm", Do: op.check},
		{Name: "sweep interrupted snapshots", Do: op.sweep},
		{Name: "reserve snapshot id", Do: op.reserve, Undo: op.abort},
		{Name: "note source state", Do: op.noteSource, Undo: op.putBackSource},
		{Name: "make temp dir", Do: op.makeTemp, Undo: op.removeTemp},
	}
	if op.kind == SnapshotDisk {
		list = append(list,
			steps.Step{Name: "wake paused guest", Do: op.wakeGuest, Undo: op.pauseGuestAgain},
			steps.Step{Name: "sync guest disk", Do: op.syncGuest})
	} else {
		list = append(list, steps.Step{Name: "attach agent", Do: op.attachAgent})
	}
	return append(list,
		steps.Step{Name: "save vm state", Do: op.save},
		steps.Step{Name: "resume source", Do: op.resumeSource, Undo: op.unresumeSource},
		steps.Step{Name: "write manifest", Do: op.writeManifest},
		steps.Step{Name: "publish snapshot", Do: op.publish, Undo: op.unpublish},
		steps.Step{Name: "commit snapshot row", Do: op.commit},
	)
}

func (op *snapshotOp) lockVM(ctx context.Context) error {
	unlock, rec, b, err := op.vm.lock(ctx)
	if err != nil {
		return err
	}
	op.unlockVM, op.rec, op.b = unlock, rec, b
	op.wasRunning = rec.Status == store.VMRunning
	return nil
}

func (op *snapshotOp) unlock() {
	if op.unlockVM != nil {
		op.unlockVM()
	}
}

// check refuses a VM that is not running or paused, and a kind the backend
// cannot take.
func (op *snapshotOp) check(context.Context) error {
	vm, rec, b, kind := op.vm, op.rec, op.b, op.kind
	if rec.Status != store.VMRunning && rec.Status != store.VMPaused {
		return newErr("snapshot", ErrVMNotRunning, newFix(FixStartVM, ArgVM, vm.id),
			fmt.Sprintf("cannot snapshot vm %s: it is %s; a VM must be running or paused to be snapshotted", vm.id, rec.Status))
	}
	caps := b.Capabilities()
	if (kind == SnapshotDisk && !caps.DiskSnapshot) || (kind != SnapshotDisk && !caps.MemorySnapshot) {
		return newErr("snapshot", ErrUnsupported, Fix{}, fmt.Sprintf("the %s backend cannot take %s snapshots", b.Name(), kind))
	}
	return nil
}

// sweep removes what interrupted snapshots left (best effort).
func (op *snapshotOp) sweep(ctx context.Context) error {
	op.m.cleanupSnapshots(ctx)
	return nil
}

// reserve claims the snapshot's id with a pending row: no one else can
// take it, and nothing lists it until commit.
func (op *snapshotOp) reserve(ctx context.Context) error {
	op.id = op.opts.ID
	if op.id == "" {
		op.id = op.m.snapshotID(ctx, op.vm.id)
	}
	op.row = store.Snapshot{ID: op.id, VMID: op.vm.id, Backend: op.b.Name(), Type: op.kind, CreatedAt: time.Now().UTC()}
	if op.tmpl != nil {
		op.row.TemplateKey, op.row.Template = op.tmpl.key, op.tmpl.meta
	}
	if err := op.m.store.ReserveSnapshot(ctx, op.row); err != nil {
		if errors.Is(err, store.ErrExists) {
			return newErr("snapshot", ErrSnapshotExists, newFix(FixChooseSnapshotID, ArgSnapshot, op.id),
				fmt.Sprintf("snapshot %q already exists", op.id))
		}
		return err
	}
	op.reserved = true
	return nil
}

func (op *snapshotOp) abort(ctx context.Context) error {
	return op.m.store.AbortSnapshot(ctx, op.id)
}

// noteSource changes nothing: its undo puts a VM that was running back to
// running (saving the state pauses it).
func (op *snapshotOp) noteSource(context.Context) error { return nil }

func (op *snapshotOp) putBackSource(ctx context.Context) error {
	if !op.wasRunning || op.resumed {
		return nil
	}
	if err := op.b.Resume(ctx, op.rec.Machine); err != nil {
		return err
	}
	op.rec.Status = store.VMRunning
	return op.m.store.UpdateVM(ctx, op.rec)
}

func (op *snapshotOp) makeTemp(context.Context) error {
	tmp, err := snapshot.TempDir(op.m.snapRoot(), op.id)
	if err != nil {
		return err
	}
	op.tmp = tmp
	return nil
}

func (op *snapshotOp) removeTemp(context.Context) error { return os.RemoveAll(op.tmp) }

// wakeGuest resumes a paused guest for the moment of a disk snapshot's
// sync (saving the state pauses it again).
func (op *snapshotOp) wakeGuest(ctx context.Context) error {
	if op.wasRunning {
		return nil
	}
	if err := op.b.Resume(ctx, op.rec.Machine); err != nil {
		return err
	}
	op.rec.Status = store.VMRunning
	op.m.store.UpdateVM(ctx, op.rec)
	return nil
}

// pauseGuestAgain pauses a guest that wakeGuest resumed and that is still
// running, unless the caller asked for it to run after the snapshot.
func (op *snapshotOp) pauseGuestAgain(ctx context.Context) error {
	if op.wasRunning || op.opts.ResumeSource || op.rec.Status != store.VMRunning {
		return nil
	}
	if err := op.b.Pause(ctx, op.rec.Machine); err != nil {
		return err
	}
	op.rec.Status = store.VMPaused
	return op.m.store.UpdateVM(ctx, op.rec)
}

// syncGuest flushes the guest's page cache: the disk alone must be
// consistent.
func (op *snapshotOp) syncGuest(ctx context.Context) error {
	c, err := op.vm.agent(ctx, "snapshot")
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	err = c.Sync(sctx)
	cancel()
	if err != nil {
		return fmt.Errorf("syncing the guest before a disk snapshot: %w", err)
	}
	return nil
}

// attachAgent has an agent channel attached while the memory is saved: the
// guest then restores with a host already on that channel. Without one it
// must first learn of the restorer's connection (a virtio-serial
// port-open), which took a restored guest about 200 ms before its first
// reply under TCG. Best effort, and only for a running guest.
func (op *snapshotOp) attachAgent(ctx context.Context) error {
	if !op.wasRunning {
		return nil
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if _, err := op.vm.agent(actx, "snapshot"); err != nil {
		op.m.log.Debug("snapshot without an agent connection", "vm", op.vm.id, "err", err)
	}
	cancel()
	return nil
}

// save has the backend pause the VM and write its artifacts into the temp
// dir. The VM stays paused (putBackSource resumes it on failure).
func (op *snapshotOp) save(ctx context.Context) error {
	res, err := op.b.Snapshot(ctx, op.rec.Machine, op.kind, op.tmp)
	if err != nil {
		return err
	}
	op.res = res
	op.rec.Status = store.VMPaused
	return op.m.store.UpdateVM(ctx, op.rec)
}

// resumeSource runs the VM again, with ResumeSource, as soon as its state
// is captured: the artifacts in the temp dir are copies that the running
// VM no longer touches, so hashing, fsyncing, publishing and committing
// them need not keep it paused. Durability is unchanged (nothing is listed
// before the commit, and the commit follows the fsync), and the source is
// down only while the backend saves the state. A failure to resume does
// not fail the snapshot: VM.Snapshot reports it after the commit.
func (op *snapshotOp) resumeSource(ctx context.Context) error {
	if !op.opts.ResumeSource {
		return nil
	}
	if err := op.b.Resume(ctx, op.rec.Machine); err != nil {
		op.resumeErr = err
		return nil
	}
	op.resumed = true
	op.rec.Status = store.VMRunning
	if err := op.m.store.UpdateVM(ctx, op.rec); err != nil {
		// This step failed, so its undo will not run: put a source that
		// was paused back to paused here (best effort).
		op.unresumeSource(context.WithoutCancel(ctx))
		return err
	}
	return nil
}

// unresumeSource pauses a source that resumeSource ran and that was paused
// before the snapshot: a failed snapshot leaves the VM as it was.
func (op *snapshotOp) unresumeSource(ctx context.Context) error {
	if !op.resumed || op.wasRunning {
		return nil
	}
	if err := op.b.Pause(ctx, op.rec.Machine); err != nil {
		return err
	}
	op.resumed = false
	op.rec.Status = store.VMPaused
	return op.m.store.UpdateVM(ctx, op.rec)
}

// writeManifest hashes the artifacts and writes the manifest next to them.
func (op *snapshotOp) writeManifest(ctx context.Context) error {
	arts, size, err := snapshot.Describe(op.tmp, op.res.Artifacts)
	if err != nil {
		return err
	}
	host, err := op.m.hostRecord(ctx, op.b, op.rec)
	if err != nil {
		return err
	}
	op.man = snapshot.Manifest{Host: host, FormatVersion: snapshot.FormatVersion, ID: op.id, VMID: op.vm.id, Backend: op.b.Name(),
		Type: op.kind, CreatedAt: op.row.CreatedAt, VMConfig: op.rec.Config, Spec: op.rec.Machine.Spec,
		Result: op.res, Artifacts: arts, BaseImage: op.res.BaseImage, SizeBytes: size}
	return snapshot.WriteManifest(op.tmp, op.man)
}

// publish renames the complete directory into place.
func (op *snapshotOp) publish(context.Context) error {
	_, err := snapshot.Publish(op.tmp, op.m.snapRoot(), op.id)
	return err
}

func (op *snapshotOp) unpublish(context.Context) error {
	return os.RemoveAll(filepath.Join(op.m.snapRoot(), op.id))
}

// commit makes the row ready, with the manifest the restores compare the
// one on disk to.
func (op *snapshotOp) commit(ctx context.Context) error {
	manJSON, _ := json.Marshal(op.man)
	op.row.SizeBytes, op.row.ParentImage, op.row.Manifest = op.man.SizeBytes, op.res.BaseImage, manJSON
	return op.m.store.CommitSnapshot(ctx, op.id, op.row)
}

// failed explains a failed snapshot. Failures before the id was reserved
// changed nothing and are returned as they are.
func (op *snapshotOp) failed(err error) error {
	var e *Error
	if !op.reserved || errors.As(err, &e) {
		return err
	}
	return &Error{Op: "snapshot", Message: fmt.Sprintf("snapshot of vm %s failed: %v", op.vm.id, err), Err: err}
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
	m.cleanupPulls()
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
		return nil, newErr("snapshot", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", id))
	}
	if err != nil {
		return nil, err
	}
	if isTemplate(s) {
		return nil, templateNotSnapshot("snapshot", id)
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
			Fix: newFix(FixRetakeSnapshot, ArgSnapshot, id), Err: errors.Join(ErrSnapshotCorrupt, err)}
	}
	row, err := m.store.GetSnapshot(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return snapshot.Manifest{}, newErr("restore", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", id))
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
	if man.Type == SnapshotDiff && man.BaseImage != "" {
		if _, err := os.Stat(man.BaseImage); err != nil {
			return man, &Error{Op: "restore",
				Message: fmt.Sprintf("snapshot %s is a diff snapshot and its base image %s is missing", id, man.BaseImage),
				Fix:     newFix(FixRestoreBaseImage, ArgPath, man.BaseImage),
				Err:     errors.Join(ErrBackingImageMissing, backend.ErrBackingMissing)}
		}
		if err := m.checkBaseDigest("restore", man); err != nil {
			return man, err
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
//
// It runs as the steps of restoreOp.steps; a failed step undoes the ones
// before it, so a failed restore leaves no VMM, directory or record of its
// own and puts the replaced VM's files and record back.
func (m *Manager) FromSnapshot(ctx context.Context, id string, opts RestoreOptions) (*VM, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if err := m.autoPull(ctx, "restore", id); err != nil {
		return nil, err
	}
	r := &restoreOp{m: m, id: id, opts: opts, locks: heldLocks{dataDir: m.opts.DataDir}}
	defer r.locks.release()
	if err := m.runSteps(ctx, "restore", []any{"snapshot", id}, r.steps()...); err != nil {
		return nil, r.failed(err)
	}
	return r.vm, nil
}

// restoreOp is one FromSnapshot: its steps and what they share. Locks are
// taken in the order snapshot, then VM (as in Fork and DeleteSnapshot),
// and held until the restore ends.
type restoreOp struct {
	m    *Manager
	id   string
	opts RestoreOptions
	// newIdentity: the snapshot predates machine-ids, so this restore
	// gives the guest one (and re-applies its whole identity).
	newIdentity bool

	locks    heldLocks
	man      snapshot.Manifest
	b        backend.Backend
	vmID     string
	spec     backend.Spec
	old      store.VM // the VM replaced, when hasOld
	hasOld   bool
	aside    string   // where the replaced VM's files wait ("" for none)
	pending  store.VM // the record written before the VMM starts
	reserved bool     // pending is written: failures are the restore's
	mach     backend.Machine
	vm       *VM
}

// steps lists the restore: checks that change nothing, then the changes,
// each with its undo.
func (r *restoreOp) steps() []steps.Step {
	list := []steps.Step{
		{Name: "lock snapshot", Do: r.lockSnapshot},
		{Name: "check restore-once", Do: r.checkRestoreOnce},
		{Name: "verify snapshot", Do: r.verify},
		{Name: "lock vm", Do: r.lockVM},
		{Name: "stop replaced vm", Do: r.stopReplaced, Undo: r.putBackReplacedRecord},
		{Name: "move replaced files aside", Do: r.moveAside, Undo: r.moveBack},
		{Name: "reserve vm record", Do: r.reserveRecord, Undo: r.dropRecord},
		{Name: "make vm dir", Do: r.makeDir, Undo: r.removeDirs},
		{Name: "assign uid", Do: r.assignUID}, // released with the record (dropRecord)
		{Name: "restore vmm", Do: r.restoreVMM, Undo: r.stopVMM},
	}
	if r.opts.Resume {
		list = append(list, steps.Step{Name: "connect agent", Do: r.connectAgent, Undo: r.disconnect})
	}
	// Last: once it commits, nothing may be undone.
	return append(list, steps.Step{Name: "mark restored", Do: r.markRestored})
}

func (r *restoreOp) lockSnapshot(ctx context.Context) error { return r.locks.snapshot(ctx, r.id) }

// checkRestoreOnce refuses a snapshot restored before, unless forced.
func (r *restoreOp) checkRestoreOnce(ctx context.Context) error {
	s, err := r.m.store.GetSnapshot(ctx, r.id)
	if errors.Is(err, store.ErrNotFound) {
		return newErr("restore", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", r.id))
	}
	if err != nil {
		return err
	}
	if isTemplate(s) {
		return templateNotSnapshot("restore", r.id)
	}
	if s.Restored && !r.opts.Force {
		return newErr("restore", ErrSnapshotRestored, newFix(FixRestoreForce, ArgSnapshot, r.id),
			fmt.Sprintf("snapshot %s was already restored (into vm %s); a snapshot restores once unless forced", r.id, s.RestoredVMID))
	}
	return nil
}

// verify checks the manifest and artifacts (before anything is stopped or
// replaced) and finds the snapshot's backend.
func (r *restoreOp) verify(ctx context.Context) error {
	man, err := r.m.loadSnapshot(ctx, r.id, false)
	if err != nil {
		return err
	}
	b, err := r.m.backend(man.Backend)
	if err != nil {
		return err
	}
	if err := r.m.checkHost(ctx, "restore", man, b); err != nil {
		return err
	}
	r.man, r.b, r.vmID = man, b, man.VMID
	r.spec = man.Spec
	if r.spec.MachineID == "" {
		r.spec.MachineID = newMachineID() // a snapshot from before machine-ids
		r.newIdentity = true
	}
	r.spec.Dir, r.spec.RunDir = r.m.vmDir(r.vmID), r.m.runDir(r.vmID)
	r.spec.Disk = filepath.Join(r.spec.Dir, filepath.Base(r.spec.Disk))
	return nil
}

func (r *restoreOp) lockVM(ctx context.Context) error { return r.locks.vm(ctx, r.vmID) }

// stopReplaced stops the VM that has this id, if any, and removes what an
// interrupted restore of it left aside.
func (r *restoreOp) stopReplaced(ctx context.Context) error {
	old, err := r.m.store.GetVM(ctx, r.vmID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	ob, err := r.m.backend(old.Backend)
	if err != nil {
		return err
	}
	if err := ob.Stop(ctx, old.Machine); err != nil {
		return fmt.Errorf("restore: stopping vm %s: %w", r.vmID, err)
	}
	removeReplaced(old.Machine.Dir)
	old.Status, old.PID = store.VMStopped, 0
	r.old, r.hasOld = old, true
	return nil
}

// putBackReplacedRecord records the replaced VM as stopped, with why the
// restore failed once it had replaced the record.
func (r *restoreOp) putBackReplacedRecord(ctx context.Context) error {
	if !r.hasOld {
		return nil
	}
	if cause := steps.Cause(ctx); r.reserved && cause != nil {
		r.old.LastError = "restore of snapshot " + r.id + " failed: " + cause.Error()
	}
	return r.m.store.UpdateVM(ctx, r.old)
}

// moveAside moves the replaced VM's files out of the way: they come back
// should the restore fail.
func (r *restoreOp) moveAside(context.Context) error {
	if !r.hasOld {
		return nil
	}
	if _, err := os.Stat(r.old.Machine.Dir); err != nil {
		return nil
	}
	aside := r.old.Machine.Dir + replacedSuffix + fmt.Sprint(time.Now().UnixNano())
	if err := os.Rename(r.old.Machine.Dir, aside); err != nil {
		return err
	}
	r.aside = aside
	return nil
}

func (r *restoreOp) moveBack(context.Context) error {
	if r.aside == "" {
		return nil
	}
	return os.Rename(r.aside, r.old.Machine.Dir)
}

// reserveRecord points the VM's record at the new VMM's directory before
// that VMM starts: should this process die mid-restore, the VM is listed
// (stopped, with a last error saying so) and a new restore, Start or
// Delete stops the VMM, found through its directory, instead of it
// running on unseen.
func (r *restoreOp) reserveRecord(ctx context.Context) error {
	r.pending = store.VM{ID: r.vmID, Backend: r.b.Name(), Status: store.VMStopped, Config: r.man.VMConfig,
		Machine: backend.Machine{Spec: r.spec, Backend: r.b.Name()}, RestoredFrom: r.id,
		LastError: "the restore of snapshot " + r.id + " into this VM was interrupted; restore it again or delete the VM"}
	var err error
	if r.hasOld {
		err = r.m.store.UpdateVM(ctx, r.pending)
	} else {
		err = r.m.store.CreateVM(ctx, r.pending)
	}
	r.reserved = err == nil
	return err
}

// dropRecord deletes a record this restore created (and with it the uid
// assigned to it); a replaced VM's record is put back by
// putBackReplacedRecord.
func (r *restoreOp) dropRecord(ctx context.Context) error {
	if r.hasOld {
		return nil
	}
	return r.m.store.DeleteVM(ctx, r.vmID)
}

func (r *restoreOp) makeDir(context.Context) error {
	return os.MkdirAll(r.spec.Dir, 0o700)
}

// removeDirs removes the new VM's directory and its run directory.
func (r *restoreOp) removeDirs(context.Context) error {
	return errors.Join(os.RemoveAll(r.spec.Dir), os.RemoveAll(r.spec.RunDir))
}

func (r *restoreOp) assignUID(ctx context.Context) error {
	return r.m.runAs(ctx, &r.spec)
}

func (r *restoreOp) restoreVMM(ctx context.Context) error {
	mach, err := r.b.Restore(ctx, backend.RestoreRequest{Spec: r.spec, SnapshotDir: filepath.Join(r.m.snapRoot(), r.id),
		Kind: r.man.Type, Result: r.man.Result, Resume: r.opts.Resume})
	if err != nil {
		return err
	}
	r.mach = mach
	r.vm = &VM{m: r.m, id: r.vmID}
	return nil
}

func (r *restoreOp) stopVMM(ctx context.Context) error {
	return r.b.Stop(ctx, r.mach)
}

// connectAgent waits for the restored guest's agent and gives it its
// clock and identity (its own: the VM the snapshot was taken of).
func (r *restoreOp) connectAgent(ctx context.Context) error {
	var cfg Config
	json.Unmarshal(r.man.VMConfig, &cfg)
	cfg = cfg.withDefaults()
	timeout := 30 * time.Second
	if r.man.Type == SnapshotDisk {
		timeout = cfg.BootTimeout
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	c, err := r.m.connectAgent(cctx, r.b, r.mach)
	cancel()
	if err == nil {
		r.vm.setClient(c)
		if r.newIdentity {
			err = r.vm.afterBoot(ctx, c, r.mach.Spec, nil)
		} else {
			// The guest is the snapshot's VM under its own id: its
			// hostname, MAC and machine-id are already right. It needs
			// the host's clock and fresh randomness (another restore
			// of this image shares its CRNG state).
			err = r.vm.setClockAndIdentity(ctx, c, agentproto.SetIdentityRequest{})
		}
	}
	if err != nil {
		return fmt.Errorf("the restored vm's agent did not answer: %w", err)
	}
	return nil
}

func (r *restoreOp) disconnect(context.Context) error {
	r.vm.closeClient()
	return nil
}

// markRestored records, in one transaction, the VM as restored (its VMM,
// paused or running) and the snapshot as restored into it: the restore-once
// rule never sees one without the other. Then the replaced VM's files go.
func (r *restoreOp) markRestored(ctx context.Context) error {
	rec := r.pending
	rec.Status, rec.Machine, rec.PID, rec.LastError = store.VMPaused, r.mach, r.mach.PID, ""
	if r.opts.Resume {
		rec.Status = store.VMRunning
	}
	err := r.m.store.Tx(ctx, func(tx *store.Tx) error {
		if err := tx.UpdateVM(ctx, rec); err != nil {
			return err
		}
		s, err := tx.GetSnapshot(ctx, r.id)
		if err != nil {
			return err
		}
		s.Restored, s.RestoredVMID, s.RestoreCount = true, r.vmID, s.RestoreCount+1
		return tx.UpdateSnapshot(ctx, s)
	})
	if err != nil {
		return err
	}
	removeAll(r.aside)
	return nil
}

// failed explains a failed restore. Failures before the VM's record was
// replaced changed nothing and are returned as they are.
func (r *restoreOp) failed(cause error) error {
	var e *Error
	if !r.reserved || errors.As(cause, &e) {
		return cause
	}
	if errors.Is(cause, backend.ErrBackingMissing) {
		return &Error{Op: "restore", Message: fmt.Sprintf("restore of %s: %v", r.id, cause),
			Fix: newFix(FixFullSnapshot), Err: errors.Join(ErrBackingImageMissing, cause)}
	}
	return &Error{Op: "restore", Message: fmt.Sprintf("restore of snapshot %s failed: %v", r.id, cause),
		Fix: newFix(FixShowLogs, ArgVM, r.vmID), Err: cause}
}

// runSteps runs an operation's steps (package steps), logging each one
// done and its time at debug level, and a failure with the step it
// happened in. It returns the failed step's own error, so an operation's
// errors read as before it was split in steps; an undo that failed is
// logged as a warning (what it left behind is named there).
func (m *Manager) runSteps(ctx context.Context, op string, attrs []any, list ...steps.Step) error {
	t0 := time.Now()
	for i := range list {
		name, do := list[i].Name, list[i].Do
		list[i].Do = func(ctx context.Context) error {
			if err := do(ctx); err != nil {
				return err
			}
			m.log.DebugContext(ctx, op, append(attrs, "step", name, "elapsed", time.Since(t0))...)
			return nil
		}
	}
	err := steps.Run(ctx, list...)
	var se *steps.Error
	if !errors.As(err, &se) {
		return err
	}
	m.log.Debug(op+" failed", append(attrs, "step", se.Step, "err", se.Err)...)
	if se.Rollback != nil {
		m.log.Warn(op+" failed and its rollback did not finish", append(attrs, "step", se.Step, "err", se.Err, "rollback", se.Rollback)...)
	}
	return se.Err
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
//
// Steps: lock snapshot, find snapshot, lock restored vms, detach restored
// disks, delete snapshot (one transaction: the VMs' rows no longer point at
// it, its row is gone; then its files). The rows go before the files: a
// delete interrupted in between leaves an unlisted directory, which the
// next snapshot (or doctor) sweeps, never a listed snapshot without files.
func (m *Manager) DeleteSnapshot(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	return m.deleteSnapshot(ctx, id, false)
}

// deleteSnapshot is DeleteSnapshot of a user's snapshot, or of a template
// when template is set (each refuses the other kind).
func (m *Manager) deleteSnapshot(ctx context.Context, id string, template bool) error {
	d := &deleteSnapshotOp{m: m, id: id, template: template, locks: heldLocks{dataDir: m.opts.DataDir}}
	defer d.locks.release()
	return m.runSteps(ctx, "snapshot delete", []any{"snapshot", id},
		steps.Step{Name: "lock snapshot", Do: func(ctx context.Context) error { return d.locks.snapshot(ctx, id) }},
		steps.Step{Name: "find snapshot", Do: d.find},
		steps.Step{Name: "lock restored vms", Do: d.lockUsers},
		steps.Step{Name: "detach restored disks", Do: d.detach},
		steps.Step{Name: "delete snapshot", Do: d.delete}, // last: it commits
	)
}

// deleteSnapshotOp is one DeleteSnapshot. Nothing in it is undone: a
// detached disk is as good as an attached one, and the rows change in one
// transaction.
type deleteSnapshotOp struct {
	m        *Manager
	id       string
	template bool // deleting a template
	locks    heldLocks
	stopped  []store.VM // stopped VMs restored from the snapshot
}

func (d *deleteSnapshotOp) find(ctx context.Context) error {
	s, err := d.m.store.GetSnapshot(ctx, d.id)
	if errors.Is(err, store.ErrNotFound) || (err == nil && isTemplate(s) != d.template) {
		if err == nil && !d.template {
			return templateNotSnapshot("snapshot delete", d.id)
		}
		return newErr("snapshot delete", ErrSnapshotNotFound, newFix(FixListSnapshots), fmt.Sprintf("snapshot %q not found", d.id))
	}
	return err
}

// lockUsers locks each VM restored from the snapshot, until its disk is
// detached and its row updated: one started meanwhile would run on a disk
// whose backing file is going away. (The snapshot's lock is taken first,
// as in FromSnapshot and Fork.) A running or paused one refuses the
// delete.
func (d *deleteSnapshotOp) lockUsers(ctx context.Context) error {
	users, err := d.m.store.VMsRestoredFrom(ctx, d.id)
	if err != nil {
		return err
	}
	for _, u := range users {
		if err := d.locks.vm(ctx, u.ID); err != nil {
			return err
		}
		rec, err := d.m.record(ctx, u.ID)
		if err != nil || rec.RestoredFrom != d.id {
			continue // deleted, or restored from another snapshot, meanwhile
		}
		if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
			msg := fmt.Sprintf("snapshot %s is in use: vm %s restored from it is %s", d.id, u.ID, rec.Status)
			fix := newFix(FixStopVM, ArgVM, u.ID)
			if strings.HasPrefix(u.ID, poolPrefix) {
				msg += " (a member of a warm pool)"
				fix = newFix(FixRemovePool, ArgImage, d.m.info(rec).Image)
			}
			return newErr("snapshot delete", ErrSnapshotInUse, fix, msg)
		}
		d.stopped = append(d.stopped, rec)
	}
	return nil
}

// detach makes each stopped VM's disk independent of the snapshot, so
// deleting it loses none of their data.
func (d *deleteSnapshotOp) detach(ctx context.Context) error {
	for _, rec := range d.stopped {
		if err := d.m.detachDisk(ctx, rec); err != nil {
			return err
		}
	}
	return nil
}

// delete clears the VMs' RestoredFrom and deletes the snapshot's row, in
// one transaction, then its files.
func (d *deleteSnapshotOp) delete(ctx context.Context) error {
	err := d.m.store.Tx(ctx, func(tx *store.Tx) error {
		for _, rec := range d.stopped {
			rec.RestoredFrom = ""
			if err := tx.UpdateVM(ctx, rec); err != nil {
				return err
			}
		}
		return tx.DeleteSnapshot(ctx, d.id)
	})
	if err != nil {
		return err
	}
	return snapshot.Remove(d.m.snapRoot(), d.id)
}

// detachDisk makes a stopped VM's disk independent of the snapshot it was
// restored from (when its backend's disks depend on it).
func (m *Manager) detachDisk(ctx context.Context, rec store.VM) error {
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
	return nil
}

// heldLocks are the store locks an operation holds until it ends, taken in
// the order snapshot, then VMs, and released in reverse.
type heldLocks struct {
	dataDir string
	unlocks []func()
}

func (l *heldLocks) snapshot(ctx context.Context, id string) error {
	return l.hold(store.LockSnapshot(ctx, l.dataDir, id))
}

func (l *heldLocks) vm(ctx context.Context, id string) error {
	return l.hold(store.LockVM(ctx, l.dataDir, id))
}

func (l *heldLocks) hold(unlock func(), err error) error {
	if err != nil {
		return err
	}
	l.unlocks = append(l.unlocks, unlock)
	return nil
}

func (l *heldLocks) release() {
	for i := len(l.unlocks) - 1; i >= 0; i-- {
		l.unlocks[i]()
	}
	l.unlocks = nil
}
