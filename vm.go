package smolvm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/consolelog"
	"github.com/smolvm-go/smolvm/internal/fsutil"
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
	CreatedAt    time.Time     `json:"created_at"`
	RestoredFrom string        `json:"restored_from,omitempty"`
	LastError    string        `json:"last_error,omitempty"`
	Dir          string        `json:"dir"`
	ConsoleLog   string        `json:"console_log"`
}

// ID returns the VM id.
func (vm *VM) ID() string { return vm.id }

// Manager returns the manager the VM belongs to.
func (vm *VM) Manager() *Manager { return vm.m }

// New creates a VM (record, per-VM disk overlay) without starting it.
func (m *Manager) New(ctx context.Context, cfg Config) (*VM, error) {
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
		return nil, newErr("create", ErrVMExists, fmt.Sprintf("smolvm sandbox delete %s, or choose another --name", id),
			fmt.Sprintf("vm %q already exists", id))
	}
	img, err := m.openImage(cfg.Image)
	if err != nil {
		return nil, err
	}
	b, err := m.backend(cfg.Backend)
	if err != nil {
		return nil, err
	}
	spec := m.specFor(id, cfg, img.Kernel, img.Initrd, img.Rootfs, img.KernelArgs)
	if spec.Network && !b.Capabilities().NetworkPolicy {
		return nil, newErr("create", ErrUnsupported, "add --no-network, or use --backend qemu",
			fmt.Sprintf("the %s backend cannot enforce a guest network policy (it would reach the host's networks)", b.Name()))
	}
	if caps := b.Capabilities(); caps.KernelFormat == backend.KernelVmlinux {
		if img.Vmlinux == "" {
			return nil, newErr("create", ErrImageNotBuilt, "smolvm image build "+cfg.Image+" --kernel minimal",
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
			return nil, newErr("create", ErrVMExists, "smolvm sandbox delete "+id, fmt.Sprintf("vm %q already exists", id))
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
	if err := b.Prepare(ctx, spec); err != nil {
		return fail(&Error{Op: "create", Message: fmt.Sprintf("preparing the disk of %s: %v", id, err), Err: err})
	}
	return &VM{m: m, id: id}, nil
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
			Fix: "fix the configuration (see the message)", Err: errors.Join(ErrInvalidConfig, err)}
	}
	return nil
}

