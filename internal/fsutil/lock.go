package fsutil

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy is wrapped by TryLock's error when another holder has the lock.
var ErrBusy = errors.New("lock is held")

// lockPoll is how often Lock retries a busy lock.
const lockPoll = 20 * time.Millisecond

// Lock takes an exclusive flock(2) on path, creating the file (0600) when
// missing, waiting until it is free or ctx ends. onWait, when not nil, is
// called once if the lock is busy. The file is opened with O_NOFOLLOW (a
// symlink planted at path is refused, not followed) and O_CLOEXEC (os
// always sets it: a child such as QEMU does not inherit the lock) and must be
// a regular file. Call unlock to release it; the kernel also releases it
// when the process dies, so a lock file left behind is harmless: lock files
// are never removed (a waiter would lock an unlinked inode while a newcomer
// locks a fresh file of the same name). When ctx ends first the error
// wraps ctx.Err().
func Lock(ctx context.Context, path string, onWait func()) (unlock func(), err error) {
	return lock(ctx, path, onWait, unix.LOCK_EX)
}

// LockShared is Lock with a shared flock(2): any number of shared holders
// at once, none while an exclusive (Lock) holder has it.
func LockShared(ctx context.Context, path string, onWait func()) (unlock func(), err error) {
	return lock(ctx, path, onWait, unix.LOCK_SH)
}

func lock(ctx context.Context, path string, onWait func(), how int) (unlock func(), err error) {
	f, err := openLockFile(path)
	if err != nil {
		return nil, err
	}
	waited := false
	for {
		if err := ctx.Err(); err != nil {
			f.Close()
			return nil, fmt.Errorf("waiting for lock %s: %w", path, err)
		}
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			break
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("flock %s: %w", path, err)
		}
		if !waited && onWait != nil {
			onWait()
		}
		waited = true
		t := time.NewTimer(lockPoll)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
	var once sync.Once
	return func() { once.Do(func() { f.Close() }) }, nil
}

// TryLock is Lock without waiting: it returns an error wrapping ErrBusy at
// once when another holder has the lock. Closing the returned file
// releases the lock.
func TryLock(path string) (*os.File, error) {
	f, err := openLockFile(path)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("%s: %w", path, ErrBusy)
		}
		return nil, fmt.Errorf("flock %s: %w", path, err)
	}
	return f, nil
}

func openLockFile(path string) (*os.File, error) {
	// O_NONBLOCK: opening a FIFO planted at path must not hang; it is
	// refused below as not a regular file.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0o600)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("lock file %s is a symlink; refusing to follow it (remove it): %w", path, err)
		}
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("lock file %s is not a regular file (%v); remove it", path, st.Mode().Type())
	}
	return f, nil
}
