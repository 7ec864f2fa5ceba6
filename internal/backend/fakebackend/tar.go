package fakebackend

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Bounds on what extractTar accepts (snapshot files are data, not trust).
const (
	maxEntries   = 100000
	maxTotalSize = 1 << 30
)

// writeTar archives the directories and regular files under dir (skipping
// the top-level names in skip; other file types are left out) into path.
func writeTar(path, dir string, skip []string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	werr := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		if slices.Contains(skip, strings.Split(rel, string(filepath.Separator))[0]) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if !info.Mode().IsRegular() && !info.IsDir() {
			return nil
		}
		hdr, err := tar.FileInfoHeader(info, "")
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		hdr.Uname, hdr.Gname = "", ""
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		defer src.Close()
		_, err = io.CopyN(tw, src, info.Size())
		return err
	})
	if err := errors.Join(werr, tw.Close(), f.Close()); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// extractTar unpacks the archive at path into dir: only directories and
// regular files with local names (no "..", no absolute paths; nothing it
// writes is a symlink, so nothing leads out of dir), private modes,
// bounded in count and size.
func extractTar(path, dir string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	var total int64
	for n := 0; ; n++ {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if n >= maxEntries {
			return fmt.Errorf("%s: more than %d entries", path, maxEntries)
		}
		name := filepath.FromSlash(hdr.Name)
		if !filepath.IsLocal(name) {
			return fmt.Errorf("%s: entry %q is not a local path", path, hdr.Name)
		}
		target := filepath.Join(dir, name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o700); err != nil {
				return err
			}
		case tar.TypeReg:
			if hdr.Size < 0 || total+hdr.Size > maxTotalSize {
				return fmt.Errorf("%s: more than %d bytes", path, maxTotalSize)
			}
			total += hdr.Size
			if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
				return err
			}
			out, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fs.FileMode(hdr.Mode)&0o700)
			if err != nil {
				return err
			}
			_, cerr := io.CopyN(out, tr, hdr.Size)
			if err := errors.Join(cerr, out.Close()); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: entry %q has type %q; only directories and regular files", path, hdr.Name, hdr.Typeflag)
		}
	}
}
