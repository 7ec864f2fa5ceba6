package qemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
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
	MemoryRaw    = backend.MemoryRaw
	MemoryStream = backend.MemoryStream
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
	return execQMP(ctx, c, "migrate-set-capabilities", map[string]any{"capabilities": migrationCaps(ignoreShared, mappedRAM)}, nil)
}

// migrationCaps are the migration capabilities a snapshot or restore sets.
func migrationCaps(ignoreShared, mappedRAM bool) []migCap {
	return []migCap{
		{"x-ignore-shared", ignoreShared},
		{"mapped-ram", mappedRAM},
	}
}

type migrateStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// waitMigration polls query-migrate until the migration completes or fails.
func waitMigration(ctx context.Context, c *qmp.Client, m backend.Machine, op string) error {
	st, err := pollMigration(ctx, c, m, op, func(s string) bool {
		return s == "completed" || s == "failed" || s == "cancelled"
	})
	if err != nil || st.Status == "completed" {
		return err
	}
	msg := st.ErrorDesc
	if msg == "" {
		msg = "migration " + st.Status
	}
	return &backend.VMMError{Op: op, Message: msg, Log: logTail(qemuLog(m.Dir))}
}

// pollMigration polls query-migrate until final(status) and returns that
// status: every millisecond for the first ten polls (a restore's incoming
// migration of a raw-memory snapshot loads in 2-5 ms, and a restore waits
// on this: a 2, 4, 8 ms backoff found it done up to 4 ms late), then with
// a backoff up to 10 ms.
func pollMigration(ctx context.Context, c *qmp.Client, m backend.Machine, op string, final func(string) bool) (migrateStatus, error) {
	delay := time.Millisecond
	for i := 1; ; i++ {
		var st migrateStatus
		if err := execQMP(ctx, c, "query-migrate", nil, &st); err != nil {
			if !processAlive(m) {
				return st, &backend.VMMError{Op: op, Message: "qemu exited during migration", Log: logTail(qemuLog(m.Dir))}
			}
			return st, err
		}
		if final(st.Status) {
			return st, nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return st, fmt.Errorf("qemu: %s (migration %s): %w", op, st.Status, ctx.Err())
		case <-t.C:
		}
		if i >= 10 {
			delay = min(delay*2, 10*time.Millisecond) // query-migrate is cheap
		}
	}
}

// migrationDone reports whether a query-migrate status is final (or no
// migration ever ran).
func migrationDone(status string) bool {
	switch status {
	case "", "none", "completed", "failed", "cancelled":
		return true
	}
	return false
}

// endOrphanedMigration cancels a migration in flight and waits until it has
// ended. Callers serialize operations on a machine (see backend.Backend),
// so a migration found by one of them was started by a snapshot whose
// process died (killed mid-create): QEMU carries on without its client,
// writing into a directory that the next create sweeps, and stops the VM
// when it completes.
func (b *Backend) endOrphanedMigration(ctx context.Context, c *qmp.Client, m backend.Machine) error {
	var st migrateStatus
	if err := execQMP(ctx, c, "query-migrate", nil, &st); err != nil || migrationDone(st.Status) {
		return err
	}
	b.log.Warn("cancelling a migration left by an interrupted snapshot", "id", m.ID, "status", st.Status)
	if err := execQMP(ctx, c, "migrate_cancel", nil, nil); err != nil {
		return err
	}
	_, err := pollMigration(ctx, c, m, "migrate_cancel", migrationDone)
	return err
}

// Snapshot pauses the VM and writes kind's artifacts into dir (see the
// package doc). The VM is left paused.
//
// A VM whose RAM is not a shared file (one restored from a snapshot maps it
// privately) cannot leave RAM out of the migration, so its RAM is first
// saved inside the stream; that snapshot is then restored, paused, into a
// short-lived QEMU whose RAM is a shared file, and snapshotted again from
// there as a raw, mappable image (see normalize). Snapshots of restored VMs
// therefore restore and fork in constant time too, at the price of a
// slower create. Should that step fail, the stream snapshot is kept.
func (b *Backend) Snapshot(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
	res, err := b.snapshot(ctx, m, kind, dir)
	if err != nil || res.MemoryFormat != MemoryStream {
		return res, err
	}
	return b.normalize(ctx, m, kind, dir, res)
}

