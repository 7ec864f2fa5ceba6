package smolvm_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
	"github.com/smolvm-go/smolvm/internal/store"
)

// TestTemplateRules checks the SDK's template rules on the fake backend
// (milliseconds; faults injected): the first Start builds the template and
// restores it, later ones restore it; the VM gets its own id, env,
// hostname and disk; templates are not user snapshots; ColdBoot boots;
// a failed build or restore rolls back; the delete rule holds for
// templates; a second Start boots from the VM's own disk. The same
// behaviour on real VMs: TestTemplates (template_test.go).
func TestTemplateRules(t *testing.T) {
	t.Setenv("SMOLVM_COLD_BOOT", "") // templates on (TestMain turns them off)
	e := newRulesEnv(t, fakebackend.Name, fakebackend.Default)
	fake := e.fake
	ctx := testCtx(t)
	m := e.m
	cfg := func(name string) smolvm.Config {
		c := e.cfg
		c.Name = name
		c.Env = map[string]string{"TMPL_ENV": "env-" + name}
		return c
	}
	start := func(t *testing.T, c smolvm.Config) *smolvm.VM {
		t.Helper()
		vm, err := m.New(ctx, c)
		if err != nil {
			t.Fatalf("New %s: %v", c.Name, err)
		}
		t.Cleanup(func() { vm.Close() })
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start %s: %v", c.Name, err)
		}
		return vm
	}
	templates := func(t *testing.T) []smolvm.TemplateInfo {
		t.Helper()
		l, err := m.ListTemplates(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}

	var tmpl smolvm.TemplateInfo
	var a, b *smolvm.VM
	t.Run("FirstCreateBuildsThenRestores", func(t *testing.T) {
		a = start(t, cfg("a"))
		l := templates(t)
		if len(l) != 1 || l[0].Stale || l[0].Uses != 1 || l[0].Shape.Image != "busybox" || l[0].Shape.MemoryMiB != 256 {
			t.Fatalf("templates after the first create: %+v", l)
		}
		tmpl = l[0]
		info, _ := a.Info(ctx)
		if info.Template != tmpl.Key || info.RestoredFrom != tmpl.SnapshotID || info.Status != smolvm.StatusRunning {
			t.Errorf("info of a: template %q restored from %q status %s; want %q %q running", info.Template, info.RestoredFrom, info.Status, tmpl.Key, tmpl.SnapshotID)
		}
		if got := strings.TrimSpace(mustOK(t, a, "echo $TMPL_ENV")); got != "env-a" {
			t.Errorf("env in a = %q", got)
		}
		if h := fake.Hostname("a"); h != "a" {
			t.Errorf("hostname of a = %q, want a", h)
		}
		vms, _ := m.List(ctx)
		for _, v := range vms {
			if strings.HasPrefix(v.ID, "template-build-") {
				t.Errorf("the builder vm is left: %s", v.ID)
			}
		}
		b = start(t, cfg("b"))
		if l := templates(t); len(l) != 1 || l[0].Uses != 2 {
			t.Errorf("templates after the second create: %+v", l)
		}
		if got := strings.TrimSpace(mustOK(t, b, "echo $TMPL_ENV")); got != "env-b" {
			t.Errorf("env in b = %q", got)
		}
		e.writeMarker(t, a, "only-in-a")
		if res := run(t, b, "cat "+markerFile); res.OK() {
			t.Errorf("a file written in a is in b: %q", res.Stdout)
		}
	})
	if tmpl.Key == "" {
		t.Fatal("no template")
	}

	t.Run("BuildTemplate", func(t *testing.T) {
		// The shape creates use: the same template, nothing built.
		got, err := m.BuildTemplate(ctx, "busybox", smolvm.TemplateOptions{MemoryMiB: 256, NoNetwork: true, Backend: smolvm.BackendName(fakebackend.Name)})
		if err != nil || got.Key != tmpl.Key || got.Uses != 2 {
			t.Errorf("BuildTemplate of the shape in use = %+v, %v; want template %s", got, err, tmpl.Key)
		}
		if _, err := m.BuildTemplate(ctx, "busybox", smolvm.TemplateOptions{MemoryMiB: 1}); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("BuildTemplate with 1 MiB = %v, want ErrInvalidConfig", err)
		}
		if _, err := m.BuildTemplate(ctx, "nope", smolvm.TemplateOptions{}); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("BuildTemplate of an unknown image = %v, want ErrInvalidConfig", err)
		}
	})

	t.Run("NotAUserSnapshot", func(t *testing.T) {
		if l, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{}); len(l) != 0 {
			t.Errorf("ListSnapshots lists the template: %+v", l)
		}
		if _, err := m.GetSnapshot(ctx, tmpl.SnapshotID); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("GetSnapshot(template) = %v", err)
		}
		if _, err := m.FromSnapshot(ctx, tmpl.SnapshotID, smolvm.RestoreOptions{Force: true}); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("FromSnapshot(template) = %v", err)
		}
		if _, err := m.Fork(ctx, tmpl.SnapshotID, 1, smolvm.ForkOptions{}); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("Fork(template) = %v", err)
		}
		if err := m.DeleteSnapshot(ctx, tmpl.SnapshotID); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("DeleteSnapshot(template) = %v", err)
		}
		if st, err := os.Stat(filepath.Join(e.dataDir, "snapshots", tmpl.SnapshotID)); err != nil || st.Mode().Perm() != 0o700 {
			t.Errorf("template dir: %v %v, want 0700", st, err)
		}
	})

	t.Run("ColdBoot", func(t *testing.T) {
		c := cfg("cold")
		c.ColdBoot = true
		vm := start(t, c)
		if info, _ := vm.Info(ctx); info.Template != "" || info.RestoredFrom != "" {
			t.Errorf("a cold boot names a template: %+v", info)
		}
		if l := templates(t); len(l) != 1 || l[0].Uses != 2 {
			t.Errorf("a cold boot used a template: %+v", l)
		}
		vm.Delete(ctx)
	})

	t.Run("CreatedColdStartedFromTemplate", func(t *testing.T) {
		// New under Options.ColdBoot prepares a disk; a Start by a
		// Manager with templates on restores the template all the same.
		cold, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: e.dataDir, ImageDir: testImageDir, RunDir: e.runDir,
			Logger: quietLogger(), ColdBoot: true})
		if err != nil {
			t.Fatal(err)
		}
		defer cold.Close()
		vm, err := cold.New(ctx, cfg("mixed"))
		if err != nil {
			t.Fatal(err)
		}
		vm.Close()
		vm, err = m.Open(ctx, "mixed")
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if info, _ := vm.Info(ctx); info.Template != tmpl.Key {
			t.Errorf("template %q, want %q", info.Template, tmpl.Key)
		}
		vm.Delete(ctx)
	})

	t.Run("RestoreFailureRollsBack", func(t *testing.T) {
		vm, err := m.New(ctx, cfg("d"))
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		for _, op := range []fakebackend.Op{fakebackend.OpRestore, fakebackend.OpLoadMemory, fakebackend.OpAgent} {
			remove := fake.Fail(op, "d", 1)
			err := vm.Start(ctx)
			remove()
			if err == nil {
				t.Fatalf("%s fault: Start succeeded", op)
			}
			if st, _ := vm.Status(ctx); st != smolvm.StatusCreated {
				t.Errorf("%s fault: status %s, want created (as New left it)", op, st)
			}
			for _, a := range e.alive() {
				if strings.Contains(a, "d") && !strings.Contains(a, "a") && !strings.Contains(a, "b") {
					t.Errorf("%s fault: a machine is left: %s", op, a)
				}
			}
			if info, _ := vm.Info(ctx); info.Template != "" || info.RestoredFrom != "" {
				t.Errorf("%s fault: the record names the template: %+v", op, info)
			}
		}
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start after the faults: %v", err)
		}
		if got := strings.TrimSpace(mustOK(t, vm, "echo $TMPL_ENV")); got != "env-d" {
			t.Errorf("env in d = %q", got)
		}
		vm.Delete(ctx)
	})

	t.Run("BuildFailureRollsBack", func(t *testing.T) {
		c := cfg("f")
		c.MemoryMiB = 300 // a shape no template serves yet
		vm, err := m.New(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		remove := fake.Fail(fakebackend.OpSnapshot, "", 1)
		err = vm.Start(ctx)
		remove()
		if err == nil {
			t.Fatal("Start succeeded though the template's snapshot failed")
		}
		if l := templates(t); len(l) != 1 {
			t.Errorf("a failed build left a template: %+v", l)
		}
		vms, _ := m.List(ctx)
		for _, v := range vms {
			if strings.HasPrefix(v.ID, "template-build-") {
				t.Errorf("a failed build left its builder vm: %s", v.ID)
			}
		}
		ents, _ := os.ReadDir(filepath.Join(e.dataDir, "snapshots"))
		for _, en := range ents {
			if en.Name() != tmpl.SnapshotID {
				t.Errorf("a failed build left %s in snapshots/", en.Name())
			}
		}
		if st, _ := vm.Status(ctx); st != smolvm.StatusCreated {
			t.Errorf("status %s, want created", st)
		}
		// The failure is remembered for a while: a create in that time
		// gets it back without a second builder; an explicit build retries.
		if err := vm.Start(ctx); !errors.Is(err, smolvm.ErrBoot) || !strings.Contains(err.Error(), "not tried again") {
			t.Fatalf("Start right after a failed build = %v, want the remembered failure (ErrBoot)", err)
		}
		if _, err := m.BuildTemplate(ctx, "busybox", smolvm.TemplateOptions{MemoryMiB: 300, NoNetwork: true, Backend: smolvm.BackendName(fakebackend.Name)}); err != nil {
			t.Fatalf("BuildTemplate after the fault: %v", err)
		}
		// Another shape: its own template, never a wrong shape.
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start after the fault: %v", err)
		}
		info, _ := vm.Info(ctx)
		if l := templates(t); len(l) != 2 || info.Template == tmpl.Key || info.MemoryMiB != 300 {
			t.Errorf("a 300 MiB VM: template %s (first %s), %d MiB; templates %+v", info.Template, tmpl.Key, info.MemoryMiB, l)
		}
		vm.Delete(ctx)
	})

	t.Run("FailedBuildNotRetriedByEachWaiter", func(t *testing.T) {
		// Three creates of a new shape at once, its build fails once: one
		// builder ran; the others return its failure instead of building
		// again in turn (a second build would succeed: the fault is spent).
		remove := fake.Fail(fakebackend.OpSnapshot, "", 1)
		defer remove()
		var wg sync.WaitGroup
		errs := make([]error, 3)
		for i := range errs {
			c := cfg(fmt.Sprintf("w%d", i))
			c.MemoryMiB = 310
			vm, err := m.New(ctx, c)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { vm.Delete(ctx); vm.Close() }()
			wg.Go(func() { errs[i] = vm.Start(ctx) })
		}
		wg.Wait()
		remembered := 0
		for i, err := range errs {
			if err == nil {
				t.Errorf("create %d succeeded: a waiter built the template again", i)
			} else if errors.Is(err, smolvm.ErrBoot) && strings.Contains(err.Error(), "not tried again") {
				remembered++
			}
		}
		if remembered != len(errs)-1 {
			t.Errorf("%d creates returned the remembered failure, want %d (one built): %v", remembered, len(errs)-1, errs)
		}
		for _, l := range templates(t) {
			if l.Shape.MemoryMiB == 310 {
				t.Errorf("a waiter built the template again after the failure: %+v", l)
			}
		}
	})

	t.Run("DeleteRuleAndSecondStart", func(t *testing.T) {
		if err := m.DeleteTemplate(ctx, tmpl.Key[:12]); !errors.Is(err, smolvm.ErrSnapshotInUse) {
			t.Fatalf("DeleteTemplate while a and b run = %v, want ErrSnapshotInUse", err)
		}
		if err := a.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		if err := b.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if err := m.DeleteTemplate(ctx, tmpl.Key); err != nil {
			t.Fatalf("DeleteTemplate with only stopped users: %v", err)
		}
		for _, l := range templates(t) {
			if l.Key == tmpl.Key {
				t.Errorf("deleted template still listed")
			}
		}
		// A second start boots from the VM's own disk (detached from the
		// deleted template) and keeps saying where it came from.
		if err := b.Start(ctx); err != nil {
			t.Fatalf("second start of b: %v", err)
		}
		if got := strings.TrimSpace(mustOK(t, b, "echo $TMPL_ENV")); got != "env-b" {
			t.Errorf("env in b after a second start = %q", got)
		}
		if info, _ := b.Info(ctx); info.Template != tmpl.Key || info.RestoredFrom != "" {
			t.Errorf("b after its template went: template %q restored from %q", info.Template, info.RestoredFrom)
		}
		if err := m.DeleteTemplate(ctx, "zz"); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("DeleteTemplate(bad key) = %v", err)
		}
	})

	t.Run("CollectRemovesLeftoverBuilders", func(t *testing.T) {
		// A build that died leaves its builder VM: gc removes it, unless
		// a build holds the template's lock.
		// The name is reserved: only a build makes such a VM. A dead
		// build's leftover is made here as one would be: a builder that
		// never got to snapshot (its snapshot fails).
		if _, err := m.New(ctx, smolvm.Config{Name: "template-build-x", Image: "busybox"}); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("New(template-build-x) = %v, want ErrInvalidConfig", err)
		}
		c := cfg("leftover")
		c.MemoryMiB = 320
		remove := fake.Fail(fakebackend.OpSnapshot, "", -1)
		remove2 := fake.Fail(fakebackend.OpStop, "", -1) // the rollback cannot stop it: it is left
		vm, err := m.New(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.Start(ctx); err == nil {
			t.Fatal("Start succeeded though snapshots fail")
		}
		remove()
		remove2()
		var name string
		vms, _ := m.List(ctx)
		for _, v := range vms {
			if strings.HasPrefix(v.ID, "template-build-") {
				name = v.ID
				if !v.TemplateBuilder || v.Pool {
					t.Errorf("builder %s: Info.TemplateBuilder %v, Pool %v (sandbox ls shows it)", v.ID, v.TemplateBuilder, v.Pool)
				}
			} else if v.TemplateBuilder {
				t.Errorf("%s is marked a template builder", v.ID)
			}
		}
		if name == "" {
			t.Fatal("no leftover builder to collect")
		}
		unlock, err := store.LockSnapshot(ctx, e.dataDir, "tmpl-"+strings.TrimPrefix(name, "template-build-"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := m.CollectTemplates(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Open(ctx, name); err != nil {
			t.Errorf("gc removed the builder of a running build: %v", err)
		}
		unlock()
		if _, err := m.CollectTemplates(ctx); err != nil {
			t.Fatal(err)
		}
		e.assertNoVM(t, name)
		vm.Delete(ctx)
	})
}
