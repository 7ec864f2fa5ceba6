package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/procfs"
)

// sha256File returns the hex sha256 and the size of the file at path.
func sha256File(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// writeJSONAtomic marshals v (indented) and writes it atomically.
func writeJSONAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return fsutil.WriteFile(path, append(b, '\n'), 0o644)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("parse %s: %w", path, err)
	}
	return nil
}

// syncTree fsyncs every regular file and directory under root.
func syncTree(root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return fsutil.SyncDir(p)
		}
		if d.Type().IsRegular() {
			return fsutil.SyncFile(p)
		}
		return nil
	})
}

// publishDir moves the fully built directory tmp to final. tmp must be on
// the same file system. An existing final is replaced: it is renamed aside
// first and removed after the new one is in place.
func publishDir(tmp, final string) error {
	if err := syncTree(tmp); err != nil {
		return err
	}
	parent := filepath.Dir(final)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	var old string
	if _, err := os.Lstat(final); err == nil {
		old = fmt.Sprintf("%s.old-%d", final, os.Getpid())
		os.RemoveAll(old)
		if err := os.Rename(final, old); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		if old != "" {
			os.Rename(old, final)
		}
		return err
	}
	if err := fsutil.SyncDir(parent); err != nil {
		return err
	}
	if old != "" {
		return os.RemoveAll(old)
	}
	return nil
}

// copyFile replaces dst atomically (fsutil.Write: temp, fsync, rename,
// dir fsync) with a copy of src, mode perm masked by the umask as if
// created with it.
func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return fsutil.Write(dst, func(w io.Writer) (os.FileMode, error) {
		_, err := io.Copy(w, in)
		return fsutil.HostMode(perm), err
	})
}

// lockCache takes the image cache's lock (dir/.lock, fsutil.Lock), creating
// dir when missing, waiting until it is free or ctx ends. onWait
// (optional) is called once if the lock is busy.
func lockCache(ctx context.Context, dir string, onWait func()) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return fsutil.Lock(ctx, filepath.Join(dir, ".lock"), onWait)
}

// mountsUnder returns the mount points at or below dir (deepest first),
// read from /proc/self/mountinfo.
func mountsUnder(dir string) []string {
	mounts, err := procfs.SelfMounts()
	if err != nil {
		return nil
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, m := range mounts {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") {
			out = append(out, m.Point)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// removeAllSafe unmounts anything mounted below dir (a chroot left behind by
// an interrupted debootstrap) and then removes dir. It refuses to remove
// dir while something is still mounted inside it.
func removeAllSafe(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := unmountUnder(dir); err != nil {
		return fmt.Errorf("cannot remove %s: %w", dir, err)
	}
	return os.RemoveAll(dir)
}

// unmountUnder unmounts everything mounted at or below dir, deepest first.
func unmountUnder(dir string) error {
	for _, mp := range mountsUnder(dir) {
		if err := syscall.Unmount(mp, 0); err != nil {
			syscall.Unmount(mp, syscall.MNT_DETACH)
		}
	}
	if left := mountsUnder(dir); len(left) > 0 {
		return fmt.Errorf("still mounted: %s", strings.Join(left, ", "))
	}
	return nil
}

// dirSize returns the total apparent size of the regular files below root.
func dirSize(root string) (int64, error) {
	var total int64
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			info, err := d.Info()
			if err != nil {
				return err
			}
			total += info.Size()
		}
		return nil
	})
	return total, err
}
