package remote

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// encoder compresses chunks; EncodeAll is safe for concurrent use.
var encoder, _ = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))

// reporter serialises progress callbacks.
type reporter struct {
	mu sync.Mutex
	fn func(Progress)
	p  Progress
}

func (r *reporter) add(bytes int64, chunks int) {
	if r.fn == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.p.DoneBytes += bytes
	r.p.DoneChunks += chunks
	r.fn(r.p)
}

func (r *reporter) start(p Progress) {
	if r.fn == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.p = p
	r.fn(r.p)
}

// window is one aligned chunk window of one file that may hold data.
type window struct {
	file int
	slot int // index in the file's window list (off / chunk size)
	off  int64
	n    int64
}

// dataWindows lists the chunk windows of f that overlap a data extent.
func dataWindows(f *os.File, fi int, size, cs int64) ([]window, error) {
	ext, err := snapshot.Extents(f, size)
	if err != nil {
		return nil, err
	}
	var out []window
	last := int64(-1)
	for _, e := range ext {
		for w := e[0] / cs * cs; w < e[0]+e[1]; w += cs {
			if w <= last {
				continue
			}
			out = append(out, window{file: fi, slot: int(w / cs), off: w, n: chunkLen(w, size, cs)})
			last = w
		}
	}
	return out, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Push uploads every data chunk not already in the store (zstd-compressed,
// key chunks/<sha256 of raw>), then the snapshot's index object last
// (snapshots/<id>.json), the commit marker: a push that dies half-way lists
// nothing, and a re-run uploads only missing chunks. manifest is stored
// verbatim inside the index (at most MaxManifestSize). The stats are
// returned on error too (what was uploaded before it).
func Push(ctx context.Context, st Store, id string, manifest []byte, files []File, opts PushOptions) (PushStats, error) {
	var stats PushStats
	if err := ValidateID(id); err != nil {
		return stats, err
	}
	if len(manifest) > MaxManifestSize {
		return stats, fmt.Errorf("%w: manifest of %d bytes, at most %d", ErrInvalid, len(manifest), MaxManifestSize)
	}
	if len(files) > MaxFiles {
		return stats, fmt.Errorf("%w: %d files, at most %d", ErrInvalid, len(files), MaxFiles)
	}
	cs := chunkSize
	if opts.ChunkSize != 0 {
		cs = opts.ChunkSize
	}
	if cs < minChunkSize || cs > maxChunkSize || cs&(cs-1) != 0 {
		return stats, fmt.Errorf("%w: chunk size %d: a power of two from %d to %d", ErrInvalid, cs, minChunkSize, maxChunkSize)
	}
	ix := index{Format: indexFormat, ID: id, ChunkSize: cs, Manifest: manifest, Files: make([]indexFile, len(files))}
	seen := map[string]bool{}
	slots := make([][]string, len(files)) // per file, per window: the chunk key, "" for a hole
	var windows []window
	var total int64
	fhs := make([]*os.File, len(files))
	defer func() {
		for _, f := range fhs {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i, fl := range files {
		if err := validName(fl.Name); err != nil {
			return stats, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		if seen[fl.Name] {
			return stats, fmt.Errorf("%w: file %q given twice", ErrInvalid, fl.Name)
		}
		seen[fl.Name] = true
		f, err := os.Open(fl.Path)
		if err != nil {
			return stats, err
		}
		fhs[i] = f
		fi, err := f.Stat()
		if err != nil {
			return stats, err
		}
		if !fi.Mode().IsRegular() || fi.Size() > MaxFileSize {
			return stats, fmt.Errorf("%w: %s: not a regular file of at most %d bytes", ErrInvalid, fl.Path, int64(MaxFileSize))
		}
		size := fi.Size()
		ix.Files[i] = indexFile{Name: fl.Name, Size: size}
		stats.LogicalBytes += size
		ws, err := dataWindows(f, i, size, cs)
		if err != nil {
			return stats, fmt.Errorf("%s: %w", fl.Path, err)
		}
		slots[i] = make([]string, (size+cs-1)/cs)
		for _, w := range ws {
			total += w.n
		}
		windows = append(windows, ws...)
	}

	rep := &reporter{fn: opts.Progress}
	rep.start(Progress{Phase: "upload", TotalBytes: total, TotalChunks: len(windows)})
	var mu sync.Mutex // guards stats, slots, claimed
	claimed := map[string]bool{}
	bufs := sync.Pool{New: func() any { b := make([]byte, cs); return &b }}
	err := forEach(ctx, parallel(opts.Parallel), windows, func(gctx context.Context, w window) error {
		bp := bufs.Get().(*[]byte)
		defer bufs.Put(bp)
		buf := (*bp)[:w.n]
		if _, err := fhs[w.file].ReadAt(buf, w.off); err != nil {
			if err == io.EOF {
				return fmt.Errorf("%s changed while being pushed (shorter than %d bytes)", files[w.file].Path, w.off+w.n)
			}
			return err
		}
		if allZero(buf) {
			rep.add(w.n, 1)
			return nil
		}
		sum := sha256.Sum256(buf)
		key := hex.EncodeToString(sum[:])
		mu.Lock()
		slots[w.file][w.slot] = key
		stats.Chunks++
		stats.DataBytes += w.n
		mine := !claimed[key]
		claimed[key] = true
		mu.Unlock()
		if mine {
			ok, err := st.Exists(gctx, chunkKey(key))
			if err != nil {
				return err
			}
			if !ok {
				z := encoder.EncodeAll(buf, nil)
				if err := st.Put(gctx, chunkKey(key), bytes.NewReader(z), int64(len(z))); err != nil {
					return err
				}
				mu.Lock()
				stats.Uploaded++
				stats.UploadedBytes += int64(len(z))
				mu.Unlock()
			}
		}
		rep.add(w.n, 1)
		return nil
	})
	if err != nil {
		return stats, err
	}
	for i := range ix.Files {
		for slot, key := range slots[i] {
			if key != "" {
				ix.Files[i].Chunks = append(ix.Files[i].Chunks, indexChunk{Off: int64(slot) * cs, Key: key})
			}
		}
	}
	ix.DataBytes = stats.DataBytes
	ix.PushedAt = time.Now().UTC().Truncate(time.Second)
	data, err := json.Marshal(&ix)
	if err != nil {
		return stats, err
	}
	if len(data) > MaxIndexSize {
		return stats, fmt.Errorf("%w: the index would be %d bytes, at most %d", ErrInvalid, len(data), MaxIndexSize)
	}
	if err := st.Put(ctx, indexKey(id), bytes.NewReader(data), int64(len(data))); err != nil {
		return stats, err
	}
	stats.UploadedBytes += int64(len(data))
	return stats, nil
}