func (m *Manager) specFor(id string, cfg Config, kernel, initrd, rootfs, imgArgs string) backend.Spec {
	args := []string{"quiet", "smol.root=/dev/vda", "smol.hostname=" + hostnameFor(id)}
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
		MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, Accel: backend.Accel(cfg.Accel),
		Network: !cfg.NoNetwork, MAC: macFor(id), PortForwards: pfs,
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
		return rec, newErr("open", ErrVMNotFound, "smolvm sandbox list --all", fmt.Sprintf("vm %q not found", id))
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
	var want store.VMStatus
	switch st {
	case backend.StatusRunning:
		want = store.VMRunning
	case backend.StatusPaused:
		want = store.VMPaused
	case backend.StatusStopped:
		want, rec.LastError = store.VMStopped, "the VM process exited"
		rec.PID = 0
	default:
		want, rec.LastError = store.VMError, "the VMM reports an unrecoverable guest error; see smolvm sandbox logs "+id
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
		ID: rec.ID, Status: Status(rec.Status), Image: cfg.Image, Backend: rec.Backend,
		Accel: string(rec.Machine.Accel), MemoryMiB: rec.Machine.MemoryMiB, CPUs: rec.Machine.CPUs,
		Network: rec.Machine.Network, PortForwards: pfs, PID: rec.PID, CreatedAt: rec.CreatedAt,
		RestoredFrom: rec.RestoredFrom, LastError: rec.LastError, Dir: rec.Machine.Dir,
		ConsoleLog: filepath.Join(rec.Machine.Dir, "console.log"),
	}
	if rec.Machine.Network {
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
	return Status(rec.Status), err
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

// Start boots the VM (or resumes it when paused) and returns once its agent
// answers. Starting a running VM does nothing.
func (vm *VM) Start(ctx context.Context) error {
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	switch rec.Status {
	case store.VMRunning:
		return nil
	case store.VMPaused:
		return vm.resumeLocked(ctx, rec, b)
	}
	var cfg Config
	json.Unmarshal(rec.Config, &cfg)
	cfg = cfg.withDefaults()
	// A VM in "error" may still have a VMM process (e.g. KVM internal-error).
	b.Stop(ctx, rec.Machine)
	vm.closeClient()
	spec := rec.Machine.Spec
	if err := vm.m.runAs(ctx, &spec); err != nil {
		return err
	}
	m, err := b.Start(ctx, spec)
	if err != nil {
		return vm.bootFailed(ctx, rec, b, err)
	}
	rec.Machine, rec.PID, rec.Status, rec.LastError = m, m.PID, store.VMRunning, ""
	if err := vm.m.store.UpdateVM(ctx, rec); err != nil {
		b.Stop(context.WithoutCancel(ctx), m)
		return err
	}
	bootCtx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	c, err := vm.m.connectAgent(bootCtx, b, m)
	if err != nil {
		return vm.bootFailed(ctx, rec, b, err)
	}
	vm.setClient(c)
	if err := vm.afterBoot(ctx, c, cfg.Env); err != nil {
		return vm.bootFailed(ctx, rec, b, err)
	}
	return nil
}

// afterBoot sets the guest clock and the configured environment. The clock
// request is not waited for: the agent applies it before any later request
// on this connection, so the first command already sees the host's time
// and a round trip is saved; a failure is logged.
func (vm *VM) afterBoot(ctx context.Context, c *agentclient.Client, env map[string]string) error {
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	wait, err := c.SendSetTime(cctx, time.Now())
	if err != nil {
		return fmt.Errorf("setting the guest clock: %w", err)
	}
	go func() {
		wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := wait(wctx); err != nil && !errors.Is(err, agentclient.ErrDisconnected) {
			vm.m.log.Warn("setting the guest clock", "vm", vm.id, "err", err)
		}
	}()
	if len(env) > 0 {
		if err := c.SetEnv(cctx, env, nil); err != nil {
			return fmt.Errorf("setting the guest environment: %w", err)
		}
	}
	return nil
}

// bootFailed stops whatever runs, records the error and explains it.
func (vm *VM) bootFailed(ctx context.Context, rec store.VM, b backend.Backend, cause error) error {
	ctx = context.WithoutCancel(ctx)
	vm.closeClient()
	b.Stop(ctx, rec.Machine)
	rec.Status, rec.PID, rec.LastError = store.VMError, 0, cause.Error()
	vm.m.store.UpdateVM(ctx, rec)
	msg := fmt.Sprintf("vm %s failed to boot: %v", vm.id, cause)
	if tail := logTail(filepath.Join(rec.Machine.Dir, "console.log"), 15); tail != "" {
		msg += "\n--- guest console (last lines) ---\n" + tail
	}
	var ve *backend.VMMError
	if errors.As(cause, &ve) && ve.Log != "" && strings.Contains(msg, ve.Log) == false {
		msg += "\n--- vmm log ---\n" + ve.Log
	}
	fix := "smolvm doctor; then smolvm sandbox logs " + vm.id
	if errors.Is(cause, ErrUnsafeDir) {
		fix = "remove the directory named above (another user may have planted it), or set SMOLVM_RUN_DIR to a private directory"
	}
	return &Error{Op: "start", Message: msg, Fix: fix, Err: errors.Join(ErrBoot, cause)}
}

// connectAgent dials the guest agent and resyncs, failing fast when the VMM
// process dies or reports an error while we wait.
func (m *Manager) connectAgent(ctx context.Context, b backend.Backend, mach backend.Machine) (*agentclient.Client, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	done := make(chan struct{})
	defer close(done)
	go func() {
		// A dead process is seen within 100 ms (a cheap signal-0 check); a
		// VMM that is alive but failed (e.g. KVM internal-error) within a
		// second (a QMP query, kept rare: under TCG it costs guest CPU).
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for i := 1; ; i++ {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if mach.PID > 0 && i%10 != 0 && processAlive(mach.PID) {
					continue
				}
				st, err := b.Status(ctx, mach)
				if err == nil && (st == backend.StatusStopped || st == backend.StatusError) {
					cancel(fmt.Errorf("the VM stopped while waiting for its agent (VMM status: %s)", st))
					return
				}
			}
		}
	}()
	c, err := agentclient.Connect(ctx, func(ctx context.Context) (net.Conn, error) { return b.DialAgent(ctx, mach) })
	if err == nil {
		c.SetCallTimeout(m.opts.AgentCallTimeout, 0)
	}
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
			return nil, cause
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("the guest agent did not answer in time: %w", err)
		}
		return nil, err
	}
	return c, nil
}

