package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Restore starts a new QEMU from a snapshot. Memory snapshots are loaded
// with an incoming "file:" migration into a VM with the snapshotted device
// configuration; "raw" memory is mapped privately (copy-on-write) from the
// snapshot's memory image. Disk snapshots cold-boot. The new VM writes to a
// fresh qcow2 overlay (req.Spec.Disk, default Dir/disk.qcow2) whose backing
// file is the snapshot's disk: snapshot files are never modified.
func (b *Backend) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	return b.restore(ctx, req, helperOpts{})
}

// helperOpts adapt restore to normalize's short-lived helper VM.
type helperOpts struct {
	dieWithParent bool                  // QEMU is killed when the launching thread exits
	launched      func(backend.Machine) // called once QEMU is up, before the state loads
}

// restore is Restore, with the helper's options.
func (b *Backend) restore(ctx context.Context, req backend.RestoreRequest, h helperOpts) (backend.Machine, error) {
	spec := req.Spec
	kind := req.Kind
	switch kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return backend.Machine{}, fmt.Errorf("qemu: restore kind %q: %w", kind, backend.ErrUnsupported)
	}
	snapDir, err := filepath.Abs(req.SnapshotDir)
	if err != nil {
		return backend.Machine{}, err
	}
	arts := map[string]string{}
	for _, a := range req.Result.Artifacts {
		arts[a.Role] = filepath.Join(snapDir, a.Name)
	}
	for role, p := range arts {
		if _, err := os.Stat(p); err != nil {
			return backend.Machine{}, fmt.Errorf("qemu: restore: snapshot %s file missing: %w", role, err)
		}
	}
	var cfg *snapshotConfig
	if p := arts[RoleConfig]; p != "" {
		cfg, err = readSnapshotConfig(p)
		if err != nil {
			return backend.Machine{}, err
		}
	}
	format := req.Result.MemoryFormat
	if kind != backend.SnapshotDisk {
		if arts["state"] == "" {
			return backend.Machine{}, fmt.Errorf("qemu: restore: snapshot has no state artifact (%s)", StateFile)
		}
		switch format {
		case MemoryRaw:
			if arts["memory"] == "" {
				return backend.Machine{}, fmt.Errorf("qemu: restore: snapshot has no memory artifact (%s)", MemoryFile)
			}
			st, err := os.Stat(arts["memory"])
			if err != nil {
				return backend.Machine{}, fmt.Errorf("qemu: restore: %w", err)
			}
			if want := int64(spec.MemoryMiB) << 20; st.Size() != want {
				return backend.Machine{}, fmt.Errorf("qemu: restore: memory image is %d MiB but the spec asks for %d MiB; restore with the snapshot's memory size",
					st.Size()>>20, spec.MemoryMiB)
			}
		case MemoryStream:
		default:
			return backend.Machine{}, fmt.Errorf("qemu: restore: unknown memory format %q", format)
		}
	}
	if cfg != nil {
		if cfg.MemoryMiB != spec.MemoryMiB && kind != backend.SnapshotDisk {
			return backend.Machine{}, fmt.Errorf("qemu: restore: snapshot has %d MiB of memory but the spec asks for %d MiB", cfg.MemoryMiB, spec.MemoryMiB)
		}
		if kind != backend.SnapshotDisk && (cfg.CPUs != max(spec.CPUs, 1) || cfg.Network != spec.Network) {
			return backend.Machine{}, fmt.Errorf("qemu: restore: the spec must match the snapshot (cpus %d, network %v); got cpus %d, network %v",
				cfg.CPUs, cfg.Network, max(spec.CPUs, 1), spec.Network)
		}
	}

	// Pre-flight the disk's backing chain: QEMU would only exit with
	// "Could not open backing file".
	snapDisk := arts["disk"]
	if snapDisk != "" {
		if err := b.checkBacking(ctx, snapDisk, req.Result.BaseImage); err != nil {
			return backend.Machine{}, err
		}
	} else if cfg != nil && cfg.HasDisk {
		return backend.Machine{}, fmt.Errorf("qemu: restore: snapshot has no disk artifact but the VM had a disk")
	}

	// New writable overlay over the snapshot's disk.
	if err := fsutil.PrivateDir(spec.Dir); err != nil {
		return backend.Machine{}, fmt.Errorf("qemu: restore: %w", err)
	}
	createdDisk := ""
	if snapDisk != "" {
		if spec.Disk == "" {
			spec.Disk = filepath.Join(spec.Dir, DiskFile)
		}
		if _, err := os.Lstat(spec.Disk); err == nil {
			return backend.Machine{}, fmt.Errorf("qemu: restore: disk %s: %w", spec.Disk, fs.ErrExist)
		}
		if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", snapDisk, spec.Disk); err != nil {
			return backend.Machine{}, fmt.Errorf("qemu: restore: %w", err)
		}
		createdDisk = spec.Disk
		if err := private(spec.Disk); err != nil {
			os.Remove(spec.Disk)
			return backend.Machine{}, err
		}
		spec.DiskFormat = "qcow2"
	} else {
		spec.Disk, spec.DiskFormat = "", ""
	}
	fail := func(err error) (backend.Machine, error) {
		if createdDisk != "" {
			os.Remove(createdDisk)
		}
		return backend.Machine{}, err
	}

	l, err := b.freshLaunch(spec)
	if err != nil {
		return fail(err)
	}
	if kind == backend.SnapshotDisk {
		l.StartPaused = !req.Resume
		m, err := b.launch(ctx, spec, l)
		if err != nil {
			return fail(err)
		}
		return m, nil
	}

	ignoreShared, mappedRAM := applySnapshotLaunch(&l, cfg, format, arts["memory"])
	l.DieWithParent = h.dieWithParent
	t0 := time.Now()
	m, err := b.launch(ctx, spec, l)
	if err != nil {
		return fail(err)
	}
	if h.launched != nil {
		h.launched(m)
	}
	abort := func(err error) (backend.Machine, error) {
		var ve *backend.VMMError
		if errors.As(err, &ve) && ve.Log == "" {
			ve.Log = logTail(qemuLog(spec.Dir))
		}
		kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		b.Stop(kctx, m)
		cancel()
		return fail(err)
	}
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		return abort(err)
	}
	defer c.Close()
	if err := setMigrationCaps(ctx, c, ignoreShared, mappedRAM); err != nil {
		return abort(err)
	}
	// Opened by us and handed over: a QEMU that dropped its privileges
	// cannot open the snapshot's path.
	sf, err := os.Open(arts["state"])
	if err != nil {
		return abort(fmt.Errorf("qemu: restore: %w", err))
	}
	fdPath, release, err := passFile(ctx, c, sf, "restore-state")
	sf.Close()
	if err != nil {
		return abort(err)
	}
	err = execQMP(ctx, c, "migrate-incoming", map[string]any{
		"channels":      fileChannel(fdPath),
		"exit-on-error": false,
	}, nil)
	release()
	if err != nil {
		return abort(err)
	}
	if err := waitMigration(ctx, c, m, "migrate-incoming"); err != nil {
		return abort(err)
	}
	tLoad := time.Since(t0)
	if req.Resume {
		if err := execQMP(ctx, c, "cont", nil, nil); err != nil {
			return abort(err)
		}
	}
	b.log.Debug("restored", "id", spec.ID, "format", format, "load", tLoad, "total", time.Since(t0))
	return m, nil
}

