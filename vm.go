package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/store"
)

// VM is a handle on one sandbox. Close releases the handle; the VM keeps
// running until Stop or Delete. A VM is safe for concurrent use.
type VM struct {
	m  *Manager
	id string

	mu     sync.Mutex
	client *agentclient.Client
	// owner is set on handles the package-level New, Open, FromSnapshot
	// and Fork return: they share the Manager those made, which closes
	// when the last of them is closed. Guarded by mu.
	owner *managerRef
}

// managerRef counts the VM handles that share ownership of a Manager; the
// last release closes it (Fork's clones share one).
type managerRef struct {
	mu sync.Mutex
	n  int
	m  *Manager
}

// ownManager makes vms the owners of m: m closes when the last of them is
// closed.
func ownManager(m *Manager, vms ...*VM) {
	r := &managerRef{m: m, n: len(vms)}
	for _, vm := range vms {
		vm.mu.Lock()
		vm.owner = r
		vm.mu.Unlock()
	}
}

// release drops one owner; the last one closes the Manager.
func (r *managerRef) release() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n--
	if r.n == 0 {
		return r.m.Close()
	}
	return nil
}

// Info describes a VM.
type Info struct {
	ID        string `json:"id"`
	Status    Status `json:"status"`
	Image     string `json:"image"`
	Backend   string `json:"backend"`
	Accel     string `json:"accel,omitempty"`
	MemoryMiB int    `json:"memory_mib"`
	CPUs      int    `json:"cpus"`
	Network   bool   `json:"network"`
	// NetworkPolicy is the guest network policy (nil without networking).
	NetworkPolicy *NetworkPolicy `json:"network_policy,omitempty"`
	// NetworkStats are the sidecar's counters and last refusals (Info
	// fills them for a running VM; nil otherwise).
	NetworkStats *NetworkStats `json:"network_stats,omitempty"`
	PortForwards []PortForward `json:"port_forwards,omitempty"`
	PID          int           `json:"pid,omitempty"`
	// Hostname, MAC (of eth0, with networking) and MachineID
	// (/etc/machine-id) are the identity the guest is given at every boot
	// and restore. A VM created before machine-ids has none until it starts.
	Hostname     string    `json:"hostname"`
	MAC          string    `json:"mac,omitempty"`
	MachineID    string    `json:"machine_id,omitempty"`
	CreatedAt    time.Time `json:"created_at"`
	RestoredFrom string    `json:"restored_from,omitempty"`
	// Template is the key of the template the VM was started from ("" for
	// a VM that booted cold, or was restored from a snapshot).
	Template string `json:"template,omitempty"`
	// Pool says the VM is a warm pool's member (paused, waiting to be
	// claimed by a create; see Manager.SetPool): not a sandbox of its own.
	Pool      bool   `json:"pool,omitempty"`
	LastError string `json:"last_error,omitempty"`
	Dir       string `json:"dir"`
	// RunDir is the VM's private directory of unix sockets (the agent's
	// channels, the VMM's control socket).
	RunDir     string `json:"run_dir"`
	ConsoleLog string `json:"console_log"`

	// TemplateBuilder says the VM is booting to become a template (see
	// TemplateInfo): made and deleted by the build, not a sandbox of its
	// own.
	TemplateBuilder bool `json:"template_builder,omitempty"`
}

// IsSandbox says whether the VM is a sandbox of the user's: not a warm pool's
// paused member and not a template's builder, which the SDK makes and removes
// itself. Listings meant for people (the CLI, the API, MCP) show only these.
func (i Info) IsSandbox() bool { return !i.Pool && !i.TemplateBuilder }

// ID returns the VM id.
func (vm *VM) ID() string { return vm.id }

// Manager returns the manager the VM belongs to.
func (vm *VM) Manager() *Manager { return vm.m }

