package lifetime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend" // registers "fake"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

var testRoot string

func TestMain(m *testing.M) {
	if _, err := testutil.EnsureImages(context.Background(), image.Busybox); err != nil {
		fmt.Fprintf(os.Stderr, "test setup: %v\nrun scripts/setup first\n", err)
		os.Exit(1)
	}
	root, err := os.MkdirTemp("/tmp", "smlt")
	if err != nil {
		panic(err)
	}
	testRoot = root
	os.Setenv("SMOLVM_COLD_BOOT", "1") // no template build: templates are tested in the root package
	code := m.Run()
	os.RemoveAll(root)
	os.Exit(code)
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// env is a data dir with a Manager and a Keeper whose clock the test moves.
type env struct {
	m   *smolvm.Manager
	k   *Keeper
	cfg smolvm.Config

	mu    sync.Mutex
	clock time.Time
}

func newEnv(t *testing.T, backend string) *env {
	t.Helper()
	dir, err := os.MkdirTemp(testRoot, "d")
	if err != nil {
		t.Fatal(err)
	}
	m, err := smolvm.NewManager(context.Background(), smolvm.Options{DataDir: dir, ImageDir: testutil.ImageDir(),
		RunDir: filepath.Join(dir, "run"), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{m: m, clock: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		cfg: smolvm.Config{Image: "busybox", Backend: smolvm.BackendName(backend), NoNetwork: true, MemoryMiB: 256}}
	e.k = e.keeper(t)
	t.Cleanup(func() {
		ctx := context.Background()
		infos, _ := m.List(ctx)
		for _, i := range infos {
			if vm, err := m.Open(ctx, i.ID); err == nil {
				vm.Delete(ctx)
				vm.Close()
			}
		}
		snaps, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
		for _, s := range snaps {
			m.DeleteSnapshot(ctx, s.ID)
		}
		m.Close()
	})
	return e
}

// keeper opens a Keeper on the env's data dir with the env's clock.
func (e *env) keeper(t *testing.T) *Keeper {
	t.Helper()
	k, err := New(e.m, quiet())
	if err != nil {
		t.Fatal(err)
	}
	k.now = e.now
	return k
}

func (e *env) now() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.clock
}

func (e *env) advance(d time.Duration) {
	e.mu.Lock()
	e.clock = e.clock.Add(d)
	e.mu.Unlock()
}

func (e *env) boot(t *testing.T, ctx context.Context, name string) *smolvm.VM {
	t.Helper()
	cfg := e.cfg
	cfg.Name = name
	vm, err := e.m.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return vm
}

// outcome is one onExpire call.
type outcome struct {
	id  string
	a   Action
	err error
}

// reap runs one pass of the reaper and returns what it reported.
func (e *env) reap(ctx context.Context) []outcome {
	var out []outcome
	e.k.reap(ctx, func(id string, a Action, err error) { out = append(out, outcome{id, a, err}) })
	return out
}

func run(t *testing.T, ctx context.Context, vm *smolvm.VM, cmd string) string {
	t.Helper()
	res, err := vm.Run(ctx, cmd)
	if err != nil || !res.OK() {
		t.Fatalf("Run(%q) = %+v, %v", cmd, res, err)
	}
	return strings.TrimSpace(res.Stdout)
}

func status(t *testing.T, ctx context.Context, m *smolvm.Manager, id string) smolvm.Status {
	t.Helper()
	vm, err := m.Open(ctx, id)
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	defer vm.Close()
	st, err := vm.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func snapshots(t *testing.T, ctx context.Context, m *smolvm.Manager) []string {
	t.Helper()
	l, err := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range l {
		ids = append(ids, s.ID)
	}
	return ids
}

// TestLifetimeRules checks the Keeper's rules on the fake backend
// (milliseconds): validation; a deadline that deletes; a deadline that
// pauses to a snapshot and a Resume that restores it into the same id
// with its memory; idle pauses, Touch and the snapshot of the previous
// pause deleted; failed pauses retried with backoff and never marked
// paused without a snapshot (a snapshot that failed; a stop that failed
// after the snapshot, whose snapshot the retry reuses); a sandbox deleted
// elsewhere; the file: reloaded by a new Keeper, private, refused when
// planted or unknown. The same pause and resume on a real VM:
// TestLifetimeRealVM.
func TestLifetimeRules(t *testing.T) {
	e := newEnv(t, fakebackend.Name)
	fake := fakebackend.Default
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k := e.k

	t.Run("Validation", func(t *testing.T) {
		e.boot(t, ctx, "val")
		for _, c := range []struct {
			id         string
			ttl, idle  time.Duration
			a          Action
			want       error
			wantReason string
		}{
			{"val", -time.Second, 0, ActionDelete, smolvm.ErrInvalidConfig, "negative"},
			{"val", MaxTTL + time.Hour, 0, ActionDelete, smolvm.ErrInvalidConfig, "too long"},
			{"val", time.Minute, time.Millisecond, ActionPause, smolvm.ErrInvalidConfig, "idle too short"},
			{"val", time.Minute, 0, "explode", smolvm.ErrInvalidConfig, "action"},
			{"../x", time.Minute, 0, ActionDelete, smolvm.ErrInvalidID, "id"},
			{"nope", time.Minute, 0, ActionDelete, smolvm.ErrVMNotFound, "unknown vm"},
		} {
			if err := k.Set(ctx, c.id, c.ttl, c.a, c.idle); !errors.Is(err, c.want) {
				t.Errorf("%s: Set = %v, want %v", c.wantReason, err, c.want)
			}
		}
		if _, ok := k.Get("val"); ok {
			t.Error("a refused Set recorded a lifetime")
		}
		if err := k.Extend(ctx, "val", -1); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("Extend(-1) = %v", err)
		}
		// Extend on a sandbox without a lifetime gives it one that deletes.
		if err := k.Extend(ctx, "val", time.Minute); err != nil {
			t.Fatal(err)
		}
		if l, _ := k.Get("val"); l.Action != ActionDelete || !l.Deadline.Equal(e.now().Add(time.Minute)) {
			t.Errorf("after Extend: %+v", l)
		}
		// No deadline and no idle timeout: no lifetime.
		if err := k.Set(ctx, "val", 0, ActionDelete, 0); err != nil {
			t.Fatal(err)
		}
		if l, ok := k.Get("val"); ok {
			t.Errorf("lifetime kept with nothing in it: %+v", l)
		}
	})

	t.Run("DeadlineDeletes", func(t *testing.T) {
		e.boot(t, ctx, "del")
		if err := k.Set(ctx, "del", time.Minute, ActionDelete, 0); err != nil {
			t.Fatal(err)
		}
		e.advance(59 * time.Second)
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("acted before the deadline: %+v", got)
		}
		if err := k.Extend(ctx, "del", time.Minute); err != nil { // a call extends it from now
			t.Fatal(err)
		}
		e.advance(59 * time.Second)
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("acted before the extended deadline: %+v", got)
		}
		e.advance(time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || got[0].id != "del" || got[0].a != ActionDelete || got[0].err != nil {
			t.Fatalf("reap = %+v", got)
		}
		if _, err := e.m.Open(ctx, "del"); !errors.Is(err, smolvm.ErrVMNotFound) {
			t.Errorf("deleted sandbox: Open = %v", err)
		}
		if _, ok := k.Get("del"); ok {
			t.Error("lifetime of a deleted sandbox kept")
		}
	})

	var firstSnap string
	t.Run("DeadlinePausesAndResumeRestores", func(t *testing.T) {
		vm := e.boot(t, ctx, "pz")
		run(t, ctx, vm, `mkdir -p run && echo in-memory > run/marker && echo on-disk > disk-marker`)
		if err := k.Set(ctx, "pz", 30*time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		e.advance(30 * time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || got[0].a != ActionPause || got[0].err != nil {
			t.Fatalf("reap = %+v", got)
		}
		l, _ := k.Get("pz")
		if !l.Paused || l.Snapshot == "" || !l.Deadline.IsZero() {
			t.Fatalf("after the pause: %+v", l)
		}
		firstSnap = l.Snapshot
		if st := status(t, ctx, e.m, "pz"); st != smolvm.StatusStopped {
			t.Errorf("paused sandbox is %s, want stopped (its memory is in the snapshot)", st)
		}
		if s, err := e.m.GetSnapshot(ctx, l.Snapshot); err != nil || s.VMID != "pz" || s.Type != smolvm.SnapshotFull {
			t.Fatalf("pause snapshot %+v, %v", s, err)
		}
		// Nothing more happens to a paused sandbox.
		e.advance(time.Hour)
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("acted on a paused sandbox: %+v", got)
		}
		rvm, err := k.Resume(ctx, "pz")
		if err != nil {
			t.Fatal(err)
		}
		defer rvm.Close()
		if got := run(t, ctx, rvm, `cat run/marker disk-marker`); got != "in-memory\non-disk" {
			t.Errorf("after resume: %q", got)
		}
		info, _ := rvm.Info(ctx)
		if info.ID != "pz" || info.Status != smolvm.StatusRunning || info.RestoredFrom != firstSnap {
			t.Errorf("resumed: %+v", info)
		}
		l, _ = k.Get("pz")
		if l.Paused || l.Snapshot != "" || l.Previous != firstSnap || !l.Deadline.Equal(e.now().Add(30*time.Second)) {
			t.Errorf("after resume: %+v", l)
		}
		// Resume of a sandbox that is not auto-paused changes nothing.
		again, err := k.Resume(ctx, "pz")
		if err != nil {
			t.Fatal(err)
		}
		again.Close()
		if s := snapshots(t, ctx, e.m); len(s) != 1 {
			t.Errorf("snapshots %v", s)
		}
	})

	t.Run("IdlePausesAndTouch", func(t *testing.T) {
		if err := k.Set(ctx, "pz", 0, ActionPause, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		e.advance(9 * time.Second)
		k.Touch("pz")
		e.advance(9 * time.Second)
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("paused a sandbox touched 9 s ago: %+v", got)
		}
		e.advance(time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || got[0].a != ActionPause || got[0].err != nil {
			t.Fatalf("reap = %+v", got)
		}
		l, _ := k.Get("pz")
		if !l.Paused || l.Snapshot == "" || l.Snapshot == firstSnap || l.Previous != "" {
			t.Fatalf("after the idle pause: %+v", l)
		}
		// The snapshot the sandbox was resumed from is gone; the new one stays.
		if s := snapshots(t, ctx, e.m); len(s) != 1 || s[0] != l.Snapshot {
			t.Errorf("snapshots %v, want only %s", s, l.Snapshot)
		}
		// Idle again after this pause: nothing to do.
		e.advance(time.Hour)
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("acted on a paused sandbox: %+v", got)
		}
	})

	t.Run("Reload", func(t *testing.T) {
		want, _ := k.Get("pz")
		k2 := e.keeper(t)
		got, ok := k2.Get("pz")
		want.LastActive = got.LastActive // a new Keeper counts its start as activity
		if !ok || fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("reloaded %+v, want %+v", got, want)
		}
		fi, err := os.Stat(filepath.Join(e.m.DataDir(), FileName))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("file: %v %v", fi.Mode(), err)
		}
		// The reloaded Keeper resumes what the first one paused.
		vm, err := k2.Resume(ctx, "pz")
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if got := run(t, ctx, vm, `cat run/marker`); got != "in-memory" {
			t.Errorf("after resume by a new keeper: %q", got)
		}
		// Back to the first Keeper, which must see it: reload it.
		e.k = e.keeper(t)
		k = e.k
	})

	t.Run("FailedSnapshotRetries", func(t *testing.T) {
		if err := k.Set(ctx, "pz", time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		before := snapshots(t, ctx, e.m)
		remove := fake.Fail(fakebackend.OpSnapshot, "pz", 1)
		defer remove()
		e.advance(time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || !errors.Is(got[0].err, fakebackend.ErrInjected) {
			t.Fatalf("reap = %+v", got)
		}
		l, _ := k.Get("pz")
		if l.Paused || l.Snapshot != "" || l.Failures != 1 || l.LastError == "" || !l.NextTry.Equal(e.now().Add(time.Second)) {
			t.Fatalf("after a failed pause: %+v", l)
		}
		if st := status(t, ctx, e.m, "pz"); st != smolvm.StatusRunning {
			t.Errorf("sandbox is %s after a failed pause, want running", st)
		}
		if got := e.reap(ctx); len(got) != 0 {
			t.Fatalf("retried before the backoff: %+v", got)
		}
		e.advance(time.Second)
		if got := e.reap(ctx); len(got) != 1 || got[0].err != nil {
			t.Fatalf("retry = %+v", got)
		}
		l, _ = k.Get("pz")
		if !l.Paused || l.Snapshot == "" || l.Failures != 0 {
			t.Fatalf("after the retry: %+v", l)
		}
		if s := snapshots(t, ctx, e.m); len(s) != len(before) {
			t.Errorf("snapshots %v, before %v (the previous one is deleted, one new)", s, before)
		}
		if _, err := k.Resume(ctx, "pz"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("FailedStopReusesSnapshot", func(t *testing.T) {
		if err := k.Set(ctx, "pz", time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		remove := fake.Fail(fakebackend.OpStop, "pz", 1)
		defer remove()
		e.advance(time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || got[0].err == nil {
			t.Fatalf("reap = %+v", got)
		}
		l, _ := k.Get("pz")
		if l.Paused || l.Snapshot == "" || l.Failures != 1 {
			t.Fatalf("after a failed stop: %+v (the snapshot must be recorded, not paused)", l)
		}
		snap := l.Snapshot
		if st := status(t, ctx, e.m, "pz"); st != smolvm.StatusPaused {
			t.Errorf("sandbox is %s, want paused (as the snapshot left it)", st)
		}
		e.advance(time.Second)
		if got := e.reap(ctx); len(got) != 1 || got[0].err != nil {
			t.Fatalf("retry = %+v", got)
		}
		l, _ = k.Get("pz")
		if !l.Paused || l.Snapshot != snap {
			t.Fatalf("after the retry: %+v, want paused with %s", l, snap)
		}
		if _, err := k.Resume(ctx, "pz"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("DeletedElsewhere", func(t *testing.T) {
		vm := e.boot(t, ctx, "gone")
		if err := k.Set(ctx, "pz", 0, ActionPause, 0); err != nil { // pz: no deadline
			t.Fatal(err)
		}
		if err := k.Set(ctx, "gone", time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		if err := vm.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		e.advance(time.Second)
		got := e.reap(ctx)
		if len(got) != 1 || !errors.Is(got[0].err, smolvm.ErrVMNotFound) {
			t.Fatalf("reap = %+v", got)
		}
		if _, ok := k.Get("gone"); ok {
			t.Error("lifetime of a vanished sandbox kept")
		}
	})

	t.Run("StartedElsewhereIsNotReplaced", func(t *testing.T) {
		if err := k.Set(ctx, "pz", time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		e.advance(time.Second)
		if got := e.reap(ctx); len(got) != 1 || got[0].err != nil {
			t.Fatalf("reap = %+v", got)
		}
		l, _ := k.Get("pz")
		vm, err := e.m.Open(ctx, "pz")
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.Start(ctx); err != nil { // not through the Keeper: a cold boot from its disk
			t.Fatal(err)
		}
		run(t, ctx, vm, `echo after-start > disk-marker`)
		rvm, err := k.Resume(ctx, "pz")
		if err != nil {
			t.Fatal(err)
		}
		defer rvm.Close()
		if got := run(t, ctx, rvm, `cat disk-marker`); got != "after-start" {
			t.Errorf("Resume replaced a sandbox started meanwhile: disk-marker %q", got)
		}
		if got, _ := k.Get("pz"); got.Paused || got.Snapshot != "" {
			t.Errorf("after Resume: %+v", got)
		}
		if _, err := e.m.GetSnapshot(ctx, l.Snapshot); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
			t.Errorf("stale pause snapshot %s: %v", l.Snapshot, err)
		}
	})

	t.Run("Forget", func(t *testing.T) {
		if err := k.Set(ctx, "pz", time.Second, ActionPause, 0); err != nil {
			t.Fatal(err)
		}
		e.advance(time.Second)
		if got := e.reap(ctx); len(got) != 1 || got[0].err != nil {
			t.Fatalf("reap = %+v", got)
		}
		if err := k.Forget(ctx, "pz"); err != nil {
			t.Fatal(err)
		}
		if _, ok := k.Get("pz"); ok {
			t.Error("forgotten lifetime kept")
		}
		if s := snapshots(t, ctx, e.m); len(s) != 0 {
			t.Errorf("snapshots of a forgotten sandbox kept: %v", s)
		}
		if k2 := e.keeper(t); len(k2.l) != 0 {
			t.Errorf("forgotten lifetime still in the file: %+v", k2.l)
		}
	})

	t.Run("RunStopsWithContext", func(t *testing.T) {
		k.tick = time.Millisecond
		rctx, rcancel := context.WithCancel(ctx)
		done := make(chan error)
		go func() { done <- k.Run(rctx, nil) }()
		time.Sleep(10 * time.Millisecond)
		rcancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Run did not return after its context ended")
		}
	})

	t.Run("FileRefused", func(t *testing.T) {
		path := filepath.Join(e.m.DataDir(), FileName)
		write := func(s string, mode os.FileMode) {
			os.Remove(path)
			if err := os.WriteFile(path, []byte(s), mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(path, mode)
		}
		for name, c := range map[string]struct {
			body string
			mode os.FileMode
		}{
			"newer version":  {`{"version": 2, "lifetimes": []}`, 0o600},
			"malformed":      {`{"version": 1, "lifetimes": [`, 0o600},
			"unknown field":  {`{"version": 1, "lifetimes": [], "x": 1}`, 0o600},
			"bad id":         {`{"version": 1, "lifetimes": [{"id": "../etc", "action": "delete"}]}`, 0o600},
			"bad action":     {`{"version": 1, "lifetimes": [{"id": "a", "action": "boom"}]}`, 0o600},
			"paused no snap": {`{"version": 1, "lifetimes": [{"id": "a", "action": "pause", "paused": true}]}`, 0o600},
			"twice":          {`{"version": 1, "lifetimes": [{"id": "a", "action": "delete"}, {"id": "a", "action": "delete"}]}`, 0o600},
			"world-readable": {`{"version": 1, "lifetimes": []}`, 0o644},
		} {
			write(c.body, c.mode)
			if _, err := New(e.m, quiet()); !errors.Is(err, smolvm.ErrInvalidConfig) {
				t.Errorf("%s: New = %v, want refused", name, err)
			}
		}
		os.Remove(path)
		target := filepath.Join(t.TempDir(), "elsewhere")
		os.WriteFile(target, []byte(`{"version": 1, "lifetimes": []}`), 0o600)
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
		if _, err := New(e.m, quiet()); err == nil {
			t.Error("a symlinked file was read")
		}
		os.Remove(path)
		if _, err := New(e.m, quiet()); err != nil {
			t.Errorf("no file: %v", err)
		}
	})
}

func TestBackoff(t *testing.T) {
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 5: 16 * time.Second, 9: 256 * time.Second, 10: maxBackof, 100: maxBackof} {
		if got := backoff(n); got != want {
			t.Errorf("backoff(%d) = %v, want %v", n, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"version": 1, "lifetimes": [{"id": "a", "action": "pause", "ttl_ns": 1000000000, "paused": true, "snapshot": "s"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ls, err := parse(b)
		if err != nil {
			return
		}
		for _, l := range ls {
			if l.validate() != nil {
				t.Fatalf("parse accepted an invalid lifetime %+v", l)
			}
		}
	})
}
