package store

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestUpdateVMIfUnchanged: a compare-and-set on the version a row was read
// at; a write from a stale read changes nothing.
func TestUpdateVMIfUnchanged(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	if err := s.CreateVM(ctx, testVM("a", time.Now())); err != nil {
		t.Fatal(err)
	}
	stale, _ := s.GetVM(ctx, "a")
	// A lock holder writes a field.
	fresh := stale
	fresh.RestoredFrom = "snap-1"
	if err := s.UpdateVM(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	// The stale reader's write is refused and changes nothing.
	w := stale
	w.Status, w.LastError = VMStopped, "the VM process exited"
	if err := s.UpdateVMIfUnchanged(ctx, w); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale compare-and-set: %v, want ErrConflict", err)
	}
	got, _ := s.GetVM(ctx, "a")
	if got.RestoredFrom != "snap-1" || got.Status != VMCreated || got.LastError != "" {
		t.Errorf("after a refused write: %+v", got)
	}
	// Re-read, decide again: accepted, and the lock holder's field stays.
	w = got
	w.Status, w.LastError = VMStopped, "the VM process exited"
	if err := s.UpdateVMIfUnchanged(ctx, w); err != nil {
		t.Fatalf("fresh compare-and-set: %v", err)
	}
	got, _ = s.GetVM(ctx, "a")
	if got.RestoredFrom != "snap-1" || got.Status != VMStopped {
		t.Errorf("after an accepted write: %+v", got)
	}
	// The same read twice: only the first write lands.
	if err := s.UpdateVMIfUnchanged(ctx, w); !errors.Is(err, ErrConflict) {
		t.Errorf("second write from one read: %v, want ErrConflict", err)
	}
	missing := w
	missing.ID = "gone"
	if err := s.UpdateVMIfUnchanged(ctx, missing); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing vm: %v, want ErrNotFound", err)
	}
}

// TestUpdateVMVersionMonotonic: UpdatedAt moves forward on every write even
// when the clock does not (a clock stepped back, or two writes in one
// clock tick), so equal versions mean an unchanged row.
func TestUpdateVMVersionMonotonic(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	if err := s.CreateVM(ctx, testVM("a", time.Now())); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Hour)
	if _, err := s.db.ExecContext(ctx, `UPDATE vms SET updated_at = ?`, toNanos(future)); err != nil {
		t.Fatal(err)
	}
	v, _ := s.GetVM(ctx, "a")
	for i := 1; i <= 3; i++ {
		if err := s.UpdateVMIfUnchanged(ctx, v); err != nil {
			t.Fatal(err)
		}
		got, _ := s.GetVM(ctx, "a")
		if want := future.Add(time.Duration(i)); !got.UpdatedAt.Equal(want) {
			t.Fatalf("write %d: UpdatedAt %v, want %v", i, got.UpdatedAt, want)
		}
		v = got
	}
}

// TestDBFileMode: the state database is created 0600 whatever the umask.
func TestDBFileMode(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	s := openTest(t, dir)
	st, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode() != 0o600 {
		t.Errorf("state.db mode %v, want 0600", st.Mode())
	}
	if err := s.CreateVM(context.Background(), testVM("a", time.Now())); err != nil {
		t.Fatal(err)
	}
	for _, suffix := range []string{"-wal", "-shm"} {
		st, err := os.Stat(s.Path() + suffix)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != 0o600 {
			t.Errorf("state.db%s mode %v, want 0600", suffix, st.Mode())
		}
	}
}