// New creates a VM (record, per-VM disk overlay) without starting it.
// Names starting with "template-build-" (the VMs that build templates) and
// "pool-" (the members of warm pools) are reserved.
func (m *Manager) New(ctx context.Context, cfg Config) (*VM, error) {
	if strings.HasPrefix(cfg.Name, builderPrefix) {
		return nil, newErr("create", ErrInvalidConfig, newFix(FixChooseVMName, ArgVM, cfg.Name),
			fmt.Sprintf("vm name %q is reserved: names starting with %q are the VMs that build templates", cfg.Name, builderPrefix))
	}
	if strings.HasPrefix(cfg.Name, poolPrefix) {
		return nil, newErr("create", ErrInvalidConfig, newFix(FixChooseVMName, ArgVM, cfg.Name),
			fmt.Sprintf("vm name %q is reserved: names starting with %q are the members of warm pools", cfg.Name, poolPrefix))
	}
	return m.newVM(ctx, cfg)
}

func (m *Manager) newVM(ctx context.Context, cfg Config) (*VM, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.Network, _ = cfg.resolveNetwork() // validated above
	cfg.NoNetwork = cfg.Network.Mode == NetworkNone
	if cfg.Name == "" {
		id, err := m.uniqueName(ctx)
		if err != nil {
			return nil, err
		}
		cfg.Name = id
	}
	id := cfg.Name
	unlock, err := store.LockVM(ctx, m.opts.DataDir, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := m.store.GetVM(ctx, id); err == nil {
		return nil, newErr("create", ErrVMExists, newFix(FixChooseVMName, ArgVM, id),
			fmt.Sprintf("vm %q already exists", id))
	}
	img, err := m.openImage(cfg.Image)
	if err != nil {
		return nil, err
	}
	b, err := m.backend(string(cfg.Backend))
	if err != nil {
		return nil, err
	}
	spec := m.specFor(id, cfg, img.Kernel, img.Initrd, img.Rootfs, img.KernelArgs)
	if spec.Network && !b.Capabilities().NetworkPolicy {
		return nil, newErr("create", ErrUnsupported, newFix(FixDisableNetwork, ArgBackend, DefaultBackend),
			fmt.Sprintf("the %s backend cannot enforce a guest network policy (it would reach the host's networks)", b.Name()))
	}
	if caps := b.Capabilities(); caps.KernelFormat == backend.KernelVmlinux {
		if img.Vmlinux == "" {
			return nil, newErr("create", ErrImageNotBuilt, newFix(FixBuildImage, ArgImage, cfg.Image, ArgKernel, "minimal"),
				fmt.Sprintf("image %q has no uncompressed vmlinux kernel, which the %s backend needs", cfg.Image, b.Name()))
		}
		spec.Kernel = img.Vmlinux
	}
	if caps := b.Capabilities(); caps.DiskFormat == backend.DiskRaw {
		spec.DiskFormat = backend.DiskRaw
		spec.Disk = filepath.Join(spec.Dir, "disk.ext4")
	}
	if err := checkSpec(b, spec); err != nil {
		return nil, err
	}
	rawCfg, _ := json.Marshal(cfg)
	rec := store.VM{ID: id, Backend: b.Name(), Status: store.VMCreated, Config: rawCfg,
		Machine: backend.Machine{Spec: spec, Backend: b.Name()}}
	if err := m.store.CreateVM(ctx, rec); err != nil {
		if errors.Is(err, store.ErrExists) {
			return nil, newErr("create", ErrVMExists, newFix(FixDeleteVM, ArgVM, id), fmt.Sprintf("vm %q already exists", id))
		}
		return nil, err
	}
	fail := func(err error) (*VM, error) {
		removeAll(spec.Dir, spec.RunDir)
		m.store.DeleteVM(context.WithoutCancel(ctx), id)
		return nil, err
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return fail(err)
	}
	// A VM that starts from a template gets its disk (an overlay on the
	// template's) when it starts; a cold boot's disk is made now.
	if !m.usesTemplate(cfg, b) {
		if err := m.prepareDisk(ctx, b, spec); err != nil {
			return fail(err)
		}
	}
	return &VM{m: m, id: id}, nil
}

// prepareDisk has the backend make the VM's disk (an overlay on the image,
// or a copy).
func (m *Manager) prepareDisk(ctx context.Context, b backend.Backend, spec backend.Spec) error {
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return err
	}
	if err := b.Prepare(ctx, spec); err != nil {
		return &Error{Op: "create", Message: fmt.Sprintf("preparing the disk of %s: %v", spec.ID, err), Err: err}
	}
	return nil
}

