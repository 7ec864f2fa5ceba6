package smolvm_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend" // registers "fake"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// TestRules tests the SDK's rules on snapshots (restore-once, rollback of a
// failed restore, fork failures, the delete rule, locking between
// Managers, ids validated before anything exists) once per backend:
// "fake" (internal/backend/fakebackend: the real agent server in this
// process, milliseconds; error paths reached by injected faults) and the
// QEMU (smolvm.BackendQEMU; real VMs: the proof on the real thing; the
// subtests that need an injected fault run on the fake only). The subtests
// of one backend run in order and share one VM and snapshot.
func TestRules(t *testing.T) {
	t.Run(fakebackend.Name, func(t *testing.T) {
		testRules(t, newRulesEnv(t, fakebackend.Name, fakebackend.Default))
	})
	t.Run(string(smolvm.BackendQEMU), func(t *testing.T) {
		for _, b := range []string{"qemu-system-x86_64", "qemu-img"} {
			if _, err := exec.LookPath(b); err != nil {
				t.Skipf("QEMU is not installed (%s not found): scripts/setup installs it", b)
			}
		}
		testRules(t, newRulesEnv(t, string(smolvm.BackendQEMU), nil))
	})
}

// rulesEnv is one backend's data dir, shared by two Managers (as two
// processes share it).
type rulesEnv struct {
	backend       string
	dataDir       string
	runDir        string
	m, m2         *smolvm.Manager
	fake          *fakebackend.Host // nil: a real backend (no fault injection)
	cfg           smolvm.Config
	before, after string // marker contents: at the snapshot, after it
}

