package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fcapi"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/steps"
)

// snapshotMeta is DIR/firecracker.json: how a snapshot was taken.
type snapshotMeta struct {
	Kind               backend.SnapshotKind `json:"kind"`
	DiskCopy           string               `json:"disk_copy"`           // "reflink" or "sparse"
	NetworkIface       string               `json:"network_iface"`       // "eth0" when a TAP was attached, else ""
	DrivePath          string               `json:"drive_path"`          // path_on_host pinned in vmstate (relative to the VMM's cwd)
	FirecrackerVersion string               `json:"firecracker_version"` // from GET /version
	CPUs               int                  `json:"cpus"`
	MemoryMiB          int                  `json:"memory_mib"`
	CreatedAt          time.Time            `json:"created_at"`
}

// Snapshot implements backend.Backend. Whatever the kind, the VM is paused
// (and left paused), PUT /snapshot/create writes a Full "vmstate" and
// "memory", and the disk is copied to "disk" (reflink, else sparse). Kind
// "disk" keeps the state and memory too but is restored by a cold boot.
func (b *Backend) Snapshot(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
	switch kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot kind %q: %w", kind, backend.ErrUnsupported)
	}
	if !alive(m) {
		return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: %w", backend.ErrNotRunning)
	}
	if b.jailFor(m.Spec) != nil {
		return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: %w", errJailedSnapshot)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return backend.SnapshotResult{}, err
	}
	ctx, cancel := withDefaultTimeout(ctx, b.snapTTL)
	defer cancel()
	c := fcapi.New(apiSock(m.Spec))
	defer c.Close()

	if err := c.Pause(ctx); err != nil {
		return backend.SnapshotResult{}, vmmError("pause", err, m.Dir)
	}
	state, mem, disk := filepath.Join(dir, stateFile), filepath.Join(dir, memoryFile), filepath.Join(dir, diskFile)
	if err := c.CreateSnapshot(ctx, fcapi.SnapshotCreate{SnapshotType: fcapi.SnapshotFull, SnapshotPath: state, MemFilePath: mem}); err != nil {
		return backend.SnapshotResult{}, vmmError("snapshot/create", err, m.Dir)
	}
	meta := snapshotMeta{Kind: kind, CPUs: m.CPUs, MemoryMiB: m.MemoryMiB, CreatedAt: time.Now().UTC()}
	arts := []backend.Artifact{{Role: "state", Name: stateFile}, {Role: "memory", Name: memoryFile}}
	if m.Disk != "" {
		// After snapshot/create the block device's writes are in the host
		// filesystem, and the paused guest makes no new ones.
		method, err := copyDisk(ctx, m.Disk, disk)
		if err != nil {
			return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: disk: %w", err)
		}
		meta.DiskCopy, meta.DrivePath = method, driveLinkName
		arts = append(arts, backend.Artifact{Role: "disk", Name: diskFile})
	}
	arts = append(arts, backend.Artifact{Role: "meta", Name: metaFile})
	if m.Network && tapExists(m.Spec) {
		meta.NetworkIface = IfaceID
	}
	if v, err := c.Version(ctx); err == nil {
		meta.FirecrackerVersion = v
	}
	mb, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, metaFile), append(mb, '\n'), 0o600); err != nil {
		return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: %w", err)
	}
	for _, p := range []string{state, mem, filepath.Join(dir, metaFile)} {
		if err := fsutil.SyncFile(p); err != nil {
			return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: %w", err)
		}
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return backend.SnapshotResult{}, fmt.Errorf("firecracker: snapshot: %w", err)
	}
	res := backend.SnapshotResult{Artifacts: arts, MemoryFormat: "raw"}
	if kind == backend.SnapshotDisk {
		// The state and memory files are kept (as the seed does on
		// Firecracker) but Restore cold-boots the disk and never reads
		// them, so the result declares no memory.
		res.MemoryFormat = ""
	}
	return res, nil
}

