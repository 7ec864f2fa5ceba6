package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/store"
)

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
	// The first start restores the template of the VM's shape; later ones
	// (and ColdBoot) boot from the VM's own disk.
	if rec.Status == store.VMCreated && vm.m.usesTemplate(cfg, b) {
		return vm.startFromTemplate(ctx, rec, b, cfg)
	}
	// A VM in "error" may still have a VMM process (e.g. KVM internal-error).
	b.Stop(ctx, rec.Machine)
	vm.closeClient()
	spec := rec.Machine.Spec
	if spec.MachineID == "" {
		spec.MachineID = newMachineID() // a VM created before machine-ids: kept from now on
	}
	if rec.Status == store.VMCreated && spec.Disk != "" {
		// Made by New, unless the VM was created to start from a
		// template (which Options.ColdBoot now overrides).
		if _, err := os.Stat(spec.Disk); errors.Is(err, os.ErrNotExist) {
			if err := vm.m.prepareDisk(ctx, b, spec); err != nil {
				return err
			}
		}
	}
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
	if err := vm.afterBoot(ctx, c, m.Spec, cfg.Env); err != nil {
		return vm.bootFailed(ctx, rec, b, err)
	}
	return nil
}

// afterBoot gives a guest that just came up its clock and identity
// (applyIdentity) and the configured environment.
func (vm *VM) afterBoot(ctx context.Context, c *agentclient.Client, spec backend.Spec, env map[string]string) error {
	if err := vm.applyIdentity(ctx, c, spec); err != nil {
		return err
	}
	if len(env) > 0 {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
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
	fix := newFix(FixRunDoctor, ArgVM, vm.id)
	if errors.Is(cause, ErrUnsafeDir) {
		fix = newFix(FixRemoveDir, ArgEnv, "SMOLVM_RUN_DIR")
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
			return nil, newErr(op, ErrVMNotFound, newFix(FixListVMs), fmt.Sprintf("vm %q not found", vm.id))
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
		return nil, &Error{Op: op, Message: msg, Fix: newFix(FixShowLogs, ArgVM, vm.id), Err: err}
	}
	vm.setClient(c)
	return c, nil
}

func (vm *VM) notRunning(op string, rec store.VM) error {
	fix := newFix(FixStartVM, ArgVM, vm.id)
	if rec.Status == store.VMPaused {
		fix = newFix(FixResumeVM, ArgVM, vm.id)
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
		return newErr("pause", ErrUnsupported, Fix{}, b.Name()+" cannot pause VMs")
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
	return newErr("resume", ErrVMNotRunning, newFix(FixStartVM, ArgVM, vm.id),
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
	// was restored from): set it from the host's, and reseed its CRNG.
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if c, err := vm.agent(cctx, "resume"); err == nil {
		vm.refreshGuest(cctx, c)
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
