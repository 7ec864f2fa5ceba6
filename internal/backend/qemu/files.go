package qemu

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"syscall"

	"golang.org/x/sys/unix"
)

// lseek whence values for sparse files (linux).
const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

const sparseBlock = 4096

// sparseCopy copies src to a new file dst (created or truncated), leaving
// holes where src has holes and where a 4 KiB block is all zeros. dst gets
// src's exact size and is fsynced. It returns the bytes of data written.
func sparseCopy(dst, src string) (int64, error) {
	return copySparse(dst, src, flushSync)
}

// flushMode is how much of its data copySparse sends to the disk.
type flushMode int

const (
	// flushSync starts writeback of each chunk as it is written and
	// fsyncs the file at the end.
	flushSync flushMode = iota
	// flushNone writes to the page cache only and leaves the flush to the
	// caller. A snapshot's copies run while the VM is stopped: starting
	// writeback there (sync_file_range) can block the copy behind a busy
	// disk, which the source's downtime would pay; the caller's fsync
	// (snapshot.Describe, overlapped with hashing) runs after the resume.
	flushNone
)

// copySparse is sparseCopy with the flush mode f.
func copySparse(dst, src string, f flushMode) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return 0, err
	}
	size := st.Size()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	written, err := copySparseData(out, in, size, f == flushSync)
	if err == nil {
		err = out.Truncate(size)
	}
	if err == nil && f == flushSync {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return 0, fmt.Errorf("sparse copy %s -> %s: %w", src, dst, err)
	}
	return written, nil
}

// copyChunk is the unit copySparseData reads and hands to writeback.
const copyChunk = 8 << 20

func copySparseData(out, in *os.File, size int64, writeback bool) (written int64, err error) {
	err = guardFault(func() error {
		var err error
		written, err = copySparseMapped(out, in, size, writeback)
		return err
	})
	return written, err
}

// guardFault runs f, turning a memory fault in it (SIGBUS from a mapped
// file that shrank) into an error instead of a crash of the process.
func guardFault(f func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if fe, ok := r.(interface{ Addr() uintptr }); ok {
				err = fmt.Errorf("memory fault reading a mapped file (did it shrink?) at %#x: %v", fe.Addr(), r)
				return
			}
			panic(r)
		}
	}()
	return f()
}

func copySparseMapped(out, in *os.File, size int64, writeback bool) (int64, error) {
	// Map the source when it can be (tmpfs RAM files, regular files): the
	// data is written straight from the page cache, with no copy through a
	// buffer, which halves the CPU time of a snapshot's RAM copy. Should the
	// file shrink under the mapping, the access faults: copySparseData
	// runs this under guardFault.
	var mem []byte
	if size > 0 && size == int64(int(size)) {
		if b, err := unix.Mmap(int(in.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED); err == nil {
			mem = b
			defer unix.Munmap(b)
			unix.Madvise(b, unix.MADV_SEQUENTIAL)
		}
	}
	var buf []byte
	if mem == nil {
		buf = make([]byte, copyChunk)
	}
	zero := make([]byte, sparseBlock)
	fd := int(out.Fd())
	var written int64
	for off := int64(0); off < size; {
		// Next data extent [dataStart, holeStart).
		dataStart, err := in.Seek(off, seekData)
		switch {
		case errors.Is(err, syscall.ENXIO):
			return written, nil // only a hole remains
		case errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EOPNOTSUPP):
			dataStart = off // no SEEK_DATA: treat everything as data
		case err != nil:
			return written, err
		}
		holeStart, err := in.Seek(dataStart, seekHole)
		if err != nil || holeStart > size {
			holeStart = size
		}
		for pos := dataStart; pos < holeStart; {
			n := min(int64(copyChunk), holeStart-pos)
			var data []byte
			if mem != nil {
				data = mem[pos : pos+n]
				// Fault the chunk in with one call instead of one page
				// fault per 4 KiB page (a snapshot copies RAM while the
				// VM is stopped: 2×4 rounds of the bench's downtime row
				// gave medians of 156 and 170 ms with it, 196 and 207 ms
				// without). Best effort: kernels before 5.14 refuse it.
				unix.Madvise(data, unix.MADV_POPULATE_READ)
			} else {
				m, err := in.ReadAt(buf[:n], pos)
				if int64(m) < n {
					if err == nil || errors.Is(err, io.EOF) {
						err = io.ErrUnexpectedEOF
					}
					return written, err
				}
				data = buf[:n]
			}
			// Write runs of non-zero 4 KiB blocks; zero blocks stay holes.
			runStart := int64(-1)
			flush := func(end int64) error {
				if runStart < 0 {
					return nil
				}
				if _, err := out.WriteAt(data[runStart:end], pos+runStart); err != nil {
					return err
				}
				written += end - runStart
				runStart = -1
				return nil
			}
			for i := int64(0); i < n; i += sparseBlock {
				end := min(i+sparseBlock, n)
				if bytes.Equal(data[i:end], zero[:end-i]) {
					if err := flush(i); err != nil {
						return written, err
					}
				} else if runStart < 0 {
					runStart = i
				}
			}
			if err := flush(n); err != nil {
				return written, err
			}
			// Start writeback of this chunk now, so the disk works while
			// the next chunk is copied and the final fsync has little left.
			// Best effort: a filesystem that refuses it is flushed by fsync.
			if writeback {
				unix.SyncFileRange(fd, pos, n, unix.SYNC_FILE_RANGE_WRITE)
			}
			pos += n
		}
		off = holeStart
	}
	return written, nil
}

// allocatedBytes is the space a file uses on disk.
func allocatedBytes(path string) int64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}
