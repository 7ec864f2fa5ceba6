package qemu

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestPlantedRAMDirRefused: a guest RAM dir under /dev/shm that another
// local user pre-created (to read the guest's memory), or a symlink in its
// place, is refused with an error naming it; QEMU never starts and nothing
// is created or removed through it.
func TestPlantedRAMDirRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns a directory to another user: run it as root (the project's test setup does)")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	root := testutil.ShortDir(t)
	spec := testutil.SpecIn(root, img, "ramdir", testutil.SpecOptions{})
	if err := b.Prepare(ctxFor(t, time.Minute), spec); err != nil {
		t.Fatal(err)
	}
	ram, err := b.memoryFile(spec)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(ram)
	if !strings.HasPrefix(dir, "/dev/shm/smolvm-") {
		t.Fatalf("RAM dir %s, want it under /dev/shm", dir)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	elsewhere := testutil.ShortDir(t)
	cases := map[string]func() error{
		"other user 0777": func() error {
			if err := os.Mkdir(dir, 0o777); err != nil {
				return err
			}
			if err := os.Chmod(dir, 0o777); err != nil {
				return err
			}
			return os.Chown(dir, 65534, 65534)
		},
		"other user 0700": func() error {
			if err := os.Mkdir(dir, 0o700); err != nil {
				return err
			}
			return os.Chown(dir, 65534, 65534)
		},
		"ours 0755": func() error { return os.Mkdir(dir, 0o755) },
		"symlink":   func() error { return os.Symlink(elsewhere, dir) },
	}
	for name, plant := range cases {
		t.Run(name, func(t *testing.T) {
			os.RemoveAll(dir)
			if err := plant(); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Lstat(dir)
			_, err := b.Start(ctxFor(t, time.Minute), spec)
			if !errors.Is(err, fsutil.ErrUnsafe) {
				t.Fatalf("Start with a planted RAM dir: %v, want fsutil.ErrUnsafe", err)
			}
			if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "remove it") {
				t.Errorf("error does not name %s and say what to do: %v", dir, err)
			}
			if pids := testutil.ProcessesFor(spec.RunDir); len(pids) > 0 {
				t.Errorf("QEMU started: %v", pids)
			}
			after, err := os.Lstat(dir)
			if err != nil || after.Mode() != before.Mode() {
				t.Errorf("the planted dir changed: %v -> %v (%v)", before.Mode(), after, err)
			}
			for _, d := range []string{dir, elsewhere} {
				if ents, _ := os.ReadDir(d); len(ents) != 0 {
					t.Errorf("%s: something was created through it: %v", d, ents)
				}
			}
		})
	}
}
