package qemu

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestDetachNeverProbesTheFormat: a raw disk whose guest wrote a qcow2
// header naming a host file as its backing file is flattened as raw bytes
// (-f raw): the host file's data never enters the result.
func TestDetachNeverProbesTheFormat(t *testing.T) {
	testutil.RequireQEMU(t)
	ctx := context.Background()
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, bytes.Repeat([]byte("TOPSECRET"), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	// What a hostile guest can write to its raw disk: a qcow2 image over the host file.
	disk := filepath.Join(dir, "vm", "disk.raw")
	os.MkdirAll(filepath.Dir(disk), 0o700)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, disk).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	guestBytes, _ := os.ReadFile(disk)
	b := New(Options{})
	m := backend.Machine{Spec: backend.Spec{ID: "d", Dir: filepath.Dir(disk), Disk: disk, DiskFormat: "raw"}}
	if err := b.Detach(ctx, m); err != nil {
		t.Fatal(err)
	}
	ii, err := b.info(ctx, disk, "qcow2")
	if err != nil || ii.backingPath() != "" {
		t.Fatalf("detached image: %+v %v", ii, err)
	}
	flat := filepath.Join(dir, "flat.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, flat).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	got, _ := os.ReadFile(flat)
	if bytes.Contains(got, []byte("TOPSECRET")) {
		t.Fatal("the detached disk holds the host file's data: the source format was probed")
	}
	// qemu-img rounds a raw image up to whole sectors (zeros).
	if len(got) < len(guestBytes) || !bytes.Equal(got[:len(guestBytes)], guestBytes) || len(bytes.Trim(got[len(guestBytes):], "\x00")) != 0 {
		t.Errorf("the detached disk is %d bytes, not the %d raw bytes the guest wrote", len(got), len(guestBytes))
	}
	// Unknown formats are refused before qemu-img runs.
	m.DiskFormat = "vmdk"
	if err := b.Detach(ctx, m); err == nil {
		t.Error("detach of a vmdk-format machine")
	}
}

// TestRestoreOverlayKeptByBackingFile: the second overlay created over a
// backing file is the bytes qemu-img made for the first (no qemu-img run:
// the binary is gone by then), private; a backing file that changed gets
// a fresh overlay from qemu-img, which names its new size. The backing
// chain check reads a header once per file identity too.
func TestRestoreOverlayKeptByBackingFile(t *testing.T) {
	testutil.RequireQEMU(t)
	ctx := context.Background()
	dir := t.TempDir()
	base := filepath.Join(dir, "snap", "disk.qcow2")
	os.MkdirAll(filepath.Dir(base), 0o700)
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", base, "64M").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	b := New(Options{})
	first := Overlay{Path: filepath.Join(dir, "vm1", "disk.qcow2"), Backing: base}
	if err := b.createOverlay(ctx, filepath.Dir(first.Path), first); err != nil {
		t.Fatal(err)
	}
	if err := b.checkBacking(ctx, base, ""); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(first.Path)
	// From here on qemu-img cannot run: what works comes from the caches.
	b.opts.QEMUImgPath = filepath.Join(dir, "no-qemu-img")
	second := Overlay{Path: filepath.Join(dir, "vm2", "disk.qcow2"), Backing: base}
	if err := b.createOverlay(ctx, filepath.Dir(second.Path), second); err != nil {
		t.Fatalf("second overlay over the same backing file: %v", err)
	}
	got, _ := os.ReadFile(second.Path)
	if len(want) == 0 || !bytes.Equal(got, want) {
		t.Fatalf("second overlay: %d bytes, want the first's %d", len(got), len(want))
	}
	if st, err := os.Stat(second.Path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("second overlay: %v, %v; want mode 0600", st.Mode(), err)
	}
	if err := b.checkBacking(ctx, base, ""); err != nil {
		t.Fatalf("backing check of an unchanged disk: %v", err)
	}
	if err := b.createOverlay(ctx, filepath.Dir(second.Path), second); err == nil {
		t.Fatal("an overlay was written over an existing file")
	}
	// The backing file changes (resized): neither cache answers for it.
	if out, err := exec.Command("qemu-img", "resize", "-q", "-f", "qcow2", base, "128M").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	third := Overlay{Path: filepath.Join(dir, "vm3", "disk.qcow2"), Backing: base}
	if err := b.createOverlay(ctx, filepath.Dir(third.Path), third); err == nil {
		t.Fatal("an overlay over a changed backing file came from the cache")
	}
	if err := b.checkBacking(ctx, base, ""); err == nil {
		t.Fatal("the backing check of a changed disk came from the cache")
	}
	b.opts.QEMUImgPath = ""
	if err := b.createOverlay(ctx, filepath.Dir(third.Path), third); err != nil {
		t.Fatal(err)
	}
	ii, err := b.info(ctx, third.Path, "qcow2")
	if err != nil || ii.VirtualSize != 128<<20 || ii.backingPath() != base {
		t.Fatalf("overlay over the changed backing file: %+v, %v", ii, err)
	}
}
