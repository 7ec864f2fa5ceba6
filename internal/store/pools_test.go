package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// TestMigrateToPoolsKeepsRows opens a database at schema version 3 (the
// last one without pools) holding a VM with a uid: the migration keeps
// both and adds an empty pools table.
func TestMigrateToPoolsKeepsRows(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := dbAtVersion(t, dir, 3)
	for _, q := range []string{
		`INSERT INTO vms (id, backend, status, machine, created_at, updated_at, template) VALUES ('old', 'qemu', 'stopped', '{}', 1, 1, 'k')`,
		`INSERT INTO vm_uids (uid, vm_id) VALUES (70000, 'old')`} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s := openTest(t, dir)
	if vm, err := s.GetVM(ctx, "old"); err != nil || vm.Template != "k" {
		t.Fatalf("vm after migration: %+v, %v", vm, err)
	}
	if uid, err := s.UIDOf(ctx, "old"); err != nil || uid != 70000 {
		t.Errorf("uid after migration: %d, %v", uid, err)
	}
	if l, err := s.ListPools(ctx); err != nil || len(l) != 0 {
		t.Errorf("pools after migration: %+v, %v", l, err)
	}
	if v, _ := userVersion(ctx, s.db); v != len(migrations) {
		t.Errorf("user_version = %d, want %d", v, len(migrations))
	}
}

// dbAtVersion makes the database in dir at schema version v (the first v
// migrations, as an older smolvm left it); the caller adds rows and closes it.
func dbAtVersion(t *testing.T, dir string, v int) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, DBName))
	if err != nil {
		t.Fatal(err)
	}
	for k, m := range migrations[:v] {
		if _, err := db.Exec(m); err != nil {
			t.Fatalf("migration %d: %v", k+1, err)
		}
	}
	if _, err := db.Exec(fmt.Sprintf("PRAGMA user_version = %d", v)); err != nil {
		t.Fatal(err)
	}
	return db
}

// TestPoolsAndMoveUID: PutPool creates and replaces, DeletePool removes
// (not found twice), invalid pools are refused; MoveUID hands a uid to
// another VM, which keeps it when the first row is deleted.
func TestPoolsAndMoveUID(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	p := Pool{Name: "busybox/256m", Image: "busybox", Options: json.RawMessage(`{"MemoryMiB":256}`), Size: 2}
	if err := s.PutPool(ctx, p); err != nil {
		t.Fatal(err)
	}
	p.Size = 3
	if err := s.PutPool(ctx, p); err != nil {
		t.Fatal(err)
	}
	l, err := s.ListPools(ctx)
	if err != nil || len(l) != 1 || l[0].Size != 3 || l[0].Image != "busybox" || string(l[0].Options) != `{"MemoryMiB":256}` {
		t.Fatalf("ListPools = %+v, %v", l, err)
	}
	for _, bad := range []Pool{{Name: "x", Size: 0, Options: json.RawMessage(`{}`)}, {Name: "", Size: 1, Options: json.RawMessage(`{}`)}, {Name: "x", Size: 1, Options: json.RawMessage(`{`)}} {
		if err := s.PutPool(ctx, bad); err == nil {
			t.Errorf("PutPool(%+v) accepted", bad)
		}
	}
	if err := s.DeletePool(ctx, p.Name); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePool(ctx, p.Name); !errors.Is(err, ErrNotFound) {
		t.Errorf("second DeletePool = %v", err)
	}

	for _, id := range []string{"pool-a", "claimer"} {
		if err := s.CreateVM(ctx, testVM(id, time.Now())); err != nil {
			t.Fatal(err)
		}
	}
	uid, err := s.AssignUID(ctx, "pool-a", 70000, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Tx(ctx, func(tx *Tx) error {
		if err := tx.MoveUID(ctx, "pool-a", "claimer"); err != nil {
			return err
		}
		return tx.DeleteVM(ctx, "pool-a")
	})
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := s.UIDOf(ctx, "claimer"); got != uid {
		t.Errorf("claimer's uid = %d, want %d (moved)", got, uid)
	}
	if err := s.CreateVM(ctx, testVM("pool-b", time.Now())); err != nil {
		t.Fatal(err)
	}
	if other, err := s.AssignUID(ctx, "pool-b", 70000, 10, nil); err != nil || other == uid {
		t.Errorf("AssignUID after the move = %d, %v; the moved uid %d must stay taken", other, err, uid)
	}
}
