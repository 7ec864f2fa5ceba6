package qemu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestAccelCheck: usable KVM is ok; TCG (here: PVM) is a warning that
// names the reason and how to get KVM.
func TestAccelCheck(t *testing.T) {
	kvm, cpuVMX, _, pvm, missing := fakeHostFiles(t)
	if c := accelCheck(hostEnv{DevKVM: kvm, CPUInfo: cpuVMX, PVMModule: missing}); c.Status != backend.CheckOK || c.Detail != "kvm" {
		t.Errorf("usable KVM: %+v", c)
	}
	c := accelCheck(hostEnv{DevKVM: kvm, CPUInfo: cpuVMX, PVMModule: pvm})
	if c.Status != backend.CheckWarn || !strings.Contains(c.Detail, "tcg") || !strings.Contains(c.Detail, "PVM") || c.Fix == "" {
		t.Errorf("PVM: %+v", c)
	}
}

// fakeHostFiles makes the files the accelerator probe reads: a /dev/kvm
// stand-in, a cpuinfo with vmx and one without, a kvm_pvm module dir, and
// a path that does not exist.
func fakeHostFiles(t *testing.T) (kvm, cpuVMX, cpuNone, pvm, missing string) {
	dir := t.TempDir()
	kvm = filepath.Join(dir, "kvm")
	cpuVMX = filepath.Join(dir, "cpuinfo-vmx")
	cpuNone = filepath.Join(dir, "cpuinfo")
	pvm = filepath.Join(dir, "kvm_pvm")
	missing = filepath.Join(dir, "missing")
	for _, err := range []error{
		os.WriteFile(kvm, nil, 0o600),
		os.WriteFile(cpuVMX, []byte("processor\t: 0\nflags\t\t: fpu vmx sse\n"), 0o644),
		os.WriteFile(cpuNone, []byte("processor\t: 0\nflags\t\t: fpu sse\n"), 0o644),
		os.Mkdir(pvm, 0o755),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return
}

// TestHostChecksWithoutQEMU: with no QEMU on PATH the emulator and
// qemu-img fail with a fix, and seccomp (which asks QEMU) is not checked.
func TestHostChecksWithoutQEMU(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	got := map[string]backend.Check{}
	for _, c := range hostChecks(context.Background()) {
		got[c.Name] = c
	}
	for _, name := range []string{"qemu", "qemu-img"} {
		if c := got[name]; c.Status != backend.CheckFail || c.Fix == "" {
			t.Errorf("%s without QEMU: %+v", name, c)
		}
	}
	if c, ok := got["seccomp"]; ok {
		t.Errorf("seccomp checked without QEMU: %+v", c)
	}
	if _, ok := got["accel"]; !ok {
		t.Error("no accel check")
	}
}

// TestHostChecksThisHost: on a host with QEMU (this one) the emulator's
// version and its seccomp support are reported as ok.
func TestHostChecksThisHost(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("QEMU not installed")
	}
	got := map[string]backend.Check{}
	for _, c := range hostChecks(context.Background()) {
		got[c.Name] = c
	}
	if c := got["qemu"]; c.Status != backend.CheckOK || !strings.HasPrefix(c.Detail, "QEMU emulator version") {
		t.Errorf("qemu: %+v", c)
	}
	if c := got["seccomp"]; c.Status != backend.CheckOK || !strings.Contains(c.Detail, "-sandbox") {
		t.Errorf("seccomp: %+v", c)
	}
	if r, _ := backend.Lookup("qemu"); r.HostChecks == nil {
		t.Error("the registration declares no host checks")
	}
}
