package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// ErrLocked is wrapped (together with the context's error) when LockVM or
// LockSnapshot gives up because another holder kept the lock.
var ErrLocked = errors.New("gave up waiting for the lock")

// LockDir is the directory under the data dir that holds lock files.
const LockDir = "locks"

// LockVM takes an exclusive flock(2) on <dataDir>/locks/<id>.lock, waiting
// until it is free or ctx ends. Call unlock to release it; the kernel also
// releases it when the process dies, so a lock file left behind is harmless.
// Locks exclude each other across processes and within one process alike.
// When ctx ends first the error names the VM and wraps ErrLocked and
// ctx.Err().
func LockVM(ctx context.Context, dataDir, id string) (unlock func(), err error) {
	return lock(ctx, dataDir, id, id+".lock", "VM")
}

// LockSnapshot is LockVM for snapshots: the file is
// <dataDir>/locks/<id>.snapshot.lock (ids contain no '.', so it never
// collides with a VM's lock file).
func LockSnapshot(ctx context.Context, dataDir, id string) (unlock func(), err error) {
	return lock(ctx, dataDir, id, id+".snapshot.lock", "snapshot")
}

// LockSnapshotShared takes the snapshot's lock shared: many holders at
// once (creates restoring one template), none while LockSnapshot holds it
// (a delete, or a template build).
func LockSnapshotShared(ctx context.Context, dataDir, id string) (unlock func(), err error) {
	return lockHow(ctx, dataDir, id, id+".snapshot.lock", "snapshot", fsutil.LockShared)
}

func lock(ctx context.Context, dataDir, id, name, what string) (func(), error) {
	return lockHow(ctx, dataDir, id, name, what, fsutil.Lock)
}

func lockHow(ctx context.Context, dataDir, id, name, what string, how func(context.Context, string, func()) (func(), error)) (func(), error) {
	if err := ValidID(id); err != nil {
		return nil, fmt.Errorf("store: lock %s: %w", what, err)
	}
	dir := filepath.Join(dataDir, LockDir)
	if err := fsutil.PrivateDir(dir); err != nil {
		return nil, fmt.Errorf("store: lock %s %q: %w", what, id, err)
	}
	path := filepath.Join(dir, name)
	unlock, err := how(ctx, path, nil)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("another smolvm process is operating on %s %q: %w %s: %w", what, id, ErrLocked, path, ctx.Err())
		}
		return nil, fmt.Errorf("store: lock %s %q: %w", what, id, err)
	}
	return unlock, nil
}
