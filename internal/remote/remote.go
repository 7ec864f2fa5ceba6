// Package remote stores snapshots in an S3-compatible object store as
// content-addressed chunks.
//
// Layout under the store's prefix: chunks/<sha256 hex of the raw bytes>
// (each a zstd frame of ChunkSize raw bytes of one file at an aligned
// offset, or fewer at the file's end), and snapshots/<id>.json, the index
// of one snapshot: its files, their sizes, the key of each data chunk and
// the snapshot's manifest stored verbatim. All-zero chunks (holes) are not
// stored. The index is written last: it is the commit marker, so a push
// that dies half-way lists nothing. On pull the index and every chunk are
// hostile input (see index.go and pull.go).
package remote

import (
	"context"
	"errors"
	"io"
	"time"

	"golang.org/x/sync/errgroup"
)

// ChunkSize is the size of the raw file data one chunk holds, at offsets
// aligned to it.
const ChunkSize = 2 << 20

// chunkSize is what Push uses when PushOptions.ChunkSize is zero; tests
// change it. Pull takes the size from the index (bounded).
var chunkSize int64 = ChunkSize

// Store is the narrow object-store interface the chunk layer needs (S3 in
// production; tests of rules may use an in-memory fake of it, claims are
// proven against versitygw).
type Store interface {
	Put(ctx context.Context, key string, r io.Reader, size int64) error
	Get(ctx context.Context, key string) (io.ReadCloser, error) // ErrNotFound when absent
	Exists(ctx context.Context, key string) (bool, error)
	List(ctx context.Context, prefix string) ([]string, error) // keys, relative to the store's prefix
	Delete(ctx context.Context, key string) error
}

var (
	// ErrNotFound: the object (snapshot index, chunk, bucket) is not in the store.
	ErrNotFound = errors.New("not found in the remote store")
	// ErrCorrupt: an object in the store is malformed or does not match its key.
	ErrCorrupt = errors.New("remote store object is corrupt")
	// ErrNewer: the index was written by a newer format version.
	ErrNewer = errors.New("remote snapshot was pushed by a newer smolvm")
	// ErrAuth: the store refused the credentials.
	ErrAuth = errors.New("remote store refused the credentials")
	// ErrUnreachable: the store's endpoint could not be reached.
	ErrUnreachable = errors.New("remote store unreachable")
	// ErrInvalid: a caller value (URL, id, file name) is malformed.
	ErrInvalid = errors.New("invalid remote store argument")
)

// File is one file to push: Name is a plain local file name (the snapshot
// artifact name), Path where it is.
type File struct{ Name, Path string }

// Progress reports a push's or pull's advance.
type Progress struct {
	Phase                   string // "upload", "download", "verify"
	DoneBytes, TotalBytes   int64
	DoneChunks, TotalChunks int
}

// PushOptions tune Push.
type PushOptions struct {
	Parallel int            // default 8
	Progress func(Progress) // called from one goroutine at a time, may be nil
	// ChunkSize overrides ChunkSize, to measure other sizes (the dedup
	// figure): a power of two from 64 KiB to 64 MiB; 0 = ChunkSize.
	// Snapshots pushed with different sizes share no chunks.
	ChunkSize int64
}

// PushStats says what a push found and sent.
type PushStats struct {
	Chunks        int   // data chunks in the snapshot (holes / all-zero chunks are not chunks)
	Uploaded      int   // chunks this push uploaded (the rest were already in the store)
	LogicalBytes  int64 // sum of file sizes
	DataBytes     int64 // bytes in data chunks (uncompressed)
	UploadedBytes int64 // bytes sent for chunks (compressed), plus the index
}

// PullOptions tune Pull.
type PullOptions struct {
	Parallel int            // default 8
	Progress func(Progress) // called from one goroutine at a time, may be nil
}

// PullStats says what a pull found and fetched.
type PullStats struct {
	Chunks, Downloaded            int
	DownloadedBytes, LogicalBytes int64
}

// Entry is one snapshot in the store.
type Entry struct {
	ID        string
	Manifest  []byte // as pushed (caller parses; hostile)
	DataBytes int64
	PushedAt  time.Time
}

const defaultParallel = 8

func parallel(n int) int {
	if n <= 0 {
		return defaultParallel
	}
	return min(n, 64)
}

// forEach runs fn on every job, at most par at a time, and stops at the
// first error or when ctx ends (its error then).
func forEach[J any](ctx context.Context, par int, jobs []J, fn func(ctx context.Context, j J) error) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(par)
	for _, j := range jobs {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error { return fn(gctx, j) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}
