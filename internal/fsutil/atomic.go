package fsutil

import (
	"errors"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// WriteFile atomically replaces path with data and mode perm: readers see
// either the old content or the new, never a mix. It writes a temp file in
// the same directory, fsyncs it, renames it over path and fsyncs the
// directory. On error path is left as it was and no temp file remains.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return Write(path, func(w io.Writer) (os.FileMode, error) {
		_, err := w.Write(data)
		return perm, err
	})
}

// Write is WriteFile for content that fill streams, with the mode fill
// returns. Should fill fail, path is left as it was and nothing remains.
func Write(path string, fill func(w io.Writer) (os.FileMode, error)) error {
	return WriteFileFunc(path, func(f *os.File) (os.FileMode, error) { return fill(f) })
}

// WriteFileFunc is Write for a fill that needs the temp file itself (to
// clone into it, or to write at offsets). fill must not close f.
func WriteFileFunc(path string, fill func(f *os.File) (os.FileMode, error)) error {
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
	return Install(f, path, perm)
}

// Install publishes the temp file f, written in path's directory: it sets
// mode perm, fsyncs and closes f, renames it to path and fsyncs the
// directory. f is closed whatever the outcome; on error path is left as it
// was (the caller removes the temp file).
func Install(f *os.File, path string, perm os.FileMode) error {
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
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncFile fsyncs the file (or directory) at path.
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

// SyncDir fsyncs a directory, making the renames and creations in it
// durable. A file system that cannot fsync a directory (EINVAL) has
// nothing more to flush, so that is not an error.
func SyncDir(dir string) error {
	err := SyncFile(filepath.Clean(dir))
	if errors.Is(err, unix.EINVAL) {
		return nil
	}
	return err
}
