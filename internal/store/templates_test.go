package store

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestMigrateToTemplatesKeepsRows opens a database at schema version 2 (the
// last one without templates) holding a VM and a snapshot: the migration
// keeps both, with empty template fields, and the snapshot stays listed.
func TestMigrateToTemplatesKeepsRows(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := dbAtVersion(t, dir, 2)
	now := time.Now().UnixNano()
	if _, err := db.Exec(`INSERT INTO vms (id, backend, status, machine, created_at, updated_at) VALUES ('old', 'qemu', 'stopped', '{}', ?, ?)`, now, now); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO snapshots (id, state, vm_id, backend, type, created_at) VALUES ('snap', 'ready', 'old', 'qemu', 'full', ?)`, now); err != nil {
		t.Fatal(err)
	}
	db.Close()

	s := openTest(t, dir)
	vm, err := s.GetVM(ctx, "old")
	if err != nil || vm.Template != "" {
		t.Fatalf("vm after migration: %+v, %v", vm, err)
	}
	snaps, err := s.ListSnapshots(ctx, "")
	if err != nil || len(snaps) != 1 || snaps[0].ID != "snap" || snaps[0].TemplateKey != "" {
		t.Fatalf("snapshots after migration: %+v, %v", snaps, err)
	}
	if v, _ := userVersion(ctx, s.db); v != len(migrations) {
		t.Errorf("user_version = %d, want %d", v, len(migrations))
	}
}

// TestTemplatesAreNotUserSnapshots: a snapshot with a template key is
// found by GetTemplate and ListTemplates only, keeps its key and metadata
// through UpdateSnapshot, and a VM keeps the template it names.
func TestTemplatesAreNotUserSnapshots(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	meta := json.RawMessage(`{"image":"busybox"}`)
	tmpl := Snapshot{ID: "tmpl-abc", VMID: "builder", Backend: "qemu", Type: backend.SnapshotFull, TemplateKey: "abc", Template: meta}
	if err := s.ReserveSnapshot(ctx, tmpl); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetTemplate(ctx, "abc"); !errors.Is(err, ErrNotFound) {
		t.Errorf("pending template found: %v", err)
	}
	if err := s.CommitSnapshot(ctx, "tmpl-abc", tmpl); err != nil {
		t.Fatal(err)
	}
	if err := s.ReserveSnapshot(ctx, Snapshot{ID: "user", VMID: "v", Backend: "qemu", Type: backend.SnapshotFull}); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitSnapshot(ctx, "user", Snapshot{VMID: "v", Backend: "qemu", Type: backend.SnapshotFull}); err != nil {
		t.Fatal(err)
	}
	snaps, _ := s.ListSnapshots(ctx, "")
	if len(snaps) != 1 || snaps[0].ID != "user" {
		t.Errorf("ListSnapshots = %+v, want only the user snapshot", snaps)
	}
	got, err := s.GetTemplate(ctx, "abc")
	if err != nil || got.ID != "tmpl-abc" || string(got.Template) != string(meta) {
		t.Fatalf("GetTemplate = %+v, %v", got, err)
	}
	if _, err := s.GetTemplate(ctx, ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetTemplate(\"\") = %v, want not found (user snapshots have no key)", err)
	}
	got.RestoreCount = 3
	got.TemplateKey = ""
	if err := s.UpdateSnapshot(ctx, got); err != nil {
		t.Fatal(err)
	}
	list, _ := s.ListTemplates(ctx)
	if len(list) != 1 || list[0].TemplateKey != "abc" || list[0].RestoreCount != 3 {
		t.Errorf("ListTemplates = %+v", list)
	}
	v := testVM("from-tmpl", time.Now())
	v.Template = "abc"
	if err := s.CreateVM(ctx, v); err != nil {
		t.Fatal(err)
	}
	rv, _ := s.GetVM(ctx, "from-tmpl")
	rv.Template = "abc"
	rv.Status = VMRunning
	if err := s.UpdateVM(ctx, rv); err != nil {
		t.Fatal(err)
	}
	if rv, _ := s.GetVM(ctx, "from-tmpl"); rv.Template != "abc" {
		t.Errorf("vm template = %q", rv.Template)
	}
}
