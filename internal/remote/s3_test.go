package remote

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/testutil/s3server"
)

// s3Env starts versitygw and points the AWS credential variables at it.
func s3Env(t *testing.T) *s3server.Server {
	srv := s3server.Start(t, "smolvm-test")
	for _, kv := range srv.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	return srv
}

func openS3(t *testing.T, srv *s3server.Server, prefix string) Store {
	t.Helper()
	st, err := NewS3(context.Background(), S3Config{URL: "s3://" + srv.Bucket + "/" + prefix, Endpoint: srv.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func privateDir(t *testing.T) string {
	d := filepath.Join(t.TempDir(), "d")
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	return d
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// writeSparse makes a file of size with data only at the given offsets.
func writeSparse(t *testing.T, path string, size int64, data map[int64][]byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range data {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ (%d and %d bytes)", a, b, len(x), len(y))
	}
}

// snapshotFiles writes the four kinds of file a snapshot has into dir.
func snapshotFiles(t *testing.T, dir string) []File {
	const mib = 1 << 20
	writeSparse(t, filepath.Join(dir, "memory"), 64*mib, map[int64][]byte{ // holes, data in 3 chunks
		0: randBytes(4096), 9*mib + 100: randBytes(3 * mib), 40 * mib: randBytes(5000),
	})
	if err := os.WriteFile(filepath.Join(dir, "zeros"), make([]byte, 6*mib), 0o600); err != nil { // allocated, all zero
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "disk"), randBytes(5*mib+12345), 0o600); err != nil { // not a multiple
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "empty"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var files []File
	for _, n := range []string{"memory", "zeros", "disk", "empty"} {
		files = append(files, File{Name: n, Path: filepath.Join(dir, n)})
	}
	return files
}

func TestS3(t *testing.T) {
	srv := s3Env(t)
	ctx := context.Background()
	// The file geometry below (which windows hold data) is laid out for
	// 4 MiB chunks; the default is smaller (ADR 0024).
	defer setChunkSize(4 << 20)()

	t.Run("RoundTrip", func(t *testing.T) {
		st := openS3(t, srv, "roundtrip")
		src := privateDir(t)
		files := snapshotFiles(t, src)
		man := []byte(`{"id":"snap-1"}`)
		var calls int
		var last Progress
		ps, err := Push(ctx, st, "snap-1", man, files, PushOptions{Progress: func(p Progress) {
			if p.Phase != "upload" || p.DoneBytes < last.DoneBytes || p.DoneBytes > p.TotalBytes {
				t.Errorf("push progress %+v after %+v", p, last)
			}
			calls++
			last = p
		}})
		if err != nil {
			t.Fatal(err)
		}
		// memory: chunks 0, 2 (9 MiB+100 .. 12 MiB+100 spans chunks 2 and 3), 3, 10; disk: 2; zeros: none.
		if ps.Chunks != 6 || ps.Uploaded != 6 || calls == 0 || last.DoneBytes != last.TotalBytes || last.DoneChunks != last.TotalChunks {
			t.Fatalf("push stats %+v, %d progress calls, last %+v: want 6 chunks uploaded, progress complete", ps, calls, last)
		}
		es, err := List(ctx, st)
		if err != nil || len(es) != 1 || es[0].ID != "snap-1" || !bytes.Equal(es[0].Manifest, man) || es[0].DataBytes != ps.DataBytes {
			t.Fatalf("List = %+v, %v", es, err)
		}
		dst := privateDir(t)
		var plast Progress
		got, pst, err := Pull(ctx, st, "snap-1", dst, PullOptions{Progress: func(p Progress) { plast = p }})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, man) || pst.Chunks != 6 || pst.Downloaded != 6 || pst.LogicalBytes != ps.LogicalBytes {
			t.Fatalf("pull: manifest %q, stats %+v", got, pst)
		}
		if plast != (Progress{Phase: "download", DoneBytes: ps.DataBytes, TotalBytes: ps.DataBytes, DoneChunks: 6, TotalChunks: 6}) {
			t.Fatalf("pull's last progress %+v, want all %d bytes of 6 chunks downloaded", plast, ps.DataBytes)
		}
		for _, f := range files {
			sameFile(t, f.Path, filepath.Join(dst, f.Name))
			fi, _ := os.Stat(filepath.Join(dst, f.Name))
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v, want 0600", f.Name, fi.Mode())
			}
		}
		// Holes stay holes: the memory file's allocation is its 4 data chunks at most,
		// the zero file none.
		if a := allocated(t, filepath.Join(dst, "memory")); a > 4*chunkSize {
			t.Errorf("pulled memory allocates %d bytes, its data chunks are 4*4 MiB", a)
		}
		if a := allocated(t, filepath.Join(dst, "zeros")); a != 0 {
			t.Errorf("pulled zeros allocates %d bytes, want a hole", a)
		}
		f, _ := os.Open(filepath.Join(dst, "memory"))
		ext, _ := snapshot.Extents(f, 64<<20)
		f.Close()
		for _, e := range ext {
			if e[0] >= 4<<20 && e[0] < 8<<20 || e[0] >= 16<<20 && e[0] < 40<<20 {
				t.Errorf("pulled memory has data at %d, where the source has a hole", e[0])
			}
		}

		// A second push of the same data uploads nothing; one changed page, one chunk.
		ps2, err := Push(ctx, st, "snap-2", man, files, PushOptions{})
		if err != nil || ps2.Uploaded != 0 || ps2.Chunks != 6 {
			t.Fatalf("second push: %+v, %v: want 0 of 6 uploaded", ps2, err)
		}
		mf, _ := os.OpenFile(files[0].Path, os.O_RDWR, 0)
		mf.WriteAt(randBytes(4096), 40<<20+8192)
		mf.Close()
		ps3, err := Push(ctx, st, "snap-3", man, files, PushOptions{})
		if err != nil || ps3.Uploaded != 1 {
			t.Fatalf("push after a changed page: %+v, %v: want 1 uploaded", ps3, err)
		}
		chunks, bytes, err := Usage(ctx, st)
		if err != nil || chunks != 7 || bytes <= 0 {
			t.Fatalf("Usage = %d chunks, %d bytes, %v: want 7", chunks, bytes, err)
		}
		if err := Delete(ctx, st, "snap-2"); err != nil {
			t.Fatal(err)
		}
		if _, err := Stat(ctx, st, "snap-2"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Stat after Delete: %v, want ErrNotFound", err)
		}
		if _, _, err := Pull(ctx, st, "nope", privateDir(t), PullOptions{}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Pull of a missing snapshot: %v, want ErrNotFound", err)
		}
	})

	t.Run("ChunkSizeOption", func(t *testing.T) {
		st := openS3(t, srv, "chunksize")
		files := snapshotFiles(t, privateDir(t))
		ps, err := Push(ctx, st, "s", nil, files, PushOptions{ChunkSize: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		// memory: 4 KiB at 0, 3 MiB at 9 MiB+100 (4 chunks), 5000 bytes at 40 MiB; disk: 6 chunks.
		if ps.Chunks != 12 {
			t.Fatalf("push with 1 MiB chunks: %+v, want 12 chunks", ps)
		}
		dst := privateDir(t)
		if _, _, err := Pull(ctx, st, "s", dst, PullOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			sameFile(t, f.Path, filepath.Join(dst, f.Name))
		}
	})

	t.Run("PushResumes", func(t *testing.T) {
		defer setChunkSize(64 << 10)()
		st := openS3(t, srv, "pushresume")
		src := privateDir(t)
		p := filepath.Join(src, "disk")
		os.WriteFile(p, randBytes(40*64<<10), 0o600) // 40 chunks
		files := []File{{Name: "disk", Path: p}}
		cctx, cancel := context.WithCancel(ctx)
		var n atomic.Int32
		_, err := Push(cctx, st, "half", nil, files, PushOptions{Parallel: 2, Progress: func(p Progress) {
			if p.DoneChunks >= 10 {
				cancel()
			}
			n.Add(1)
		}})
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled push: %v", err)
		}
		if es, err := List(ctx, st); err != nil || len(es) != 0 {
			t.Fatalf("a push killed half-way lists %+v, %v", es, err)
		}
		stored, _, err := Usage(ctx, st)
		if err != nil || stored < 10 || stored >= 40 {
			t.Fatalf("after the killed push the store holds %d chunks (%v), want 10..39", stored, err)
		}
		// A put the cancelled client gave up on may still land on the server
		// afterwards (it had the whole body): at most Parallel (2) of them.
		ps, err := Push(ctx, st, "half", nil, files, PushOptions{})
		if err != nil || ps.Chunks != 40 || ps.Uploaded > 40-stored || ps.Uploaded < 40-stored-2 {
			t.Fatalf("re-run: %+v, %v: want %d uploaded (2 fewer at most)", ps, err, 40-stored)
		}
		if n, _, err := Usage(ctx, st); err != nil || n != 40 {
			t.Fatalf("after the re-run the store holds %d chunks (%v), want 40", n, err)
		}
		if es, err := List(ctx, st); err != nil || len(es) != 1 {
			t.Fatalf("after the re-run List = %+v, %v", es, err)
		}
	})

	t.Run("PullResumes", func(t *testing.T) {
		defer setChunkSize(64 << 10)()
		st := openS3(t, srv, "pullresume")
		src := privateDir(t)
		p := filepath.Join(src, "disk")
		os.WriteFile(p, randBytes(40*64<<10), 0o600)
		if _, err := Push(ctx, st, "s", nil, []File{{Name: "disk", Path: p}}, PushOptions{}); err != nil {
			t.Fatal(err)
		}
		dst := privateDir(t)
		cctx, cancel := context.WithCancel(ctx)
		_, _, err := Pull(cctx, st, "s", dst, PullOptions{Parallel: 2, Progress: func(p Progress) {
			if p.Phase == "download" && p.DoneChunks >= 10 {
				cancel()
			}
		}})
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled pull: %v", err)
		}
		// Count what the killed pull wrote right (whole chunks).
		have := 0
		got, _ := os.ReadFile(filepath.Join(dst, "disk"))
		want, _ := os.ReadFile(p)
		for i := 0; i < 40; i++ {
			if bytes.Equal(got[i*64<<10:(i+1)*64<<10], want[i*64<<10:(i+1)*64<<10]) {
				have++
			}
		}
		if have < 10 || have >= 40 {
			t.Fatalf("the killed pull left %d good chunks, want 10..39", have)
		}
		var verified int
		_, pst, err := Pull(ctx, st, "s", dst, PullOptions{Progress: func(p Progress) {
			if p.Phase == "verify" {
				verified = p.DoneChunks
			}
		}})
		if err != nil || pst.Downloaded != 40-have {
			t.Fatalf("resumed pull: %+v, %v: want %d downloaded", pst, err, 40-have)
		}
		if verified < have {
			t.Errorf("verify phase saw %d chunks, want at least %d", verified, have)
		}
		sameFile(t, p, filepath.Join(dst, "disk"))
	})

	t.Run("PullOverStaleFiles", func(t *testing.T) {
		st := openS3(t, srv, "stale")
		files := snapshotFiles(t, privateDir(t))
		if _, err := Push(ctx, st, "s", nil, files, PushOptions{}); err != nil {
			t.Fatal(err)
		}
		// dir holds other data under the same names: longer, shorter, data where
		// the snapshot has holes. The pull must end byte-equal with holes punched.
		dst := privateDir(t)
		writeSparse(t, filepath.Join(dst, "memory"), 70<<20, map[int64][]byte{
			0: randBytes(8192), 5 << 20: randBytes(1 << 20), 20 << 20: randBytes(4096), 41 << 20: randBytes(4096), 68 << 20: randBytes(4096),
		})
		os.WriteFile(filepath.Join(dst, "zeros"), randBytes(1<<20), 0o600)
		os.WriteFile(filepath.Join(dst, "disk"), randBytes(9<<20), 0o600)
		os.WriteFile(filepath.Join(dst, "empty"), randBytes(10), 0o600)
		_, pst, err := Pull(ctx, st, "s", dst, PullOptions{})
		if err != nil || pst.Downloaded != 6 {
			t.Fatalf("pull over stale files: %+v, %v: want all 6 chunks downloaded", pst, err)
		}
		for _, f := range files {
			sameFile(t, f.Path, filepath.Join(dst, f.Name))
		}
		if a := allocated(t, filepath.Join(dst, "memory")); a > 4*chunkSize {
			t.Errorf("memory allocates %d bytes after the pull, its data chunks are 4*4 MiB", a)
		}
		if a := allocated(t, filepath.Join(dst, "zeros")); a != 0 {
			t.Errorf("zeros allocates %d bytes after the pull, want a hole", a)
		}
	})

	t.Run("CorruptChunk", func(t *testing.T) {
		defer setChunkSize(64 << 10)()
		st := openS3(t, srv, "corrupt")
		src := privateDir(t)
		p := filepath.Join(src, "disk")
		os.WriteFile(p, randBytes(3*64<<10), 0o600)
		if _, err := Push(ctx, st, "s", nil, []File{{Name: "disk", Path: p}}, PushOptions{}); err != nil {
			t.Fatal(err)
		}
		keys, err := st.List(ctx, "chunks/")
		if err != nil || len(keys) != 3 {
			t.Fatalf("chunks %v, %v", keys, err)
		}
		// Another chunk's valid object under this key: decompresses fine, hashes wrong.
		other := encoder.EncodeAll(randBytes(64<<10), nil)
		if err := st.Put(ctx, keys[1], bytes.NewReader(other), int64(len(other))); err != nil {
			t.Fatal(err)
		}
		if _, _, err := Pull(ctx, st, "s", privateDir(t), PullOptions{}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("pull with a swapped chunk: %v, want ErrCorrupt", err)
		}
		// Garbage written straight into versitygw's posix dir.
		if err := os.WriteFile(filepath.Join(srv.Dir, srv.Bucket, "corrupt", keys[1]), []byte("not zstd"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, _, err := Pull(ctx, st, "s", privateDir(t), PullOptions{}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("pull with a garbage chunk: %v, want ErrCorrupt", err)
		}
		// A bomb: a valid frame of more bytes than the chunk holds.
		bomb := encoder.EncodeAll(make([]byte, 1<<20), nil)
		st.Put(ctx, keys[1], bytes.NewReader(bomb), int64(len(bomb)))
		if _, _, err := Pull(ctx, st, "s", privateDir(t), PullOptions{}); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("pull with an oversized chunk: %v, want ErrCorrupt", err)
		}
	})

	t.Run("WrongCredentials", func(t *testing.T) {
		src := privateDir(t)
		p := filepath.Join(src, "disk")
		os.WriteFile(p, randBytes(4096), 0o600)
		files := []File{{Name: "disk", Path: p}}
		t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
		st := openS3(t, srv, "x")
		if _, err := List(ctx, st); !errors.Is(err, ErrAuth) {
			t.Fatalf("List with a wrong secret: %v, want ErrAuth", err)
		}
		if _, err := Stat(ctx, st, "s"); !errors.Is(err, ErrAuth) {
			t.Fatalf("Stat with a wrong secret: %v, want ErrAuth", err)
		}
		if _, err := Push(ctx, st, "s", nil, files, PushOptions{}); !errors.Is(err, ErrAuth) {
			t.Fatalf("Push with a wrong secret: %v, want ErrAuth", err)
		}
		// An unknown key: versitygw answers 404 XAdminUserNotFound (a HEAD's 404 reads
		// as "no such key"); List and Push still say ErrAuth.
		t.Setenv("AWS_ACCESS_KEY_ID", "nobody")
		st = openS3(t, srv, "x")
		if _, err := List(ctx, st); !errors.Is(err, ErrAuth) {
			t.Fatalf("List with an unknown key: %v, want ErrAuth", err)
		}
		if _, err := Push(ctx, st, "s", nil, files, PushOptions{}); !errors.Is(err, ErrAuth) {
			t.Fatalf("Push with an unknown key: %v, want ErrAuth", err)
		}
		t.Setenv("AWS_ACCESS_KEY_ID", "")
		t.Setenv("AWS_SECRET_ACCESS_KEY", "")
		st = openS3(t, srv, "x")
		if _, err := List(ctx, st); !errors.Is(err, ErrAuth) {
			t.Fatalf("List without credentials: %v, want ErrAuth", err)
		}
	})

	t.Run("Unreachable", func(t *testing.T) {
		// The last subtest: it stops the shared server.
		st := openS3(t, srv, "roundtrip")
		srv.Stop()
		start := time.Now()
		if _, err := List(ctx, st); !errors.Is(err, ErrUnreachable) {
			t.Fatalf("List on a stopped server: %v, want ErrUnreachable", err)
		}
		if _, _, err := Pull(ctx, st, "snap-1", privateDir(t), PullOptions{}); !errors.Is(err, ErrUnreachable) {
			t.Fatalf("Pull from a stopped server: %v, want ErrUnreachable", err)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Fatalf("ErrUnreachable after %s", d)
		}
	})
}

// setChunkSize sets the push chunk size and returns the restore.
func setChunkSize(n int64) func() {
	old := chunkSize
	chunkSize = n
	return func() { chunkSize = old }
}

// BenchmarkPushPull measures push and pull throughput of 64 MiB of
// incompressible data (16 chunks) against versitygw on this host, each
// iteration into a fresh prefix (nothing dedups).
func BenchmarkPushPull(b *testing.B) {
	srv := s3server.Start(b, "bench")
	for _, kv := range srv.Env() {
		k, v, _ := strings.Cut(kv, "=")
		b.Setenv(k, v)
	}
	ctx := context.Background()
	dir := b.TempDir()
	p := filepath.Join(dir, "data")
	os.WriteFile(p, randBytes(64<<20), 0o600)
	files := []File{{Name: "data", Path: p}}
	var push, pull time.Duration
	b.SetBytes(64 << 20)
	for i := 0; b.Loop(); i++ {
		st, err := NewS3(ctx, S3Config{URL: fmt.Sprintf("s3://bench/i%d", i), Endpoint: srv.Endpoint})
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		if _, err := Push(ctx, st, "s", nil, files, PushOptions{}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		dst := filepath.Join(b.TempDir(), "d")
		os.Mkdir(dst, 0o700)
		if _, _, err := Pull(ctx, st, "s", dst, PullOptions{}); err != nil {
			b.Fatal(err)
		}
		push += t1.Sub(t0)
		pull += time.Since(t1)
	}
	b.ReportMetric(float64(b.N)*64/push.Seconds(), "push-MiB/s")
	b.ReportMetric(float64(b.N)*64/pull.Seconds(), "pull-MiB/s")
}