func readSnapshotConfig(path string) (*snapshotConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("qemu: restore: %w", err)
	}
	var cfg snapshotConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("qemu: restore: %s: %w", path, err)
	}
	return &cfg, nil
}

// checkBacking verifies every backing file below disk exists, and that the
// recorded base image exists. A missing one yields ErrBackingMissing naming
// the path.
func (b *Backend) checkBacking(ctx context.Context, disk, baseImage string) error {
	missing := func(path, of string) error {
		return fmt.Errorf("qemu: restore: %s needs backing image %s, which is missing: %w; "+
			"restore it to that path, or take a full snapshot (self-contained) next time", of, path, backend.ErrBackingMissing)
	}
	if baseImage != "" {
		if _, err := os.Stat(baseImage); err != nil {
			return missing(baseImage, disk)
		}
	}
	// A snapshot's disk artifact is qcow2; chains here are at most a few deep.
	cur, format := disk, "qcow2"
	for range 16 {
		ii, err := b.info(ctx, cur, format)
		if err != nil {
			return fmt.Errorf("qemu: restore: %w", err)
		}
		bp := ii.backingPath()
		if bp == "" {
			return nil
		}
		if _, err := os.Stat(bp); err != nil {
			return missing(bp, cur)
		}
		// smolvm records every backing file's format (-F); one without is
		// not ours, and probing it is what explicit formats avoid.
		if format = ii.BackingFilenameFormat; checkImageFormat(format) != nil {
			return fmt.Errorf("qemu: restore: %s has backing file %s of format %q: want qcow2 or raw recorded in the image; take a new snapshot",
				cur, bp, format)
		}
		cur = bp
	}
	return nil
}

// applySnapshotLaunch turns a fresh launch into the one that loads a memory
// snapshot: the snapshotted machine type and CPU model (the device layout
// must match), the RAM image mapped privately and read-only for "raw"
// memory (constant time, copy-on-write: the file is never modified and not
// ours to delete on Stop), -incoming defer and -S. It returns the migration
// capabilities to set before migrate-incoming. Restore and RestoreArgv (the
// benchmarks' bare-QEMU baseline) share it, so they launch the same QEMU.
func applySnapshotLaunch(l *launch, cfg *snapshotConfig, format, memory string) (ignoreShared, mappedRAM bool) {
	mappedRAM = true
	if cfg != nil {
		if cfg.Machine != "" {
			l.Machine = cfg.Machine
			if l.Machine != MachineMicrovm {
				l.TSCkHz = 0
			}
		}
		if cfg.CPU != "" && cfg.Accel == l.Accel {
			l.CPU = cfg.CPU
		}
		ignoreShared, mappedRAM = cfg.IgnoreShared, cfg.MappedRAM
	}
	if format == MemoryRaw {
		l.MemoryFile, l.MemoryShared, l.MemoryReadonly = memory, false, true
		ignoreShared = true
	}
	l.Incoming, l.StartPaused, l.NoKernel = true, true, true
	return ignoreShared, mappedRAM
}