func (vm *VM) setClient(c *agentclient.Client) {
	vm.mu.Lock()
	old := vm.client
	vm.client = c
	vm.mu.Unlock()
	if old != nil {
		old.Close()
	}
}

func (vm *VM) closeClient() {
	vm.setClient(nil)
}

// agent returns a connected agent client, connecting when needed. The VM
// must be running.
func (vm *VM) agent(ctx context.Context, op string) (*agentclient.Client, error) {
	// Hot path (every Run): with a live connection, the recorded status is
	// enough (another process that pauses or stops the VM updates it, and a
	// dead VMM closes the connection); reconciling with the VMM (a QMP round
	// trip) is left for when we must connect.
	vm.mu.Lock()
	c := vm.client
	vm.mu.Unlock()
	if c != nil && clientAlive(c) {
		rec, err := vm.m.store.GetVM(ctx, vm.id)
		if errors.Is(err, store.ErrNotFound) {
			return nil, newErr(op, ErrVMNotFound, "smolvm sandbox list --all", fmt.Sprintf("vm %q not found", vm.id))
		}
		if err != nil {
			return nil, err
		}
		if rec.Status != store.VMRunning {
			return nil, vm.notRunning(op, rec)
		}
		return c, nil
	}
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	if rec.Status != store.VMRunning {
		return nil, vm.notRunning(op, rec)
	}
	b, err := vm.m.backend(rec.Backend)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err = vm.m.connectAgent(cctx, b, rec.Machine)
	if err != nil {
		msg := fmt.Sprintf("cannot reach the agent of vm %s: %v", vm.id, err)
		// Say so when the VM stopped running meanwhile (a guest that
		// powered off, a VMM that paused it): that is why nobody answered.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if st, serr := b.Status(sctx, rec.Machine); serr == nil && st != backend.StatusRunning {
			msg += fmt.Sprintf(" (the VM is now %s)", st)
		}
		cancel()
		return nil, &Error{Op: op, Message: msg, Fix: "smolvm sandbox logs " + vm.id, Err: err}
	}
	vm.setClient(c)
	return c, nil
}

func (vm *VM) notRunning(op string, rec store.VM) error {
	fix := "smolvm sandbox start " + vm.id
	if rec.Status == store.VMPaused {
		fix = "smolvm sandbox resume " + vm.id
	}
	msg := fmt.Sprintf("cannot %s: vm %s is %s, not running", op, vm.id, rec.Status)
	if rec.LastError != "" {
		msg += " (" + rec.LastError + ")"
	}
	return newErr(op, ErrVMNotRunning, fix, msg)
}

// Pause freezes the VM's vCPUs. Memory stays allocated.
func (vm *VM) Pause(ctx context.Context) error {
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if rec.Status == store.VMPaused {
		return nil
	}
	if rec.Status != store.VMRunning {
		return vm.notRunning("pause", rec)
	}
	if !b.Capabilities().Pause {
		return newErr("pause", ErrUnsupported, "", b.Name()+" cannot pause VMs")
	}
	if err := b.Pause(ctx, rec.Machine); err != nil {
		return err
	}
	rec.Status = store.VMPaused
	return vm.m.store.UpdateVM(ctx, rec)
}

// Resume continues a paused VM.
func (vm *VM) Resume(ctx context.Context) error {
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	switch rec.Status {
	case store.VMRunning:
		return nil
	case store.VMPaused:
		return vm.resumeLocked(ctx, rec, b)
	}
	return newErr("resume", ErrVMNotRunning, "smolvm sandbox start "+vm.id,
		fmt.Sprintf("cannot resume vm %s: it is %s, not paused", vm.id, rec.Status))
}

func (vm *VM) resumeLocked(ctx context.Context, rec store.VM, b backend.Backend) error {
	if err := b.Resume(ctx, rec.Machine); err != nil {
		return err
	}
	rec.Status = store.VMRunning
	if err := vm.m.store.UpdateVM(ctx, rec); err != nil {
		return err
	}
	// The guest clock stood still while paused (or since the snapshot it
	// was restored from): set it from the host's. Best effort: a guest that
	// is still booting (a paused disk restore) sets its clock from the RTC.
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if c, err := vm.agent(cctx, "resume"); err == nil {
		c.SetTime(cctx, time.Now())
	}
	return nil
}

