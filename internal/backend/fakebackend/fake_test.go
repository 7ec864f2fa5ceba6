package fakebackend

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// A snapshot archive is data: entries leading out of the directory, links
// and devices are refused, and nothing is written outside it.
func TestExtractRefusesEscapes(t *testing.T) {
	for name, hdr := range map[string]tar.Header{
		"dotdot":   {Name: "../escaped", Typeflag: tar.TypeReg, Size: 1, Mode: 0o600},
		"absolute": {Name: "/tmp/escaped", Typeflag: tar.TypeReg, Size: 1, Mode: 0o600},
		"symlink":  {Name: "link", Typeflag: tar.TypeSymlink, Linkname: "/"},
		"hardlink": {Name: "hard", Typeflag: tar.TypeLink, Linkname: "/etc/passwd"},
		"device":   {Name: "dev", Typeflag: tar.TypeChar},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "a.tar")
			f, _ := os.Create(p)
			tw := tar.NewWriter(f)
			if err := tw.WriteHeader(&hdr); err != nil {
				t.Fatal(err)
			}
			if hdr.Size > 0 {
				tw.Write([]byte("x"))
			}
			tw.Close()
			f.Close()
			out := filepath.Join(dir, "out")
			os.Mkdir(out, 0o700)
			if err := extractTar(p, out); err == nil {
				t.Fatal("extracted")
			}
			if _, err := os.Lstat(filepath.Join(dir, "escaped")); err == nil {
				t.Fatal("wrote outside the directory")
			}
		})
	}
}

func TestFaults(t *testing.T) {
	h := NewHost()
	remove := h.Fail(OpStart, "a", 1)
	defer remove()
	if err := h.fail(OpStart, "b"); err != nil {
		t.Fatalf("fault for a hit b: %v", err)
	}
	if err := h.fail(OpStart, "a"); !errors.Is(err, ErrInjected) {
		t.Fatalf("first start of a: %v, want ErrInjected", err)
	}
	if err := h.fail(OpStart, "a"); err != nil {
		t.Fatalf("a fault for one time hit twice: %v", err)
	}
	undo := h.Fail(OpStop, "", 0)
	for range 3 {
		if err := h.Backend().Stop(context.Background(), backend.Machine{Spec: backend.Spec{ID: "x"}}); !errors.Is(err, ErrInjected) {
			t.Fatalf("stop: %v, want ErrInjected every time", err)
		}
	}
	undo()
	if err := h.Backend().Stop(context.Background(), backend.Machine{Spec: backend.Spec{ID: "x"}}); err != nil {
		t.Fatalf("stop after the fault was removed: %v", err)
	}
}

// FuzzExtractTar: whatever the archive holds, extraction writes nothing
// outside its directory and creates only directories and regular files.
func FuzzExtractTar(f *testing.F) {
	src := f.TempDir()
	os.MkdirAll(filepath.Join(src, "a/b"), 0o700)
	os.WriteFile(filepath.Join(src, "a/b/c"), []byte("hello"), 0o600)
	seed := filepath.Join(f.TempDir(), "seed.tar")
	if err := writeTar(seed, src, nil); err != nil {
		f.Fatal(err)
	}
	b, _ := os.ReadFile(seed)
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		p := filepath.Join(dir, "in.tar")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(dir, "out")
		os.Mkdir(out, 0o700)
		extractTar(p, out)
		filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err != nil || path == dir || path == p {
				return nil
			}
			if rel, _ := filepath.Rel(out, path); !filepath.IsLocal(rel) && path != out {
				t.Errorf("wrote %s outside %s", path, out)
			}
			if d.Type()&^os.ModeDir != 0 {
				t.Errorf("%s has type %v", path, d.Type())
			}
			return nil
		})
	})
}
