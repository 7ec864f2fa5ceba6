package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/qmp"
	"github.com/smolvm-go/smolvm/internal/steps"
)

// Restore starts a new QEMU from a snapshot. Memory snapshots are loaded
// with an incoming "file:" migration into a VM with the snapshotted device
// configuration; "raw" memory is mapped privately (copy-on-write) from the
// snapshot's memory image. Disk snapshots cold-boot. The new VM writes to a
// fresh qcow2 overlay (req.Spec.Disk, default Dir/disk.qcow2) whose backing
// file is the snapshot's disk: snapshot files are never modified.
//
// It plans the restore (PlanRestore: every check of the snapshot against
// the spec, before anything is created), then runs the plan as named steps
// (see runRestore) whose undos remove what a failed restore created.
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
	p, err := b.PlanRestore(req)
	if err != nil {
		return backend.Machine{}, err
	}
	p.launch.DieWithParent = h.dieWithParent
	return b.runRestore(ctx, p, h.launched)
}

// RestorePlan is what Restore does for one snapshot, decided before any
// file or process exists: the disk overlay to create, the QEMU to launch,
// and the QMP commands that load and resume it. Restore runs it; the
// benchmarks drive a bare QEMU with the same plan (Args, QMP) to time the
// baseline.
type RestorePlan struct {
	Kind backend.SnapshotKind
	// Spec is the new machine as launched: Disk is the overlay (qcow2),
	// or empty when the snapshot has no disk.
	Spec backend.Spec
	// Overlay is the writable disk to create before the launch: a qcow2
	// at Overlay.Path whose backing file (qcow2) is Overlay.Backing, the
	// snapshot's disk. Empty Path: no disk.
	Overlay Overlay
	// BaseImage is the image a diff snapshot's disk depends on ("" none);
	// the executor checks the disk's whole backing chain exists.
	BaseImage string
	// Args is QEMU's argv (without the binary). For a memory snapshot:
	// the snapshotted machine type and CPU model, RAM mapped privately and
	// read-only from the memory image ("raw") or a fresh shared file
	// ("stream", whose directory the launcher creates), no kernel,
	// -incoming defer, -S. For a disk snapshot: a cold boot, -S unless
	// resuming. Restore launches exactly this, plus QEMU's privilege drop
	// (-run-with, when smolvm runs as root and the spec has a uid) and the
	// network sidecar's descriptor in place of user networking.
	Args []string
	// QMPSocket and AgentSocket are where QEMU listens (agent port 0).
	QMPSocket, AgentSocket string
	// MemoryFile is the file backing guest RAM; MemoryFormat the
	// snapshot's ("" for a disk snapshot).
	MemoryFile, MemoryFormat string
	// StateFile is the migration stream migrate-incoming reads ("" for a
	// disk snapshot, which cold-boots).
	StateFile string
	// QMP are the commands to run, in order, once QMP answers.
	QMP []QMPCommand

	launch launch
}

// Overlay is a qcow2 file to create over a backing qcow2.
type Overlay struct{ Path, Backing string }

// QMPCommand is one step of a plan's QMP sequence.
type QMPCommand struct {
	Step      string // what it does, the step's name in errors: "load state"
	Execute   string
	Arguments map[string]any
	// InputFile, when set, is the file the command's "file" channel reads.
	// Restore opens it and hands QEMU the descriptor (add-fd), and the
	// channel reads /dev/fdset/N instead: a QEMU that dropped its
	// privileges cannot open the path. An unconfined QEMU may open it.
	InputFile string
	// AwaitMigration: once the command returns, poll query-migrate until
	// the migration completed (an error when it failed).
	AwaitMigration bool
}

// withInput returns the command's arguments with its file channel reading
// path (the fdset QEMU got the input file as).
func (q QMPCommand) withInput(path string) map[string]any {
	args := maps.Clone(q.Arguments)
	args["channels"] = fileChannel(path)
	return args
}