// Stop shuts the VM down (its disk is kept; Start boots it again).
func (vm *VM) Stop(ctx context.Context) error {
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	return vm.stopLocked(ctx, rec, b)
}

func (vm *VM) stopLocked(ctx context.Context, rec store.VM, b backend.Backend) error {
	if rec.Status == store.VMRunning {
		// Flush the guest's page cache so the disk is consistent.
		vm.mu.Lock()
		c := vm.client
		vm.mu.Unlock()
		if c != nil && clientAlive(c) {
			sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			c.Sync(sctx)
			cancel()
		}
	}
	vm.closeClient()
	if err := b.Stop(ctx, rec.Machine); err != nil {
		return err
	}
	if rec.Status == store.VMCreated {
		return nil
	}
	rec.Status, rec.PID = store.VMStopped, 0
	return vm.m.store.UpdateVM(ctx, rec)
}

// Delete stops the VM and removes everything it owns.
func (vm *VM) Delete(ctx context.Context) error {
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	vm.closeClient()
	if err := b.Stop(ctx, rec.Machine); err != nil {
		return fmt.Errorf("delete %s: stopping: %w", vm.id, err)
	}
	removeAll(rec.Machine.Dir, rec.Machine.RunDir)
	removeReplaced(rec.Machine.Dir)
	return vm.m.store.DeleteVM(ctx, vm.id)
}

// Close releases the handle (agent connection). The VM keeps running. A
// handle from the package-level New, Open, FromSnapshot or Fork also
// releases the Manager made for it; the clones of one Fork share theirs,
// which closes with the last of them. Closing twice is harmless.
func (vm *VM) Close() error {
	vm.closeClient()
	vm.mu.Lock()
	r := vm.owner
	vm.owner = nil
	vm.mu.Unlock()
	if r != nil {
		return r.release()
	}
	return nil
}

// Result is the outcome of a command. A non-zero exit code is a result, not
// an error.
//
// Stdout and Stderr keep at most the output limit of each stream (the first
// DefaultOutputLimit bytes unless WithOutputLimit or Options.OutputLimit
// say otherwise); Truncated says that more was produced and dropped.
// Writers given with WithStdout/WithStderr still get all of it.
//
// TimedOut means the guest killed the command at its WithTimeout. A guest
// that does not end the command within the timeout plus ExecTimeoutGrace
// gets no Result: Run returns an error wrapping ErrTimeout.
type Result struct {
	ExitCode  int           `json:"exit_code"`
	Stdout    string        `json:"stdout"`
	Stderr    string        `json:"stderr"`
	TimedOut  bool          `json:"timed_out,omitempty"`
	Truncated bool          `json:"truncated,omitempty"`
	Duration  time.Duration `json:"duration_ns"`
}

// DefaultOutputLimit is how many bytes of each stream a Result keeps by
// default.
const DefaultOutputLimit = 4 << 20

// ExecTimeoutGrace is how long past a command's WithTimeout the host waits
// for the guest's answer before it gives up (asking the guest to kill the
// command) and returns ErrTimeout.
const ExecTimeoutGrace = 2 * time.Second

// OK reports whether the command exited with status 0.
func (r *Result) OK() bool { return r.ExitCode == 0 && !r.TimedOut }

// Output is stdout with surrounding white space trimmed.
func (r *Result) Output() string { return strings.TrimSpace(r.Stdout) }

// RunOption customizes Run.
type RunOption func(*runOpts)

type runOpts struct {
	timeout        time.Duration
	outputLimit    int
	env            map[string]string
	dir            string
	stdin          []byte
	stdinReader    io.Reader
	stdout, stderr io.Writer
}

// WithTimeout kills the command (its whole process group) after d. The
// guest kills it (Result.TimedOut); should the guest not answer within d
// plus ExecTimeoutGrace, the host stops waiting, asks the guest to kill it
// and Run returns an error wrapping ErrTimeout.
func WithTimeout(d time.Duration) RunOption { return func(o *runOpts) { o.timeout = d } }

// WithOutputLimit keeps at most n bytes of each of stdout and stderr in the
// Result (n <= 0: the default, DefaultOutputLimit or Options.OutputLimit).
// Output past it is dropped and flagged by Result.Truncated; streaming
// writers still get everything.
func WithOutputLimit(n int) RunOption { return func(o *runOpts) { o.outputLimit = n } }

