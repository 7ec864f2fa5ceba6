package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/store"
	"golang.org/x/sys/unix"
)

// ImportOptions configure ImportSnapshot.
type ImportOptions struct {
	// SnapshotID imports the snapshot under this id instead of the one in
	// its manifest (the VM id it restores to stays the manifest's).
	SnapshotID string
}

// ExportOptions configure ExportSnapshot.
type ExportOptions struct {
	// Flatten makes the archive of a diff snapshot self-contained: its
	// disk is sent with the base image's data merged in (no backing file),
	// and the archive's manifest is that of a full snapshot (memory,
	// device state and a self-contained disk), which restores on a host
	// without the base image. The archive is larger by the base image's
	// data the guest's disk uses. A snapshot that names no base image
	// (full, disk) is sent as it is.
	Flatten bool
}

// ExportSnapshot writes snapshot id to w as one self-describing stream: a
// zstd-compressed tar of its manifest, then each artifact with its holes
// left out (docs/adr/0023-export-format.md). The snapshot's manifest is
// verified first and every artifact is re-hashed as it is sent, so a
// snapshot whose files changed fails the export (ErrSnapshotCorrupt)
// instead of travelling. The snapshot is locked while it is read (a
// delete waits). On error, w holds a partial stream that import refuses.
//
// opts is variadic so that every call written before it existed still
// compiles: at most one ExportOptions is given (more is ErrInvalidConfig).
// With Flatten, a diff snapshot's disk is first flattened into a private
// temp file in the data dir (which must have room for it: ErrNoSpace),
// and its base image must be on this host, the one it was taken on
// (ErrBackingImageMissing).
func (m *Manager) ExportSnapshot(ctx context.Context, id string, w io.Writer, opts ...ExportOptions) error {
	if len(opts) > 1 {
		return newErr("snapshot export", ErrInvalidConfig, Fix{}, fmt.Sprintf("snapshot export takes at most one ExportOptions, got %d", len(opts)))
	}
	var o ExportOptions
	if len(opts) == 1 {
		o = opts[0]
	}
	if _, err := m.GetSnapshot(ctx, id); err != nil {
		return err
	}
	locks := heldLocks{dataDir: m.opts.DataDir}
	defer locks.release()
	if err := locks.snapshot(ctx, id); err != nil {
		return err
	}
	man, err := m.loadSnapshot(ctx, id, false)
	flatten := o.Flatten && man.BaseImage != ""
	if err != nil && (flatten || !errors.Is(err, ErrBackingImageMissing)) { // exporting as it is needs no base image
		return err
	}
	dir := filepath.Join(m.snapRoot(), id)
	path := func(a snapshot.Artifact) string { return filepath.Join(dir, a.Name) }
	if flatten {
		fl, err := m.flattenForExport(ctx, dir, man)
		if err != nil {
			return err
		}
		defer os.RemoveAll(fl.tmp)
		man = fl.man
		path = func(a snapshot.Artifact) string {
			if a.Role == "disk" {
				return fl.disk
			}
			return filepath.Join(dir, a.Name)
		}
	}
	if err := snapshot.WriteArchiveFiles(ctxWriter{ctx, w}, man, path); err != nil {
		if errors.Is(err, snapshot.ErrCorrupt) {
			return &Error{Op: "snapshot export", Message: fmt.Sprintf("snapshot %s cannot be exported: %v", id, err),
				Fix: newFix(FixRetakeSnapshot, ArgSnapshot, id), Err: errors.Join(ErrSnapshotCorrupt, err)}
		}
		return fmt.Errorf("snapshot export %s: %w", id, err)
	}
	return nil
}

// flattened is a diff snapshot's manifest made self-contained for an
// export, and its flattened disk in a private temp dir.
type flattened struct {
	man       snapshot.Manifest
	tmp, disk string
}

