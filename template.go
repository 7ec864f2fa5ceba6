package smolvm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/store"
)

// A template is a full snapshot of an image booted to agent-ready with one
// shape (TemplateShape). The first Start of a VM restores it (building it
// on first use) instead of booting: see VM.Start and docs/architecture.md
// ("Templates"). Templates are stored as snapshots (verified before each
// restore, published crash-safe, the manifest equal to the database's
// copy) with a template key; they are not listed as snapshots, and
// restoring one does not count for the restore-once rule.

// templateKeyVersion versions TemplateShape's key: bump it when what a
// template depends on changes, and every old template becomes stale.
const templateKeyVersion = 2

// TemplateShape is what a template is keyed by: the image's content and
// the VM's shape. Two VMs with equal shapes restore the same template.
type TemplateShape struct {
	Version int    `json:"version"`
	Image   string `json:"image"`
	// ImageID is a digest of the image's content: kernel, vmlinux,
	// initramfs (which holds the guest agent), root filesystem, agent and
	// image kernel arguments. Rebuilding the image or the agent changes it.
	ImageID   string `json:"image_id"`
	Backend   string `json:"backend"`
	Accel     Accel  `json:"accel"` // resolved: kvm or tcg
	MemoryMiB int    `json:"memory_mib"`
	CPUs      int    `json:"cpus"`
	Network   bool   `json:"network"`
	// KernelArgs is the guest kernel command line without the VM's own
	// identity (its hostname).
	KernelArgs string `json:"kernel_args"`
	// Host is what the memory image depends on of the host it is made on
	// (backend.Host.TemplateKey; empty for a backend that does not describe
	// its host): after a VMM upgrade that cannot load the old state, creates
	// build a new template and the old one is stale.
	Host string `json:"host,omitempty"`
}

