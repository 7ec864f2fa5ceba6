package hostprobe

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestVersionFirstLine(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vmm")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho 'vmm 1.2.3  '\necho 'second line'\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if v, err := Version(context.Background(), bin); err != nil || v != "vmm 1.2.3" {
		t.Errorf("Version = %q, %v; want the trimmed first line", v, err)
	}
	failing := filepath.Join(dir, "broken")
	os.WriteFile(failing, []byte("#!/bin/sh\nexit 3\n"), 0o700)
	if v, err := Version(context.Background(), failing); err == nil || !strings.Contains(err.Error(), failing) {
		t.Errorf("Version of a failing binary = %q, %v; want an error naming it", v, err)
	}
	if _, err := Version(context.Background(), filepath.Join(dir, "missing")); err == nil {
		t.Error("Version of a missing binary: no error")
	}
}

func TestBinary(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "tool"), []byte("#!/bin/sh\n"), 0o700)
	t.Setenv("PATH", dir)
	if p, why := Binary("tool"); p != filepath.Join(dir, "tool") || why != "" {
		t.Errorf("Binary(tool) = %q, %q", p, why)
	}
	if p, why := Binary("absent"); p != "" || !strings.Contains(why, "not on PATH") {
		t.Errorf("Binary(absent) = %q, %q", p, why)
	}
}

// TestFreeSpace: a dir that does not exist yet is measured at its nearest
// existing parent, which is named.
func TestFreeSpace(t *testing.T) {
	dir := t.TempDir()
	free, at, err := FreeSpace(filepath.Join(dir, "not", "yet"))
	if err != nil || at != dir || free == 0 {
		t.Errorf("FreeSpace = %d, %q, %v; want >0 at %s", free, at, err, dir)
	}
	if _, at, err := FreeSpace(dir); err != nil || at != dir {
		t.Errorf("FreeSpace(existing) at %q, %v", at, err)
	}
}

// TestReadCPU reads the first processor's vendor, model and flags, and
// stops there.
func TestReadCPU(t *testing.T) {
	p := filepath.Join(t.TempDir(), "cpuinfo")
	info := "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU\nflags\t\t: fpu vme sse2\n\n" +
		"processor\t: 1\nvendor_id\t: Other\nmodel name\t: other\nflags\t\t: fpu\n"
	if err := os.WriteFile(p, []byte(info), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := ReadCPU(Env{CPUInfo: p})
	if err != nil || c.Vendor != "GenuineIntel" || c.Model != "Intel(R) Xeon(R) CPU" || strings.Join(c.Flags, " ") != "fpu vme sse2" {
		t.Fatalf("ReadCPU = %+v, %v", c, err)
	}
	if _, err := ReadCPU(Env{CPUInfo: filepath.Join(t.TempDir(), "none")}); err == nil {
		t.Fatal("ReadCPU of a missing file: no error")
	}
}