// PlanRestore checks req's snapshot against its spec and returns the plan
// Restore runs: the artifacts listed must exist, the memory image, the
// snapshot's recorded resources (qemu.json) and the spec must agree, and
// a snapshot of a VM with a disk must carry one. It reads the snapshot's
// files but changes nothing.
func (b *Backend) PlanRestore(req backend.RestoreRequest) (RestorePlan, error) {
	spec, kind := req.Spec, req.Kind
	switch kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return RestorePlan{}, fmt.Errorf("qemu: restore kind %q: %w", kind, backend.ErrUnsupported)
	}
	snapDir, err := filepath.Abs(req.SnapshotDir)
	if err != nil {
		return RestorePlan{}, err
	}
	arts := map[string]string{}
	for _, a := range req.Result.Artifacts {
		arts[a.Role] = filepath.Join(snapDir, a.Name)
	}
	for role, p := range arts {
		if _, err := os.Stat(p); err != nil {
			return RestorePlan{}, fmt.Errorf("qemu: restore: snapshot %s file missing: %w", role, err)
		}
	}
	var cfg *snapshotConfig
	if p := arts[RoleConfig]; p != "" {
		if cfg, err = readSnapshotConfig(p); err != nil {
			return RestorePlan{}, err
		}
	}
	format := req.Result.MemoryFormat
	if kind != backend.SnapshotDisk {
		if arts["state"] == "" {
			return RestorePlan{}, fmt.Errorf("qemu: restore: snapshot has no state artifact (%s)", StateFile)
		}
		switch format {
		case MemoryRaw:
			if arts["memory"] == "" {
				return RestorePlan{}, fmt.Errorf("qemu: restore: snapshot has no memory artifact (%s)", MemoryFile)
			}
			st, err := os.Stat(arts["memory"])
			if err != nil {
				return RestorePlan{}, fmt.Errorf("qemu: restore: %w", err)
			}
			if want := int64(spec.MemoryMiB) << 20; st.Size() != want {
				return RestorePlan{}, fmt.Errorf("qemu: restore: memory image is %d MiB but the spec asks for %d MiB; restore with the snapshot's memory size",
					st.Size()>>20, spec.MemoryMiB)
			}
		case MemoryStream:
		default:
			return RestorePlan{}, fmt.Errorf("qemu: restore: unknown memory format %q", format)
		}
	}
	if cfg != nil && kind != backend.SnapshotDisk {
		if cfg.MemoryMiB != spec.MemoryMiB {
			return RestorePlan{}, fmt.Errorf("qemu: restore: snapshot has %d MiB of memory but the spec asks for %d MiB", cfg.MemoryMiB, spec.MemoryMiB)
		}
		if cfg.CPUs != max(spec.CPUs, 1) || cfg.Network != spec.Network {
			return RestorePlan{}, fmt.Errorf("qemu: restore: the spec must match the snapshot (cpus %d, network %v); got cpus %d, network %v",
				cfg.CPUs, cfg.Network, max(spec.CPUs, 1), spec.Network)
		}
	}
	p := RestorePlan{Kind: kind, BaseImage: req.Result.BaseImage}
	if snapDisk := arts["disk"]; snapDisk != "" {
		if spec.Disk == "" {
			spec.Disk = filepath.Join(spec.Dir, DiskFile)
		}
		spec.DiskFormat = "qcow2"
		p.Overlay = Overlay{Path: spec.Disk, Backing: snapDisk}
	} else if cfg != nil && cfg.HasDisk {
		return RestorePlan{}, fmt.Errorf("qemu: restore: snapshot has no disk artifact but the VM had a disk")
	} else {
		spec.Disk, spec.DiskFormat = "", ""
	}
	l, err := b.freshLaunch(spec)
	if err != nil {
		return RestorePlan{}, err
	}
	if kind == backend.SnapshotDisk {
		l.StartPaused = !req.Resume
	} else {
		ignoreShared, mappedRAM := applySnapshotLaunch(&l, cfg, format, arts["memory"])
		p.MemoryFormat, p.StateFile = format, arts["state"]
		p.QMP = []QMPCommand{
			{Step: "set capabilities", Execute: "migrate-set-capabilities",
				Arguments: map[string]any{"capabilities": migrationCaps(ignoreShared, mappedRAM)}},
			{Step: "load state", Execute: "migrate-incoming",
				Arguments: map[string]any{"channels": fileChannel(p.StateFile), "exit-on-error": false},
				InputFile: p.StateFile, AwaitMigration: true},
		}
		if req.Resume {
			p.QMP = append(p.QMP, QMPCommand{Step: "resume", Execute: "cont"})
		}
	}
	if p.Args, err = buildArgs(spec, l); err != nil {
		return RestorePlan{}, err
	}
	p.Spec, p.launch = spec, l
	p.MemoryFile = l.MemoryFile
	p.QMPSocket, p.AgentSocket = qmpSocket(spec.RunDir), agentSocket(spec.RunDir)
	return p, nil
}