// Key is the shape's content key: sha256 of its JSON, in hex.
func (s TemplateShape) Key() string {
	b, _ := json.Marshal(s)
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// TemplateInfo describes a template.
type TemplateInfo struct {
	Key   string        `json:"key"`
	Shape TemplateShape `json:"shape"`
	// SnapshotID names the template's snapshot directory under the data
	// dir's snapshots/.
	SnapshotID string    `json:"snapshot_id"`
	CreatedAt  time.Time `json:"created_at"`
	SizeBytes  int64     `json:"size_bytes"`
	// Uses is how many VMs were created from it.
	Uses int `json:"uses"`
	// Stale says the template's image changed (rebuilt, new agent) or is
	// gone: no create uses it again; CollectTemplates deletes it.
	Stale       bool   `json:"stale"`
	StaleReason string `json:"stale_reason,omitempty"`
}

// TemplateOptions choose the shape BuildTemplate builds (zero values: the
// Config defaults).
type TemplateOptions struct {
	MemoryMiB int
	CPUs      int
	NoNetwork bool
	Backend   BackendName
	Accel     Accel
}

// TemplateCollection is what CollectTemplates did.
type TemplateCollection struct {
	Removed []TemplateInfo `json:"removed"`
	// Kept are stale templates still in use (a VM created from one runs or
	// is paused), with why: they go on a later collection.
	Kept map[string]string `json:"kept,omitempty"`
}

// templateSnapshotID is the snapshot id of a template: fixed by its key.
func templateSnapshotID(key string) string { return "tmpl-" + key[:32] }

// templateBuilderID is the id of the VM booted to build a template (it
// ends as the template's snapshot id does: removeLeftoverBuilders finds
// the build's lock from it).
func templateBuilderID(key string) string { return builderPrefix + key[:32] }

// builderPrefix starts the id of every template builder VM; New refuses
// it for other VMs.
const builderPrefix = "template-build-"

// imageID digests what a VM booted from img runs.
func imageID(img image.Image) string {
	m := img.Manifest
	parts := []string{"name=" + m.Name, "kernel=" + m.Kernel.SHA256, "initrd=" + m.Initrd.SHA256,
		"rootfs=" + m.Rootfs.SHA256, "agent=" + m.AgentSHA256, "args=" + m.KernelArgs}
	if m.Vmlinux != nil {
		parts = append(parts, "vmlinux="+m.Vmlinux.SHA256)
	}
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return hex.EncodeToString(h[:])
}

// usesTemplate says whether the first Start of a VM with cfg on b restores
// a template: not when the caller asked for a cold boot, nor on a backend
// without memory snapshots.
func (m *Manager) usesTemplate(cfg Config, b backend.Backend) bool {
	return !cfg.ColdBoot && !m.opts.ColdBoot && b.Capabilities().MemorySnapshot
}

// templateShape is the shape a VM with cfg (defaulted) has on b.
func (m *Manager) templateShape(ctx context.Context, cfg Config, b backend.Backend, img image.Image) (TemplateShape, error) {
	accel := cfg.Accel
	if r, ok := backend.As[backend.AccelResolver](b); ok {
		a, err := r.ResolveAccel(cfg.Accel)
		if err != nil {
			return TemplateShape{}, err
		}
		accel = a
	}
	spec := m.specFor("template", cfg, img.Kernel, img.Initrd, img.Rootfs, img.KernelArgs)
	var args []string
	for _, a := range strings.Fields(spec.KernelArgs) {
		if !strings.HasPrefix(a, "smol.hostname=") {
			args = append(args, a)
		}
	}
	host, err := templateHost(ctx, b, accel)
	if err != nil {
		return TemplateShape{}, err
	}
	return TemplateShape{Version: templateKeyVersion, Image: img.Name, ImageID: imageID(img), Backend: b.Name(),
		Accel: accel, MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, Network: !cfg.NoNetwork,
		KernelArgs: strings.Join(args, " "), Host: host}, nil
}

// templateHost is the Host part of a template's shape on b under accel.
func templateHost(ctx context.Context, b backend.Backend, accel Accel) (string, error) {
	d, ok := backend.As[backend.HostDescriber](b)
	if !ok {
		return "", nil
	}
	h, err := d.DescribeHost(ctx, accel)
	if err != nil {
		return "", fmt.Errorf("describing this host for a template: %w", err)
	}
	return h.TemplateKey(), nil
}

// acquireTemplate returns the template of shape, building it when there is
// none, with its lock held shared (release it once the restore is done): a
// delete or gc waits until then. Concurrent first uses build once: the
// builder holds the lock exclusively, the others wait and then find it.
func (m *Manager) acquireTemplate(ctx context.Context, shape TemplateShape) (store.Snapshot, func(), error) {
	key := shape.Key()
	id := templateSnapshotID(key)
	for attempt := 0; ; attempt++ {
		unlock, err := store.LockSnapshotShared(ctx, m.opts.DataDir, id)
		if err != nil {
			return store.Snapshot{}, nil, err
		}
		s, err := m.store.GetTemplate(ctx, key)
		if err == nil {
			return s, unlock, nil
		}
		unlock()
		if !errors.Is(err, store.ErrNotFound) {
			return store.Snapshot{}, nil, err
		}
		if attempt == 2 { // built, then deleted by a gc, twice
			return store.Snapshot{}, nil, fmt.Errorf("template %s was deleted while this create waited for it: %w", key[:12], ErrSnapshotNotFound)
		}
		if _, err := m.buildTemplate(ctx, shape, false); err != nil {
			return store.Snapshot{}, nil, err
		}
	}
}

// buildTemplate builds the template of shape unless it exists (built is
// false then). Its steps: lock template (exclusive), check template, remove
// leftover builder, create builder vm [undo: delete it], boot builder vm,
// snapshot builder vm (commits the template row: last). Then the builder
// VM is deleted (a failure there is logged: the template is good).
//
// A failed build is remembered for templateFailureMemory (a file beside
// the template's lock, written before the lock is released): the creates
// that waited on the lock, and those that come within that time, return
// that failure instead of each booting a builder in turn to fail again.
// retry (an explicit BuildTemplate) builds all the same.
func (m *Manager) buildTemplate(ctx context.Context, shape TemplateShape, retry bool) (built bool, err error) {
	t := &templateBuildOp{m: m, shape: shape, key: shape.Key(), retry: retry}
	t.id = templateSnapshotID(t.key)
	defer t.release()
	err = m.runSteps(ctx, "template build", []any{"template", t.key[:12]},
		steps.Step{Name: "lock template", Do: t.lock},
		steps.Step{Name: "check template", Do: t.check},
		steps.Step{Name: "remove leftover builder", Do: t.removeLeftover},
		steps.Step{Name: "create builder vm", Do: t.create, Undo: t.deleteBuilder},
		steps.Step{Name: "boot builder vm", Do: t.boot},
		steps.Step{Name: "snapshot builder vm", Do: t.snapshot}, // last: it commits
	)
	if errors.Is(err, errTemplateExists) {
		return false, nil
	}
	var recent *recentBuildFailure
	if errors.As(err, &recent) {
		return false, &Error{Op: "template", Message: fmt.Sprintf("building the template of image %s (%d MiB, %d vCPU) failed %s ago, "+
			"and is not tried again for %s: %s", shape.Image, shape.MemoryMiB, shape.CPUs, recent.age.Round(time.Second),
			templateFailureMemory, recent.Message), Fix: newFix(FixRunDoctor), Err: ErrBoot}
	}
	if err != nil {
		// A build that ran and failed is remembered while the lock is
		// ours; not one the caller gave up on (its context ended).
		if t.attempted && ctx.Err() == nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			t.rememberFailure(err)
		}
		// The builder VM (and its logs) went with the rollback: the
		// message carries its console tail; its fix would name it.
		return false, &Error{Op: "template", Message: fmt.Sprintf("building the template of image %s (%d MiB, %d vCPU) failed: %v",
			shape.Image, shape.MemoryMiB, shape.CPUs, err), Fix: newFix(FixRunDoctor), Err: err}
	}
	t.forgetFailure()
	if err := t.deleteBuilder(context.WithoutCancel(ctx)); err != nil {
		m.log.Warn("template built, but its builder vm was not deleted", "vm", templateBuilderID(t.key), "err", err)
	}
	m.log.Debug("template built", "template", t.key[:12], "image", shape.Image)
	return true, nil
}

