package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

// memStore is an in-memory Store for the index rules (the behaviour against
// a real S3 server is TestS3's).
type memStore struct {
	mu sync.Mutex
	m  map[string][]byte
}

func newMem() *memStore { return &memStore{m: map[string][]byte{}} }

func (s *memStore) Put(_ context.Context, key string, r io.Reader, _ int64) error {
	b, err := io.ReadAll(r)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[key] = b
	return err
}

func (s *memStore) Get(_ context.Context, key string) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.m[key]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (s *memStore) Exists(_ context.Context, key string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.m[key]
	return ok, nil
}

func (s *memStore) List(_ context.Context, prefix string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k := range s.m {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out, nil
}

func (s *memStore) Delete(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, key)
	return nil
}

// validIndex pushes two small files into a memStore and returns it with
// the index as a generic JSON object to mutate.
func validIndex(t testing.TB) (*memStore, map[string]any) {
	defer setChunkSize(64 << 10)()
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, bytes.Repeat([]byte{1}, 3*64<<10+5), 0o600)
	os.WriteFile(b, bytes.Repeat([]byte{2}, 100), 0o600)
	st := newMem()
	if _, err := Push(context.Background(), st, "s", []byte(`{"m":1}`), []File{{"a", a}, {"b", b}}, PushOptions{}); err != nil {
		t.Fatal(err)
	}
	var ix map[string]any
	if err := json.Unmarshal(st.m[indexKey("s")], &ix); err != nil {
		t.Fatal(err)
	}
	return st, ix
}

func files(ix map[string]any) []any { return ix["files"].([]any) }
func file(ix map[string]any, i int) map[string]any {
	return files(ix)[i].(map[string]any)
}
func chunks(ix map[string]any, i int) []any { return file(ix, i)["chunks"].([]any) }
func chunk(ix map[string]any, i, j int) map[string]any {
	return chunks(ix, i)[j].(map[string]any)
}

