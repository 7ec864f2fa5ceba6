package smolvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// failingRestore is the real QEMU backend, except that its n-th Restore
// fails: a fault injected behind our own interface, to test the error path.
type failingRestore struct {
	backend.Backend
	n     int32
	calls atomic.Int32
}

// Unwrap lets backend.As reach the real backend's optional interfaces.
func (f *failingRestore) Unwrap() backend.Backend { return f.Backend }

func (f *failingRestore) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	if f.calls.Add(1) == f.n {
		return backend.Machine{}, fmt.Errorf("injected restore failure for %s", req.Spec.ID)
	}
	return f.Backend.Restore(ctx, req)
}

// TestForkRemovesFailedClone: a clone that fails to start is removed and
// reported; the others keep running.
func TestForkRemovesFailedClone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	m := newTempManager(t, ctx, "smvfi")
	reg, _ := backend.Lookup(DefaultBackend)
	real, err := reg.New(backend.Options{Logger: m.log})
	if err != nil {
		t.Fatal(err)
	}
	fb := &failingRestore{Backend: real, n: 2}
	m.backends[DefaultBackend] = fb

	vm, err := m.New(ctx, Config{Name: "src", Image: "busybox", NoNetwork: true, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Delete(context.Background())
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Snapshot(ctx, SnapshotOptions{ID: "s"}); err != nil {
		t.Fatal(err)
	}
	clones, err := m.Fork(ctx, "s", 3, ForkOptions{Resume: true})
	var fe *ForkError
	if !errors.As(err, &fe) || len(fe.Failed) != 1 {
		t.Fatalf("Fork error: %v", err)
	}
	if len(clones) != 2 {
		t.Fatalf("%d clones started, want 2", len(clones))
	}
	for id := range fe.Failed {
		if _, err := m.Open(ctx, id); !errors.Is(err, ErrVMNotFound) {
			t.Errorf("failed clone %s still recorded: %v", id, err)
		}
		if _, err := os.Stat(m.vmDir(id)); !os.IsNotExist(err) {
			t.Errorf("failed clone %s left its dir: %v", id, err)
		}
	}
	for _, c := range clones {
		res, err := c.Run(ctx, "hostname")
		if err != nil || res.Output() != c.ID() {
			t.Errorf("clone %s: %v %+v", c.ID(), err, res)
		}
		c.Delete(ctx)
		c.Close()
	}

	// Too little host memory (the available figure faked, the snapshot
	// real): refused before anything starts, with the figures; enough for
	// the start but not for every clone's whole RAM: allowed (overcommit).
	before, _ := m.List(ctx)
	m.memAvailable = func() (int64, bool) { return 100, true }
	_, err = m.Fork(ctx, "s", 2, ForkOptions{})
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "not enough memory for 2 clones") ||
		!strings.Contains(err.Error(), "100 MiB available") {
		t.Errorf("fork with 100 MiB available: %v", err)
	}
	if after, _ := m.List(ctx); len(after) != len(before) {
		t.Errorf("refused fork left VMs: %d -> %d", len(before), len(after))
	}
	m.memAvailable = func() (int64, bool) { return 400, true } // < 2 x 256 MiB guests, > image + 2 x overhead
	if err := m.checkForkMemory("s", mustManifest(t, m, "s").Result, 256, 2); err != nil {
		t.Errorf("fork within the start-up need but over the worst case: %v", err)
	}
}

func mustManifest(t *testing.T, m *Manager, id string) snapshot.Manifest {
	t.Helper()
	man, err := m.loadSnapshot(context.Background(), id, false)
	if err != nil {
		t.Fatal(err)
	}
	return man
}