// templateFailureMemory is how long a failed template build is returned
// to creates of its shape instead of a new build.
const templateFailureMemory = 30 * time.Second

// buildFailure is the record of a failed build (failurePath).
type buildFailure struct {
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// recentBuildFailure is the check step's error: a build of this template
// failed within templateFailureMemory.
type recentBuildFailure struct {
	buildFailure
	age time.Duration
}

func (e *recentBuildFailure) Error() string { return "a recent build failed: " + e.Message }

// failurePath is where a failed build of the template is recorded: in the
// data dir's private lock dir, beside the template's lock.
func (t *templateBuildOp) failurePath() string {
	return filepath.Join(t.m.opts.DataDir, store.LockDir, t.id+".failed")
}

// maxFailureRecord bounds the failure record read back (the message is
// cut to fit).
const maxFailureRecord = 4096

func (t *templateBuildOp) rememberFailure(err error) {
	msg := err.Error()
	if len(msg) > maxFailureRecord/2 {
		msg = msg[:maxFailureRecord/2] + "..."
	}
	b, _ := json.Marshal(buildFailure{At: time.Now(), Message: msg})
	if werr := fsutil.WriteFile(t.failurePath(), b, 0o600); werr != nil {
		t.m.log.Debug("template build failure not recorded", "template", t.key[:12], "err", werr)
	}
}

func (t *templateBuildOp) forgetFailure() {
	if err := os.Remove(t.failurePath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.m.log.Debug("template build failure record not removed", "template", t.key[:12], "err", err)
	}
}

// recentFailure returns the recorded failure of this template's last
// build when it is younger than templateFailureMemory. The record is read
// only as a small regular file (never through a link); anything else,
// unreadable or old, counts as none.
func (t *templateBuildOp) recentFailure() *recentBuildFailure {
	f, err := os.OpenFile(t.failurePath(), os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() > maxFailureRecord {
		return nil
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFailureRecord))
	var rec buildFailure
	if err != nil || json.Unmarshal(b, &rec) != nil {
		return nil
	}
	age := time.Since(rec.At)
	if age < 0 || age >= templateFailureMemory {
		return nil
	}
	return &recentBuildFailure{buildFailure: rec, age: age}
}

var errTemplateExists = errors.New("template exists")

// templateBuildOp is one buildTemplate.
type templateBuildOp struct {
	m         *Manager
	shape     TemplateShape
	key       string
	id        string
	retry     bool // build even after a recent failure
	attempted bool // a builder vm was made
	unlock    func()
	vm        *VM
}

func (t *templateBuildOp) lock(ctx context.Context) error {
	unlock, err := store.LockSnapshot(ctx, t.m.opts.DataDir, t.id)
	t.unlock = unlock
	return err
}

func (t *templateBuildOp) release() {
	if t.unlock != nil {
		t.unlock()
	}
}

// check stops the build when another builder finished first, or failed
// within templateFailureMemory (unless this build is a retry).
func (t *templateBuildOp) check(ctx context.Context) error {
	if _, err := t.m.store.GetTemplate(ctx, t.key); err == nil {
		return errTemplateExists
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	if f := t.recentFailure(); f != nil && !t.retry {
		return f
	}
	return nil
}

// removeLeftover deletes a builder VM a crashed build left (no one else
// builds this key: the lock is ours).
func (t *templateBuildOp) removeLeftover(ctx context.Context) error {
	if old, err := t.m.Open(ctx, templateBuilderID(t.key)); err == nil {
		err = old.Delete(ctx)
		old.Close()
		return err
	}
	return nil
}

// create records a neutral VM of the shape: no caller's env, ports or
// name; the default network policy (the restored VM gets its own).
func (t *templateBuildOp) create(ctx context.Context) (err error) {
	t.attempted = true
	s := t.shape
	t.vm, err = t.m.newVM(ctx, Config{Name: templateBuilderID(t.key), Image: s.Image, MemoryMiB: s.MemoryMiB, CPUs: s.CPUs,
		NoNetwork: !s.Network, Backend: BackendName(s.Backend), Accel: s.Accel, ColdBoot: true})
	return err
}

func (t *templateBuildOp) deleteBuilder(ctx context.Context) error {
	if t.vm == nil {
		return nil
	}
	err := t.vm.Delete(ctx)
	t.vm.Close()
	t.vm = nil
	return err
}

// warmUpTimeout bounds the command a builder runs before its snapshot.
const warmUpTimeout = 60 * time.Second

// boot boots the builder, checks that it runs the shape's image, and runs
// one command in it: the snapshot then holds a guest that has run one
// (the exec path's files in its page cache, the agent's exec machinery
// set up), as a pool member's and the restore benchmark's source do.
// Without it a template create's first command took 190-220 ms against
// 95-125 ms with it (TCG).
func (t *templateBuildOp) boot(ctx context.Context) error {
	if err := t.vm.Start(ctx); err != nil {
		return err
	}
	img, err := t.m.openImage(t.shape.Image)
	if err != nil {
		return err
	}
	if imageID(img) != t.shape.ImageID {
		return fmt.Errorf("image %s changed while its template was being built; create again", t.shape.Image)
	}
	if err := t.vm.warmUp(ctx, warmUpTimeout); err != nil {
		return fmt.Errorf("template builder: %w", err)
	}
	return nil
}

// warmUp runs one command ("true", which leaves nothing behind) in the
// guest, with a bound: a template's builder and a pool member do before
// their guest is kept, so that a restore's first command finds its paths
// warm.
func (vm *VM) warmUp(ctx context.Context, timeout time.Duration) error {
	res, err := vm.Run(ctx, "true", WithTimeout(timeout))
	if err != nil {
		return fmt.Errorf("the warm-up command in vm %s: %w", vm.id, err)
	}
	if !res.OK() {
		return fmt.Errorf("the warm-up command (true) in vm %s exited %d", vm.id, res.ExitCode)
	}
	return nil
}

// snapshot takes the builder's full snapshot as the template: its row
// carries the key and the shape, so it is listed as a template only.
func (t *templateBuildOp) snapshot(ctx context.Context) error {
	meta, _ := json.Marshal(t.shape)
	_, err := t.vm.snapshot(ctx, SnapshotOptions{ID: t.id, Type: SnapshotFull}, &templateMark{key: t.key, meta: meta})
	return err
}

// templateMark makes a snapshot a template.
type templateMark struct {
	key  string
	meta json.RawMessage
}

// startFromTemplate is the first Start of a VM that uses templates: it
// restores the template of the VM's shape (building it on first use) into
// the VM's own id, spec (env, ports, network policy, resources) and a
// fresh identity, with the clone steps of Fork (cloneOp). The caller holds
// the VM's lock. A failure rolls back to the VM as New left it (created,
// never started); the template, when built, stays.
func (vm *VM) startFromTemplate(ctx context.Context, rec store.VM, b backend.Backend, cfg Config) error {
	img, err := vm.m.openImage(cfg.Image)
	if err != nil {
		return err
	}
	shape, err := vm.m.templateShape(ctx, cfg, b, img)
	if err != nil {
		return err
	}
	// A ready member of a warm pool of this shape, when there is one; a
	// claim that fails falls back to restoring the template.
	if vm.claimFromPool(ctx, rec, b, cfg, shape.Key()) {
		return nil
	}
	tmpl, unlock, err := vm.m.acquireTemplate(ctx, shape)
	if err != nil {
		return err
	}
	defer unlock()
	man, err := vm.m.loadSnapshot(ctx, tmpl.ID, false) // verified before each restore
	if err != nil {
		return err
	}
	if err := vm.m.checkHost(ctx, "start", man, b); err != nil {
		// Another VM from the image would restore the same template: the
		// way out is a cold boot, or a new template built on this host.
		var e *Error
		if errors.As(err, &e) && errors.Is(err, ErrHostIncompatible) {
			e.Message = fmt.Sprintf("template %s: %s; delete the template (DeleteTemplate) and the next start builds one on this host",
				tmpl.TemplateKey[:12], e.Message)
			e.Fix = newFix(FixSetOption, ArgOption, "ColdBoot", ArgValue, "true")
		}
		return err
	}
	vm.closeClient()
	c := &cloneOp{m: vm.m, b: b, res: man.Result, snapDir: filepath.Join(vm.m.snapRoot(), tmpl.ID), kind: man.Type,
		id: vm.id, resume: true, locks: heldLocks{dataDir: vm.m.opts.DataDir},
		template: &templateUse{key: tmpl.TemplateKey, snapshotID: tmpl.ID, env: cfg.Env, before: rec}}
	defer c.locks.release()
	if err := vm.m.runSteps(ctx, "start from template", []any{"vm", vm.id, "template", tmpl.TemplateKey[:12]}, c.steps()...); err != nil {
		var e *Error
		if errors.As(err, &e) {
			return err
		}
		return &Error{Op: "start", Message: fmt.Sprintf("vm %s did not start from template %s: %v", vm.id, tmpl.TemplateKey[:12], err),
			Fix: newFix(FixRunDoctor), Err: errors.Join(ErrBoot, err)}
	}
	vm.setClient(c.client)
	return nil
}

// templateUse is what a clone restored from a template adds to Fork's
// clone: the VM's record before (put back on failure), its env.
type templateUse struct {
	key, snapshotID string
	env             map[string]string
	before          store.VM
}

func (m *Manager) templateInfo(ctx context.Context, s store.Snapshot, images, hosts map[string]string) TemplateInfo {
	info := TemplateInfo{Key: s.TemplateKey, SnapshotID: s.ID, CreatedAt: s.CreatedAt, SizeBytes: s.SizeBytes, Uses: s.RestoreCount}
	if err := json.Unmarshal(s.Template, &info.Shape); err != nil {
		info.Stale, info.StaleReason = true, "its description is unreadable"
		return info
	}
	switch {
	case info.Shape.Version != templateKeyVersion:
		info.Stale, info.StaleReason = true, fmt.Sprintf("made by another smolvm (template version %d)", info.Shape.Version)
	case info.Shape.Key() != s.TemplateKey:
		info.Stale, info.StaleReason = true, "its key does not match its shape"
	default:
		cur, ok := images[info.Shape.Image]
		if !ok {
			if img, err := image.Open(m.opts.ImageDir, info.Shape.Image); err == nil {
				cur = imageID(img)
			}
			images[info.Shape.Image] = cur
		}
		if cur == "" {
			info.Stale, info.StaleReason = true, "image "+info.Shape.Image+" is no longer built"
		} else if cur != info.Shape.ImageID {
			info.Stale, info.StaleReason = true, "image "+info.Shape.Image+" was rebuilt (new kernel, agent or root filesystem)"
		} else if host, ok := m.currentTemplateHost(ctx, info.Shape, hosts); ok && host != info.Shape.Host {
			info.Stale, info.StaleReason = true, fmt.Sprintf("made on another host (%s; this host: %s)", info.Shape.Host, host)
		}
	}
	return info
}

// currentTemplateHost is the Host part a template of shape would have on
// this host now (memoized in hosts by backend and accelerator); ok is false
// when it cannot be told (the backend is not registered here, or does not
// answer), and then the template is not called stale for it.
func (m *Manager) currentTemplateHost(ctx context.Context, shape TemplateShape, hosts map[string]string) (string, bool) {
	k := shape.Backend + "\x00" + string(shape.Accel)
	if h, ok := hosts[k]; ok {
		return h, true
	}
	b, err := m.backend(shape.Backend)
	if err != nil {
		return "", false
	}
	h, err := templateHost(ctx, b, shape.Accel)
	if err != nil {
		return "", false
	}
	hosts[k] = h
	return h, true
}

// ListTemplates lists the templates, oldest first, each with whether it is
// stale.
func (m *Manager) ListTemplates(ctx context.Context) ([]TemplateInfo, error) {
	rows, err := m.store.ListTemplates(ctx)
	if err != nil {
		return nil, err
	}
	images, hosts := map[string]string{}, map[string]string{}
	out := make([]TemplateInfo, 0, len(rows))
	for _, r := range rows {
		out = append(out, m.templateInfo(ctx, r, images, hosts))
	}
	return out, nil
}

// BuildTemplate builds the template of image with the shape in opts
// (nothing when it exists) and returns it. A create with that image and
// shape then restores it.
func (m *Manager) BuildTemplate(ctx context.Context, imageName string, opts TemplateOptions) (TemplateInfo, error) {
	cfg := Config{Image: imageName, MemoryMiB: opts.MemoryMiB, CPUs: opts.CPUs, NoNetwork: opts.NoNetwork,
		Backend: opts.Backend, Accel: opts.Accel}.withDefaults()
	if err := cfg.validate(); err != nil {
		return TemplateInfo{}, err
	}
	img, err := m.openImage(cfg.Image)
	if err != nil {
		return TemplateInfo{}, err
	}
	b, err := m.backend(string(cfg.Backend))
	if err != nil {
		return TemplateInfo{}, err
	}
	if !b.Capabilities().MemorySnapshot {
		return TemplateInfo{}, newErr("template", ErrUnsupported, Fix{}, fmt.Sprintf("the %s backend cannot take memory snapshots, which templates are", b.Name()))
	}
	shape, err := m.templateShape(ctx, cfg, b, img)
	if err != nil {
		return TemplateInfo{}, err
	}
	if _, err := m.buildTemplate(ctx, shape, true); err != nil { // an explicit build retries a failed one
		return TemplateInfo{}, err
	}
	s, err := m.store.GetTemplate(ctx, shape.Key())
	if err != nil {
		return TemplateInfo{}, err
	}
	return m.templateInfo(ctx, s, map[string]string{}, map[string]string{}), nil
}

// findTemplate resolves a key or a unique prefix of one (at least 8 hex
// digits).
func (m *Manager) findTemplate(ctx context.Context, key string) (store.Snapshot, error) {
	notFound := func(msg string) error {
		return newErr("template", ErrSnapshotNotFound, newFix(FixListTemplates), msg)
	}
	if len(key) < 8 || len(key) > 64 || strings.Trim(key, "0123456789abcdef") != "" {
		return store.Snapshot{}, notFound(fmt.Sprintf("invalid template key %q: give at least 8 of its hex digits", key))
	}
	rows, err := m.store.ListTemplates(ctx)
	if err != nil {
		return store.Snapshot{}, err
	}
	var found []store.Snapshot
	for _, r := range rows {
		if strings.HasPrefix(r.TemplateKey, key) {
			found = append(found, r)
		}
	}
	switch len(found) {
	case 0:
		return store.Snapshot{}, notFound(fmt.Sprintf("no template with key %s", key))
	case 1:
		return found[0], nil
	}
	return store.Snapshot{}, notFound(fmt.Sprintf("%d templates have keys starting with %s: give more of the key", len(found), key))
}

// DeleteTemplate deletes the template with key (or a unique prefix of it)
// with DeleteSnapshot's rule: refused (ErrSnapshotInUse) while a VM created
// from it runs or is paused; the disks of stopped ones are made
// independent of it first, so they keep working.
func (m *Manager) DeleteTemplate(ctx context.Context, key string) error {
	s, err := m.findTemplate(ctx, key)
	if err != nil {
		return err
	}
	return m.deleteSnapshot(ctx, s.ID, true)
}

// CollectTemplates deletes the stale templates (see TemplateInfo.Stale)
// and the builder VMs that crashed builds left. A stale template still in
// use is kept and reported; it goes on a later collection.
func (m *Manager) CollectTemplates(ctx context.Context) (TemplateCollection, error) {
	var out TemplateCollection
	if err := m.removeLeftoverBuilders(ctx); err != nil {
		return out, err
	}
	list, err := m.ListTemplates(ctx)
	if err != nil {
		return out, err
	}
	for _, t := range list {
		if !t.Stale {
			continue
		}
		err := m.deleteSnapshot(ctx, t.SnapshotID, true)
		switch {
		case err == nil:
			out.Removed = append(out.Removed, t)
		case errors.Is(err, ErrSnapshotInUse):
			if out.Kept == nil {
				out.Kept = map[string]string{}
			}
			out.Kept[t.Key] = err.Error()
		case errors.Is(err, ErrSnapshotNotFound): // deleted meanwhile
		default:
			return out, err
		}
	}
	return out, nil
}

// removeLeftoverBuilders deletes builder VMs that no build is using: a
// build holds its template's lock exclusively, so a builder whose lock is
// free was left by a build that died.
func (m *Manager) removeLeftoverBuilders(ctx context.Context) error {
	recs, err := m.store.ListVMs(ctx)
	if err != nil {
		return err
	}
	for _, r := range recs {
		suffix, ok := strings.CutPrefix(r.ID, builderPrefix)
		if !ok || len(suffix) != 32 || strings.Trim(suffix, "0123456789abcdef") != "" {
			continue
		}
		// The builder's id ends with the same key prefix as its
		// template's snapshot id, whose lock the build holds.
		tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		unlock, err := store.LockSnapshot(tctx, m.opts.DataDir, "tmpl-"+suffix)
		cancel()
		if err != nil {
			continue // a build is running
		}
		if vm, err := m.Open(ctx, r.ID); err == nil {
			err = vm.Delete(ctx)
			vm.Close()
			if err != nil {
				unlock()
				return err
			}
		}
		unlock()
	}
	return nil
}

// isTemplate says whether the manifest's snapshot row is a template
// (loadSnapshot's callers other than templates refuse them).
func isTemplate(s store.Snapshot) bool { return s.TemplateKey != "" }

// templateNotSnapshot is the error user snapshot operations give for a
// template's snapshot id.
func templateNotSnapshot(op, id string) error {
	return newErr(op, ErrSnapshotNotFound, newFix(FixListSnapshots),
		fmt.Sprintf("snapshot %q not found (%s is a template: VMs are created from it, see the templates)", id, id))
}