func TestHostileIndex(t *testing.T) {
	ctx := context.Background()
	const mib = 1 << 20
	cases := []struct {
		name   string
		mutate func(ix map[string]any)
		raw    func(b []byte) []byte
		want   error
	}{
		{name: "valid", mutate: func(map[string]any) {}},
		{name: "dotdot name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = "../x" }, want: ErrCorrupt},
		{name: "path name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = "sub/x" }, want: ErrCorrupt},
		{name: "absolute name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = "/etc/passwd" }, want: ErrCorrupt},
		{name: "dot name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = ".bashrc" }, want: ErrCorrupt},
		{name: "empty name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = "" }, want: ErrCorrupt},
		{name: "backslash name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = `..\x` }, want: ErrCorrupt},
		{name: "control char name", mutate: func(ix map[string]any) { file(ix, 0)["name"] = "a\nb" }, want: ErrCorrupt},
		{name: "duplicate names", mutate: func(ix map[string]any) { file(ix, 1)["name"] = "a" }, want: ErrCorrupt},
		{name: "misaligned chunk", mutate: func(ix map[string]any) { chunk(ix, 0, 1)["off"] = 64<<10 + 1 }, want: ErrCorrupt},
		{name: "overlapping chunks", mutate: func(ix map[string]any) { chunk(ix, 0, 2)["off"] = 64 << 10 }, want: ErrCorrupt},
		{name: "chunks out of order", mutate: func(ix map[string]any) {
			c := chunks(ix, 0)
			c[0], c[1] = c[1], c[0]
		}, want: ErrCorrupt},
		{name: "chunk beyond size", mutate: func(ix map[string]any) { chunk(ix, 0, 3)["off"] = 4 * 64 << 10 }, want: ErrCorrupt},
		{name: "negative offset", mutate: func(ix map[string]any) { chunk(ix, 0, 0)["off"] = -64 << 10 }, want: ErrCorrupt},
		{name: "bad key", mutate: func(ix map[string]any) { chunk(ix, 0, 0)["sha256"] = "../../snapshots/x" }, want: ErrCorrupt},
		{name: "uppercase key", mutate: func(ix map[string]any) {
			chunk(ix, 0, 0)["sha256"] = strings.ToUpper(chunk(ix, 0, 0)["sha256"].(string))
		}, want: ErrCorrupt},
		{name: "huge size", mutate: func(ix map[string]any) { file(ix, 1)["size"] = float64(1 << 50) }, want: ErrCorrupt},
		{name: "negative size", mutate: func(ix map[string]any) { file(ix, 1)["size"] = -1 }, want: ErrCorrupt},
		{name: "data_bytes lies", mutate: func(ix map[string]any) { ix["data_bytes"] = 1 }, want: ErrCorrupt},
		{name: "chunk size not a power of two", mutate: func(ix map[string]any) { ix["chunk_size"] = 3 * 64 << 10 }, want: ErrCorrupt},
		{name: "chunk size huge", mutate: func(ix map[string]any) { ix["chunk_size"] = 1 << 40 }, want: ErrCorrupt},
		{name: "other id", mutate: func(ix map[string]any) { ix["id"] = "t" }, want: ErrCorrupt},
		{name: "unknown field", mutate: func(ix map[string]any) { ix["backing_file"] = "/etc/shadow" }, want: ErrCorrupt},
		{name: "unknown file field", mutate: func(ix map[string]any) { file(ix, 0)["mode"] = 0o4755 }, want: ErrCorrupt},
		{name: "newer format", mutate: func(ix map[string]any) { ix["format"] = 2; ix["new_thing"] = true }, want: ErrNewer},
		{name: "format zero", mutate: func(ix map[string]any) { ix["format"] = 0 }, want: ErrCorrupt},
		{name: "too many files", mutate: func(ix map[string]any) {
			var fs []any
			for i := range MaxFiles + 1 {
				fs = append(fs, map[string]any{"name": fmt.Sprint("f", i), "size": 0, "chunks": []any{}})
			}
			ix["files"] = fs
			ix["data_bytes"] = 0
		}, want: ErrCorrupt},
		{name: "more chunks than the size holds", mutate: func(ix map[string]any) {
			f := file(ix, 1)
			f["chunks"] = append(f["chunks"].([]any), chunk(ix, 1, 0))
		}, want: ErrCorrupt},
		{name: "manifest too big", mutate: func(ix map[string]any) { ix["manifest"] = make([]byte, MaxManifestSize+1) }, want: ErrCorrupt},
		{name: "trailing data", raw: func(b []byte) []byte { return append(b, []byte(` {}`)...) }, want: ErrCorrupt},
		{name: "not json", raw: func([]byte) []byte { return []byte("\x28\xb5\x2f\xfd") }, want: ErrCorrupt},
		{name: "index too big", raw: func(b []byte) []byte {
			return append(b[:len(b)-1], []byte(`,"pad":"`+strings.Repeat("x", 16*mib)+`"}`)...)
		}, want: ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			st, ix := validIndex(t)
			var b []byte
			if c.mutate != nil {
				c.mutate(ix)
				b, _ = json.Marshal(ix)
			} else {
				b = c.raw(st.m[indexKey("s")])
			}
			st.m[indexKey("s")] = b
			dir := privateDir(t)
			_, _, err := Pull(ctx, st, "s", dir, PullOptions{})
			if c.want == nil {
				if err != nil {
					t.Fatalf("valid index refused: %v", err)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("Pull: %v, want %v", err, c.want)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("refused pull left %d files in dir", len(ents))
			}
			if _, err := Stat(ctx, st, "s"); !errors.Is(err, c.want) {
				t.Fatalf("Stat: %v, want %v", err, c.want)
			}
			if es, err := List(ctx, st); err != nil || len(es) != 0 {
				t.Fatalf("List shows a refused index: %+v, %v", es, err)
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "x")); err == nil {
				t.Fatal("a file was written outside dir")
			}
		})
	}
}

func TestPullRefusesUnsafeTargets(t *testing.T) {
	ctx := context.Background()
	st, _ := validIndex(t)
	// dir must be private.
	open := filepath.Join(t.TempDir(), "open")
	os.Mkdir(open, 0o755)
	os.Chmod(open, 0o755)
	if _, _, err := Pull(ctx, st, "s", open, PullOptions{}); err == nil {
		t.Fatal("Pull into a 0755 dir succeeded")
	}
	// A symlink named like a file is not followed.
	dir := privateDir(t)
	victim := filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("keep"), 0o600)
	os.Symlink(victim, filepath.Join(dir, "a"))
	if _, _, err := Pull(ctx, st, "s", dir, PullOptions{}); err == nil {
		t.Fatal("Pull wrote through a symlink")
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Fatalf("the symlink's target was changed: %q", b)
	}
}

func TestPushValidates(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "f")
	os.WriteFile(p, []byte("x"), 0o600)
	for _, c := range []struct {
		id    string
		files []File
	}{
		{"../x", []File{{"f", p}}},
		{"UPPER", []File{{"f", p}}},
		{"s", []File{{"../f", p}}},
		{"s", []File{{"f", p}, {"f", p}}},
		{"s", []File{{"f", t.TempDir()}}},
	} {
		if _, err := Push(ctx, newMem(), c.id, nil, c.files, PushOptions{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Push(%q, %v): %v, want ErrInvalid", c.id, c.files, err)
		}
	}
	for _, cs := range []int64{1000, 32 << 10, 96 << 10, 128 << 20} {
		if _, err := Push(ctx, newMem(), "s", nil, nil, PushOptions{ChunkSize: cs}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Push with chunk size %d: %v, want ErrInvalid", cs, err)
		}
	}
	if _, err := Push(ctx, newMem(), "s", make([]byte, MaxManifestSize+1), nil, PushOptions{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Push of a 1 MiB+1 manifest: %v, want ErrInvalid", err)
	}
}

func TestParseURL(t *testing.T) {
	for _, c := range []struct{ in, bucket, prefix string }{
		{"s3://my-bucket", "my-bucket", ""},
		{"s3://my-bucket/", "my-bucket", ""},
		{"s3://my.bucket/snaps/team-a", "my.bucket", "snaps/team-a"},
		{"s3://abc/p/", "abc", "p"},
	} {
		b, p, err := ParseURL(c.in)
		if err != nil || b != c.bucket || p != c.prefix {
			t.Errorf("ParseURL(%q) = %q, %q, %v", c.in, b, p, err)
		}
	}
	for _, bad := range []string{"", "my-bucket", "http://b/x", "s3://", "s3://ab", "s3://My-Bucket", "s3://-bucket",
		"s3://b..c", "s3://192.168.1.1", "s3://bucket/../x", "s3://bucket/a//b", "s3://bucket//a", "s3://bucket/a/./b",
		"s3://bucket/a\x00b", "s3://bucket/a?b", "s3://bucket/a\\b", "s3://under_score"} {
		if _, _, err := ParseURL(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseURL(%q): %v, want ErrInvalid", bad, err)
		}
	}
	for _, e := range []string{"ftp://h", "http://", "http://u:p@h", "http://h/path", "http://h?x=1", "h:9000"} {
		if _, err := NewS3(context.Background(), S3Config{URL: "s3://bucket", Endpoint: e}); !errors.Is(err, ErrInvalid) {
			t.Errorf("NewS3 with endpoint %q: %v, want ErrInvalid", e, err)
		}
	}
}

// FuzzIndex: the index parser never panics, and what it accepts keeps the
// invariants Pull relies on.
func FuzzIndex(f *testing.F) {
	st, ix := validIndex(f)
	f.Add(st.m[indexKey("s")])
	file(ix, 0)["name"] = "../x"
	b, _ := json.Marshal(ix)
	f.Add(b)
	f.Add([]byte(`{"format":2}`))
	f.Add([]byte(`{"format":1,"id":"s","chunk_size":65536,"data_bytes":1,"files":[{"name":"a","size":1,"chunks":[{"off":0,"sha256":"` + strings.Repeat("0", 64) + `"}]}]}`))
	f.Add([]byte(`{"format":1,"id":"s","chunk_size":65536,"files":[{"name":"a","size":68719476736,"chunks":[]}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ix, err := parseIndex(data, "s")
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNewer) {
				t.Fatalf("error without a sentinel: %v", err)
			}
			return
		}
		names := map[string]bool{}
		for _, f := range ix.Files {
			if !filepath.IsLocal(f.Name) || strings.ContainsRune(f.Name, '/') || names[f.Name] || f.Size < 0 || f.Size > MaxFileSize {
				t.Fatalf("accepted file %+v", f)
			}
			names[f.Name] = true
			next := int64(0)
			for _, c := range f.Chunks {
				if c.Off < next || c.Off%ix.ChunkSize != 0 || c.Off >= f.Size || !validKey(c.Key) {
					t.Fatalf("accepted chunk %+v of %+v", c, f)
				}
				next = c.Off + ix.ChunkSize
			}
		}
		if len(ix.Manifest) > MaxManifestSize || len(ix.Files) > MaxFiles {
			t.Fatal("accepted an index over its bounds")
		}
	})
}
