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
func (b *Backend) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	spec, err := absSpec(req.Spec)
	if err != nil {
		return backend.Machine{}, err
	}
	switch req.Kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return backend.Machine{}, fmt.Errorf("firecracker: restore kind %q: %w", req.Kind, backend.ErrUnsupported)
	}
	if err := checkSpec(spec, req.Kind == backend.SnapshotDisk); err != nil {
		return backend.Machine{}, err
	}
	if b.jailFor(spec) != nil {
		return backend.Machine{}, fmt.Errorf("firecracker: restore: %w", errJailedSnapshot)
	}
	snapDir, err := filepath.Abs(req.SnapshotDir)
	if err != nil {
		return backend.Machine{}, err
	}
	art := func(role, def string) (string, error) {
		name := def
		for _, a := range req.Result.Artifacts {
			if a.Role == role {
				name = a.Name
			}
		}
		p := filepath.Join(snapDir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("firecracker: restore: %s artifact: %w", role, err)
		}
		return p, nil
	}
	hasRole := func(role string) bool {
		for _, a := range req.Result.Artifacts {
			if a.Role == role {
				return true
			}
		}
		return false
	}
	var diskArt string
	switch {
	case spec.Disk != "":
		if diskArt, err = art("disk", diskFile); err != nil {
			return backend.Machine{}, err
		}
	case hasRole("disk"):
		return backend.Machine{}, errors.New("firecracker: restore: the snapshot has a disk but the spec has no Disk to restore it to")
	}
	var meta snapshotMeta
	if mb, err := os.ReadFile(filepath.Join(snapDir, metaFile)); err == nil {
		_ = json.Unmarshal(mb, &meta)
	}

	var stateArt, memArt string
	if req.Kind != backend.SnapshotDisk {
		if stateArt, err = art("state", stateFile); err != nil {
			return backend.Machine{}, err
		}
		if memArt, err = art("memory", memoryFile); err != nil {
			return backend.Machine{}, err
		}
		if meta.DrivePath != "" && meta.DrivePath != driveLinkName {
			return backend.Machine{}, fmt.Errorf("firecracker: restore: snapshot pins drive path %q, this backend attaches %q", meta.DrivePath, driveLinkName)
		}
		if meta.NetworkIface != "" && os.Geteuid() != 0 {
			return backend.Machine{}, fmt.Errorf("firecracker: restore: the snapshot has a network interface; restoring it needs root for a TAP device: %w", backend.ErrUnsupported)
		}
	}

	tctx, cancel := withDefaultTimeout(ctx, b.snapTTL)
	defer cancel()
	if diskArt != "" {
		if err := os.MkdirAll(filepath.Dir(spec.Disk), 0o700); err != nil {
			return backend.Machine{}, fmt.Errorf("firecracker: restore: %w", err)
		}
		if _, err := copyDisk(tctx, diskArt, spec.Disk); err != nil {
			return backend.Machine{}, fmt.Errorf("firecracker: restore: disk: %w", err)
		}
	}
	removeDisk := func() {
		if diskArt != "" {
			_ = os.Remove(spec.Disk)
		}
	}

	// On failure the disk copy made above goes too: the new machine never
	// existed.
	if req.Kind == backend.SnapshotDisk {
		m, err := b.Start(ctx, spec)
		if err != nil {
			removeDisk()
			return backend.Machine{}, err
		}
		if !req.Resume {
			if err := b.Pause(ctx, m); err != nil {
				_ = b.Stop(context.Background(), m)
				removeDisk()
				return backend.Machine{}, err
			}
		}
		return m, nil
	}

	// The interface exists in vmstate when the snapshot's metadata says so,
	// or (for a snapshot without metadata) when the new spec asks for one.
	// The returned Machine says which, so that Stop removes the TAP.
	hasNet := meta.NetworkIface != "" || (meta.Kind == "" && spec.Network)
	if spec.Network && !hasNet {
		noteLog(spec.Dir, "network requested but the snapshot has no network interface: the restored VM has none")
	}
	spec.Network = hasNet

	p, err := b.launch(tctx, spec)
	if err != nil {
		removeDisk()
		return backend.Machine{}, err
	}
	m := p.machine(spec)
	m.MemoryFile = memArt
	m.MemoryShared = false
	fail := func(op string, err error) (backend.Machine, error) {
		err = p.fail(op, err, spec)
		removeDisk()
		return backend.Machine{}, err
	}
	load := fcapi.SnapshotLoad{
		SnapshotPath:  stateArt,
		MemBackend:    &fcapi.MemoryBackend{BackendType: fcapi.MemBackendFile, BackendPath: memArt},
		ResumeVM:      req.Resume,
		VsockOverride: &fcapi.VsockOverride{UDSPath: vsockSock(spec)},
	}
	if hasNet {
		tap, err := setupTAP(tctx, spec)
		if err != nil {
			return fail("network", err)
		}
		if tap != "" {
			load.NetworkOverrides = []fcapi.NetworkOverride{{IfaceID: IfaceID, HostDevName: tap}}
		}
	}
	c := fcapi.New(apiSock(spec))
	defer c.Close()
	if err := c.LoadSnapshot(tctx, load); err != nil {
		return fail("snapshot/load", err)
	}
	return m, nil
}

// tapExists reports whether the VM's TAP device is present.
func tapExists(spec backend.Spec) bool {
	_, err := os.Stat("/sys/class/net/" + tapName(spec.ID))
	return err == nil
}