// runRestore runs p as named steps (steps.Run): check backing and create
// disk (when the snapshot has a disk), start vmm, then for a memory
// snapshot connect qmp and one step per QMP command: set capabilities,
// load state and, with Resume, resume. When a step fails
// the ones before it are undone, newest first: QEMU is stopped and the
// overlay removed. launched, when set, is called once QEMU is up.
func (b *Backend) runRestore(ctx context.Context, p RestorePlan, launched func(backend.Machine)) (backend.Machine, error) {
	var (
		m  backend.Machine
		c  *qmp.Client
		t0 time.Time
	)
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	// withLog adds the tail of QEMU's log to a VMM error without one: why
	// QEMU refused is usually there.
	withLog := func(err error) error {
		var ve *backend.VMMError
		if errors.As(err, &ve) && ve.Log == "" {
			ve.Log = logTail(qemuLog(p.Spec.Dir))
		}
		return err
	}
	var list []steps.Step
	if p.Overlay.Path != "" {
		list = append(list, steps.Step{
			// Pre-flight: QEMU would only exit with "Could not open
			// backing file".
			Name: "check backing",
			Do:   func(ctx context.Context) error { return b.checkBacking(ctx, p.Overlay.Backing, p.BaseImage) },
		}, steps.Step{
			Name: "create disk",
			Do:   func(ctx context.Context) error { return b.createOverlay(ctx, p.Spec.Dir, p.Overlay) },
			Undo: func(context.Context) error { return os.Remove(p.Overlay.Path) },
		})
	}
	list = append(list, steps.Step{
		Name: "start vmm",
		Do: func(ctx context.Context) error {
			t0 = time.Now()
			var err error
			if m, err = b.launch(ctx, p.Spec, p.launch); err != nil {
				return err
			}
			if launched != nil {
				launched(m)
			}
			return nil
		},
		// Killed, not asked to quit: the guest never ran (a QEMU whose
		// incoming migration failed ignores quit).
		Undo: func(ctx context.Context) error { return b.stop(ctx, m, false) },
	})
	if len(p.QMP) > 0 {
		list = append(list, steps.Step{
			Name: "connect qmp",
			Do: func(ctx context.Context) error {
				var err error
				c, err = b.dialQMP(ctx, m)
				return err
			},
		})
	}
	for _, q := range p.QMP {
		list = append(list, steps.Step{
			Name: q.Step,
			Do:   func(ctx context.Context) error { return withLog(b.execPlanned(ctx, c, m, q)) },
		})
	}
	if err := steps.Run(ctx, list...); err != nil {
		return backend.Machine{}, fmt.Errorf("qemu: restore: %w", err)
	}
	b.log.Debug("restored", "id", p.Spec.ID, "kind", p.Kind, "format", p.MemoryFormat, "elapsed", time.Since(t0))
	return m, nil
}

// createOverlay creates o (it must not exist) and makes it private, after
// making the VM's dir private.
func (b *Backend) createOverlay(ctx context.Context, dir string, o Overlay) error {
	if err := fsutil.PrivateDir(dir); err != nil {
		return err
	}
	if _, err := os.Lstat(o.Path); err == nil {
		return fmt.Errorf("disk %s: %w", o.Path, fs.ErrExist)
	}
	key, keyed := overlayKeyOf(o.Backing)
	if keyed {
		if data, ok := b.overlays.get(key); ok {
			return writeOverlay(o.Path, data)
		}
	}
	if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", o.Backing, o.Path); err != nil {
		return err
	}
	if err := private(o.Path); err != nil {
		os.Remove(o.Path)
		return err
	}
	if keyed {
		b.overlays.remember(key, o.Path)
	}
	return nil
}

// The overlay a restore creates depends only on its backing file (its path,
// format and size): qemu-img writes the same bytes for the same backing
// file every time. So the first overlay made over a backing file is kept in
// memory, before QEMU ever opens it, and later restores over that file
// write those bytes instead of running qemu-img create again (about 7 ms of
// a fork and exec on every restore and template create). The key holds the
// backing file's identity (device, inode, size, modification time, as
// snapshot files are never modified after they are published): a backing
// file replaced or changed is a new key, and its overlay comes from
// qemu-img again.

// overlayKey identifies a backing file's content.
type overlayKey struct {
	path          string
	dev, ino      uint64
	size, mtimeNs int64
}

// overlayKeyOf is the key of the backing file at path (ok false when it
// cannot be read as a regular file).
func overlayKeyOf(path string) (overlayKey, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return overlayKey{}, false
	}
	return overlayKey{path: path, dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtimeNs: st.Mtim.Nano()}, true
}

