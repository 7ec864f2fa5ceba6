// Package atomicfile writes files so that readers see either the old
// content or the new, never a mix: a temp file in the same directory,
// fsynced, renamed over the target, and the directory fsynced.
package atomicfile

import (
	"io"
	"os"
	"path/filepath"
)

// WriteFile atomically replaces path with data and mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return Write(path, func(w io.Writer) (os.FileMode, error) {
		_, err := w.Write(data)
		return perm, err
	})
}

// Write atomically replaces path with what fill writes, and the mode fill
// returns. Should fill fail, path is left as it was and nothing remains.
func Write(path string, fill func(w io.Writer) (os.FileMode, error)) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	perm, err := fill(f)
	if err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory (making renames in it durable).
func SyncDir(dir string) error { return SyncFile(dir) }

// SyncFile fsyncs a file (or directory) by path.
func SyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
