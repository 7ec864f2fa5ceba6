package smolvm

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// UploadFile copies a host file into the guest (atomically; the mode is
// kept). Any size works: large files stream in chunks.
func (vm *VM) UploadFile(ctx context.Context, localPath, guestPath string) error {
	if !strings.HasPrefix(guestPath, "/") {
		return newErr("upload", ErrInvalidConfig, Fix{}, fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	f, err := os.Open(localPath)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return newErr("upload", ErrInvalidConfig, Fix{}, fmt.Sprintf("%s is not a regular file", localPath))
	}
	if strings.HasSuffix(guestPath, "/") {
		guestPath += filepath.Base(localPath)
	}
	c, err := vm.agent(ctx, "upload files")
	if err != nil {
		return err
	}
	return vm.agentErr("upload", c.WriteFileFrom(ctx, guestPath, f, st.Size(), st.Mode().Perm()))
}

// WriteFile writes data to a guest file (atomically).
func (vm *VM) WriteFile(ctx context.Context, guestPath string, data []byte, mode fs.FileMode) error {
	c, err := vm.agent(ctx, "write files")
	if err != nil {
		return err
	}
	return vm.agentErr("write", c.WriteFileFrom(ctx, guestPath, bytes.NewReader(data), int64(len(data)), mode))
}

// ReadFile reads a guest file.
func (vm *VM) ReadFile(ctx context.Context, guestPath string) ([]byte, error) {
	c, err := vm.agent(ctx, "read files")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if _, _, err := c.ReadFileTo(ctx, guestPath, &buf); err != nil {
		return nil, vm.agentErr("read", err)
	}
	return buf.Bytes(), nil
}

// WriteFileFrom writes the size bytes r yields to a guest file (atomically;
// missing parent directories are created; mode as in WriteFile). Any size
// works: large files stream in chunks, so r is never held in memory whole.
// r must yield at least size bytes (fewer fail it, and nothing is
// written); bytes past size are not read.
func (vm *VM) WriteFileFrom(ctx context.Context, guestPath string, r io.Reader, size int64, mode fs.FileMode) error {
	if !strings.HasPrefix(guestPath, "/") {
		return newErr("write", ErrInvalidConfig, Fix{}, fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	if size < 0 {
		return newErr("write", ErrInvalidConfig, Fix{}, fmt.Sprintf("negative size %d", size))
	}
	c, err := vm.agent(ctx, "write files")
	if err != nil {
		return err
	}
	return vm.agentErr("write", c.WriteFileFrom(ctx, guestPath, r, size, mode))
}

// ReadFileTo copies a guest file to w and returns the mode the guest
// reports for it and the number of bytes written. Any size works: large
// files stream in chunks. The guest is not trusted: w never gets more than
// the size it announced, and a file that changes while it is read, or does
// not match that size, fails with an error (ErrGuestProtocol for a size
// mismatch). On error w may hold part of the file (DownloadFile is the
// atomic variant). The mode is the guest's word: mask it (as DownloadFile
// does) before giving it to a host file.
func (vm *VM) ReadFileTo(ctx context.Context, guestPath string, w io.Writer) (fs.FileMode, int64, error) {
	return vm.ReadFileToChecked(ctx, guestPath, w, nil)
}

// ReadFileToChecked is ReadFileTo with check, when not nil, called with
// the size the guest announces before the first byte is written to w (0:
// the guest gives none, as for /proc files; then at most 16 MiB are
// read). An error from check ends the read and is returned as it is: a
// caller refuses a file too large for it, or for its disk, before storing
// any of it. The guest cannot then send more than it announced (an error
// wrapping ErrGuestProtocol, as for ReadFileTo).
func (vm *VM) ReadFileToChecked(ctx context.Context, guestPath string, w io.Writer, check func(size int64) error) (fs.FileMode, int64, error) {
	if !strings.HasPrefix(guestPath, "/") {
		return 0, 0, newErr("read", ErrInvalidConfig, Fix{}, fmt.Sprintf("guest path %q must be absolute", guestPath))
	}
	c, err := vm.agent(ctx, "read files")
	if err != nil {
		return 0, 0, err
	}
	mode, n, err := c.ReadFileToChecked(ctx, guestPath, w, check)
	return mode, n, vm.agentErr("read", err)
}

// DownloadFile copies a guest file to the host (atomically). It gets the
// guest file's permission bits masked by the process umask, never setuid,
// setgid or sticky (a guest's 04777 becomes 0755 under umask 022). Any size
// works: large files stream in chunks.
func (vm *VM) DownloadFile(ctx context.Context, guestPath, localPath string) error {
	c, err := vm.agent(ctx, "download files")
	if err != nil {
		return err
	}
	if st, err := os.Stat(localPath); err == nil && st.IsDir() {
		localPath = filepath.Join(localPath, filepath.Base(guestPath))
	}
	return vm.agentErr("download", fsutil.Write(localPath, func(w io.Writer) (os.FileMode, error) {
		mode, _, err := c.ReadFileTo(ctx, guestPath, w)
		return fsutil.HostMode(mode), err
	}))
}