// WithEnv adds environment variables for this command.
func WithEnv(env map[string]string) RunOption { return func(o *runOpts) { o.env = env } }

// WithWorkdir runs the command in dir.
func WithWorkdir(dir string) RunOption { return func(o *runOpts) { o.dir = dir } }

// WithStdin feeds data to the command's standard input.
func WithStdin(data []byte) RunOption {
	return func(o *runOpts) { o.stdin, o.stdinReader = data, nil }
}

// MaxStdinSize bounds what WithStdinReader reads: the agent protocol
// carries a command's standard input whole, in its exec request.
const MaxStdinSize = agentproto.MaxFileSize

// WithStdinReader feeds what r yields to the command's standard input. The
// protocol carries standard input whole (it is not streamed while the
// command runs), so Run reads r to EOF before it starts the command, at
// most MaxStdinSize bytes: a reader that yields more fails Run with
// ErrInvalidConfig and the command does not run. For more data, write it
// to a guest file (VM.WriteFileFrom) and redirect from it. A Read that
// blocks holds Run (ctx cannot interrupt it; it is checked once r is
// read), and WithTimeout counts from the start of the command. The last of
// WithStdin and WithStdinReader wins.
func WithStdinReader(r io.Reader) RunOption {
	return func(o *runOpts) { o.stdin, o.stdinReader = nil, r }
}

// WithStdout streams standard output to w while the command runs (it is
// also returned in Result.Stdout).
func WithStdout(w io.Writer) RunOption { return func(o *runOpts) { o.stdout = w } }

// WithStderr streams standard error to w while the command runs.
func WithStderr(w io.Writer) RunOption { return func(o *runOpts) { o.stderr = w } }

// Run runs a shell command line (/bin/sh -c) in the guest.
func (vm *VM) Run(ctx context.Context, command string, opts ...RunOption) (*Result, error) {
	return vm.exec(ctx, agentproto.ExecRequest{Shell: command}, opts)
}

// RunArgs runs argv directly (no shell) in the guest.
func (vm *VM) RunArgs(ctx context.Context, argv []string, opts ...RunOption) (*Result, error) {
	if len(argv) == 0 {
		return nil, newErr("run", ErrInvalidConfig, "", "empty command")
	}
	return vm.exec(ctx, agentproto.ExecRequest{Argv: argv}, opts)
}

func (vm *VM) exec(ctx context.Context, req agentproto.ExecRequest, opts []RunOption) (*Result, error) {
	var o runOpts
	for _, f := range opts {
		f(&o)
	}
	c, err := vm.agent(ctx, "run commands")
	if err != nil {
		return nil, err
	}
	if o.stdinReader != nil {
		if o.stdin, err = readStdin(o.stdinReader); err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	req.Env, req.Cwd, req.Stdin = o.env, o.dir, o.stdin
	if o.timeout > 0 {
		req.TimeoutMS = o.timeout.Milliseconds()
	}
	limit := o.outputLimit
	if limit <= 0 {
		limit = vm.m.opts.OutputLimit
	}
	if limit <= 0 {
		limit = DefaultOutputLimit
	}
	stdout, stderr := &capBuffer{max: limit}, &capBuffer{max: limit}
	var wout, werr io.Writer = stdout, stderr
	if o.stdout != nil {
		wout = io.MultiWriter(stdout, o.stdout)
	}
	if o.stderr != nil {
		werr = io.MultiWriter(stderr, o.stderr)
	}
	// The host-side deadline: the guest's timeout plus a grace.
	ectx := ctx
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ectx, cancel = context.WithTimeout(ctx, o.timeout+ExecTimeoutGrace)
		defer cancel()
	}
	start := time.Now()
	res, err := c.Exec(ectx, req, wout, werr)
	if err != nil {
		if o.timeout > 0 && ctx.Err() == nil && ectx.Err() != nil {
			return nil, &Error{Op: "run", Message: fmt.Sprintf("run in vm %s: the guest did not end the command within its timeout of %s (+%s grace); "+
				"the host stopped waiting and asked the guest to kill it", vm.id, o.timeout, ExecTimeoutGrace),
				Fix: "smolvm sandbox logs " + vm.id, Err: errors.Join(ErrTimeout, err)}
		}
		return nil, vm.agentErr("run", &Error{Op: "run", Message: fmt.Sprintf("run in vm %s: %v", vm.id, err), Err: err})
	}
	out := &Result{ExitCode: res.ExitCode, Stdout: string(stdout.data), Stderr: string(stderr.data),
		TimedOut: res.TimedOut, Truncated: stdout.cut || stderr.cut, Duration: time.Since(start)}
	if res.Error != "" && out.Stderr == "" {
		out.Stderr = res.Error + "\n"
	}
	return out, nil
}