// flattenForExport flattens the disk of the diff snapshot man (in dir)
// into a private temp dir under the data dir (the caller removes fl.tmp)
// and returns the manifest the archive carries: type full (memory, device
// state, a disk with no backing file: what a full snapshot is), no base
// image (in the manifest, the backend's result, and the spec's base disk,
// so a VM restored from it depends on nothing from the image either), the
// disk's digest, size and the snapshot's allocated size recomputed. The
// disk's digest is checked first, then its header: its backing file must
// be exactly the base image (qemu-img reads what it names).
func (m *Manager) flattenForExport(ctx context.Context, dir string, man snapshot.Manifest) (fl flattened, err error) {
	fail := func(err error) (flattened, error) {
		e := &Error{Op: "snapshot export", Message: fmt.Sprintf("snapshot %s cannot be flattened: %v", man.ID, err), Err: err}
		if errors.Is(err, snapshot.ErrCorrupt) || errors.Is(err, snapshot.ErrForeignBacking) {
			e.Fix, e.Err = newFix(FixRetakeSnapshot, ArgSnapshot, man.ID), errors.Join(ErrSnapshotCorrupt, err)
		}
		return flattened{}, e
	}
	b, err := m.backend(man.Backend)
	if err != nil {
		return flattened{}, err
	}
	fd, ok := backend.As[backend.DiskFlattener](b)
	if !ok {
		return fail(fmt.Errorf("backend %s cannot flatten a disk: %w", man.Backend, ErrUnsupported))
	}
	i := slices.IndexFunc(man.Artifacts, func(a snapshot.Artifact) bool { return a.Role == "disk" })
	if i < 0 {
		return fail(fmt.Errorf("%w: it names base image %s but has no disk", snapshot.ErrCorrupt, man.BaseImage))
	}
	src := filepath.Join(dir, man.Artifacts[i].Name)
	// The archive sends the flattened disk, re-hashed as it goes: the
	// source is hashed here (an overlay: the data the guest wrote), so a
	// changed snapshot fails a flattened export as it fails any other.
	if sum, _, err := snapshot.DigestFormat(src, man.FormatVersion); err != nil {
		return fail(err)
	} else if sum != man.Artifacts[i].SHA256 {
		return fail(fmt.Errorf("%w: %s does not match its checksum (sha256 %s, manifest %s)", snapshot.ErrCorrupt, src, sum[:12], man.Artifacts[i].SHA256[:12]))
	}
	if _, err := snapshot.CheckQcow2(src, man.BaseImage); err != nil {
		return fail(err)
	}
	// The flattened disk holds at most the base image's data plus the
	// overlay's.
	need, err := allocated(src, man.BaseImage)
	if err != nil {
		return fail(err)
	}
	if err := m.checkSpace("snapshot export", m.opts.DataDir, need, "flattening snapshot "+man.ID); err != nil {
		return flattened{}, err
	}
	tmp, err := os.MkdirTemp(m.opts.DataDir, ".export-")
	if err != nil {
		return fail(err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	disk := filepath.Join(tmp, man.Artifacts[i].Name)
	if err := fd.FlattenDisk(ctx, src, disk); err != nil {
		return fail(err)
	}
	if back, err := snapshot.CheckQcow2(disk, ""); err != nil || back != "" {
		return fail(fmt.Errorf("the flattened disk still has a backing file %q: %v", back, err))
	}
	sum, size, err := snapshot.DigestFormat(disk, man.FormatVersion) // the manifest's other digests are of its format
	if err != nil {
		return fail(err)
	}
	st, err := os.Stat(disk)
	if err != nil {
		return fail(err)
	}
	oldAlloc, err := snapshot.Allocated(src)
	if err != nil {
		return fail(err)
	}
	newAlloc, err := snapshot.Allocated(disk)
	if err != nil {
		return fail(err)
	}
	out := man
	out.Artifacts = slices.Clone(man.Artifacts)
	out.Artifacts[i] = snapshot.Artifact{Role: "disk", Name: man.Artifacts[i].Name, Size: size, SHA256: sum, MtimeNS: st.ModTime().UnixNano()}
	out.Type, out.BaseImage, out.Result.BaseImage, out.Spec.BaseDisk = SnapshotFull, "", "", ""
	out.SizeBytes = max(man.SizeBytes-oldAlloc+newAlloc, newAlloc)
	if err := out.Validate(); err != nil {
		return fail(err)
	}
	return flattened{man: out, tmp: tmp, disk: disk}, nil
}

// spaceMargin is what a write of need bytes must leave free besides them:
// 64 MiB plus 1/32 of need (filesystem metadata, qcow2 clusters, and room
// for the rest of the host).
func spaceMargin(need int64) int64 { return 64<<20 + need/32 }

// statfsFree is the space unprivileged writers may use on the filesystem
// of path.
func statfsFree(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// checkSpace refuses (ErrNoSpace) a write of about need bytes, for what,
// into the filesystem of dir when that has less than need plus
// spaceMargin free. A filesystem that cannot be asked passes: the write
// itself then fails if it must.
func (m *Manager) checkSpace(op, dir string, need int64, what string) error {
	statfs := m.statfs
	if statfs == nil {
		statfs = statfsFree
	}
	free, err := statfs(dir)
	if err != nil {
		m.log.Debug("free space unknown", "dir", dir, "err", err)
		return nil
	}
	if want := need + spaceMargin(need); free < want {
		return &Error{Op: op,
			Message: fmt.Sprintf("%s needs about %d MiB on the filesystem of %s (%d MiB and a margin of %d MiB), which has %d MiB free",
				what, want>>20, dir, need>>20, spaceMargin(need)>>20, free>>20),
			Fix: newFix(FixFreeResources, ArgResource, ResourceDisk, ArgPath, dir), Err: ErrNoSpace}
	}
	return nil
}

// importNeed is the space an archive's snapshot takes once extracted: the
// allocated size its manifest gives, bounded by its artifacts' sizes (a
// manifest may claim anything; the extents written are bounded by the
// sizes). A manifest that claims less only passes the check: the
// extraction then fails on a full disk and removes what it wrote.
func importNeed(man snapshot.Manifest) int64 {
	var sum int64
	for _, a := range man.Artifacts {
		sum += a.Size + 4096 // the last block of each file
	}
	return min(man.SizeBytes, sum)
}

// allocated is the disk space the files at paths use.
func allocated(paths ...string) (int64, error) {
	var n int64
	for _, p := range paths {
		a, err := snapshot.Allocated(p)
		if err != nil {
			return 0, err
		}
		n += a
	}
	return n, nil
}

// ctxWriter stops a copy once its context ends.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// ctxReader stops a copy once its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// ImportSnapshot reads an archive written by ExportSnapshot and adds the
// snapshot it holds. The archive is hostile input: its manifest is bounded
// and validated (supported format version, artifact names exactly the
// backend's known plain file names), each artifact is bounded by the size
// the manifest gives and must hash to its digest, nothing else may be in
// the archive, and a qcow2 disk may have no backing file or exactly the
// base image the manifest declares, which this host must have (else
// ErrBackingImageMissing naming it). Everything is written into a private
// temp dir and published as a snapshot is (rename, then the row made
// ready): a failed import lists nothing and leaves nothing on disk.
// Refusals wrap ErrSnapshotCorrupt (ErrUnsupported for a newer format).
func (m *Manager) ImportSnapshot(ctx context.Context, r io.Reader, opts ImportOptions) (*SnapshotInfo, error) {
	if opts.SnapshotID != "" {
		if err := ValidateID(opts.SnapshotID); err != nil {
			return nil, err
		}
	}
	op := &importOp{m: m, r: ctxReader{ctx, r}, opts: opts, locks: heldLocks{dataDir: m.opts.DataDir}, name: "snapshot import", noun: "archive"}
	op.readSource = op.readArchive
	op.extract = func(context.Context) error { return op.ar.Extract(op.tmp) }
	return op.run(ctx)
}

// run is the import's steps, shared by ImportSnapshot (an archive) and
// PullSnapshot (a remote store): only readSource and extract differ.
func (op *importOp) run(ctx context.Context) (*SnapshotInfo, error) {
	m := op.m
	defer op.close()
	if err := m.runSteps(ctx, op.name, nil,
		steps.Step{Name: "read manifest", Do: op.readManifest},
		steps.Step{Name: "lock snapshot", Do: func(ctx context.Context) error { return op.locks.snapshot(ctx, op.man.ID) }},
		steps.Step{Name: "check base image", Do: op.checkBase},
		steps.Step{Name: "check free space", Do: op.checkSpace},
		steps.Step{Name: "sweep interrupted snapshots", Do: func(ctx context.Context) error { m.cleanupSnapshots(ctx); return nil }},
		steps.Step{Name: "reserve snapshot id", Do: op.reserve, Undo: op.abort},
		steps.Step{Name: "make temp dir", Do: op.makeTemp, Undo: op.removeTemp},
		steps.Step{Name: "extract artifacts", Do: op.extract},
		steps.Step{Name: "check disks", Do: op.checkDisks},
		steps.Step{Name: "write manifest", Do: op.writeManifest},
		steps.Step{Name: "publish snapshot", Do: op.publish, Undo: op.unpublish},
		steps.Step{Name: "commit snapshot row", Do: op.commit},
	); err != nil {
		return nil, op.failed(err)
	}
	info := m.snapInfo(op.row)
	return &info, nil
}

// importOp is one ImportSnapshot: its steps and what they share.
type importOp struct {
	m     *Manager
	r     io.Reader
	opts  ImportOptions
	locks heldLocks
	ar    *snapshot.ArchiveReader
	man   snapshot.Manifest
	row   store.Snapshot
	tmp   string

	name string // the operation: "snapshot import", "snapshot pull"
	noun string // what is refused: "archive", "remote snapshot"
	// readSource returns the incoming manifest, parsed and validated;
	// extract writes its artifacts into op.tmp.
	readSource func(context.Context) (snapshot.Manifest, error)
	extract    func(context.Context) error
}

func (op *importOp) close() {
	op.locks.release()
	if op.ar != nil {
		op.ar.Close()
	}
}

// readArchive reads and validates the archive's manifest.
func (op *importOp) readArchive(context.Context) (snapshot.Manifest, error) {
	ar, err := snapshot.OpenArchive(op.r)
	if err != nil {
		return snapshot.Manifest{}, err
	}
	op.ar = ar
	return ar.Manifest(), nil
}

// readManifest reads and validates the incoming manifest and renames the
// snapshot when asked.
func (op *importOp) readManifest(ctx context.Context) error {
	man, err := op.readSource(ctx)
	if err != nil {
		return err
	}
	op.man = man
	if op.opts.SnapshotID != "" {
		op.man.ID = op.opts.SnapshotID
	}
	dropped, err := narrowImportedNetwork(&op.man)
	if err != nil {
		return err
	}
	if len(dropped) > 0 {
		op.m.log.Warn("imported snapshot: its allowed CIDRs and port forwards are not kept (an archive must not open this host's ranges or ports); expose ports again after the restore",
			"snapshot", op.man.ID, "dropped", dropped)
	}
	return nil
}

// narrowImportedNetwork drops what an archive from elsewhere must not bring
// to this host: allowed CIDRs (a prefix inside a deny range opens it:
// 127.0.0.1/32 would let the guest reach this host's loopback services) and
// port forwards (host ports here). The network mode and allowed domains
// stay: they only narrow what the guest reaches, and DNS answers never open
// a deny range. It says what it dropped.
func narrowImportedNetwork(man *snapshot.Manifest) ([]string, error) {
	var dropped []string
	for _, c := range man.Spec.NetPolicy.AllowCIDRs {
		dropped = append(dropped, "allow-cidr "+c)
	}
	for _, pf := range man.Spec.PortForwards {
		dropped = append(dropped, fmt.Sprintf("port forward %d:%d", pf.HostPort, pf.GuestPort))
	}
	man.Spec.NetPolicy.AllowCIDRs, man.Spec.PortForwards = nil, nil
	if len(man.VMConfig) > 0 {
		var cfg Config
		if err := json.Unmarshal(man.VMConfig, &cfg); err != nil {
			return nil, newErr("snapshot import", ErrSnapshotCorrupt, Fix{}, fmt.Sprintf("snapshot %s: its vm config is unreadable: %v", man.ID, err))
		}
		cfg.Network.AllowCIDRs, cfg.PortForwards = nil, nil
		b, err := json.Marshal(cfg)
		if err != nil {
			return nil, err
		}
		man.VMConfig = b
	}
	return dropped, nil
}

// checkBase refuses, before anything is written, a diff snapshot whose
// base image this host lacks, or has under that path with another digest
// (ErrBackingImageMissing naming it; checkBaseDigest), and a
// manifest whose host files (base image, kernel, initrd, base disk) are
// files of this host outside its image cache: a restore would hand them
// to QEMU, and so to the guest.
func (op *importOp) checkBase(context.Context) error {
	if b := op.man.BaseImage; b != "" {
		if _, err := os.Stat(b); err != nil {
			return &Error{Op: "snapshot import",
				Message: fmt.Sprintf("snapshot %s is a diff snapshot and its base image %s is not on this host; import it where that image is, or export a full snapshot", op.man.ID, b),
				Fix:     newFix(FixRestoreBaseImage, ArgPath, b), Err: ErrBackingImageMissing}
		}
		if err := op.m.checkBaseDigest("snapshot import", op.man); err != nil {
			return err
		}
	}
	cache, err := filepath.EvalSymlinks(op.m.opts.ImageDir)
	if err != nil {
		cache = filepath.Clean(op.m.opts.ImageDir)
	}
	for _, p := range []string{op.man.BaseImage, op.man.Spec.Kernel, op.man.Spec.Initrd, op.man.Spec.BaseDisk} {
		if p == "" {
			continue
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			continue // not on this host: nothing of it can be read; restore says what is missing
		}
		if rel, err := filepath.Rel(cache, real); err != nil || !filepath.IsLocal(rel) {
			return fmt.Errorf("%w: the manifest names host file %s, which is outside this host's image cache %s", snapshot.ErrCorrupt, p, cache)
		}
	}
	return nil
}

// checkSpace refuses (ErrNoSpace) an archive whose snapshot the snapshot
// dir's filesystem has no room for (importNeed plus a margin), before
// anything is written.
func (op *importOp) checkSpace(context.Context) error {
	dir := op.m.snapRoot()
	if _, err := os.Stat(dir); err != nil {
		dir = op.m.opts.DataDir // made on the first snapshot, inside it
	}
	return op.m.checkSpace("snapshot import", dir, importNeed(op.man), "importing snapshot "+op.man.ID)
}

// checkBaseDigest refuses (ErrBackingImageMissing) the diff snapshot man
// when the file at its base image path is not the image it was taken on:
// the manifest recorded that image's digest (Host.ImageSHA256, when the
// spec's base disk is the base image), and the disk's overlay only holds
// the clusters the guest changed, so another image under the same name
// would give the guest a silently corrupt disk. The digest of the file
// here is the one the image cache recorded when it built it (a small
// read; image.RootfsSHA256), and only a file the cache does not describe
// is hashed. A manifest without a digest (format 1, or an image rebuilt
// while the VM ran) is checked by path only.
func (m *Manager) checkBaseDigest(op string, man snapshot.Manifest) error {
	if man.BaseImage == "" || man.Host == nil || man.Host.ImageSHA256 == "" || filepath.Clean(man.Spec.BaseDisk) != man.BaseImage {
		return nil
	}
	sum, recorded, err := image.RootfsSHA256(m.opts.ImageDir, man.BaseImage)
	if err != nil {
		return &Error{Op: op, Message: fmt.Sprintf("snapshot %s: its base image %s cannot be read: %v", man.ID, man.BaseImage, err),
			Fix: newFix(FixRestoreBaseImage, ArgPath, man.BaseImage), Err: errors.Join(ErrBackingImageMissing, err)}
	}
	if !recorded {
		m.log.Debug("base image hashed: the image cache records no digest for it", "path", man.BaseImage)
	}
	if sum != man.Host.ImageSHA256 {
		return &Error{Op: op,
			Message: fmt.Sprintf("snapshot %s is a diff snapshot of image %s with sha256 %s, but the base image at %s here has sha256 %s: "+
				"another image under the same path would corrupt the guest's disk", man.ID, man.Host.Image, man.Host.ImageSHA256, man.BaseImage, sum),
			Fix: newFix(FixRestoreBaseImage, ArgPath, man.BaseImage), Err: ErrBackingImageMissing}
	}
	return nil
}

func (op *importOp) reserve(ctx context.Context) error {
	op.row = store.Snapshot{ID: op.man.ID, VMID: op.man.VMID, Backend: op.man.Backend, Type: op.man.Type, CreatedAt: op.man.CreatedAt}
	if err := op.m.store.ReserveSnapshot(ctx, op.row); err != nil {
		if errors.Is(err, store.ErrExists) {
			return newErr("snapshot import", ErrSnapshotExists, newFix(FixChooseSnapshotID, ArgSnapshot, op.man.ID),
				fmt.Sprintf("snapshot %q already exists: import it under another id", op.man.ID))
		}
		return err
	}
	return nil
}

func (op *importOp) abort(ctx context.Context) error { return op.m.store.AbortSnapshot(ctx, op.man.ID) }

func (op *importOp) makeTemp(context.Context) error {
	tmp, err := snapshot.TempDir(op.m.snapRoot(), op.man.ID)
	op.tmp = tmp
	return err
}

func (op *importOp) removeTemp(context.Context) error { return os.RemoveAll(op.tmp) }

// checkDisks reads the header of each disk artifact: qcow2 with no
// backing file, or exactly the manifest's base image.
func (op *importOp) checkDisks(context.Context) error {
	for _, a := range op.man.Artifacts {
		if a.Role != "disk" {
			continue
		}
		if _, err := snapshot.CheckQcow2(filepath.Join(op.tmp, a.Name), op.man.BaseImage); err != nil {
			return err
		}
	}
	return nil
}

// writeManifest hashes the written files (and fsyncs them) as a snapshot
// create does, and writes this host's manifest: the same data, local
// mtimes, and the id asked for. A manifest of an older format (its
// digests bound to the files' layout, snapshot.LegacyDigest) is checked
// with its own digests first and written in this format, with content
// digests, so the imported snapshot no longer depends on the layout.
func (op *importOp) writeManifest(context.Context) error {
	legacy := op.man.FormatVersion < snapshot.FormatVersion
	if legacy {
		if err := snapshot.Verify(op.tmp, op.man, true); err != nil {
			return fmt.Errorf("%w (hashed once written on this host)", err)
		}
	}
	arts, size, err := snapshot.Describe(op.tmp, op.man.Result.Artifacts)
	if err != nil {
		return err
	}
	for i, a := range arts {
		if a.Name != op.man.Artifacts[i].Name || (!legacy && a.SHA256 != op.man.Artifacts[i].SHA256) {
			return fmt.Errorf("%w: %s hashes differently once written on this host", snapshot.ErrCorrupt, a.Name)
		}
	}
	op.man.Artifacts, op.man.SizeBytes = arts, size
	op.man.FormatVersion = snapshot.FormatVersion
	if err := op.man.Validate(); err != nil {
		return err
	}
	return snapshot.WriteManifest(op.tmp, op.man)
}

func (op *importOp) publish(context.Context) error {
	_, err := snapshot.Publish(op.tmp, op.m.snapRoot(), op.man.ID)
	return err
}

func (op *importOp) unpublish(context.Context) error {
	return os.RemoveAll(filepath.Join(op.m.snapRoot(), op.man.ID))
}

func (op *importOp) commit(ctx context.Context) error {
	manJSON, err := json.Marshal(op.man)
	if err != nil {
		return err
	}
	op.row.SizeBytes, op.row.ParentImage, op.row.Manifest = op.man.SizeBytes, op.man.BaseImage, manJSON
	return op.m.store.CommitSnapshot(ctx, op.man.ID, op.row)
}

// failed explains a failed import: refusals of the archive wrap
// ErrSnapshotCorrupt (a newer format: ErrUnsupported).
func (op *importOp) failed(err error) error {
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	switch {
	case errors.Is(err, snapshot.ErrNewer):
		return &Error{Op: op.name, Message: fmt.Sprintf("%s: %v", op.name, err), Err: errors.Join(ErrUnsupported, err)}
	case errors.Is(err, snapshot.ErrCorrupt), errors.Is(err, snapshot.ErrForeignBacking):
		return &Error{Op: op.name, Message: fmt.Sprintf("the %s was refused: %v; nothing was imported", op.noun, err),
			Err: errors.Join(ErrSnapshotCorrupt, err)}
	}
	return &Error{Op: op.name, Message: fmt.Sprintf("%s failed: %v; nothing was imported", op.name, err), Err: err}
}
