package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLockInProcess(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	unlock, err := LockVM(ctx, dir, "x")
	if err != nil {
		t.Fatal(err)
	}
	// A VM and a snapshot with the same id have separate locks.
	unlockSnap, err := LockSnapshot(ctx, dir, "x")
	if err != nil {
		t.Fatal(err)
	}

	// flock excludes other descriptors in the same process too.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := LockSnapshot(short, dir, "x"); !errors.Is(err, ErrLocked) ||
		!strings.Contains(err.Error(), `operating on snapshot "x"`) {
		t.Errorf("second LockSnapshot = %v, want a snapshot lock error", err)
	}

	unlock()
	unlock() // idempotent
	unlockSnap()
	// The lock file stays and does not get in the way.
	if _, err := os.Stat(filepath.Join(dir, LockDir, "x.lock")); err != nil {
		t.Error(err)
	}
	unlock, err = LockVM(ctx, dir, "x")
	if err != nil {
		t.Fatalf("relock: %v", err)
	}
	unlock()

	if _, err := LockVM(ctx, dir, "../x"); !errors.Is(err, ErrInvalidID) {
		t.Errorf("LockVM(../x) = %v, want ErrInvalidID", err)
	}
}

func TestLockTwoProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	ctx := context.Background()
	dir := t.TempDir()
	holder := startChild(t, "lock", dir)
	holder.expect(t, "locked")

	// While the child holds it, a bounded attempt fails with a clear error.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err := LockVM(short, dir, "vm1")
	if !errors.Is(err, ErrLocked) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LockVM while held = %v, want ErrLocked and DeadlineExceeded", err)
	}
	if want := `another smolvm process is operating on VM "vm1"`; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not contain %q", err, want)
	}

	// An unbounded attempt blocks until the child releases.
	got := make(chan error, 1)
	go func() {
		unlock, err := LockVM(ctx, dir, "vm1")
		if err == nil {
			defer unlock()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("LockVM returned while the child holds the lock: %v", err)
	case <-time.After(150 * time.Millisecond):
	}
	fmt.Fprintln(holder.stdin, "release")
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("LockVM still blocked after the child released")
	}
	holder.rest(t)

	// A holder that dies without unlocking releases the lock too.
	holder = startChild(t, "lock", dir)
	holder.expect(t, "locked")
	if err := holder.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	holder.cmd.Wait()
	within, cancel2 := context.WithTimeout(ctx, 5*time.Second)
	defer cancel2()
	unlock, err := LockVM(within, dir, "vm1")
	if err != nil {
		t.Fatalf("LockVM after the holder died: %v", err)
	}
	unlock()
}

// TestLockSnapshotShared: shared holders coexist; an exclusive lock waits
// for all of them, and a shared one waits for an exclusive holder.
func TestLockSnapshotShared(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	u1, err := LockSnapshotShared(ctx, dir, "t")
	if err != nil {
		t.Fatal(err)
	}
	u2, err := LockSnapshotShared(ctx, dir, "t")
	if err != nil {
		t.Fatalf("second shared lock: %v", err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := LockSnapshot(short, dir, "t"); !errors.Is(err, ErrLocked) {
		t.Errorf("exclusive lock under shared holders = %v, want ErrLocked", err)
	}
	u1()
	u2()
	ux, err := LockSnapshot(ctx, dir, "t")
	if err != nil {
		t.Fatal(err)
	}
	short2, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	if _, err := LockSnapshotShared(short2, dir, "t"); !errors.Is(err, ErrLocked) {
		t.Errorf("shared lock under an exclusive holder = %v, want ErrLocked", err)
	}
	ux()
}
