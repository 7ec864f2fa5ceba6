package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/smolvm-go/smolvm/internal/backend"
)

func openTest(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func testVM(id string, created time.Time) VM {
	return VM{
		ID:      id,
		Backend: "qemu",
		Status:  VMCreated,
		Config:  json.RawMessage(`{"image":"busybox","memory_mib":256}`),
		Machine: backend.Machine{
			Spec:    backend.Spec{ID: id, Dir: "/data/vms/" + id, MemoryMiB: 256, CPUs: 1},
			Backend: "qemu",
			PID:     42,
			Accel:   backend.AccelKVM,
		},
		PID:       42,
		CreatedAt: created,
		UpdatedAt: created,
	}
}

func testSnapshot(id, vmID string, created time.Time) Snapshot {
	return Snapshot{
		ID:          id,
		VMID:        vmID,
		Backend:     "qemu",
		Type:        backend.SnapshotDiff,
		CreatedAt:   created,
		SizeBytes:   1 << 20,
		ParentImage: "/images/busybox/rootfs.ext4",
		Manifest:    json.RawMessage(`{"artifacts":[{"role":"memory","name":"mem"}]}`),
	}
}

func TestOpenCreatesDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	openTest(t, dir)
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %v, want 0700", fi.Mode().Perm())
	}
	if _, err := os.Stat(filepath.Join(dir, DBName)); err != nil {
		t.Error(err)
	}
}

func TestOpenOddPath(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a b?c#d%e")
	s := openTest(t, dir)
	if err := s.CreateVM(context.Background(), testVM("v", time.Now())); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, DBName)); err != nil {
		t.Error(err)
	}
}

// TestOpenConcurrent opens a fresh data dir from many goroutines (each its
// own connection pool): the migration must run once and every Open succeed.
func TestOpenConcurrent(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			s, err := Open(context.Background(), dir)
			if err != nil {
				t.Error(err)
				return
			}
			s.Close()
		})
	}
	wg.Wait()
	s := openTest(t, dir)
	if v, err := userVersion(context.Background(), s.db); err != nil || v != len(migrations) {
		t.Errorf("user_version = %d, %v; want %d", v, err, len(migrations))
	}
}

func TestPragmas(t *testing.T) {
	s := openTest(t, t.TempDir())
	for pragma, want := range map[string]string{
		"journal_mode": "wal",
		"foreign_keys": "1",
		"busy_timeout": "10000",
	} {
		var got string
		if err := s.db.QueryRow("PRAGMA " + pragma).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("PRAGMA %s = %q, want %q", pragma, got, want)
		}
	}
}

func TestVMCRUD(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)

	// Created out of order; listed by created_at.
	b, a := testVM("b", t0.Add(time.Second)), testVM("a", t0)
	for _, v := range []VM{b, a} {
		if err := s.CreateVM(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.GetVM(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(a, got); diff != "" {
		t.Errorf("GetVM (-want +got):\n%s", diff)
	}
	list, err := s.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]VM{a, b}, list); diff != "" {
		t.Errorf("ListVMs (-want +got):\n%s", diff)
	}

	// Update everything but CreatedAt; UpdatedAt moves to now.
	upd := a
	upd.Status, upd.PID, upd.LastError = VMError, 0, "kvm internal error"
	upd.Config = nil
	upd.Machine.PID = 0
	upd.RestoredFrom = "snap1"
	upd.CreatedAt = t0.Add(time.Hour) // ignored
	before := time.Now()
	if err := s.UpdateVM(ctx, upd); err != nil {
		t.Fatal(err)
	}
	got, err = s.GetVM(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if got.UpdatedAt.Before(before) {
		t.Errorf("UpdatedAt = %v, want >= %v", got.UpdatedAt, before)
	}
	upd.CreatedAt, upd.UpdatedAt = t0, got.UpdatedAt
	if diff := cmp.Diff(upd, got); diff != "" {
		t.Errorf("after UpdateVM (-want +got):\n%s", diff)
	}

	restored, err := s.VMsRestoredFrom(ctx, "snap1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]VM{upd}, restored); diff != "" {
		t.Errorf("VMsRestoredFrom (-want +got):\n%s", diff)
	}

	if err := s.DeleteVM(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	list, err = s.ListVMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]VM{b}, list); diff != "" {
		t.Errorf("ListVMs after delete (-want +got):\n%s", diff)
	}
}