// checkSpec validates a launch spec by type (and with what the backend
// itself refuses) before anything is created for it: no file, no process.
func checkSpec(b backend.Backend, spec backend.Spec) error {
	err := spec.Validate()
	if v, ok := backend.As[backend.SpecValidator](b); ok && err == nil {
		err = v.ValidateSpec(spec)
	}
	if err != nil {
		return &Error{Op: "create", Message: fmt.Sprintf("vm %s cannot be created: %v", spec.ID, err),
			Fix: newFix(FixEditOption, ArgHint, "fix the configuration (see the message)"), Err: errors.Join(ErrInvalidConfig, err)}
	}
	return nil
}

func (m *Manager) specFor(id string, cfg Config, kernel, initrd, rootfs, imgArgs string) backend.Spec {
	// No per-VM value on the command line: a template's memory keeps it
	// (identity.go). The hostname, MAC and machine-id reach the guest
	// through set_identity.
	args := []string{"quiet", "smol.root=/dev/vda"}
	if imgArgs != "" {
		args = append(args, imgArgs)
	}
	if !cfg.NoNetwork {
		args = append(args, "smol.net=1")
	}
	pfs := make([]backend.PortForward, 0, len(cfg.PortForwards))
	for _, pf := range cfg.PortForwards {
		pfs = append(pfs, backend.PortForward(pf))
	}
	dir := m.vmDir(id)
	return backend.Spec{
		ID: id, Dir: dir, RunDir: m.runDir(id),
		Kernel: kernel, Initrd: initrd, BaseDisk: rootfs,
		Disk: filepath.Join(dir, "disk.qcow2"), DiskFormat: "qcow2",
		MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, Accel: cfg.Accel,
		Network: !cfg.NoNetwork, MAC: macFor(id), MachineID: newMachineID(), PortForwards: pfs,
		NetPolicy:  cfg.Network.toBackend(),
		KernelArgs: strings.Join(args, " "),
	}
}

// hostnameFor keeps a hostname within the kernel's 64-byte limit.
func hostnameFor(id string) string {
	if len(id) > 63 {
		return strings.TrimRight(id[:63], "-_")
	}
	return id
}

// Open returns a handle on an existing VM.
func (m *Manager) Open(ctx context.Context, id string) (*VM, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if _, err := m.record(ctx, id); err != nil {
		return nil, err
	}
	return &VM{m: m, id: id}, nil
}

// record loads the VM's row and reconciles its status with the VMM. The
// caller need not hold the VM's lock: the reconciled status is written back
// only if the row is unchanged since it was read (compare-and-set); when a
// lock holder changed it meanwhile (a new machine, a new status), what the
// VMM said may be about the old one, so it reads and asks again.
func (m *Manager) record(ctx context.Context, id string) (store.VM, error) {
	for attempt := 1; ; attempt++ {
		rec, err := m.reconcile(ctx, id)
		if errors.Is(err, store.ErrConflict) && attempt < 10 {
			continue
		}
		if errors.Is(err, store.ErrConflict) {
			return rec, nil // busy row: report what the VMM says, persist nothing
		}
		return rec, err
	}
}