// maxCachedOverlay bounds one kept overlay (a fresh qcow2 overlay is a few
// clusters: 192 KiB with the default 64 KiB clusters), and
// maxCachedOverlays how many are kept (the cache is emptied when full).
const (
	maxCachedOverlay  = 1 << 20
	maxCachedOverlays = 32
)

// overlayCache holds fresh overlays by backing file.
type overlayCache struct {
	mu sync.Mutex
	m  map[overlayKey][]byte
}

func (c *overlayCache) get(k overlayKey) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	data, ok := c.m[k]
	return data, ok
}

// remember keeps the overlay just created at path over k's file, unless
// that file changed meanwhile (its key now differs) or the overlay is not
// a small regular file.
func (c *overlayCache) remember(k overlayKey, path string) {
	data, err := readSmall(path, maxCachedOverlay)
	if err != nil {
		return
	}
	if now, ok := overlayKeyOf(k.path); !ok || now != k {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxCachedOverlays {
		c.m = map[overlayKey][]byte{}
	}
	c.m[k] = data
}

// readSmall reads the regular file at path (not through a link) when it
// holds at most limit bytes.
func readSmall(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() > limit {
		return nil, fmt.Errorf("%s: not a regular file of at most %d bytes", path, limit)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(data)) != st.Size() {
		err = fmt.Errorf("%s changed while read", path)
	}
	return data, err
}

// writeOverlay creates path (it must not exist), private, with data.
func writeOverlay(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("qemu: disk: %w", err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("qemu: disk: %w", err)
	}
	return nil
}

// execPlanned runs one planned QMP command on m: its input file handed over
// as a descriptor, and the migration it starts awaited.
func (b *Backend) execPlanned(ctx context.Context, c *qmp.Client, m backend.Machine, q QMPCommand) error {
	var args any
	if q.Arguments != nil {
		args = q.Arguments
	}
	release := func() {}
	if q.InputFile != "" {
		f, err := os.Open(q.InputFile)
		if err != nil {
			return fmt.Errorf("qemu: %w", err)
		}
		var fdPath string
		fdPath, release, err = passFile(ctx, c, f, q.Execute+"-input")
		f.Close()
		if err != nil {
			return err
		}
		args = q.withInput(fdPath)
	}
	err := execQMP(ctx, c, q.Execute, args, nil)
	release() // QEMU opened its own duplicate (or failed)
	if err != nil {
		return err
	}
	if q.AwaitMigration {
		return waitMigration(ctx, c, m, q.Execute)
	}
	return nil
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
		return fmt.Errorf("%s needs backing image %s, which is missing: %w; "+
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
		ii, err := b.snapshotDiskInfo(ctx, cur, format)
		if err != nil {
			return err
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
			return fmt.Errorf("%s has backing file %s of format %q: want qcow2 or raw recorded in the image; take a new snapshot",
				cur, bp, format)
		}
		cur = bp
	}
	return nil
}

// snapshotDiskInfo is info for a disk of a restore's backing chain, kept
// by the file's identity (overlayKey): a snapshot's files are never
// modified once published, so their headers are read once per process
// instead of by a qemu-img run (about 5 ms) on every restore. A file that
// changes gets a new key, and qemu-img reads it again.
func (b *Backend) snapshotDiskInfo(ctx context.Context, path, format string) (imageInfo, error) {
	key, keyed := overlayKeyOf(path)
	ck := diskInfoKey{overlayKey: key, format: format}
	if keyed {
		b.infosMu.Lock()
		ii, ok := b.infos[ck]
		b.infosMu.Unlock()
		if ok {
			return ii, nil
		}
	}
	ii, err := b.info(ctx, path, format)
	if err != nil || !keyed {
		return ii, err
	}
	if now, ok := overlayKeyOf(path); ok && now == key {
		b.infosMu.Lock()
		if b.infos == nil || len(b.infos) >= maxCachedOverlays {
			b.infos = map[diskInfoKey]imageInfo{}
		}
		b.infos[ck] = ii
		b.infosMu.Unlock()
	}
	return ii, nil
}

// diskInfoKey keys snapshotDiskInfo: the file and the format it is read as.
type diskInfoKey struct {
	overlayKey
	format string
}

// applySnapshotLaunch turns a fresh launch into the one that loads a memory
// snapshot: the snapshotted machine type and CPU model (the device layout
// must match), the RAM image mapped privately and read-only for "raw"
// memory (constant time, copy-on-write: the file is never modified and not
// ours to delete on Stop), -incoming defer and -S. It returns the migration
// capabilities to set before migrate-incoming.
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