func TestVMDefaultsTimes(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	before := time.Now()
	if err := s.CreateVM(ctx, VM{ID: "v", Backend: "qemu", Status: VMCreated}); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetVM(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if got.CreatedAt.Before(before) || !got.UpdatedAt.Equal(got.CreatedAt) {
		t.Errorf("CreatedAt %v UpdatedAt %v, want now and equal", got.CreatedAt, got.UpdatedAt)
	}
}

func TestVMErrors(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	v := testVM("vm1", time.Now())
	if err := s.CreateVM(ctx, v); err != nil {
		t.Fatal(err)
	}

	check := func(name string, err, want error) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Errorf("%s: got %v, want %v", name, err, want)
		} else if !strings.Contains(err.Error(), `"`) {
			t.Errorf("%s: %q does not name the record", name, err)
		}
	}
	check("CreateVM duplicate", s.CreateVM(ctx, v), ErrExists)
	_, err := s.GetVM(ctx, "nope")
	check("GetVM", err, ErrNotFound)
	check("UpdateVM", s.UpdateVM(ctx, testVM("nope", time.Now())), ErrNotFound)
	check("DeleteVM", s.DeleteVM(ctx, "nope"), ErrNotFound)
	check("CreateVM bad id", s.CreateVM(ctx, testVM("../x", time.Now())), ErrInvalidID)

	bad := testVM("vm2", time.Now())
	bad.Status = "exploded"
	if err := s.CreateVM(ctx, bad); err == nil {
		t.Error("CreateVM with invalid status succeeded")
	}
	bad = testVM("vm2", time.Now())
	bad.Config = json.RawMessage(`{`)
	if err := s.CreateVM(ctx, bad); err == nil {
		t.Error("CreateVM with invalid config JSON succeeded")
	}
}

