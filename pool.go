package smolvm

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/store"
)

// A warm pool keeps N VMs of one image and shape restored from its
// template and paused. The first Start of a VM of that shape claims one
// instead of restoring the template: one store transaction moves the
// member's machine (its running VMM, dirs and uid) to the VM's record and
// deletes the member's row, so two processes never get the same member;
// then the VM gets its own identity and environment and is resumed. The
// VM's record id is its name; its Machine keeps the member's dirs (VMDIR
// and RUNDIR are named after the member, which the VMM's command line and
// sockets refer to) with Spec.ID set to the VM's id. Refills never happen
// inside Start: call FillPools after it (the CLI runs `smolvm template
// pool fill` detached once a create returns). See docs/architecture.md
// ("Warm pool").

// poolPrefix starts the id of every pool member; New refuses it.
const poolPrefix = "pool-"

// MaxPoolSize bounds one pool.
const MaxPoolSize = 16

// PoolInfo describes a warm pool.
type PoolInfo struct {
	Name    string          `json:"name"`
	Image   string          `json:"image"`
	Options TemplateOptions `json:"options"`
	// Size is how many members the pool keeps; Ready how many are paused
	// and ready to be claimed now (restored from the current template of
	// the image: after a rebuild, none until the pool is filled again).
	Size  int `json:"size"`
	Ready int `json:"ready"`
	// Members are the ready members' ids.
	Members []string `json:"members,omitempty"`
	// IdleMemoryKiB is the proportional set size (PSS) of the ready
	// members' processes (VMMs and network sidecars), summed: what the
	// pool costs the host's memory while it waits (0 when it cannot be
	// read).
	IdleMemoryKiB int64 `json:"idle_memory_kib"`
	// PIDs are the ready members' processes, VMMs and network sidecars
	// (to measure their CPU time while idle).
	PIDs []int `json:"pids,omitempty"`
}

// poolConfig is the Config a pool's members are created with: the
// template's neutral shape (no env, ports or caller name; the default
// network policy), so the VMs that claim them differ only in what the
// claim gives them.
func poolConfig(imageName string, opts TemplateOptions) (Config, error) {
	cfg := Config{Image: imageName, MemoryMiB: opts.MemoryMiB, CPUs: opts.CPUs, NoNetwork: opts.NoNetwork,
		Backend: opts.Backend, Accel: opts.Accel}.withDefaults()
	if err := cfg.validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// poolKey names a pool after its image and shape.
func poolKey(cfg Config) (name, tag string) {
	net := "net"
	if cfg.NoNetwork {
		net = "nonet"
	}
	name = fmt.Sprintf("%s/%dm/%dc/%s/%s/%s", cfg.Image, cfg.MemoryMiB, cfg.CPUs, net, cfg.Backend, cfg.Accel)
	h := sha256.Sum256([]byte(name))
	return name, hex.EncodeToString(h[:4])
}

// poolMemberPrefix starts the ids of one pool's members.
func poolMemberPrefix(tag string) string { return poolPrefix + tag + "-" }

func newPoolMemberID(tag string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return poolMemberPrefix(tag) + hex.EncodeToString(b)
}

func optionsOf(cfg Config) TemplateOptions {
	return TemplateOptions{MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, NoNetwork: cfg.NoNetwork, Backend: cfg.Backend, Accel: cfg.Accel}
}

// poolWarmTimeout bounds the one command that warms a new pool member
// (a detached filler has no other deadline; the image's shell runs it).
const poolWarmTimeout = 60 * time.Second

// SetPool keeps n restored, paused VMs of image with the shape in opts
// ready (the template is built when needed). n = 0 removes the pool and
// deletes its members. SetPool only records the size: FillPools (or
// `smolvm template pool`) starts the members.
func (m *Manager) SetPool(ctx context.Context, imageName string, opts TemplateOptions, n int) error {
	if n < 0 || n > MaxPoolSize {
		return newErr("pool", ErrInvalidConfig, Fix{}, fmt.Sprintf("pool size %d out of range 0-%d", n, MaxPoolSize))
	}
	cfg, err := poolConfig(imageName, opts)
	if err != nil {
		return err
	}
	if _, err := m.openImage(cfg.Image); err != nil {
		return err
	}
	name, _ := poolKey(cfg)
	if n == 0 {
		if err := m.store.DeletePool(ctx, name); err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		// Drain under the pool's fill lock (fillPool of a pool with no row
		// drains it): a filler that read the old size before the row went
		// must not add members after this drain, where nothing would find
		// them again.
		return m.fillPool(ctx, imageName, opts)
	}
	b, err := m.backend(string(cfg.Backend))
	if err != nil {
		return err
	}
	if !m.usesTemplate(Config{}, b) {
		return newErr("pool", ErrUnsupported, Fix{}, fmt.Sprintf("the %s backend cannot take memory snapshots (or templates are off: SMOLVM_COLD_BOOT), so it has no warm pool", b.Name()))
	}
	raw, _ := json.Marshal(optionsOf(cfg))
	return m.store.PutPool(ctx, store.Pool{Name: name, Image: cfg.Image, Options: raw, Size: n})
}

// Pools lists the warm pools with their ready members and idle cost.
func (m *Manager) Pools(ctx context.Context) ([]PoolInfo, error) {
	pools, err := m.store.ListPools(ctx)
	if err != nil {
		return nil, err
	}
	recs, err := m.store.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]PoolInfo, 0, len(pools))
	for _, p := range pools {
		info := PoolInfo{Name: p.Name, Image: p.Image, Size: p.Size}
		json.Unmarshal(p.Options, &info.Options)
		cfg, err := poolConfig(p.Image, info.Options)
		if err != nil {
			out = append(out, info)
			continue
		}
		_, tag := poolKey(cfg)
		key, err := m.poolTemplateKey(ctx, cfg) // members of an older template are not ready
		if err != nil {
			out = append(out, info)
			continue
		}
		for _, r := range recs {
			if !strings.HasPrefix(r.ID, poolMemberPrefix(tag)) || r.Status != store.VMPaused || r.Template != key {
				continue
			}
			info.Ready++
			info.Members = append(info.Members, r.ID)
			for _, pid := range []int{r.PID, r.Machine.NetPID} {
				if pid > 0 && processAlive(pid) {
					info.PIDs = append(info.PIDs, pid)
					if mem, err := procfs.Rollup(pid); err == nil {
						info.IdleMemoryKiB += mem.Pss
					}
				}
			}
		}
		out = append(out, info)
	}
	return out, nil
}

