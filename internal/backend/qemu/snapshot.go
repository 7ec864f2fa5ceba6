package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/qmp"
)

// Artifact file names inside a snapshot dir.
const (
	StateFile  = "state.bin"    // migration stream: device state (+ RAM for MemoryFormat "stream")
	MemoryFile = "memory.raw"   // sparse raw image of guest RAM (MemoryFormat "raw")
	DiskFile   = "disk.qcow2"   // disk: self-contained (full, disk) or relative to BaseImage (diff)
	ConfigFile = "qemu.json"    // launch configuration the restore must reproduce
	RoleConfig = "config"       // artifact role of ConfigFile
	maxBW      = int64(1) << 40 // migration bandwidth cap (the 128 MiB/s default throttles even a stopped VM)
)

// Memory formats (backend.SnapshotResult.MemoryFormat).
const (
	MemoryRaw    = "raw"
	MemoryStream = "stream"
)

// snapshotConfig records how the snapshotted QEMU was launched, so a
// restore reproduces the device configuration exactly.
type snapshotConfig struct {
	Version      int           `json:"version"`
	Machine      string        `json:"machine"`
	Accel        backend.Accel `json:"accel"`
	CPU          string        `json:"cpu"`
	MemoryMiB    int           `json:"memory_mib"`
	CPUs         int           `json:"cpus"`
	Network      bool          `json:"network"`
	MAC          string        `json:"mac,omitempty"`
	HasDisk      bool          `json:"has_disk"`
	Kind         string        `json:"kind"`
	MemoryFormat string        `json:"memory_format,omitempty"`
	IgnoreShared bool          `json:"x_ignore_shared,omitempty"`
	MappedRAM    bool          `json:"mapped_ram,omitempty"`
	QEMUVersion  string        `json:"qemu_version,omitempty"`
}

// launchFromCmdline recovers machine/accel/cpu from a running QEMU's argv.
func launchFromCmdline(argv []string) (machine string, accel backend.Accel, cpu string) {
	for i := 0; i+1 < len(argv); i++ {
		v := argv[i+1]
		switch argv[i] {
		case "-machine", "-M":
			machine, _, _ = strings.Cut(v, ",")
		case "-accel":
			a, _, _ := strings.Cut(v, ",")
			accel = backend.Accel(a)
		case "-cpu":
			cpu = v
		}
	}
	return
}

type migCap struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

func fileChannel(path string) []map[string]any {
	return []map[string]any{{
		"channel-type": "main",
		"addr":         map[string]any{"transport": "file", "filename": path, "offset": 0},
	}}
}

// setMigrationCaps sets the capabilities we use, explicitly on or off (an
// earlier snapshot of the same QEMU may have set them differently).
func setMigrationCaps(ctx context.Context, c *qmp.Client, ignoreShared, mappedRAM bool) error {
	caps := []migCap{
		{"x-ignore-shared", ignoreShared},
		{"mapped-ram", mappedRAM},
	}
	return execQMP(ctx, c, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil)
}

type migrateStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// waitMigration polls query-migrate until the migration completes or fails.
func waitMigration(ctx context.Context, c *qmp.Client, m backend.Machine, op string) error {
	delay := 2 * time.Millisecond
	for {
		var st migrateStatus
		if err := execQMP(ctx, c, "query-migrate", nil, &st); err != nil {
			if !processAlive(m) {
				return &backend.VMMError{Op: op, Message: "qemu exited during migration", Log: logTail(qemuLog(m.Dir))}
			}
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			msg := st.ErrorDesc
			if msg == "" {
				msg = "migration " + st.Status
			}
			return &backend.VMMError{Op: op, Message: msg, Log: logTail(qemuLog(m.Dir))}
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("qemu: %s: %w", op, ctx.Err())
		case <-t.C:
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// Snapshot pauses the VM and writes kind's artifacts into dir (see the
// package doc). The VM is left paused.
func (b *Backend) Snapshot(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
	switch kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return backend.SnapshotResult{}, fmt.Errorf("qemu: snapshot kind %q: %w", kind, backend.ErrUnsupported)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return backend.SnapshotResult{}, err
	}
	argv, ok := processCmdline(m)
	if !ok {
		return backend.SnapshotResult{}, fmt.Errorf("qemu: snapshot: %w", backend.ErrNotRunning)
	}
	machine, accel, cpu := launchFromCmdline(argv)
	if kind == backend.SnapshotDiff && m.Disk != "" && m.DiskFormat == "raw" {
		return backend.SnapshotResult{}, fmt.Errorf("qemu: diff snapshot of a raw disk: %w (take a full snapshot)", backend.ErrUnsupported)
	}

	c, err := b.dialQMP(ctx, m)
	if err != nil {
		return backend.SnapshotResult{}, err
	}
	defer c.Close()
	t0 := time.Now()
	if err := execQMP(ctx, c, "stop", nil, nil); err != nil {
		return backend.SnapshotResult{}, err
	}
	var st qmpStatus
	if err := execQMP(ctx, c, "query-status", nil, &st); err != nil {
		return backend.SnapshotResult{}, err
	}
	if st.Status == "postmigrate" {
		// Paused by an earlier snapshot: QEMU refuses to migrate again from
		// this state ("Can't migrate the vm that was paused due to previous
		// migration"). cont+stop re-activates the disk and returns to plain
		// "paused"; the guest runs for only a few microseconds.
		if err := execQMP(ctx, c, "cont", nil, nil); err != nil {
			return backend.SnapshotResult{}, err
		}
		if err := execQMP(ctx, c, "stop", nil, nil); err != nil {
			return backend.SnapshotResult{}, err
		}
	}
	if mapStatus(st) == backend.StatusError {
		return backend.SnapshotResult{}, &backend.VMMError{Op: "snapshot", Class: st.Status,
			Message: "the VM is in state " + st.Status + " and cannot be snapshotted", Log: logTail(qemuLog(m.Dir))}
	}

	cfg := snapshotConfig{
		Version: 1, Machine: machine, Accel: accel, CPU: cpu,
		MemoryMiB: m.MemoryMiB, CPUs: max(m.CPUs, 1), Network: m.Network, MAC: m.MAC,
		HasDisk: m.Disk != "", Kind: string(kind), QEMUVersion: c.Version().String(),
	}
	var res backend.SnapshotResult
	if kind != backend.SnapshotDisk {
		shared := m.MemoryShared && m.MemoryFile != ""
		cfg.IgnoreShared, cfg.MappedRAM = shared, !shared
		if err := setMigrationCaps(ctx, c, cfg.IgnoreShared, cfg.MappedRAM); err != nil {
			return res, err
		}
		if err := execQMP(ctx, c, "migrate-set-parameters", map[string]any{"max-bandwidth": maxBW}, nil); err != nil {
			return res, err
		}
		statePath := filepath.Join(dir, StateFile)
		if err := execQMP(ctx, c, "migrate", map[string]any{"channels": fileChannel(statePath)}, nil); err != nil {
			return res, err
		}
		if err := waitMigration(ctx, c, m, "migrate"); err != nil {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c.Execute(cctx, "migrate_cancel", nil, nil)
			cancel()
			return res, err
		}
		res.Artifacts = append(res.Artifacts, backend.Artifact{Role: "state", Name: StateFile})
		tMig := time.Since(t0)
		if shared {
			// Copy RAM while the disk is being written (both only read
			// files of the stopped VM).
			memDone := make(chan error, 1)
			go func() {
				// Not fsynced here: the caller flushes every artifact
				// while it hashes them (backend.Backend.Snapshot).
				n, err := copySparse(filepath.Join(dir, MemoryFile), m.MemoryFile, false)
				b.log.Debug("snapshot memory", "id", m.ID, "migrate", tMig, "copied", n, "total", time.Since(t0))
				memDone <- err
			}()
			diskErr := b.snapshotDisk(ctx, m, kind, dir, &res)
			if err := <-memDone; err != nil {
				return res, fmt.Errorf("qemu: snapshot memory: %w", err)
			}
			if diskErr != nil {
				return res, diskErr
			}
			res.MemoryFormat = MemoryRaw
			res.Artifacts = append(res.Artifacts, backend.Artifact{Role: "memory", Name: MemoryFile})
		} else {
			res.MemoryFormat = MemoryStream
			if err := b.snapshotDisk(ctx, m, kind, dir, &res); err != nil {
				return res, err
			}
		}
		cfg.MemoryFormat = res.MemoryFormat
	} else if err := b.snapshotDisk(ctx, m, kind, dir, &res); err != nil {
		return res, err
	}

	cb, _ := json.MarshalIndent(cfg, "", "  ")
	cfgPath := filepath.Join(dir, ConfigFile)
	if err := os.WriteFile(cfgPath, append(cb, '\n'), 0o644); err != nil {
		return res, fmt.Errorf("qemu: snapshot: %w", err)
	}
	res.Artifacts = append(res.Artifacts, backend.Artifact{Role: RoleConfig, Name: ConfigFile})
	// Nothing is fsynced here (see backend.Backend.Snapshot): on ext4 any
	// fsync commits the journal, which waits for every file's new data, so
	// one fsync here would flush the whole memory image before the caller
	// could overlap that flush with hashing it.
	b.log.Debug("snapshot done", "id", m.ID, "kind", kind, "elapsed", time.Since(t0))
	return res, nil
}

// snapshotDisk writes the disk artifact (if the VM has a disk) and records
// it in res.
func (b *Backend) snapshotDisk(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string, res *backend.SnapshotResult) error {
	if m.Disk == "" {
		return nil
	}
	dst := filepath.Join(dir, DiskFile)
	if kind == backend.SnapshotDiff {
		base, err := b.diffDisk(ctx, m, dst)
		if err != nil {
			return err
		}
		res.BaseImage = base
	} else if err := b.flattenDisk(ctx, m, dst); err != nil {
		return err
	}
	res.Artifacts = append(res.Artifacts, backend.Artifact{Role: "disk", Name: DiskFile})
	return nil
}

// flattenDisk writes a self-contained qcow2 of the VM's disk (whole backing
// chain) to dst, not fsynced. The VM must be paused (its writes flushed).
func (b *Backend) flattenDisk(ctx context.Context, m backend.Machine, dst string) error {
	format := m.DiskFormat
	if format == "" {
		format = "qcow2"
	}
	if err := b.qemuImg(ctx, "convert", "-U", "-f", format, "-O", "qcow2", m.Disk, dst); err != nil {
		return fmt.Errorf("qemu: snapshot disk: %w", err)
	}
	return nil // fsynced by the caller, see Snapshot
}

// diffDisk writes the VM's overlay to dst as a qcow2 whose backing file is
// the VM's base image (absolute path), which it returns. A VM restored from
// a snapshot has a deeper chain (overlay -> snapshot disk -> base); its copy
// is rebased onto the base so it depends on the base image only. Without a
// base image the disk is flattened and "" is returned.
func (b *Backend) diffDisk(ctx context.Context, m backend.Machine, dst string) (string, error) {
	if m.BaseDisk == "" {
		return "", b.flattenDisk(ctx, m, dst)
	}
	base, err := filepath.Abs(m.BaseDisk)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(base); err != nil {
		return "", fmt.Errorf("qemu: diff snapshot: base image %s: %w", base, errors.Join(backend.ErrBackingMissing, err))
	}
	ii, err := b.info(ctx, m.Disk)
	if err != nil {
		return "", fmt.Errorf("qemu: diff snapshot: %w", err)
	}
	if _, err := copySparse(dst, m.Disk, false); err != nil { // fsynced by the caller
		return "", fmt.Errorf("qemu: diff snapshot: %w", err)
	}
	if ii.backingPath() != base {
		bi, err := b.info(ctx, base)
		if err != nil {
			os.Remove(dst)
			return "", fmt.Errorf("qemu: diff snapshot: %w", err)
		}
		// Safe rebase: copies every cluster where the old chain differs from base.
		if err := b.qemuImg(ctx, "rebase", "-U", "-f", "qcow2", "-b", base, "-F", bi.Format, dst); err != nil {
			os.Remove(dst)
			return "", fmt.Errorf("qemu: diff snapshot: %w", err)
		}
	}
	return base, nil
}