// snapshot is Snapshot without the normalization of stream snapshots.
func (b *Backend) snapshot(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
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
	if err := b.endOrphanedMigration(ctx, c, m); err != nil {
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
		// We create the state file (0600) and hand QEMU the descriptor:
		// a QEMU that dropped its privileges cannot open paths.
		sf, err := createPrivate(filepath.Join(dir, StateFile))
		if err != nil {
			return res, fmt.Errorf("qemu: snapshot: %w", err)
		}
		fdPath, release, err := passFile(ctx, c, sf, "snapshot-state")
		sf.Close()
		if err != nil {
			return res, err
		}
		err = execQMP(ctx, c, "migrate", map[string]any{"channels": fileChannel(fdPath)}, nil)
		release() // QEMU opened its own duplicate (or failed)
		if err != nil {
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
				// Not flushed here: the caller flushes every artifact
				// while it hashes them (backend.Backend.Snapshot), after
				// the VM runs again (see flushNone).
				n, err := copySparse(filepath.Join(dir, MemoryFile), m.MemoryFile, flushNone)
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
	if err := os.WriteFile(cfgPath, append(cb, '\n'), 0o600); err != nil {
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

// normalize turns the stream snapshot res in dir into a raw one: the stream
// artifacts move to dir/.stream, a paused QEMU restores them into a shared
// RAM file (its dir inside dir, its RunDir next to m's), and a snapshot of
// that QEMU (which never runs) is written to dir. On failure the stream
// snapshot is put back and returned, with the reason logged.
func (b *Backend) normalize(ctx context.Context, m backend.Machine, kind backend.SnapshotKind, dir string, res backend.SnapshotResult) (backend.SnapshotResult, error) {
	t0 := time.Now()
	sdir := filepath.Join(dir, ".stream")
	tdir := filepath.Join(dir, ".norm")
	moved, err := moveArtifacts(res.Artifacts, dir, sdir)
	if err != nil {
		moveArtifacts(moved, sdir, dir)
		os.RemoveAll(sdir)
		return res, nil // the stream snapshot is intact in dir
	}
	keepStream := func(why error) (backend.SnapshotResult, error) {
		b.log.Warn("snapshot of a restored VM kept in stream format (restores will read its RAM)", "id", m.ID, "err", why)
		os.RemoveAll(tdir)
		for _, a := range res.Artifacts {
			os.Remove(filepath.Join(dir, a.Name)) // partial raw artifacts
		}
		os.Remove(filepath.Join(dir, MemoryFile)) // the one raw artifact the stream form lacks
		if _, err := moveArtifacts(res.Artifacts, sdir, dir); err != nil {
			return res, fmt.Errorf("qemu: snapshot: restoring the stream artifacts: %w", err)
		}
		os.RemoveAll(sdir)
		return res, nil
	}

	base := filepath.Dir(m.RunDir)
	sweepHelperRunDirs(base)
	spec := m.Spec
	spec.ID = m.ID + "-norm"
	spec.Dir = tdir
	// Short (it holds sockets), and named after this process so that a
	// later normalize can remove it should this process die.
	spec.RunDir = filepath.Join(base, fmt.Sprintf("%s%d-%s", helperRunPrefix, os.Getpid(), randHex(4)))
	spec.Disk, spec.DiskFormat = "", ""
	spec.PortForwards = nil // the source still holds its host ports
	defer os.RemoveAll(spec.RunDir)

	// The helper QEMU dies with this thread (Pdeathsig) should the process
	// be killed meanwhile; the thread is held until the QEMU is stopped.
	// Its RAM file is unlinked as soon as QEMU has mapped it, so the kernel
	// frees it with the helper whatever happens; the copy reads it through
	// our own descriptor.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var ram *os.File
	defer func() {
		if ram != nil {
			ram.Close()
		}
	}()
	tm, err := b.restore(ctx, backend.RestoreRequest{Spec: spec, SnapshotDir: sdir, Kind: kind, Result: res}, helperOpts{
		dieWithParent: true,
		launched: func(hm backend.Machine) {
			if f, err := os.Open(hm.MemoryFile); err == nil {
				ram = f
				os.Remove(hm.MemoryFile)
				os.Remove(filepath.Dir(hm.MemoryFile)) // its smolvm-* dir, when empty
			}
		},
	})
	if err != nil {
		return keepStream(err)
	}
	tmc := tm
	if ram != nil {
		tmc.MemoryFile = fmt.Sprintf("/proc/self/fd/%d", ram.Fd())
	}
	raw, err := b.snapshot(ctx, tmc, kind, dir)
	if err == nil && raw.MemoryFormat != MemoryRaw {
		err = fmt.Errorf("the helper VM gave memory format %q", raw.MemoryFormat)
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	stopErr := b.Stop(sctx, tm)
	cancel()
	if err != nil {
		return keepStream(err)
	}
	if stopErr != nil {
		b.log.Warn("stopping the snapshot helper VM", "id", spec.ID, "err", stopErr)
	}
	if kind == backend.SnapshotDiff {
		raw.BaseImage = res.BaseImage
	}
	os.RemoveAll(sdir)
	os.RemoveAll(tdir)
	b.log.Debug("snapshot of a restored VM made mappable", "id", m.ID, "elapsed", time.Since(t0))
	return raw, nil
}

// helperRunPrefix starts the RunDir of normalize's helper VMs; the rest is
// the creating process's pid and a nonce.
const helperRunPrefix = "norm-"

// sweepHelperRunDirs removes helper RunDirs under base whose creating
// process is gone (its helper QEMU died with it).
func sweepHelperRunDirs(base string) {
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), helperRunPrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			// A helper that dropped its uid lost its Pdeathsig: kill it.
			if qpid := findQEMU(filepath.Join(base, e.Name())); qpid > 0 {
				syscall.Kill(qpid, syscall.SIGKILL)
			}
			os.RemoveAll(filepath.Join(base, e.Name()))
		}
	}
}

// moveArtifacts renames the named files from one dir to another and
// returns those it moved.
func moveArtifacts(arts []backend.Artifact, from, to string) ([]backend.Artifact, error) {
	if err := os.MkdirAll(to, 0o700); err != nil {
		return nil, err
	}
	var moved []backend.Artifact
	for _, a := range arts {
		if err := os.Rename(filepath.Join(from, a.Name), filepath.Join(to, a.Name)); err != nil {
			return moved, err
		}
		moved = append(moved, a)
	}
	return moved, nil
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
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
	format := diskFormat(m)
	if err := b.qemuImg(ctx, "convert", "-U", "-f", format, "-O", "qcow2", m.Disk, dst); err != nil {
		return fmt.Errorf("qemu: snapshot disk: %w", err)
	}
	return private(dst) // fsynced by the caller, see Snapshot
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
	ii, err := b.info(ctx, m.Disk, diskFormat(m))
	if err != nil {
		return "", fmt.Errorf("qemu: diff snapshot: %w", err)
	}
	if _, err := copySparse(dst, m.Disk, flushNone); err != nil { // fsynced by the caller
		return "", fmt.Errorf("qemu: diff snapshot: %w", err)
	}
	if ii.backingPath() != base {
		// The base is the raw root filesystem Prepare put under every
		// overlay (-F raw there too). Safe rebase: copies every cluster
		// where the old chain differs from base.
		if err := b.qemuImg(ctx, "rebase", "-U", "-f", "qcow2", "-b", base, "-F", "raw", dst); err != nil {
			os.Remove(dst)
			return "", fmt.Errorf("qemu: diff snapshot: %w", err)
		}
	}
	return base, nil
}