// Restore implements backend.Backend. The snapshot's disk is copied to
// req.Spec.Disk first (reflink, else sparse). Kind "disk" is then a cold
// Start (paused right after boot unless req.Resume). Kinds "full" and
// "diff" start a fresh firecracker in req.Spec.RunDir, whose "rootfs" link
// points at the new disk so the drive path pinned in vmstate resolves to
// it, and PUT /snapshot/load with the File memory backend (the memory file
// is mapped privately, copy-on-write, and must stay in place while the VM
// runs), vsock_override to the new vsock socket and, with a TAP,
// network_overrides.
//
// It runs as the steps of restoreRun.steps (package steps): a failed step
// undoes the ones before it, so a failed restore leaves no process, socket,
// TAP or disk copy.
func (b *Backend) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	r := &restoreRun{b: b, req: req, deadline: time.Now().Add(b.snapTTL)}
	if err := steps.Run(ctx, r.steps()...); err != nil {
		var se *steps.Error
		if errors.As(err, &se) && se.Rollback == nil {
			return backend.Machine{}, se.Err // it names what failed
		}
		if se != nil {
			return backend.Machine{}, errors.Join(se.Err, se.Rollback) // and what was left
		}
		return backend.Machine{}, err
	}
	return r.m, nil
}

// restoreRun is one Restore: its steps and what they share.
type restoreRun struct {
	b        *Backend
	req      backend.RestoreRequest
	deadline time.Time // of the disk copy, launch and load, when ctx has none

	spec                      backend.Spec
	snapDir                   string
	diskArt, stateArt, memArt string // artifacts used ("" for none)
	meta                      snapshotMeta
	p                         *proc
	tap                       string // the TAP device, "" for none
	m                         backend.Machine
}

// steps lists the restore: checks that start nothing, then a cold boot
// (kind "disk") or a snapshot load.
func (r *restoreRun) steps() []steps.Step {
	list := []steps.Step{
		{Name: "check request", Do: r.check},
		{Name: "find artifacts", Do: r.findArtifacts},
		{Name: "copy disk", Do: r.copyDisk, Undo: r.removeDisk},
	}
	if r.req.Kind == backend.SnapshotDisk {
		list = append(list, steps.Step{Name: "boot vm", Do: r.boot, Undo: r.stop})
		if !r.req.Resume {
			list = append(list, steps.Step{Name: "pause vm", Do: r.pause})
		}
		return list
	}
	return append(list,
		steps.Step{Name: "start vmm", Do: r.startVMM, Undo: r.killVMM},
		steps.Step{Name: "set up network", Do: r.setupNetwork}, // the TAP goes with the vmm (killVMM)
		steps.Step{Name: "load memory", Do: r.load},
	)
}

// check validates the request: kind, spec, no jail (a jailed VM cannot be
// snapshotted), paths made absolute.
func (r *restoreRun) check(context.Context) error {
	spec, err := absSpec(r.req.Spec)
	if err != nil {
		return err
	}
	switch r.req.Kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return fmt.Errorf("firecracker: restore kind %q: %w", r.req.Kind, backend.ErrUnsupported)
	}
	if err := checkSpec(spec, r.req.Kind == backend.SnapshotDisk); err != nil {
		return err
	}
	if r.b.jailFor(spec) != nil {
		return fmt.Errorf("firecracker: restore: %w", errJailedSnapshot)
	}
	if r.snapDir, err = filepath.Abs(r.req.SnapshotDir); err != nil {
		return err
	}
	r.spec = spec
	return nil
}

// artifact returns the path of the snapshot's artifact with role (def when
// the result names none), which must exist.
func (r *restoreRun) artifact(role, def string) (string, error) {
	name := def
	for _, a := range r.req.Result.Artifacts {
		if a.Role == role {
			name = a.Name
		}
	}
	p := filepath.Join(r.snapDir, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("firecracker: restore: %s artifact: %w", role, err)
	}
	return p, nil
}

func (r *restoreRun) hasRole(role string) bool {
	for _, a := range r.req.Result.Artifacts {
		if a.Role == role {
			return true
		}
	}
	return false
}

// findArtifacts finds every file the restore reads, before anything is
// copied or started, and checks the snapshot's metadata against what this
// backend and host can restore.
func (r *restoreRun) findArtifacts(context.Context) (err error) {
	switch {
	case r.spec.Disk != "":
		if r.diskArt, err = r.artifact("disk", diskFile); err != nil {
			return err
		}
	case r.hasRole("disk"):
		return errors.New("firecracker: restore: the snapshot has a disk but the spec has no Disk to restore it to")
	}
	if mb, err := os.ReadFile(filepath.Join(r.snapDir, metaFile)); err == nil {
		_ = json.Unmarshal(mb, &r.meta)
	}
	if r.req.Kind == backend.SnapshotDisk {
		return nil
	}
	if r.stateArt, err = r.artifact("state", stateFile); err != nil {
		return err
	}
	if r.memArt, err = r.artifact("memory", memoryFile); err != nil {
		return err
	}
	if r.meta.DrivePath != "" && r.meta.DrivePath != driveLinkName {
		return fmt.Errorf("firecracker: restore: snapshot pins drive path %q, this backend attaches %q", r.meta.DrivePath, driveLinkName)
	}
	if r.meta.NetworkIface != "" && os.Geteuid() != 0 {
		return fmt.Errorf("firecracker: restore: the snapshot has a network interface; restoring it needs root for a TAP device: %w", backend.ErrUnsupported)
	}
	return nil
}