func TestSnapshotLifecycle(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

	// Reserve: the id is taken, but the snapshot is invisible.
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "s1", VMID: "vm1", Backend: "qemu", Type: backend.SnapshotDiff, CreatedAt: t0}); err != nil {
		t.Fatal(err)
	}
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "s1", VMID: "vm2"}); !errors.Is(err, ErrExists) {
		t.Errorf("second ReserveSnapshot: got %v, want ErrExists", err)
	}
	if _, err := s.GetSnapshot(ctx, "s1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetSnapshot of pending: got %v, want ErrNotFound", err)
	}
	if err := s.UpdateSnapshot(ctx, testSnapshot("s1", "vm1", t0)); !errors.Is(err, ErrNotFound) {
		t.Errorf("UpdateSnapshot of pending: got %v, want ErrNotFound", err)
	}
	if err := s.DeleteSnapshot(ctx, "s1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("DeleteSnapshot of pending: got %v, want ErrNotFound", err)
	}
	if list, err := s.ListSnapshots(ctx, ""); err != nil || len(list) != 0 {
		t.Errorf("ListSnapshots with only a pending row = %v, %v; want none", list, err)
	}
	pending, err := s.ListPendingSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantPending := []Snapshot{{ID: "s1", VMID: "vm1", Backend: "qemu", Type: backend.SnapshotDiff,
		CreatedAt: t0, State: SnapshotPending, CreatorPID: os.Getpid()}}
	if diff := cmp.Diff(wantPending, pending); diff != "" {
		t.Errorf("ListPendingSnapshots (-want +got):\n%s", diff)
	}

	// Commit: final fields, reservation time kept when final has none.
	final := testSnapshot("", "vm1", time.Time{})
	if err := s.CommitSnapshot(ctx, "s1", final); err != nil {
		t.Fatal(err)
	}
	want := testSnapshot("s1", "vm1", t0)
	want.State, want.CreatorPID = SnapshotReady, os.Getpid()
	got, err := s.GetSnapshot(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("GetSnapshot after commit (-want +got):\n%s", diff)
	}
	if err := s.CommitSnapshot(ctx, "s1", final); !errors.Is(err, ErrNotFound) {
		t.Errorf("second CommitSnapshot: got %v, want ErrNotFound", err)
	}
	if err := s.AbortSnapshot(ctx, "s1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("AbortSnapshot of ready: got %v, want ErrNotFound", err)
	}
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "s1"}); !errors.Is(err, ErrExists) {
		t.Errorf("ReserveSnapshot over ready: got %v, want ErrExists", err)
	}
	if pending, err := s.ListPendingSnapshots(ctx); err != nil || len(pending) != 0 {
		t.Errorf("ListPendingSnapshots after commit = %v, %v; want none", pending, err)
	}

	// Update.
	want.Restored, want.RestoredVMID, want.RestoreCount = true, "clone1", 1
	if err := s.UpdateSnapshot(ctx, want); err != nil {
		t.Fatal(err)
	}
	got, err = s.GetSnapshot(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("GetSnapshot after update (-want +got):\n%s", diff)
	}

	// Abort frees the id.
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "s2", VMID: "vm2"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AbortSnapshot(ctx, "s2"); err != nil {
		t.Fatal(err)
	}
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "s2", VMID: "vm2", CreatedAt: t0.Add(time.Minute)}); err != nil {
		t.Fatalf("ReserveSnapshot after abort: %v", err)
	}
	if err := s.CommitSnapshot(ctx, "s2", testSnapshot("s2", "vm2", t0.Add(time.Minute))); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitSnapshot(ctx, "s3", testSnapshot("other", "vm2", t0)); err == nil {
		t.Error("CommitSnapshot with mismatched id succeeded")
	}

	// List: all, and by VM.
	for vmID, wantIDs := range map[string][]string{"": {"s1", "s2"}, "vm1": {"s1"}, "vm2": {"s2"}, "vm3": nil} {
		list, err := s.ListSnapshots(ctx, vmID)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, sn := range list {
			ids = append(ids, sn.ID)
		}
		if diff := cmp.Diff(wantIDs, ids); diff != "" {
			t.Errorf("ListSnapshots(%q) (-want +got):\n%s", vmID, diff)
		}
	}

	if err := s.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetSnapshot(ctx, "s1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetSnapshot after delete: got %v, want ErrNotFound", err)
	}
}