// readStdin reads a WithStdinReader source, at most MaxStdinSize bytes.
func readStdin(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxStdinSize+1))
	if err != nil {
		return nil, &Error{Op: "run", Message: fmt.Sprintf("reading the command's standard input: %v", err), Err: err}
	}
	if len(data) > MaxStdinSize {
		return nil, newErr("run", ErrInvalidConfig, "write the data to a guest file (VM.WriteFileFrom) and redirect the command's input from it",
			fmt.Sprintf("standard input over %d bytes (MaxStdinSize): the agent protocol carries it whole", MaxStdinSize))
	}
	return data, nil
}

// capBuffer keeps the first max bytes written to it and notes whether more
// came. Writes never fail (the other writers of a MultiWriter still get
// everything).
type capBuffer struct {
	data []byte
	max  int
	cut  bool
}

func (b *capBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - len(b.data); room < len(p) {
		b.cut = true
		p = p[:max(room, 0)]
	}
	b.data = append(b.data, p...)
	return n, nil
}

// agentErr gives errors of agent calls their SDK sentinel: ErrTimeout for a
// request the guest did not answer in time, ErrGuestProtocol for a reply
// the host refused.
func (vm *VM) agentErr(op string, err error) error {
	var sentinel error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, agentclient.ErrTimeout):
		sentinel = ErrTimeout
	case errors.Is(err, agentclient.ErrProtocol):
		sentinel = ErrGuestProtocol
	default:
		return err
	}
	msg := err.Error()
	var e *Error
	if errors.As(err, &e) {
		msg = e.Message
	} else {
		msg = fmt.Sprintf("%s in vm %s: %s", op, vm.id, msg)
	}
	return &Error{Op: op, Message: msg, Fix: "smolvm sandbox logs " + vm.id, Err: errors.Join(sentinel, err)}
}

