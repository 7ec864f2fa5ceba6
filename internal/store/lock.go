package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrLocked is wrapped (together with the context's error) when LockVM or
// LockSnapshot gives up because another holder kept the lock.
var ErrLocked = errors.New("gave up waiting for the lock")

// LockDir is the directory under the data dir that holds lock files.
const LockDir = "locks"

// lockPoll is how often a blocked lock attempt retries.
const lockPoll = 20 * time.Millisecond

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

func lock(ctx context.Context, dataDir, id, name, what string) (func(), error) {
	if err := ValidID(id); err != nil {
		return nil, fmt.Errorf("store: lock %s: %w", what, err)
	}
	dir := filepath.Join(dataDir, LockDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: lock %s %q: %w", what, id, err)
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("store: lock %s %q: %w", what, id, err)
	}
	fd := int(f.Fd())
	for {
		if err := ctx.Err(); err != nil {
			f.Close()
			return nil, fmt.Errorf("another smolvm process is operating on %s %q: %w %s: %w", what, id, ErrLocked, path, err)
		}
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("store: lock %s %q: flock %s: %w", what, id, path, err)
		}
		t := time.NewTimer(lockPoll)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			// Closing the descriptor releases the lock. The file stays:
			// removing it would let a waiter lock an unlinked inode while
			// a newcomer locks a fresh file of the same name.
			f.Close()
		})
	}, nil
}
