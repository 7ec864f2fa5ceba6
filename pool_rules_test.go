package smolvm_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
	"github.com/smolvm-go/smolvm/internal/store"
)

// TestPoolRules checks the warm pool's rules on the fake backend
// (milliseconds): FillPools restores members paused; a Start claims one
// (never the same one twice, across two Managers), gives it the VM's
// name, env and its own dirs' VMM; Start never refills (FillPools does,
// after); a claim whose steps fail falls back to the template and leaves
// no machine; an empty pool falls back to the template; removing the pool
// deletes its members. The same on real VMs: TestPool (pool_test.go).
func TestPoolRules(t *testing.T) {
	t.Setenv("SMOLVM_COLD_BOOT", "") // templates on (TestMain turns them off)
	e := newRulesEnv(t, fakebackend.Name, fakebackend.Default)
	fake := e.fake
	ctx := testCtx(t)
	m := e.m
	opts := smolvm.TemplateOptions{MemoryMiB: 256, NoNetwork: true, Backend: smolvm.BackendName(fakebackend.Name)}
	cfg := func(name string) smolvm.Config {
		c := e.cfg
		c.Name = name
		c.Env = map[string]string{"POOL_ENV": "env-" + name}
		return c
	}
	pool := func(t *testing.T) smolvm.PoolInfo {
		t.Helper()
		l, err := m.Pools(ctx)
		if err != nil || len(l) != 1 {
			t.Fatalf("Pools = %+v, %v; want one pool", l, err)
		}
		return l[0]
	}
	fill := func(t *testing.T) {
		t.Helper()
		if err := m.FillPools(ctx); err != nil {
			t.Fatalf("FillPools: %v", err)
		}
	}
	// member is the pool member whose machine the VM runs on ("" when it
	// restored the template into its own dirs).
	member := func(t *testing.T, vm *smolvm.VM) string {
		t.Helper()
		info, err := vm.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if d := filepath.Base(info.Dir); d != info.ID {
			return d
		}
		return ""
	}
	// orphans are the fake machines no VM record accounts for (a VM that
	// claimed a member runs on the machine launched as the member).
	orphans := func(t *testing.T) []string {
		t.Helper()
		infos, err := m.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		known := map[string]bool{}
		for _, i := range infos {
			known[filepath.Base(i.Dir)] = true
		}
		var out []string
		for _, id := range fake.Machines() {
			if !known[id] {
				out = append(out, id)
			}
		}
		return out
	}
	start := func(t *testing.T, mgr *smolvm.Manager, name string) *smolvm.VM {
		t.Helper()
		vm, err := mgr.New(ctx, cfg(name))
		if err != nil {
			t.Fatalf("New %s: %v", name, err)
		}
		t.Cleanup(func() { vm.Close() })
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start %s: %v", name, err)
		}
		return vm
	}

	if err := m.SetPool(ctx, "busybox", opts, 2); err != nil {
		t.Fatal(err)
	}
	fill(t)
	p := pool(t)
	if p.Size != 2 || p.Ready != 2 || len(p.Members) != 2 {
		t.Fatalf("pool after FillPools: %+v", p)
	}
	if _, err := m.New(ctx, smolvm.Config{Name: "pool-x", Image: "busybox"}); !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Errorf("New(pool-x) = %v, want ErrInvalidConfig (reserved)", err)
	}
	infos, _ := m.List(ctx)
	for _, i := range infos {
		if strings.HasPrefix(i.ID, "pool-") != i.Pool || (i.Pool && i.Status != smolvm.StatusPaused) {
			t.Errorf("List: %s pool=%v status %s", i.ID, i.Pool, i.Status)
		}
	}

	t.Run("ClaimGivesIdentity", func(t *testing.T) {
		before := pool(t).Members
		vm := start(t, m, "c1")
		mem := member(t, vm)
		if !slices.Contains(before, mem) {
			t.Fatalf("c1 runs on %q, not on a member of %v", mem, before)
		}
		if got := strings.TrimSpace(mustOK(t, vm, "echo $POOL_ENV")); got != "env-c1" {
			t.Errorf("env in c1 = %q", got)
		}
		if h := fake.Hostname(mem); h != "c1" {
			t.Errorf("hostname of the claimed machine = %q, want c1", h)
		}
		info, _ := vm.Info(ctx)
		if info.Status != smolvm.StatusRunning || info.Template == "" || info.Pool || info.Hostname != "c1" {
			t.Errorf("info of c1: %+v", info)
		}
		// Start never refills: the pool is short until FillPools.
		if p := pool(t); p.Ready != 1 || slices.Contains(p.Members, mem) {
			t.Errorf("pool after one claim: %+v", p)
		}
		if l, _ := m.ListTemplates(ctx); len(l) != 1 || l[0].Uses != 3 { // 2 members + c1
			t.Errorf("templates: %+v", l)
		}
	})

	t.Run("RefillAfterClaim", func(t *testing.T) {
		fill(t)
		if p := pool(t); p.Ready != 2 {
			t.Errorf("pool after the refill: %+v", p)
		}
	})

	t.Run("FillPoolFillsOnlyItsPool", func(t *testing.T) {
		// What `template pool IMAGE --size N` runs: the pool named fills;
		// another pool that is short stays as it is.
		other := opts
		other.MemoryMiB = 288
		if err := m.SetPool(ctx, "busybox", other, 1); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := m.SetPool(ctx, "busybox", other, 0); err != nil {
				t.Errorf("removing the other pool: %v", err)
			}
		}()
		if err := m.FillPool(ctx, "busybox", opts); err != nil {
			t.Fatal(err)
		}
		l, err := m.Pools(ctx)
		if err != nil || len(l) != 2 {
			t.Fatalf("Pools = %+v, %v; want two", l, err)
		}
		for _, p := range l {
			want := p.Size
			if p.Options.MemoryMiB == other.MemoryMiB {
				want = 0
			}
			if p.Ready != want {
				t.Errorf("pool of %d MiB: %d ready, want %d", p.Options.MemoryMiB, p.Ready, want)
			}
		}
	})

	t.Run("ClaimAtomicAcrossManagers", func(t *testing.T) {
		// Two Managers (as two processes), four creates at once, two
		// members: each member goes to one VM, the others restore the
		// template.
		var wg sync.WaitGroup
		vms := make([]*smolvm.VM, 4)
		errs := make([]error, 4)
		for k := range 4 {
			mgr := m
			if k%2 == 1 {
				mgr = e.m2
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				vm, err := mgr.New(ctx, cfg(fmt.Sprintf("at%d", k)))
				if err == nil {
					err = vm.Start(ctx)
				}
				vms[k], errs[k] = vm, err
			}()
		}
		wg.Wait()
		claimed := map[string]string{}
		for k, vm := range vms {
			if errs[k] != nil {
				t.Fatalf("create %d: %v", k, errs[k])
			}
			defer vm.Close()
			if mem := member(t, vm); mem != "" {
				if other, ok := claimed[mem]; ok {
					t.Errorf("member %s claimed by %s and %s", mem, other, vm.ID())
				}
				claimed[mem] = vm.ID()
			}
			if got := strings.TrimSpace(mustOK(t, vm, "echo $POOL_ENV")); got != "env-"+vm.ID() {
				t.Errorf("env in %s = %q", vm.ID(), got)
			}
		}
		if len(claimed) != 2 {
			t.Errorf("%d members claimed by 4 creates from a pool of 2, want 2: %v", len(claimed), claimed)
		}
		if p := pool(t); p.Ready != 0 {
			t.Errorf("pool after 4 creates: %+v", p)
		}
	})

	t.Run("EmptyPoolFallsBack", func(t *testing.T) {
		vm := start(t, m, "empty")
		if mem := member(t, vm); mem != "" {
			t.Errorf("a create from an empty pool runs on %s", mem)
		}
		if info, _ := vm.Info(ctx); info.Template == "" {
			t.Errorf("a create from an empty pool did not restore the template: %+v", info)
		}
	})

	t.Run("FailedClaimFallsBack", func(t *testing.T) {
		// A claim whose steps fail rolls back (the member's machine is
		// stopped, its dirs and row gone) and the next member is tried;
		// when every one fails, the template is restored.
		fill(t)
		remove := fake.Fail(fakebackend.OpResume, "next", 1) // the first claim's resume
		vm := start(t, m, "next")
		remove()
		if mem := member(t, vm); mem == "" {
			t.Errorf("after one failed claim, the second member was not claimed")
		}
		if p := pool(t); p.Ready != 0 {
			t.Errorf("pool after a failed and a good claim: %+v", p)
		}
		fill(t)
		remove = fake.Fail(fakebackend.OpResume, "failing", -1) // every claim's resume
		vm = start(t, m, "failing")
		remove()
		if mem := member(t, vm); mem != "" {
			t.Errorf("a failed claim's machine is used: %s", mem)
		}
		if got := strings.TrimSpace(mustOK(t, vm, "echo $POOL_ENV")); got != "env-failing" {
			t.Errorf("env = %q", got)
		}
		if info, _ := vm.Info(ctx); info.Template == "" || info.Hostname != "failing" {
			t.Errorf("the fallback did not restore the template: %+v", info)
		}
		if p := pool(t); p.Ready != 0 {
			t.Errorf("pool after two failed claims: %+v", p)
		}
		if o := orphans(t); len(o) != 0 {
			t.Errorf("machines left by the failed claims: %v", o)
		}
	})

	t.Run("DeleteClaimedVM", func(t *testing.T) {
		fill(t)
		vm := start(t, m, "gone")
		mem := member(t, vm)
		if mem == "" {
			t.Fatal("no member claimed")
		}
		// A second start boots from the VM's disk, as the VM.
		if err := vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if err := vm.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if h := fake.Hostname("gone"); h != "gone" {
			t.Errorf("hostname after a restart = %q", h)
		}
		if err := vm.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(fake.Machines(), mem) {
			t.Errorf("the claimed machine %s is left after Delete", mem)
		}
		if o := orphans(t); len(o) != 0 {
			t.Errorf("machines left: %v", o)
		}
		e.assertNoVM(t, "gone")
	})

	t.Run("NoClaimWhileTemplateLocked", func(t *testing.T) {
		// A template delete holds its lock exclusively, then counts the
		// template's users: a claim does not slip in between (it takes
		// the lock shared, never waiting; the create waits on the
		// template path instead).
		fill(t)
		ready := pool(t).Ready
		l, err := m.ListTemplates(ctx)
		if err != nil || len(l) != 1 {
			t.Fatalf("templates: %+v, %v", l, err)
		}
		unlock, err := store.LockSnapshot(ctx, e.dataDir, l[0].SnapshotID)
		if err != nil {
			t.Fatal(err)
		}
		vm, err := m.New(ctx, cfg("locked"))
		if err != nil {
			unlock()
			t.Fatal(err)
		}
		defer vm.Close()
		done := make(chan error, 1)
		go func() { done <- vm.Start(ctx) }()
		time.Sleep(200 * time.Millisecond)
		unlock()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if mem := member(t, vm); mem != "" {
			t.Errorf("claimed %s while the template's lock was held", mem)
		}
		if p := pool(t); p.Ready != ready {
			t.Errorf("pool: %+v, want %d ready as before", p, ready)
		}
	})

	t.Run("ImageRebuiltReplacesMembers", func(t *testing.T) {
		// Members of the old template are not ready once the image
		// changed: a create restores the new template, FillPools replaces
		// them, and the old template can then be collected.
		imgDir, setArgs := templateImageDir(t)
		setArgs("smol.pooltest=1")
		dir, err := os.MkdirTemp(testRoot, "pr")
		if err != nil {
			t.Fatal(err)
		}
		m3, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dir, ImageDir: imgDir, RunDir: e.runDir, Logger: quietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			cleanupAll(dir)
			m3.Close()
		}()
		if err := m3.SetPool(ctx, "busybox", opts, 1); err != nil {
			t.Fatal(err)
		}
		if err := m3.FillPools(ctx); err != nil {
			t.Fatal(err)
		}
		old, _ := m3.Pools(ctx)
		if len(old) != 1 || old[0].Ready != 1 {
			t.Fatalf("pool: %+v", old)
		}
		setArgs("smol.pooltest=2")
		if l, _ := m3.Pools(ctx); l[0].Ready != 0 {
			t.Errorf("members of the old template count as ready: %+v", l[0])
		}
		vm, err := m3.New(ctx, cfg("rebuilt"))
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.Start(ctx); err != nil {
			t.Fatal(err)
		}
		info, _ := vm.Info(ctx)
		if filepath.Base(info.Dir) != "rebuilt" {
			t.Errorf("a create after the rebuild claimed an old member: %s", info.Dir)
		}
		if err := m3.FillPools(ctx); err != nil {
			t.Fatal(err)
		}
		l, _ := m3.Pools(ctx)
		if l[0].Ready != 1 || slices.Contains(l[0].Members, old[0].Members[0]) {
			t.Errorf("pool after FillPools: %+v (old member %s)", l[0], old[0].Members[0])
		}
		if res, err := m3.CollectTemplates(ctx); err != nil || len(res.Removed) != 1 {
			t.Errorf("gc after the refill: %+v, %v; want the old template removed", res, err)
		}
	})

	t.Run("RemovePoolDeletesMembers", func(t *testing.T) {
		fill(t)
		if err := m.SetPool(ctx, "busybox", opts, 0); err != nil {
			t.Fatal(err)
		}
		if l, _ := m.Pools(ctx); len(l) != 0 {
			t.Errorf("Pools after removal: %+v", l)
		}
		infos, _ := m.List(ctx)
		for _, i := range infos {
			if i.Pool {
				t.Errorf("member %s left after the pool's removal", i.ID)
			}
		}
		if o := orphans(t); len(o) != 0 {
			t.Errorf("machines left after the pool's removal: %v", o)
		}
		if err := m.SetPool(ctx, "busybox", opts, smolvm.MaxPoolSize+1); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("SetPool over the max = %v", err)
		}
	})
}
