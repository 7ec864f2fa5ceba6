package snapshot

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

func TestDigestSparseAndVerify(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "memory.raw")
	f, _ := os.Create(p)
	f.Truncate(64 << 20)             // 64 MiB hole
	f.WriteAt([]byte("data"), 1<<20) // one extent
	f.Close()
	s1, size, err := Digest(p)
	if err != nil || size != 64<<20 {
		t.Fatal(size, err)
	}
	arts, alloc, err := Describe(dir, []backend.Artifact{{Role: "memory", Name: "memory.raw"}})
	if err != nil || arts[0].SHA256 != s1 {
		t.Fatal(arts, err)
	}
	if alloc > 1<<20 {
		t.Errorf("allocated %d bytes for a sparse file", alloc)
	}
	m := testManifest("x", arts)
	if err := Verify(dir, m, true); err != nil {
		t.Fatal(err)
	}
	// A write changes the content and the mtime: detected without full.
	time.Sleep(10 * time.Millisecond)
	f, _ = os.OpenFile(p, os.O_WRONLY, 0)
	f.WriteAt([]byte("DATA"), 1<<20)
	f.Close()
	if err := Verify(dir, m, false); !errors.Is(err, ErrCorrupt) {
		t.Errorf("changed artifact: %v", err)
	}
	os.Truncate(p, 1<<20)
	if err := Verify(dir, m, false); !errors.Is(err, ErrCorrupt) {
		t.Errorf("truncated artifact: %v", err)
	}
	m.FormatVersion = FormatVersion + 1
	if err := Verify(dir, m, false); !errors.Is(err, ErrNewer) {
		t.Errorf("newer format: %v", err)
	}
}

func TestPublishAndCleanup(t *testing.T) {
	root := t.TempDir()
	tmp, err := TempDir(root, "a")
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteManifest(tmp, testManifest("a", nil)); err != nil {
		t.Fatal(err)
	}
	if _, err := Publish(tmp, root, "a"); err != nil {
		t.Fatal(err)
	}
	if m, err := ReadManifest(filepath.Join(root, "a")); err != nil || m.ID != "a" {
		t.Fatal(m, err)
	}
	stale, _ := TempDir(root, "b")            // an interrupted create
	busy, _ := TempDir(root, "c")             // a create still running
	os.Mkdir(filepath.Join(root, "d"), 0o700) // complete but never committed
	n, err := Cleanup(root, func(id string) bool { return id == "c" }, func(id string) bool { return id == "a" })
	if err != nil || n != 2 {
		t.Fatalf("cleanup removed %d, %v", n, err)
	}
	for p, want := range map[string]bool{filepath.Join(root, "a"): true, stale: false, busy: true, filepath.Join(root, "d"): false} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s exists=%v, want %v", p, err == nil, want)
		}
	}
	if err := Remove(root, "a"); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(root); len(ents) != 1 {
		t.Errorf("after remove: %v", ents)
	}
}