func TestTx(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	now := time.Now()

	// A failing transaction leaves nothing behind.
	boom := errors.New("boom")
	err := s.Tx(ctx, func(tx *Tx) error {
		if err := tx.CreateVM(ctx, testVM("clone", now)); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Tx = %v, want boom", err)
	}
	if _, err := s.GetVM(ctx, "clone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetVM after rollback: got %v, want ErrNotFound", err)
	}

	// A restore: new VM and snapshot bookkeeping together.
	if err := s.ReserveSnapshot(ctx, testSnapshot("snap", "vm", now)); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitSnapshot(ctx, "snap", testSnapshot("snap", "vm", now)); err != nil {
		t.Fatal(err)
	}
	err = s.Tx(ctx, func(tx *Tx) error {
		sn, err := tx.GetSnapshot(ctx, "snap")
		if err != nil {
			return err
		}
		v := testVM("clone", now)
		v.RestoredFrom = sn.ID
		if err := tx.CreateVM(ctx, v); err != nil {
			return err
		}
		sn.Restored, sn.RestoredVMID, sn.RestoreCount = true, v.ID, sn.RestoreCount+1
		return tx.UpdateSnapshot(ctx, sn)
	})
	if err != nil {
		t.Fatal(err)
	}
	sn, err := s.GetSnapshot(ctx, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if sn.RestoreCount != 1 || sn.RestoredVMID != "clone" {
		t.Errorf("snapshot after restore: %+v", sn)
	}
	clones, err := s.VMsRestoredFrom(ctx, "snap")
	if err != nil || len(clones) != 1 || clones[0].ID != "clone" {
		t.Errorf("VMsRestoredFrom = %v, %v; want [clone]", clones, err)
	}
}

// TestTxConcurrentIncrement checks that read-modify-write transactions
// from many goroutines (and connections) do not lose updates.
func TestTxConcurrentIncrement(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	sn := testSnapshot("snap", "vm", time.Now())
	if err := s.ReserveSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitSnapshot(ctx, "snap", sn); err != nil {
		t.Fatal(err)
	}
	const n = 20
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			err := s.Tx(ctx, func(tx *Tx) error {
				sn, err := tx.GetSnapshot(ctx, "snap")
				if err != nil {
					return err
				}
				sn.RestoreCount++
				return tx.UpdateSnapshot(ctx, sn)
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got, err := s.GetSnapshot(ctx, "snap")
	if err != nil {
		t.Fatal(err)
	}
	if got.RestoreCount != n {
		t.Errorf("RestoreCount = %d, want %d", got.RestoreCount, n)
	}
}

func TestReserveConcurrentGoroutines(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	// Two Store handles on one file, so the race also crosses connection pools.
	stores := []*Store{openTest(t, dir), openTest(t, dir)}
	const n = 32
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		wins int
	)
	for i := range n {
		wg.Go(func() {
			err := stores[i%2].ReserveSnapshot(ctx, Snapshot{ID: "same", VMID: fmt.Sprint("vm", i)})
			switch {
			case err == nil:
				mu.Lock()
				wins++
				mu.Unlock()
			case !errors.Is(err, ErrExists):
				t.Errorf("ReserveSnapshot: %v", err)
			}
		})
	}
	wg.Wait()
	if wins != 1 {
		t.Errorf("%d goroutines reserved the id, want exactly 1", wins)
	}
}

func TestReserveTwoProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	dir := t.TempDir()
	s := openTest(t, dir) // creates the schema before the race
	const n = 40
	children := []*child{
		startChild(t, "reserve", dir, envN+"="+strconv.Itoa(n)),
		startChild(t, "reserve", dir, envN+"="+strconv.Itoa(n)),
	}
	for _, c := range children {
		c.expect(t, "ready")
	}
	for _, c := range children {
		fmt.Fprintln(c.stdin, "go")
	}
	winner := map[string]int{} // snapshot id -> pid of the child that won it
	for _, c := range children {
		for _, line := range c.rest(t) {
			id, ok := strings.CutPrefix(line, "won ")
			if !ok {
				continue
			}
			if pid, dup := winner[id]; dup {
				t.Errorf("%s reserved by both %d and %d", id, pid, c.cmd.Process.Pid)
			}
			winner[id] = c.cmd.Process.Pid
		}
	}
	if len(winner) != n {
		t.Errorf("%d ids reserved, want %d", len(winner), n)
	}

	// The pending rows record who reserved them.
	pending, err := s.ListPendingSnapshots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(pending) != n {
		t.Fatalf("%d pending rows, want %d", len(pending), n)
	}
	for _, p := range pending {
		if p.CreatorPID != winner[p.ID] {
			t.Errorf("%s: CreatorPID %d, want winner %d", p.ID, p.CreatorPID, winner[p.ID])
		}
	}
}

func TestSchemaVersion(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := userVersion(ctx, s.db)
	if err != nil {
		t.Fatal(err)
	}
	if v != len(migrations) || v < 1 {
		t.Errorf("user_version = %d, want %d", v, len(migrations))
	}
	if err := s.CreateVM(ctx, testVM("keep", time.Now())); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// Reopening an up-to-date database changes nothing.
	s = openTest(t, dir)
	if _, err := s.GetVM(ctx, "keep"); err != nil {
		t.Fatal(err)
	}

	// A database from a newer smolvm is refused.
	newer := len(migrations) + 1
	if _, err := s.db.Exec(fmt.Sprintf("PRAGMA user_version = %d", newer)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(ctx, dir)
	if !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("Open of newer schema: got %v, want ErrSchemaTooNew", err)
	}
	if msg := err.Error(); !strings.Contains(msg, strconv.Itoa(newer)) || !strings.Contains(msg, DBName) {
		t.Errorf("error %q should name the file and the version", msg)
	}
}
