package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
)

func TestAssignUID(t *testing.T) {
	ctx := context.Background()
	s := openTest(t, t.TempDir())
	for _, id := range []string{"a", "b", "c", "d"} {
		if err := s.CreateVM(ctx, VM{ID: id, Backend: "qemu", Status: VMCreated}); err != nil {
			t.Fatal(err)
		}
	}
	const base = 1_900_000_000
	taken := func(u int) bool { return u == base+1 } // a real user, say
	a, err := s.AssignUID(ctx, "a", base, 3, taken)
	if err != nil || a != base {
		t.Fatalf("a: %d %v, want %d", a, err, base)
	}
	if again, err := s.AssignUID(ctx, "a", base, 3, taken); err != nil || again != a {
		t.Fatalf("a again: %d %v, want the same uid %d", again, err, a)
	}
	b, err := s.AssignUID(ctx, "b", base, 3, taken)
	if err != nil || b != base+2 {
		t.Fatalf("b: %d %v, want %d (base+1 is taken)", b, err, base+2)
	}
	if _, err := s.AssignUID(ctx, "c", base, 3, taken); !errors.Is(err, ErrNoFreeUID) {
		t.Fatalf("c with a full range: %v, want ErrNoFreeUID", err)
	}
	if _, err := s.AssignUID(ctx, "nope", base, 3, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing vm: %v, want ErrNotFound", err)
	}
	if u, err := s.UIDOf(ctx, "b"); err != nil || u != b {
		t.Fatalf("UIDOf(b) = %d %v", u, err)
	}
	// Deleting a VM releases its uid.
	if err := s.DeleteVM(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if u, err := s.UIDOf(ctx, "a"); err != nil || u != 0 {
		t.Fatalf("UIDOf(a) after delete = %d %v, want 0", u, err)
	}
	if c, err := s.AssignUID(ctx, "c", base, 3, taken); err != nil || c != base {
		t.Fatalf("c after a's delete: %d %v, want %d", c, err, base)
	}
	for _, bad := range [][2]int{{0, 5}, {base, 0}, {1 << 31, 1}} {
		if _, err := s.AssignUID(ctx, "d", bad[0], bad[1], nil); err == nil {
			t.Errorf("range %v accepted", bad)
		}
	}
}

// TestAssignUIDConcurrent: several handles on one data dir (separate
// connection pools, as separate processes have) assign uids to many VMs at
// once; no uid is given twice.
func TestAssignUIDConcurrent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openTest(t, dir)
	const n = 40
	for i := range n {
		if err := s.CreateVM(ctx, VM{ID: fmt.Sprintf("vm%d", i), Backend: "qemu", Status: VMCreated}); err != nil {
			t.Fatal(err)
		}
	}
	handles := []*Store{s, openTest(t, dir), openTest(t, dir), openTest(t, dir)}
	var mu sync.Mutex
	got := map[int]string{}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("vm%d", i)
			u, err := handles[i%len(handles)].AssignUID(ctx, id, 1_900_000_000, 1000, nil)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[u]; dup {
				t.Errorf("uid %d given to %s and %s", u, other, id)
			}
			got[u] = id
		}()
	}
	wg.Wait()
	if len(got) != n {
		t.Fatalf("%d uids for %d VMs", len(got), n)
	}
}