func (m *Manager) reconcile(ctx context.Context, id string) (store.VM, error) {
	rec, err := m.store.GetVM(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return rec, newErr("open", ErrVMNotFound, newFix(FixListVMs), fmt.Sprintf("vm %q not found", id))
	}
	if err != nil {
		return rec, err
	}
	if rec.Status != store.VMRunning && rec.Status != store.VMPaused {
		return rec, nil
	}
	b, err := m.backend(rec.Backend)
	if err != nil {
		return rec, err
	}
	st, err := b.Status(ctx, rec.Machine)
	if err != nil {
		return rec, nil // cannot tell; keep the record
	}
	want := st // one Status type: the VMM's report is what is recorded
	switch st {
	case backend.StatusRunning, backend.StatusPaused:
	case backend.StatusStopped:
		rec.LastError = "the VM process exited"
		rec.PID = 0
	default:
		want, rec.LastError = store.VMError, "the VMM reports an unrecoverable guest error; see the logs of vm "+id
	}
	if want != rec.Status {
		rec.Status = want
		if err := m.store.UpdateVMIfUnchanged(ctx, rec); err != nil {
			return rec, err
		}
	}
	return rec, nil
}

func (m *Manager) info(rec store.VM) Info {
	var cfg Config
	json.Unmarshal(rec.Config, &cfg)
	pfs := make([]PortForward, 0, len(rec.Machine.PortForwards))
	for _, pf := range rec.Machine.PortForwards {
		pfs = append(pfs, PortForward(pf))
	}
	info := Info{
		ID: rec.ID, Status: rec.Status, Image: cfg.Image, Backend: rec.Backend,
		Accel: string(rec.Machine.Accel), MemoryMiB: rec.Machine.MemoryMiB, CPUs: rec.Machine.CPUs,
		Network: rec.Machine.Network, PortForwards: pfs, PID: rec.PID, CreatedAt: rec.CreatedAt,
		Hostname: hostnameFor(rec.ID), MachineID: rec.Machine.MachineID,
		RestoredFrom: rec.RestoredFrom, Template: rec.Template, Pool: strings.HasPrefix(rec.ID, poolPrefix), LastError: rec.LastError, Dir: rec.Machine.Dir, RunDir: rec.Machine.RunDir,
		ConsoleLog:      filepath.Join(rec.Machine.Dir, "console.log"),
		TemplateBuilder: strings.HasPrefix(rec.ID, builderPrefix),
	}
	if rec.Machine.Network {
		info.MAC = rec.Machine.MAC
		np := policyFromBackend(rec.Machine.NetPolicy)
		info.NetworkPolicy = &np
	}
	return info
}

// List returns every VM in the data directory, oldest first.
func (m *Manager) List(ctx context.Context) ([]Info, error) {
	recs, err := m.store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Info, 0, len(recs))
	for _, r := range recs {
		rec, err := m.record(ctx, r.ID)
		if err != nil {
			continue // deleted meanwhile
		}
		out = append(out, m.info(rec))
	}
	return out, nil
}

// Info returns the VM's current description.
func (vm *VM) Info(ctx context.Context) (Info, error) {
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return Info{}, err
	}
	info := vm.m.info(rec)
	if info.Network && (rec.Status == store.VMRunning || rec.Status == store.VMPaused) {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if st, err := vm.NetworkStats(sctx); err == nil {
			info.NetworkStats = &st
		}
		cancel()
	}
	return info, nil
}

// Status returns the VM's state, reconciled with the VMM process.
func (vm *VM) Status(ctx context.Context) (Status, error) {
	rec, err := vm.m.record(ctx, vm.id)
	return rec.Status, err
}

// lock serializes operations on this VM across processes.
func (vm *VM) lock(ctx context.Context) (func(), store.VM, backend.Backend, error) {
	unlock, err := store.LockVM(ctx, vm.m.opts.DataDir, vm.id)
	if err != nil {
		return nil, store.VM{}, nil, err
	}
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		unlock()
		return nil, rec, nil, err
	}
	b, err := vm.m.backend(rec.Backend)
	if err != nil {
		unlock()
		return nil, rec, nil, err
	}
	return unlock, rec, b, nil
}
