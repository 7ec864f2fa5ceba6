package remote

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// maxPacked bounds the compressed object read for a chunk of n raw bytes:
// zstd's worst case is a little above n (incompressible blocks).
func maxPacked(n int64) int64 { return n + n/64 + 64<<10 }

// readIndex fetches and validates the index of id.
func readIndex(ctx context.Context, st Store, id string) (*index, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	rc, err := st.Get(ctx, indexKey(id))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, MaxIndexSize+1))
	if err != nil {
		return nil, err
	}
	return parseIndex(data, id)
}

// fetchChunk downloads chunk key, which must decompress to exactly n bytes
// that hash to key, into buf[:n].
func fetchChunk(ctx context.Context, st Store, dec *zstd.Decoder, key string, buf []byte) ([]byte, int64, error) {
	n := int64(len(buf))
	rc, err := st.Get(ctx, chunkKey(key))
	if errors.Is(err, ErrNotFound) {
		return nil, 0, fmt.Errorf("%w: chunk %s is missing from the store", ErrCorrupt, key)
	}
	if err != nil {
		return nil, 0, err
	}
	defer rc.Close()
	limit := maxPacked(n)
	z, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, 0, err
	}
	if int64(len(z)) > limit {
		return nil, 0, fmt.Errorf("%w: chunk %s: object larger than %d bytes for %d raw bytes", ErrCorrupt, key, limit, n)
	}
	out, err := dec.DecodeAll(z, buf[:0])
	if err != nil {
		return nil, 0, fmt.Errorf("%w: chunk %s: %v", ErrCorrupt, key, err)
	}
	if int64(len(out)) != n {
		return nil, 0, fmt.Errorf("%w: chunk %s: %d raw bytes, the index says %d", ErrCorrupt, key, len(out), n)
	}
	if sum := sha256.Sum256(out); hex.EncodeToString(sum[:]) != key {
		return nil, 0, fmt.Errorf("%w: chunk %s: its bytes hash to %x", ErrCorrupt, key, sum)
	}
	return out, int64(len(z)), nil
}

// openTarget opens (or creates, 0600) name in dir for writing, refusing
// anything but a regular file, and sets its size. It reports whether the
// file had data before (a resumed pull).
func openTarget(dir, name string, size int64) (*os.File, bool, error) {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, false, err
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, false, fmt.Errorf("%s: not a regular file", f.Name())
	}
	had := fi.Size() > 0
	if fi.Size() != size {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, false, err
		}
	}
	return f, had, nil
}

// punch makes [off, off+n) of f a hole (zeros where punching is not supported).
func punch(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	_, err = f.WriteAt(make([]byte, n), off)
	return err
}

type pullJob struct {
	f   *os.File
	off int64
	n   int64
	key string
}

// Pull reads snapshots/<id>.json (hostile: bounded, strict, versioned,
// names plain+local+unique, offsets aligned, in range, non-overlapping,
// counts bounded), creates each file in dir (an existing private dir) at
// its size (sparse: holes stay holes), downloads chunks in parallel, checks
// each decompresses to at most its length and hashes to its key, and
// writes it at its offset. Resumable: when dir already holds a file of
// that name, chunks whose bytes there already hash right are not
// downloaded again (and data where the index has a hole is punched out).
// Returns the manifest bytes stored by Push (the caller validates them).
// Files are fsynced; dir itself is not (the caller renames it into place).
func Pull(ctx context.Context, st Store, id, dir string, opts PullOptions) ([]byte, PullStats, error) {
	var stats PullStats
	if err := ValidateID(id); err != nil {
		return nil, stats, err
	}
	if err := fsutil.CheckPrivateDir(dir); err != nil {
		return nil, stats, err
	}
	ix, err := readIndex(ctx, st, id)
	if err != nil {
		return nil, stats, err
	}
	cs := ix.ChunkSize
	var fhs []*os.File
	defer func() {
		for _, f := range fhs {
			f.Close()
		}
	}()
	var verify, fetch []pullJob
	var verifyBytes, fetchBytes int64
	for _, xf := range ix.Files {
		stats.LogicalBytes += xf.Size
		stats.Chunks += len(xf.Chunks)
		f, had, err := openTarget(dir, xf.Name, xf.Size)
		if err != nil {
			return nil, stats, err
		}
		fhs = append(fhs, f)
		var have map[int64]bool // windows of the existing file that hold data
		if had {
			ws, err := dataWindows(f, 0, xf.Size, cs)
			if err != nil {
				return nil, stats, err
			}
			have = make(map[int64]bool, len(ws))
			for _, w := range ws {
				have[w.off] = true
			}
		}
		for _, c := range xf.Chunks {
			j := pullJob{f: f, off: c.Off, n: chunkLen(c.Off, xf.Size, cs), key: c.Key}
			if have[c.Off] {
				verify = append(verify, j)
				verifyBytes += j.n
				delete(have, c.Off)
			} else {
				fetch = append(fetch, j)
				fetchBytes += j.n
			}
		}
		for off := range have { // data where the index has a hole
			if err := punch(f, off, chunkLen(off, xf.Size, cs)); err != nil {
				return nil, stats, err
			}
		}
	}

	par := parallel(opts.Parallel)
	bufs := sync.Pool{New: func() any { b := make([]byte, cs); return &b }}
	rep := &reporter{fn: opts.Progress}
	var mu sync.Mutex

	if len(verify) > 0 {
		rep.start(Progress{Phase: "verify", TotalBytes: verifyBytes, TotalChunks: len(verify)})
		err := forEach(ctx, par, verify, func(_ context.Context, j pullJob) error {
			bp := bufs.Get().(*[]byte)
			defer bufs.Put(bp)
			buf := (*bp)[:j.n]
			if _, err := j.f.ReadAt(buf, j.off); err != nil {
				return err
			}
			if sum := sha256.Sum256(buf); hex.EncodeToString(sum[:]) != j.key {
				mu.Lock()
				fetch = append(fetch, j)
				fetchBytes += j.n
				mu.Unlock()
			}
			rep.add(j.n, 1)
			return nil
		})
		if err != nil {
			return nil, stats, err
		}
	}

	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(par), zstd.WithDecoderMaxMemory(uint64(cs)), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil, stats, err
	}
	defer dec.Close()
	rep.start(Progress{Phase: "download", TotalBytes: fetchBytes, TotalChunks: len(fetch)})
	err = forEach(ctx, par, fetch, func(gctx context.Context, j pullJob) error {
		bp := bufs.Get().(*[]byte)
		defer bufs.Put(bp)
		raw, packed, err := fetchChunk(gctx, st, dec, j.key, (*bp)[:j.n])
		if err != nil {
			return err
		}
		if _, err := j.f.WriteAt(raw, j.off); err != nil {
			return err
		}
		mu.Lock()
		stats.Downloaded++
		stats.DownloadedBytes += packed
		mu.Unlock()
		rep.add(j.n, 1)
		return nil
	})
	if err != nil {
		return nil, stats, err
	}
	for _, f := range fhs {
		if err := f.Sync(); err != nil {
			return nil, stats, err
		}
	}
	return bytes.Clone(ix.Manifest), stats, nil
}