// copyDisk copies the snapshot's disk to the spec's (reflink, else sparse).
func (r *restoreRun) copyDisk(ctx context.Context) error {
	if r.diskArt == "" {
		return nil
	}
	ctx, cancel := r.bounded(ctx)
	defer cancel()
	if err := os.MkdirAll(filepath.Dir(r.spec.Disk), 0o700); err != nil {
		return fmt.Errorf("firecracker: restore: %w", err)
	}
	if _, err := copyDisk(ctx, r.diskArt, r.spec.Disk); err != nil {
		return fmt.Errorf("firecracker: restore: disk: %w", err)
	}
	return nil
}

// bounded bounds ctx by the restore's deadline when it has none: the disk
// copy, the launch and the load share one SnapshotTimeout.
func (r *restoreRun) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithDeadline(ctx, r.deadline)
}

func (r *restoreRun) removeDisk(context.Context) error {
	if r.diskArt == "" {
		return nil
	}
	if err := os.Remove(r.spec.Disk); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// boot cold-boots the copied disk (kind "disk").
func (r *restoreRun) boot(ctx context.Context) (err error) {
	r.m, err = r.b.Start(ctx, r.spec)
	return err
}

func (r *restoreRun) stop(ctx context.Context) error { return r.b.Stop(ctx, r.m) }

func (r *restoreRun) pause(ctx context.Context) error { return r.b.Pause(ctx, r.m) }

// startVMM launches a fresh firecracker for the load. The interface exists
// in vmstate when the snapshot's metadata says so, or (for a snapshot
// without metadata) when the new spec asks for one; the Machine says
// which, so that Stop removes the TAP.
func (r *restoreRun) startVMM(ctx context.Context) error {
	hasNet := r.meta.NetworkIface != "" || (r.meta.Kind == "" && r.spec.Network)
	if r.spec.Network && !hasNet {
		noteLog(r.spec.Dir, "network requested but the snapshot has no network interface: the restored VM has none")
	}
	r.spec.Network = hasNet
	ctx, cancel := r.bounded(ctx)
	defer cancel()
	p, err := r.b.launch(ctx, r.spec)
	if err != nil {
		return err
	}
	r.p = p
	r.m = p.machine(r.spec)
	r.m.MemoryFile = r.memArt
	r.m.MemoryShared = false
	return nil
}

// killVMM ends the VMM and removes its sockets, links, pid file and TAP.
func (r *restoreRun) killVMM(context.Context) error {
	r.p.kill()
	cleanup(r.spec)
	return nil
}

// setupNetwork creates the VM's TAP device, when the snapshot has an
// interface.
func (r *restoreRun) setupNetwork(ctx context.Context) error {
	if !r.spec.Network {
		return nil
	}
	ctx, cancel := r.bounded(ctx)
	defer cancel()
	tap, err := setupTAP(ctx, r.spec)
	if err != nil {
		return r.p.explain("network", err, r.spec)
	}
	r.tap = tap
	return nil
}

// load has the VMM load the snapshot: PUT /snapshot/load with the memory
// file mapped privately, the new vsock socket and the new TAP.
func (r *restoreRun) load(ctx context.Context) error {
	ctx, cancel := r.bounded(ctx)
	defer cancel()
	load := fcapi.SnapshotLoad{
		SnapshotPath:  r.stateArt,
		MemBackend:    &fcapi.MemoryBackend{BackendType: fcapi.MemBackendFile, BackendPath: r.memArt},
		ResumeVM:      r.req.Resume,
		VsockOverride: &fcapi.VsockOverride{UDSPath: vsockSock(r.spec)},
	}
	if r.tap != "" {
		load.NetworkOverrides = []fcapi.NetworkOverride{{IfaceID: IfaceID, HostDevName: r.tap}}
	}
	c := fcapi.New(apiSock(r.spec))
	defer c.Close()
	if err := c.LoadSnapshot(ctx, load); err != nil {
		return r.p.explain("snapshot/load", err, r.spec)
	}
	return nil
}

// tapExists reports whether the VM's TAP device is present.
func tapExists(spec backend.Spec) bool {
	_, err := os.Stat("/sys/class/net/" + tapName(spec.ID))
	return err == nil
}
