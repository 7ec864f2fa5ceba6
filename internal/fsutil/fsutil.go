// Package fsutil holds the file-system checks smolvm relies on for its
// private state: directories only we can enter (made with Mkdir 0700, then
// checked with Lstat, never reused as found when another user could have
// planted them), lock files opened without following symlinks (Lock,
// TryLock, waiting under a context), the process umask, and durable writes:
// WriteFile/Write/WriteFileFunc replace a file atomically (temp, fsync,
// rename, dir fsync); SyncFile and SyncDir fsync by path.
package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// ErrUnsafe is wrapped by the errors of PrivateDir and CheckPrivateDir when
// a path exists but is not a private directory of ours (a symlink, another
// owner, group or other permission bits, not a directory).
var ErrUnsafe = errors.New("not a private directory")

// UnsafeDirError says why Path is refused and what to do about it.
type UnsafeDirError struct {
	Path   string
	Reason string // "is a symlink", "is owned by uid 65534, not 0", ...
}

func (e *UnsafeDirError) Error() string {
	return fmt.Sprintf("refusing to use %s: it %s (smolvm keeps guest data and control sockets there and needs a directory "+
		"that only uid %d can enter, mode 0700); remove it (rm -r %s) if it is stale, or choose another directory",
		e.Path, e.Reason, os.Geteuid(), e.Path)
}

func (e *UnsafeDirError) Unwrap() error { return ErrUnsafe }

// PrivateDir makes dir a directory that only the effective user can enter:
// when missing it is created with Mkdir 0700 (missing parents with MkdirAll
// 0700); then, created or found, it is checked with CheckPrivateDir. A
// directory that fails the check is refused (an *UnsafeDirError wrapping
// ErrUnsafe), never repaired or reused: another user may hold files or an
// open descriptor in it.
func PrivateDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		switch {
		case errors.Is(err, fs.ErrExist):
		case errors.Is(err, fs.ErrNotExist):
			if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
				return err
			}
			if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
		default:
			return err
		}
	}
	return CheckPrivateDir(dir)
}

// CheckPrivateDir reports whether dir (not followed when it is a symlink) is
// a directory owned by the effective uid with no group or other permission
// bits. It returns nil, an *UnsafeDirError wrapping ErrUnsafe, or the
// Lstat error.
func CheckPrivateDir(dir string) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	return checkPrivate(dir, st)
}

func checkPrivate(dir string, st fs.FileInfo) error {
	if st.Mode()&fs.ModeSymlink != 0 {
		return &UnsafeDirError{Path: dir, Reason: "is a symlink"}
	}
	if !st.IsDir() {
		return &UnsafeDirError{Path: dir, Reason: "is not a directory"}
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return &UnsafeDirError{Path: dir, Reason: "has no owner information"}
	}
	if euid := os.Geteuid(); int(sys.Uid) != euid {
		return &UnsafeDirError{Path: dir, Reason: fmt.Sprintf("is owned by uid %d, not by us (uid %d)", sys.Uid, euid)}
	}
	if perm := st.Mode() & (fs.ModePerm | fs.ModeSetgid | fs.ModeSticky); perm&^0o700 != 0 {
		return &UnsafeDirError{Path: dir, Reason: fmt.Sprintf("has mode %v, open to other users", st.Mode())}
	}
	return nil
}

// Umask returns the process's file mode creation mask, read from
// /proc/self/status (Linux 4.7+) so that it is never changed, not even for
// a moment (umask(2) is process-wide: another goroutine creating a file
// meanwhile would get the wrong mode). Without /proc it returns 0o077, the
// strictest mask a caller would apply.
func Umask() fs.FileMode {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0o077
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				return 0o077
			}
			return fs.FileMode(n) & fs.ModePerm
		}
	}
	return 0o077
}

// HostMode is the mode a file copied from an untrusted source (a guest)
// gets on the host: its permission bits only (never setuid, setgid or
// sticky), masked by the process umask as if the file were created with
// that mode.
func HostMode(m fs.FileMode) fs.FileMode {
	return m.Perm() &^ Umask()
}
