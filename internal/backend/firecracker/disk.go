package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Disk copy methods, as recorded in snapshot metadata.
const (
	copyReflink = "reflink" // FICLONE: blocks shared copy-on-write
	copySparse  = "sparse"  // data extents copied, holes and zero blocks skipped
)

// copyDisk replaces dst with a copy of src: a FICLONE reflink when the
// filesystem supports it (btrfs, XFS), else a sparse copy. The copy is
// written to a temporary file, fsynced and renamed into place.
func copyDisk(ctx context.Context, src, dst string) (method string, err error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", src)
	}
	err = fsutil.WriteFileFunc(dst, func(tmp *os.File) (os.FileMode, error) {
		method = copyReflink
		if cerr := unix.IoctlFileClone(int(tmp.Fd()), int(in.Fd())); cerr != nil {
			method = copySparse
			if err := sparseCopy(ctx, in, tmp, st.Size()); err != nil {
				return 0, fmt.Errorf("copy %s: %w", src, err)
			}
		}
		return 0o600, nil
	})
	if err != nil {
		return "", err
	}
	return method, nil
}

// sparseCopy copies the data extents of in (found with SEEK_DATA /
// SEEK_HOLE) into out, which ends up size bytes long; holes stay holes and
// all-zero blocks inside extents are not written either.
func sparseCopy(ctx context.Context, in, out *os.File, size int64) error {
	if err := out.Truncate(size); err != nil {
		return err
	}
	fd := int(in.Fd())
	buf := make([]byte, 1<<20)
	var zero [64 << 10]byte
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		end := size
		if err != nil { // no SEEK_DATA here: treat the rest as data
			data = off
		} else if hole, herr := unix.Seek(fd, data, unix.SEEK_HOLE); herr == nil {
			end = min(hole, size)
		}
		for pos := data; pos < end; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := in.ReadAt(buf[:min(int64(len(buf)), end-pos)], pos)
			if n == 0 && err != nil {
				return err
			}
			chunk := buf[:n]
			for len(chunk) > 0 {
				k := min(len(chunk), len(zero))
				if !bytes.Equal(chunk[:k], zero[:k]) {
					if _, err := out.WriteAt(chunk[:k], pos); err != nil {
						return err
					}
				}
				chunk = chunk[k:]
				pos += int64(k)
			}
		}
		off = end
	}
	return nil
}