func newRulesEnv(t *testing.T, name string, fake *fakebackend.Host) *rulesEnv {
	t.Helper()
	dir, err := os.MkdirTemp(testRoot, "r")
	if err != nil {
		t.Fatal(err)
	}
	e := &rulesEnv{backend: name, dataDir: dir, runDir: filepath.Join(dir, "run"), fake: fake,
		cfg:    smolvm.Config{Name: "src", Image: "busybox", Backend: smolvm.BackendName(name), NoNetwork: true, MemoryMiB: 256},
		before: "before-" + name, after: "after-" + name}
	open := func() *smolvm.Manager {
		m, err := smolvm.NewManager(context.Background(), smolvm.Options{DataDir: dir, ImageDir: testImageDir,
			RunDir: e.runDir, Logger: quietLogger()})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	e.m, e.m2 = open(), open()
	t.Cleanup(func() {
		ctx := context.Background()
		infos, _ := e.m.List(ctx)
		for _, i := range infos {
			if vm, err := e.m.Open(ctx, i.ID); err == nil {
				vm.Delete(ctx)
				vm.Close()
			}
		}
		snaps, _ := e.m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
		for _, s := range snaps {
			e.m.DeleteSnapshot(ctx, s.ID)
		}
		e.m.Close()
		e.m2.Close()
	})
	return e
}

// alive lists the VMMs (fake machines, QEMU processes) of this env.
func (e *rulesEnv) alive() []string {
	if e.fake != nil {
		return e.fake.Machines()
	}
	return qemuProcessesUnder(e.dataDir)
}

// marker runs a shell line that reads or writes the marker file in the
// guest's home directory (on the fake: the machine's root directory).
const markerFile = `"$HOME/rules-marker"`

func (e *rulesEnv) readMarker(t *testing.T, vm *smolvm.VM) string {
	t.Helper()
	return strings.TrimSpace(mustOK(t, vm, "cat "+markerFile))
}

func (e *rulesEnv) writeMarker(t *testing.T, vm *smolvm.VM, s string) {
	t.Helper()
	mustOK(t, vm, `mkdir -p "$HOME" && echo `+s+` > `+markerFile+` && sync`)
}

// requireFake skips a subtest that needs an injected fault on a real
// backend.
func (e *rulesEnv) requireFake(t *testing.T) *fakebackend.Host {
	t.Helper()
	if e.fake == nil {
		t.Skip("needs an injected fault: runs on the fake backend")
	}
	return e.fake
}

// assertNoVM checks that vm id has no record, no directory and no VMM.
func (e *rulesEnv) assertNoVM(t *testing.T, id string) {
	t.Helper()
	ctx := testCtx(t)
	if _, err := e.m.Open(ctx, id); !errors.Is(err, smolvm.ErrVMNotFound) {
		t.Errorf("vm %s: Open = %v, want ErrVMNotFound", id, err)
	}
	if _, err := os.Lstat(filepath.Join(e.dataDir, "vms", id)); err == nil {
		t.Errorf("vm %s: its directory is left", id)
	}
	for _, a := range e.alive() {
		if a == id || strings.Contains(a, id) {
			t.Errorf("vm %s: a VMM is left: %s", id, a)
		}
	}
}

// runDirs lists what is in the env's run dir (one entry per VM with sockets).
func (e *rulesEnv) runDirs() []string {
	ents, _ := os.ReadDir(e.runDir)
	var out []string
	for _, en := range ents {
		out = append(out, en.Name())
	}
	return out
}

// forceRestore restores s1 with Force through m and checks that the VM is
// back at the snapshot.
func (e *rulesEnv) forceRestore(t *testing.T, m *smolvm.Manager) *smolvm.VM {
	t.Helper()
	vm, err := m.FromSnapshot(testCtx(t), "s1", smolvm.RestoreOptions{Resume: true, Force: true})
	if err != nil {
		t.Fatalf("forced restore: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	if got := e.readMarker(t, vm); got != e.before {
		t.Errorf("marker after a forced restore = %q, want %q", got, e.before)
	}
	return vm
}

// startSource opens the VM "src" and starts it (closed at the test's end).
func (e *rulesEnv) startSource(t *testing.T) *smolvm.VM {
	t.Helper()
	ctx := testCtx(t)
	vm, err := e.m.Open(ctx, "src")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return vm
}

func (e *rulesEnv) restoreCount(t *testing.T, id string) int {
	t.Helper()
	s, err := e.m.GetSnapshot(testCtx(t), id)
	if err != nil {
		t.Fatalf("GetSnapshot %s: %v", id, err)
	}
	return s.RestoreCount
}

func testRules(t *testing.T, e *rulesEnv) {
	ctx := testCtx(t)

	t.Run("IDsValidatedBeforeAnythingExists", func(t *testing.T) {
		before := listTree(t, e.dataDir)
		for _, bad := range []string{"../x", "a/b", "UPPER", "", ".", "x\x00y", strings.Repeat("a", 65)} {
			calls := map[string]error{}
			_, calls["FromSnapshot"] = e.m.FromSnapshot(ctx, bad, smolvm.RestoreOptions{})
			_, calls["Fork"] = e.m.Fork(ctx, bad, 1, smolvm.ForkOptions{})
			calls["DeleteSnapshot"] = e.m.DeleteSnapshot(ctx, bad)
			_, calls["GetSnapshot"] = e.m.GetSnapshot(ctx, bad)
			_, calls["Open"] = e.m.Open(ctx, bad)
			if bad != "" { // empty: a generated name, the default prefix
				_, calls["Fork prefix"] = e.m.Fork(ctx, "snap", 1, smolvm.ForkOptions{Prefix: bad})
				cfg := e.cfg
				cfg.Name = bad
				_, calls["New"] = e.m.New(ctx, cfg)
			}
			for call, err := range calls {
				if !errors.Is(err, smolvm.ErrInvalidID) && !(call == "New" && errors.Is(err, smolvm.ErrInvalidConfig)) {
					t.Errorf("%s(%q) = %v, want ErrInvalidID", call, bad, err)
				}
			}
		}
		if after := listTree(t, e.dataDir); !slices.Equal(before, after) {
			t.Errorf("invalid ids created files:\nbefore %v\nafter  %v", before, after)
		}
		if a := e.alive(); len(a) > 0 {
			t.Errorf("invalid ids started VMMs: %v", a)
		}
	})

	// The shared source VM and its snapshot.
	src, err := e.m.New(ctx, e.cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { src.Close() })
	if err := src.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	e.writeMarker(t, src, e.before)
	if _, err := src.Snapshot(ctx, smolvm.SnapshotOptions{ID: "s1"}); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}

	t.Run("ManifestRecordsHost", func(t *testing.T) {
		// The manifest on disk carries the Host section with this
		// machine's values: accelerator as the VM ran, and for QEMU its
		// version (from qemu --version) and machine type.
		man, err := snapshot.ReadManifest(filepath.Join(e.dataDir, "snapshots", "s1"))
		if err != nil {
			t.Fatal(err)
		}
		info, err := src.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		h := man.Host
		if man.FormatVersion != snapshot.FormatVersion || h == nil || string(h.Accel) != info.Accel || h.VMM != e.backend ||
			h.CPUVendor == "" || h.Image != e.cfg.Image || h.ImageSHA256 == "" || h.KernelSHA256 == "" || h.KernelRelease == "" {
			t.Fatalf("manifest host = %+v (format %d, vm accel %s)", h, man.FormatVersion, info.Accel)
		}
		if (h.Accel == "kvm") != (len(h.CPUFlags) > 0) {
			t.Errorf("cpu flags %v under %s: recorded under kvm only", h.CPUFlags, h.Accel)
		}
		if e.backend == string(smolvm.BackendQEMU) {
			out, err := exec.Command("qemu-system-x86_64", "--version").Output()
			if err != nil {
				t.Fatal(err)
			}
			if want := strings.Fields(string(out)); len(want) < 4 || h.VMMVersion != want[3] || h.MachineType != "microvm" {
				t.Errorf("qemu host = version %q machine %q; qemu says %q, want machine microvm", h.VMMVersion, h.MachineType, out)
			}
			t.Logf("recorded host: %+v", *h)
		}
	})

	t.Run("RestoreOnceAcrossManagers", func(t *testing.T) {
		// Two Managers (two processes) restore one snapshot at once:
		// exactly one wins; the other is refused as already restored.
		var wg sync.WaitGroup
		vms := make([]*smolvm.VM, 2)
		errs := make([]error, 2)
		for i, m := range []*smolvm.Manager{e.m, e.m2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				vms[i], errs[i] = m.FromSnapshot(ctx, "s1", smolvm.RestoreOptions{Resume: true})
			}()
		}
		wg.Wait()
		var won *smolvm.VM
		for i := range vms {
			switch {
			case errs[i] == nil:
				if won != nil {
					t.Fatal("both concurrent restores of one snapshot succeeded")
				}
				won = vms[i]
				t.Cleanup(func() { vms[i].Close() })
			case !errors.Is(errs[i], smolvm.ErrSnapshotRestored):
				t.Errorf("losing restore: %v, want ErrSnapshotRestored", errs[i])
			}
		}
		if won == nil {
			t.Fatalf("no restore won: %v; %v", errs[0], errs[1])
		}
		if got := e.readMarker(t, won); got != e.before {
			t.Errorf("restored marker = %q, want %q", got, e.before)
		}
		if n := e.restoreCount(t, "s1"); n != 1 {
			t.Errorf("restore count = %d, want 1", n)
		}
		e.writeMarker(t, won, e.after)

		// Again: refused before anything is touched (the VM runs on).
		if _, err := e.m.FromSnapshot(ctx, "s1", smolvm.RestoreOptions{Resume: true}); !errors.Is(err, smolvm.ErrSnapshotRestored) {
			t.Fatalf("second restore: %v, want ErrSnapshotRestored", err)
		}
		if got := e.readMarker(t, won); got != e.after {
			t.Errorf("a refused restore changed the VM: marker %q, want %q", got, e.after)
		}
		// Forced: allowed, and the VM is back at the snapshot.
		e.forceRestore(t, e.m2)
		if n := e.restoreCount(t, "s1"); n != 2 {
			t.Errorf("restore count = %d, want 2", n)
		}
	})

	t.Run("FailedRestoreRollsBack", func(t *testing.T) {
		// The VM that the restores replace is deleted first: its
		// snapshots outlive it (a restore recreates it).
		if err := src.Delete(ctx); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if snaps, err := e.m.ListSnapshots(ctx, smolvm.SnapshotFilter{VMID: "src"}); err != nil || len(snaps) != 1 {
			t.Fatalf("snapshots of the deleted vm: %v, %v; want s1", snaps, err)
		}
		count := e.restoreCount(t, "s1")
		check := func(t *testing.T, err error) {
			t.Helper()
			if err == nil {
				t.Fatal("restore succeeded")
			}
			e.assertNoVM(t, "src")
			if d := e.runDirs(); len(d) > 0 {
				t.Errorf("run dirs left: %v", d)
			}
			if n := e.restoreCount(t, "s1"); n != count {
				t.Errorf("a failed restore counted: %d, want %d", n, count)
			}
		}
		t.Run("VMDirUnusable", func(t *testing.T) {
			// A real failure on every backend: a file where the VM's
			// directory goes. (Whether the rollback removes that file,
			// which the restore did not create, is not the rule; the
			// test removes it before checking.)
			os.MkdirAll(filepath.Join(e.dataDir, "vms"), 0o700)
			plant := filepath.Join(e.dataDir, "vms", "src")
			if err := os.WriteFile(plant, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := e.m.FromSnapshot(ctx, "s1", smolvm.RestoreOptions{Resume: true, Force: true})
			if st, serr := os.Lstat(plant); serr == nil && !st.Mode().IsRegular() {
				t.Errorf("the restore left a %v at the VM's directory", st.Mode().Type())
			}
			os.Remove(plant)
			check(t, err)
		})
		for _, op := range []fakebackend.Op{fakebackend.OpRestore, fakebackend.OpLoadMemory, fakebackend.OpAgent} {
			t.Run("Fault-"+string(op), func(t *testing.T) {
				remove := e.requireFake(t).Fail(op, "src", 0)
				defer remove()
				_, err := e.m.FromSnapshot(ctx, "s1", smolvm.RestoreOptions{Resume: true, Force: true})
				check(t, err)
				if op != fakebackend.OpAgent && !errors.Is(err, fakebackend.ErrInjected) {
					t.Errorf("error does not carry the cause: %v", err)
				}
			})
		}
		// The snapshot still restores.
		vm := e.forceRestore(t, e.m)
		t.Run("ReplacedVMPutBack", func(t *testing.T) {
			// A restore that fails after stopping the VM it replaces puts
			// that VM's files back: it starts again with its own state.
			h := e.requireFake(t)
			e.writeMarker(t, vm, e.after)
			remove := h.Fail(fakebackend.OpLoadMemory, "src", 0)
			_, err := e.m.FromSnapshot(ctx, "s1", smolvm.RestoreOptions{Resume: true, Force: true})
			remove()
			if !errors.Is(err, fakebackend.ErrInjected) {
				t.Fatalf("restore: %v, want the injected fault", err)
			}
			info, err := vm.Info(ctx)
			if err != nil {
				t.Fatalf("the replaced vm's record is gone: %v", err)
			}
			if info.Status != smolvm.StatusStopped || info.LastError == "" {
				t.Errorf("replaced vm: status %s, last error %q; want stopped with the restore's error", info.Status, info.LastError)
			}
			if err := vm.Start(ctx); err != nil {
				t.Fatalf("starting the replaced vm: %v", err)
			}
			if got := e.readMarker(t, vm); got != e.after {
				t.Errorf("replaced vm's marker = %q, want %q (its own disk)", got, e.after)
			}
		})
	})

	t.Run("Fork", func(t *testing.T) {
		count := e.restoreCount(t, "s1")
		clones, err := e.m.Fork(ctx, "s1", 2, smolvm.ForkOptions{Resume: true, Prefix: "c"})
		if err != nil {
			t.Fatalf("Fork: %v", err)
		}
		hostname, _ := os.Hostname()
		for _, c := range clones {
			t.Cleanup(func() { c.Close() })
			if got := e.readMarker(t, c); got != e.before {
				t.Errorf("clone %s: marker %q, want %q", c.ID(), got, e.before)
			}
			if e.fake != nil && e.fake.Hostname(c.ID()) != c.ID() {
				t.Errorf("clone %s: its agent was given hostname %q, want its id", c.ID(), e.fake.Hostname(c.ID()))
			}
		}
		if h, _ := os.Hostname(); h != hostname {
			t.Errorf("the host's hostname changed: %q -> %q", hostname, h)
		}
		if n := e.restoreCount(t, "s1"); n != count {
			t.Errorf("fork counted as a restore (restore-once): %d, want %d", n, count)
		}
		// Clones use the snapshot: it cannot be deleted under them.
		if err := e.m.DeleteSnapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrSnapshotInUse) {
			t.Errorf("DeleteSnapshot with clones running: %v, want ErrSnapshotInUse", err)
		}
		for _, c := range clones {
			if err := c.Delete(ctx); err != nil {
				t.Fatalf("deleting clone %s: %v", c.ID(), err)
			}
		}

		// A clone that fails is removed (no record, dir or VMM) and reported
		// in a ForkError; the clones that started are returned.
		for _, tc := range []struct {
			name       string
			op         fakebackend.Op
			times      int // the fault's count (0: every time)
			n, started int
			paused     bool // ForkOptions.Resume false: each clone is paused at the end
		}{
			{"OneCloneFails", fakebackend.OpRestore, 1, 3, 2, false},
			// Each clone starts and its guest dies before its agent answers.
			{"EveryCloneFails", fakebackend.OpAgent, 0, 2, 0, false},
			// Each clone runs, answers, and then cannot be paused: each
			// running clone must be stopped.
			{"RunningClonesFail", fakebackend.OpPause, 0, 2, 0, true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				remove := e.requireFake(t).Fail(tc.op, "", tc.times)
				defer remove()
				alive := e.alive()
				vms, err := e.m.Fork(ctx, "s1", tc.n, smolvm.ForkOptions{Resume: !tc.paused, Prefix: "f"})
				var fe *smolvm.ForkError
				if !errors.As(err, &fe) || len(fe.Failed) != tc.n-tc.started || len(vms) != tc.started {
					t.Fatalf("Fork = %d vms, %v; want %d and a ForkError with %d failed", len(vms), err, tc.started, tc.n-tc.started)
				}
				if tc.op != fakebackend.OpAgent && !errors.Is(err, fakebackend.ErrInjected) {
					t.Errorf("the ForkError does not carry the clone's cause: %v", err)
				}
				for id := range fe.Failed {
					e.assertNoVM(t, id)
				}
				for _, vm := range vms {
					if got := e.readMarker(t, vm); got != e.before {
						t.Errorf("clone %s: marker %q", vm.ID(), got)
					}
					vm.Delete(ctx)
					vm.Close()
				}
				if a := e.alive(); !slices.Equal(a, alive) {
					t.Errorf("VMMs after the fork's clones were deleted: %v, want %v", a, alive)
				}
			})
		}
	})

	t.Run("DeleteRule", func(t *testing.T) {
		vm, err := e.m.Open(ctx, "src")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { vm.Close() })
		info, err := vm.Info(ctx)
		if err != nil || info.RestoredFrom != "s1" {
			t.Fatalf("vm src: restored from %q, %v; want s1", info.RestoredFrom, err)
		}
		e.writeMarker(t, vm, "kept-"+e.backend)
		if err := e.m.DeleteSnapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrSnapshotInUse) {
			t.Errorf("DeleteSnapshot while its vm runs: %v, want ErrSnapshotInUse", err)
		}
		if err := vm.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.m2.DeleteSnapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrSnapshotInUse) {
			t.Errorf("DeleteSnapshot while its vm is paused: %v, want ErrSnapshotInUse", err)
		}
		if err := vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.m.DeleteSnapshot(ctx, "s1"); err != nil {
			t.Fatalf("DeleteSnapshot with its vm stopped: %v", err)
		}
		if _, err := e.m.GetSnapshot(ctx, "s1"); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("deleted snapshot: %v, want ErrSnapshotNotFound", err)
		}
		if _, err := os.Lstat(filepath.Join(e.dataDir, "snapshots", "s1")); err == nil {
			t.Error("the deleted snapshot's directory is left")
		}
		if info, err := vm.Info(ctx); err != nil || info.RestoredFrom != "" {
			t.Errorf("vm src after its snapshot was deleted: restored from %q, %v; want detached", info.RestoredFrom, err)
		}
		// Its disk no longer needs the snapshot: it boots (cold) with its data.
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start after the snapshot was deleted: %v", err)
		}
		if got := e.readMarker(t, vm); got != "kept-"+e.backend {
			t.Errorf("marker after restart = %q, want %q (the disk)", got, "kept-"+e.backend)
		}
	})

	t.Run("ConcurrentSnapshotIDs", func(t *testing.T) {
		// Two Managers snapshot one VM under one id: exactly one wins.
		vms := []*smolvm.VM{}
		for _, m := range []*smolvm.Manager{e.m, e.m2} {
			vm, err := m.Open(ctx, "src")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { vm.Close() })
			vms = append(vms, vm)
		}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, vm := range vms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "dup"})
			}()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case !errors.Is(err, smolvm.ErrSnapshotExists):
				t.Errorf("losing snapshot: %v, want ErrSnapshotExists", err)
			}
		}
		if ok != 1 {
			t.Errorf("%d of 2 concurrent snapshots under one id succeeded, want 1: %v", ok, errs)
		}
	})

	t.Run("FailedSnapshotLeavesNothing", func(t *testing.T) {
		// A snapshot that fails is not listed, leaves no directory, and the
		// VM runs again as before.
		h := e.requireFake(t)
		vm := e.startSource(t)
		remove := h.Fail(fakebackend.OpSnapshot, "src", 0)
		var err error
		_, err = vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "broken"})
		remove()
		if !errors.Is(err, fakebackend.ErrInjected) {
			t.Fatalf("Snapshot = %v, want the injected fault", err)
		}
		if _, err := e.m.GetSnapshot(ctx, "broken"); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("failed snapshot: GetSnapshot = %v, want ErrSnapshotNotFound", err)
		}
		for _, p := range listTree(t, filepath.Join(e.dataDir, "snapshots")) {
			if strings.Contains(p, "broken") {
				t.Errorf("the failed snapshot left %s", p)
			}
		}
		if st, err := vm.Status(ctx); err != nil || st != smolvm.StatusRunning {
			t.Errorf("vm after a failed snapshot: %s, %v; want running", st, err)
		}
	})

	t.Run("ResumeSourceFailureKeepsTheSnapshot", func(t *testing.T) {
		// ResumeSource runs the source again as soon as its state is
		// captured, before the manifest, publish and commit; a source that
		// will not resume fails the call but not the snapshot.
		h := e.requireFake(t)
		vm := e.startSource(t)
		remove := h.Fail(fakebackend.OpResume, "src", 1)
		_, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "saved-not-resumed", ResumeSource: true})
		remove()
		if !errors.Is(err, fakebackend.ErrInjected) || !strings.Contains(err.Error(), "was saved") {
			t.Fatalf("Snapshot = %v, want the injected resume fault reported after the save", err)
		}
		if _, err := e.m.GetSnapshot(ctx, "saved-not-resumed"); err != nil {
			t.Errorf("the snapshot whose source did not resume: GetSnapshot = %v, want it listed", err)
		}
		if err := vm.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "resumed", ResumeSource: true}); err != nil {
			t.Fatal(err)
		}
		if st, err := vm.Status(ctx); err != nil || st != smolvm.StatusRunning {
			t.Errorf("vm after Snapshot(ResumeSource): %s, %v; want running", st, err)
		}
		for _, id := range []string{"saved-not-resumed", "resumed"} {
			if err := e.m.DeleteSnapshot(ctx, id); err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("RestoreRefusedWhenTheOldVMWillNotStop", func(t *testing.T) {
		// The VM a restore replaces cannot be stopped: the restore ends
		// before anything changed.
		h := e.requireFake(t)
		count := e.restoreCount(t, "dup")
		remove := h.Fail(fakebackend.OpStop, "src", 0)
		_, err := e.m.FromSnapshot(ctx, "dup", smolvm.RestoreOptions{Resume: true, Force: true})
		remove()
		if !errors.Is(err, fakebackend.ErrInjected) {
			t.Fatalf("FromSnapshot = %v, want the injected fault", err)
		}
		vm, err := e.m.Open(ctx, "src")
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if info, err := vm.Info(ctx); err != nil || info.Status != smolvm.StatusRunning || info.RestoredFrom == "dup" {
			t.Errorf("vm after the refused restore: %+v, %v; want it running as before", info, err)
		}
		if got := e.readMarker(t, vm); got != "kept-"+e.backend {
			t.Errorf("marker = %q, want %q", got, "kept-"+e.backend)
		}
		if n := e.restoreCount(t, "dup"); n != count {
			t.Errorf("restore count = %d, want %d", n, count)
		}
	})

	t.Run("ForkVersusDeleteAcrossManagers", func(t *testing.T) {
		// One Manager forks a snapshot while another deletes it: either
		// the clones run and the delete is refused, or the snapshot is
		// gone and the fork finds nothing; never both.
		var wg sync.WaitGroup
		var clones []*smolvm.VM
		var forkErr, delErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			clones, forkErr = e.m.Fork(ctx, "dup", 2, smolvm.ForkOptions{Resume: true, Prefix: "race"})
		}()
		go func() {
			defer wg.Done()
			delErr = e.m2.DeleteSnapshot(ctx, "dup")
		}()
		wg.Wait()
		for _, c := range clones {
			defer c.Close()
		}
		switch {
		case forkErr == nil && errors.Is(delErr, smolvm.ErrSnapshotInUse):
			if len(clones) != 2 {
				t.Errorf("fork returned %d clones, want 2", len(clones))
			}
			for _, c := range clones {
				if got := e.readMarker(t, c); got != "kept-"+e.backend {
					t.Errorf("clone %s: marker %q", c.ID(), got)
				}
			}
		case delErr == nil && errors.Is(forkErr, smolvm.ErrSnapshotNotFound):
			if len(clones) != 0 {
				t.Errorf("fork of a deleted snapshot returned %d clones", len(clones))
			}
		default:
			t.Fatalf("fork: %v (%d clones); delete: %v; want one to win cleanly", forkErr, len(clones), delErr)
		}
		t.Logf("fork: %v; delete: %v", forkErr, delErr)
	})
}

// listTree lists every path under dir (relative), sorted.
func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	slices.Sort(out)
	return out
}
