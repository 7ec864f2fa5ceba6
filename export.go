package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/store"
)

// ImportOptions configure ImportSnapshot.
type ImportOptions struct {
	// SnapshotID imports the snapshot under this id instead of the one in
	// its manifest (the VM id it restores to stays the manifest's).
	SnapshotID string
}

// ExportSnapshot writes snapshot id to w as one self-describing stream: a
// zstd-compressed tar of its manifest, then each artifact with its holes
// left out (docs/adr/0023-export-format.md). The snapshot's manifest is
// verified first and every artifact is re-hashed as it is sent, so a
// snapshot whose files changed fails the export (ErrSnapshotCorrupt)
// instead of travelling. The snapshot is locked while it is read (a
// delete waits). On error, w holds a partial stream that import refuses.
func (m *Manager) ExportSnapshot(ctx context.Context, id string, w io.Writer) error {
	if _, err := m.GetSnapshot(ctx, id); err != nil {
		return err
	}
	locks := heldLocks{dataDir: m.opts.DataDir}
	defer locks.release()
	if err := locks.snapshot(ctx, id); err != nil {
		return err
	}
	man, err := m.loadSnapshot(ctx, id, false)
	if err != nil && !errors.Is(err, ErrBackingImageMissing) { // exporting needs no base image
		return err
	}
	if err := snapshot.WriteArchive(ctxWriter{ctx, w}, filepath.Join(m.snapRoot(), id), man); err != nil {
		if errors.Is(err, snapshot.ErrCorrupt) {
			return &Error{Op: "snapshot export", Message: fmt.Sprintf("snapshot %s cannot be exported: %v", id, err),
				Fix: newFix(FixRetakeSnapshot, ArgSnapshot, id), Err: errors.Join(ErrSnapshotCorrupt, err)}
		}
		return fmt.Errorf("snapshot export %s: %w", id, err)
	}
	return nil
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
// base image this host lacks (ErrBackingImageMissing naming it), and a
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
// mtimes, and the id asked for.
func (op *importOp) writeManifest(context.Context) error {
	arts, size, err := snapshot.Describe(op.tmp, op.man.Result.Artifacts)
	if err != nil {
		return err
	}
	for i, a := range arts {
		if a.SHA256 != op.man.Artifacts[i].SHA256 || a.Name != op.man.Artifacts[i].Name {
			return fmt.Errorf("%w: %s hashes differently once written on this host", snapshot.ErrCorrupt, a.Name)
		}
	}
	op.man.Artifacts, op.man.SizeBytes = arts, size
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