// UploadFile copies a host file into the guest (atomically; the mode is
// kept). Any size works: large files stream in chunks.
func (vm *VM) UploadFile(ctx context.Context, localPath, guestPath string) error {
	if !strings.HasPrefix(guestPath, "/") {
		return newErr("upload", ErrInvalidConfig, "", fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	f, err := os.Open(localPath)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return newErr("upload", ErrInvalidConfig, "", fmt.Sprintf("%s is not a regular file", localPath))
	}
	if strings.HasSuffix(guestPath, "/") {
		guestPath += filepath.Base(localPath)
	}
	c, err := vm.agent(ctx, "upload files")
	if err != nil {
		return err
	}
	return vm.agentErr("upload", c.WriteFileFrom(ctx, guestPath, f, st.Size(), st.Mode().Perm()))
}

// WriteFile writes data to a guest file (atomically).
func (vm *VM) WriteFile(ctx context.Context, guestPath string, data []byte, mode fs.FileMode) error {
	c, err := vm.agent(ctx, "write files")
	if err != nil {
		return err
	}
	return vm.agentErr("write", c.WriteFileFrom(ctx, guestPath, bytes.NewReader(data), int64(len(data)), mode))
}

// ReadFile reads a guest file.
func (vm *VM) ReadFile(ctx context.Context, guestPath string) ([]byte, error) {
	c, err := vm.agent(ctx, "read files")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if _, _, err := c.ReadFileTo(ctx, guestPath, &buf); err != nil {
		return nil, vm.agentErr("read", err)
	}
	return buf.Bytes(), nil
}

// WriteFileFrom writes the size bytes r yields to a guest file (atomically;
// missing parent directories are created; mode as in WriteFile). Any size
// works: large files stream in chunks, so r is never held in memory whole.
// r must yield at least size bytes (fewer fail it, and nothing is
// written); bytes past size are not read.
func (vm *VM) WriteFileFrom(ctx context.Context, guestPath string, r io.Reader, size int64, mode fs.FileMode) error {
	if !strings.HasPrefix(guestPath, "/") {
		return newErr("write", ErrInvalidConfig, "", fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	if size < 0 {
		return newErr("write", ErrInvalidConfig, "", fmt.Sprintf("negative size %d", size))
	}
	c, err := vm.agent(ctx, "write files")
	if err != nil {
		return err
	}
	return vm.agentErr("write", c.WriteFileFrom(ctx, guestPath, r, size, mode))
}

// ReadFileTo copies a guest file to w and returns the mode the guest
// reports for it and the number of bytes written. Any size works: large
// files stream in chunks. The guest is not trusted: w never gets more than
// the size it announced, and a file that changes while it is read, or does
// not match that size, fails with an error (ErrGuestProtocol for a size
// mismatch). On error w may hold part of the file (DownloadFile is the
// atomic variant). The mode is the guest's word: mask it (as DownloadFile
// does) before giving it to a host file.
func (vm *VM) ReadFileTo(ctx context.Context, guestPath string, w io.Writer) (fs.FileMode, int64, error) {
	if !strings.HasPrefix(guestPath, "/") {
		return 0, 0, newErr("read", ErrInvalidConfig, "", fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	c, err := vm.agent(ctx, "read files")
	if err != nil {
		return 0, 0, err
	}
	mode, n, err := c.ReadFileTo(ctx, guestPath, w)
	return mode, n, vm.agentErr("read", err)
}

// DownloadFile copies a guest file to the host (atomically). It gets the
// guest file's permission bits masked by the process umask, never setuid,
// setgid or sticky (a guest's 04777 becomes 0755 under umask 022). Any size
// works: large files stream in chunks.
func (vm *VM) DownloadFile(ctx context.Context, guestPath, localPath string) error {
	c, err := vm.agent(ctx, "download files")
	if err != nil {
		return err
	}
	if st, err := os.Stat(localPath); err == nil && st.IsDir() {
		localPath = filepath.Join(localPath, filepath.Base(guestPath))
	}
	return vm.agentErr("download", fsutil.Write(localPath, func(w io.Writer) (os.FileMode, error) {
		mode, _, err := c.ReadFileTo(ctx, guestPath, w)
		return fsutil.HostMode(mode), err
	}))
}

// SetEnv sets environment variables for every later command (persisted in
// the guest, so they survive restarts and snapshots).
func (vm *VM) SetEnv(ctx context.Context, env map[string]string) error {
	if err := (Config{Env: env}).validateEnv(); err != nil {
		return err
	}
	c, err := vm.agent(ctx, "set environment variables")
	if err != nil {
		return err
	}
	return vm.agentErr("setenv", c.SetEnv(ctx, env, nil))
}

// ExposePort forwards hostPort on 127.0.0.1 to guestPort (TCP) now and on
// every later start.
func (vm *VM) ExposePort(ctx context.Context, hostPort, guestPort int) error {
	pf := PortForward{HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}
	if err := pf.validate(); err != nil {
		return err
	}
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if !rec.Machine.Network {
		return newErr("port expose", ErrUnsupported, "recreate the vm without --no-network", fmt.Sprintf("vm %s has networking off", vm.id))
	}
	if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
		if err := b.ExposePort(ctx, rec.Machine, backend.PortForward(pf)); err != nil {
			return err
		}
	}
	rec.Machine.PortForwards = append(rec.Machine.PortForwards, backend.PortForward(pf))
	return vm.m.store.UpdateVM(ctx, rec)
}

// Logs returns the guest console log: its last consolelog.MaxSize bytes
// (1 MiB; older output is dropped, so a guest flooding its console costs
// the host nothing).
func (vm *VM) Logs(ctx context.Context) ([]byte, error) {
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
		if b, err := vm.m.backend(rec.Backend); err == nil {
			if d, ok := backend.As[backend.ConsoleDrainer](b); ok {
				if err := d.DrainConsole(ctx, rec.Machine); err != nil {
					vm.m.log.Debug("draining the console", "vm", vm.id, "err", err)
				}
			}
		}
	}
	data, err := consolelog.Tail(filepath.Join(rec.Machine.Dir, "console.log"), consolelog.MaxSize)
	if errors.Is(err, fs.ErrNotExist) {
		return []byte{}, nil
	}
	return data, err
}

// logTail returns the last n lines of the log at path, reading only its
// last 64 KiB.
func logTail(path string, n int) string {
	data, err := consolelog.Tail(path, 64<<10)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func clientAlive(c *agentclient.Client) bool {
	select {
	case <-c.Done():
		return false
	default:
		return true
	}
}
