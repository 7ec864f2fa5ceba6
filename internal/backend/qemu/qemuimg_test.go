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
