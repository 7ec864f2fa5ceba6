package smolvm

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
)

// TestForkOwnersCloseConcurrently: handles sharing a Manager (as the
// package-level Fork's clones do) closed at once, each twice, from many
// goroutines: the Manager stays open while one is left and closes exactly
// when the last goes (go test -race checks the handles' owner field).
func TestForkOwnersCloseConcurrently(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m, err := NewManager(ctx, Options{DataDir: dir, RunDir: dir + "/run", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	vms := make([]*VM, 8)
	for i := range vms {
		vms[i] = &VM{m: m, id: "v"}
	}
	ownManager(m, vms...)
	var wg sync.WaitGroup
	for _, vm := range vms[:7] {
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := vm.Close(); err != nil {
					t.Error(err)
				}
			}()
		}
	}
	wg.Wait()
	if _, err := m.store.ListVMs(ctx); err != nil {
		t.Fatalf("the Manager closed while a handle still owns it: %v", err)
	}
	if err := vms[7].Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.store.ListVMs(ctx); err == nil {
		t.Fatal("the Manager is still open after its last owner closed")
	}
	if err := vms[7].Close(); err != nil {
		t.Errorf("second Close of the last owner: %v", err)
	}
}