// FillPools brings every pool to its size: it deletes members that no
// longer match (image rebuilt, pool shrunk, left half-made by a filler
// that died) and restores new ones from the template, paused. One filler
// per pool at a time (a lock under the data dir); a second waits for the
// first and then finds the pool full. Start never fills a pool: call
// FillPools after a create that claimed a member (the CLI does, detached).
func (m *Manager) FillPools(ctx context.Context) error {
	pools, err := m.store.ListPools(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range pools {
		var opts TemplateOptions
		json.Unmarshal(p.Options, &opts)
		if err := m.fillPool(ctx, p.Image, opts); err != nil {
			errs = append(errs, fmt.Errorf("pool %s: %w", p.Name, err))
		}
	}
	return errors.Join(errs...)
}

// FillPool is FillPools for the one pool of imageName and opts (the shape
// SetPool was given): other pools are left as they are. A pool that has no
// size (none was set, or 0) is drained.
func (m *Manager) FillPool(ctx context.Context, imageName string, opts TemplateOptions) error {
	return m.fillPool(ctx, imageName, opts)
}

// fillPool fills one pool under its filler lock, reading its size again
// once it holds the lock (a SetPool may have changed it meanwhile).
func (m *Manager) fillPool(ctx context.Context, imageName string, opts TemplateOptions) error {
	cfg, err := poolConfig(imageName, opts)
	if err != nil {
		return err
	}
	name, tag := poolKey(cfg)
	dir := filepath.Join(m.opts.DataDir, store.LockDir)
	if err := fsutil.PrivateDir(dir); err != nil {
		return err
	}
	unlock, err := fsutil.Lock(ctx, filepath.Join(dir, poolMemberPrefix(tag)+"fill.lock"), nil)
	if err != nil {
		return err
	}
	defer unlock()
	size := 0
	pools, err := m.store.ListPools(ctx)
	if err != nil {
		return err
	}
	for _, p := range pools {
		if p.Name == name {
			size = p.Size
		}
	}
	if size == 0 {
		return m.drainPool(ctx, tag, nil)
	}
	key, err := m.poolTemplateKey(ctx, cfg)
	if err != nil {
		return err
	}
	// Keep the ready members of the current template, oldest first, up to
	// size; delete the rest (we hold the filler lock: no member is being
	// made, so one not paused was left by a filler that died).
	ready := 0
	if err := m.drainPool(ctx, tag, func(r store.VM) bool {
		if r.Status == store.VMPaused && r.Template == key && ready < size {
			ready++
			return true
		}
		return false
	}); err != nil {
		return err
	}
	for ; ready < size; ready++ {
		if err := m.addPoolMember(ctx, cfg, tag); err != nil {
			return err
		}
	}
	return nil
}

// poolTemplateKey is the key of the template a pool's members are
// restored from now (it changes when the image is rebuilt).
func (m *Manager) poolTemplateKey(ctx context.Context, cfg Config) (string, error) {
	img, err := m.openImage(cfg.Image)
	if err != nil {
		return "", err
	}
	b, err := m.backend(string(cfg.Backend))
	if err != nil {
		return "", err
	}
	shape, err := m.templateShape(ctx, cfg, b, img)
	if err != nil {
		return "", err
	}
	return shape.Key(), nil
}

// addPoolMember restores one member from the template (building it when
// needed) and pauses it. A failure deletes it.
func (m *Manager) addPoolMember(ctx context.Context, cfg Config, tag string) (err error) {
	cfg.Name = newPoolMemberID(tag)
	vm, err := m.newVM(ctx, cfg)
	if err != nil {
		return err
	}
	defer vm.Close()
	defer func() {
		if err != nil {
			if derr := vm.Delete(context.WithoutCancel(ctx)); derr != nil {
				m.log.Warn("deleting a pool member that failed to start", "vm", vm.id, "err", derr)
			}
		}
	}()
	if err := vm.Start(ctx); err != nil {
		return err
	}
	rec, err := m.store.GetVM(ctx, vm.id)
	if err != nil {
		return err
	}
	if rec.Template == "" {
		return fmt.Errorf("pool member %s did not start from a template", vm.id)
	}
	// Warm the guest paths a claim's first command takes (under TCG the
	// code is translated per VMM process, on first use): one command. It
	// leaves nothing behind in the guest.
	if err := vm.warmUp(ctx, poolWarmTimeout); err != nil {
		return fmt.Errorf("warming pool member %s: %w", vm.id, err)
	}
	vm.closeClient()
	return vm.Pause(ctx)
}

// drainPool deletes the members of the pool tag for which keep is false
// (nil: all), oldest first. A member claimed meanwhile is skipped.
func (m *Manager) drainPool(ctx context.Context, tag string, keep func(store.VM) bool) error {
	recs, err := m.store.ListVMs(ctx)
	if err != nil {
		return err
	}
	sort.SliceStable(recs, func(i, j int) bool { return recs[i].CreatedAt.Before(recs[j].CreatedAt) })
	for _, r := range recs {
		if !strings.HasPrefix(r.ID, poolMemberPrefix(tag)) || (keep != nil && keep(r)) {
			continue
		}
		vm := &VM{m: m, id: r.ID}
		if err := vm.Delete(ctx); err != nil && !errors.Is(err, ErrVMNotFound) {
			return fmt.Errorf("deleting pool member %s: %w", r.ID, err)
		}
	}
	return nil
}

// poolable says whether a VM whose record New wrote (rec) can take a pool
// member: the member's sidecar runs with no port forwards and the default
// policy, so a VM with ports or another policy restores the template.
func poolable(rec store.VM, member backend.Machine) bool {
	s := rec.Machine.Spec
	return len(s.PortForwards) == 0 && len(member.PortForwards) == 0 && s.Network == member.Network &&
		reflect.DeepEqual(s.NetPolicy, member.NetPolicy)
}

// claimFromPool starts the VM from a ready member of the pool for key, if
// there is one (claimed is false otherwise, or when every attempt failed:
// the caller restores the template). The caller holds the VM's lock.
func (vm *VM) claimFromPool(ctx context.Context, rec store.VM, b backend.Backend, cfg Config, key string) (claimed bool) {
	if strings.HasPrefix(vm.id, poolPrefix) || strings.HasPrefix(vm.id, builderPrefix) {
		return false
	}
	recs, err := vm.m.store.ListVMs(ctx)
	if err != nil {
		return false
	}
	var candidates []string
	for _, r := range recs {
		if strings.HasPrefix(r.ID, poolPrefix) && r.Status == store.VMPaused && r.Template == key && poolable(rec, r.Machine) {
			candidates = append(candidates, r.ID)
		}
	}
	if len(candidates) == 0 {
		return false
	}
	// The template's lock, shared, as a restore of it takes: a delete
	// (exclusive) either finished before (its members are gone) or waits
	// and then sees the VM as a user. Never waited for here: a delete or
	// build under way sends the VM down the template path, which waits.
	lctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	unlockTemplate, err := store.LockSnapshotShared(lctx, vm.m.opts.DataDir, templateSnapshotID(key))
	cancel()
	if err != nil {
		return false
	}
	defer unlockTemplate()
	for _, id := range candidates {
		// Another claimer or a filler holds it: try the next one.
		lctx, cancel = context.WithTimeout(ctx, 20*time.Millisecond)
		unlock, err := store.LockVM(lctx, vm.m.opts.DataDir, id)
		cancel()
		if err != nil {
			continue
		}
		ok, err := vm.claimMember(ctx, rec, b, cfg, id)
		unlock()
		if ok {
			return true
		}
		if err != nil {
			vm.m.log.Warn("claiming a pool member failed; trying the next one or the template", "vm", vm.id, "member", id, "err", err)
		}
		if ctx.Err() != nil {
			return false
		}
	}
	return false
}

// claimMember runs the claim steps on one member (its lock held): claim
// pool member (one transaction: the member's row goes, its machine, uid and
// template become the VM's) [undo: stop its VMM, remove its dirs, put the
// VM's record back], resume vmm, connect agent [undo: close], set clock and
// identity, set env, count template use (last). ok is false when the
// member was gone or taken (err nil) or a step failed (err).
func (vm *VM) claimMember(ctx context.Context, rec store.VM, b backend.Backend, cfg Config, memberID string) (ok bool, err error) {
	vm.closeClient()
	c := &cloneOp{m: vm.m, b: b, id: vm.id, resume: true, locks: heldLocks{dataDir: vm.m.opts.DataDir},
		template: &templateUse{env: cfg.Env, before: rec}}
	defer c.locks.release()
	var taken bool
	claim := func(ctx context.Context) error {
		return vm.m.store.Tx(ctx, func(tx *store.Tx) error {
			mrec, err := tx.GetVM(ctx, memberID)
			if errors.Is(err, store.ErrNotFound) {
				taken = true
				return errPoolMemberGone
			}
			if err != nil {
				return err
			}
			cur, err := tx.GetVM(ctx, vm.id)
			if err != nil {
				return err
			}
			if mrec.Status != store.VMPaused || mrec.Template == "" || cur.Status != store.VMCreated {
				taken = true
				return errPoolMemberGone
			}
			if err := tx.MoveUID(ctx, memberID, vm.id); err != nil {
				return err
			}
			if err := tx.DeleteVM(ctx, memberID); err != nil {
				return err
			}
			mach := mrec.Machine
			mach.Spec.ID, mach.Spec.MAC, mach.Spec.MachineID = vm.id, cur.Machine.MAC, cur.Machine.MachineID
			if mach.Spec.MachineID == "" {
				mach.Spec.MachineID = newMachineID()
			}
			cur.Machine, cur.PID, cur.Status, cur.LastError = mach, mrec.PID, store.VMPaused, ""
			cur.RestoredFrom, cur.Template = mrec.RestoredFrom, mrec.Template
			if err := tx.UpdateVM(ctx, cur); err != nil {
				return err
			}
			c.rec, c.mach = cur, mach
			c.template.key, c.template.snapshotID = mrec.Template, mrec.RestoredFrom
			c.vm = &VM{m: vm.m, id: vm.id}
			return nil
		})
	}
	unclaim := func(ctx context.Context) error {
		return errors.Join(c.stopVMM(ctx), c.removeDirs(ctx), c.unrecordVMM(ctx))
	}
	resume := func(ctx context.Context) error {
		if err := b.Resume(ctx, c.mach); err != nil {
			return err
		}
		c.rec.Status = store.VMRunning
		return vm.m.store.UpdateVM(ctx, c.rec)
	}
	err = vm.m.runSteps(ctx, "start from pool", []any{"vm", vm.id, "member", memberID},
		steps.Step{Name: "clear unstarted vm", Do: func(ctx context.Context) error { return b.Stop(ctx, rec.Machine) }},
		steps.Step{Name: "claim pool member", Do: claim, Undo: unclaim},
		steps.Step{Name: "resume vmm", Do: resume},
		steps.Step{Name: "connect agent", Do: c.connectAgent, Undo: c.disconnect},
		steps.Step{Name: "set clock and identity", Do: c.setIdentity},
		steps.Step{Name: "set env", Do: c.setEnv},
		steps.Step{Name: "count template use", Do: c.countUse}, // last
	)
	if taken {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	vm.setClient(c.client)
	// The dirs New made for the VM are not used: it runs in the member's.
	if d := rec.Machine.Dir; d != "" && d != c.mach.Dir {
		os.RemoveAll(d)
	}
	if d := rec.Machine.RunDir; d != "" && d != c.mach.RunDir {
		os.RemoveAll(d)
	}
	vm.m.log.Debug("started from the warm pool", "vm", vm.id, "member", memberID)
	return true, nil
}

var errPoolMemberGone = errors.New("pool member claimed by another process")
