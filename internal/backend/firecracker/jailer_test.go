package firecracker

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
)

func TestJailerArgv(t *testing.T) {
	j := &jail{Jailer: "/opt/fc/jailer", Exec: "/opt/fc/firecracker", Base: "/data/vms/a/jail",
		ID: instanceID("my_vm.1"), UID: 1900000007, GID: 1900000007}
	want := []string{"--id", "my-vm-1", "--exec-file", "/opt/fc/firecracker", "--uid", "1900000007", "--gid", "1900000007",
		"--chroot-base-dir", "/data/vms/a/jail", "--", "--api-sock", "/fc.sock"}
	if got := j.Argv(); !slices.Equal(got, want) {
		t.Errorf("argv\n got %q\nwant %q", got, want)
	}
	if got, want := j.Root(), "/data/vms/a/jail/firecracker/my-vm-1/root"; got != want {
		t.Errorf("root %s, want %s", got, want)
	}
	j.ParentCgroup = "smolvm.slice"
	j.Limits = &cgroup.Limits{MemoryBytes: 640 << 20, CPUs: 2, Pids: 256}
	want = []string{"--id", "my-vm-1", "--exec-file", "/opt/fc/firecracker", "--uid", "1900000007", "--gid", "1900000007",
		"--chroot-base-dir", "/data/vms/a/jail",
		"--cgroup-version", "2", "--parent-cgroup", "smolvm.slice",
		"--cgroup", "memory.max=671088640", "--cgroup", "cpu.max=200000 100000", "--cgroup", "pids.max=256",
		"--", "--api-sock", "/fc.sock"}
	if got := j.Argv(); !slices.Equal(got, want) {
		t.Errorf("argv with cgroups\n got %q\nwant %q", got, want)
	}
}

func TestJailFor(t *testing.T) {
	b := &Backend{bin: "/opt/fc/firecracker", jailer: "/opt/fc/jailer"}
	spec := backend.Spec{ID: "vm1", Dir: "/data/vms/vm1", RunDir: "/run/x", RunAsUID: 1900000001, RunAsGID: 1900000001}
	j := b.jailFor(spec)
	if os.Geteuid() != 0 {
		if j != nil {
			t.Fatal("jailed without root")
		}
		t.Skip("the jailer is used only as root")
	}
	if j == nil || j.Base != "/data/vms/vm1/jail" || j.UID != 1900000001 || j.ID != "vm1" {
		t.Fatalf("jail %+v", j)
	}
	spec.RunAsUID = 0
	if b.jailFor(spec) != nil {
		t.Error("jailed without a uid of its own")
	}
	spec.RunAsUID = 1900000001
	if (&Backend{bin: b.bin}).jailFor(spec) != nil {
		t.Error("jailed without a jailer")
	}
}

func TestFindJailer(t *testing.T) {
	dir := t.TempDir()
	fc := filepath.Join(dir, "firecracker")
	os.WriteFile(fc, []byte("#!/bin/sh\n"), 0o755)
	if got := findJailer("", fc); got != "" {
		t.Errorf("found %q with no jailer next to firecracker", got)
	}
	jl := filepath.Join(dir, "jailer")
	os.WriteFile(jl, []byte("#!/bin/sh\n"), 0o755)
	if got := findJailer("", fc); got != jl {
		t.Errorf("found %q, want %s", got, jl)
	}
	if got := findJailer("off", fc); got != "" {
		t.Errorf("off gave %q", got)
	}
	if got := findJailer(jl, "/elsewhere/firecracker"); got != jl {
		t.Errorf("explicit jailer gave %q", got)
	}
}

func TestJailStage(t *testing.T) {
	root := t.TempDir()
	spec := backend.Spec{ID: "vm1", Dir: filepath.Join(root, "vm1"), RunDir: filepath.Join(root, "run"),
		Kernel: filepath.Join(root, "vmlinux.img"), Initrd: filepath.Join(root, "initrd.img"),
		RunAsUID: 1900000001, RunAsGID: 1900000001}
	spec.Disk = filepath.Join(spec.Dir, "disk.ext4")
	for _, d := range []string{spec.Dir, spec.RunDir} {
		os.MkdirAll(d, 0o700)
	}
	for _, f := range []string{spec.Kernel, spec.Initrd, spec.Disk} {
		os.WriteFile(f, []byte(filepath.Base(f)), 0o644)
	}
	j := &jail{Jailer: "/x/jailer", Exec: "/x/firecracker", Base: filepath.Join(spec.Dir, jailDirName),
		ID: instanceID(spec.ID), UID: spec.RunAsUID, GID: spec.RunAsGID}
	if err := j.stage(spec); err != nil {
		if os.Geteuid() != 0 {
			t.Skipf("staging chowns the disk to the VM's uid, which needs root: %v", err)
		}
		t.Fatal(err)
	}
	kernel, initrd, vsock := jailPaths(spec)
	for in, want := range map[string]string{kernel: "vmlinux.img", initrd: "initrd.img", "/" + driveLinkName: "disk.ext4"} {
		b, err := os.ReadFile(filepath.Join(j.Root(), in))
		if err != nil || string(b) != want {
			t.Errorf("jail %s = %q (%v), want %q", in, b, err, want)
		}
	}
	var disk, linked syscall.Stat_t
	syscall.Stat(spec.Disk, &disk)
	syscall.Stat(filepath.Join(j.Root(), driveLinkName), &linked)
	if disk.Ino != linked.Ino || linked.Uid != uint32(spec.RunAsUID) || linked.Mode&0o777 != 0o600 {
		t.Errorf("jailed disk: ino %d (disk %d), uid %d, mode %o; want the disk itself, the VM's uid, 0600", linked.Ino, disk.Ino, linked.Uid, linked.Mode&0o777)
	}
	if vsock != "/"+vsockName {
		t.Errorf("vsock %s", vsock)
	}
	for _, name := range []string{apiSockName, vsockName} {
		if dst, err := os.Readlink(filepath.Join(spec.RunDir, name)); err != nil || dst != filepath.Join(j.Root(), name) {
			t.Errorf("RunDir/%s -> %q (%v)", name, dst, err)
		}
	}
	// The VM's cleanup removes the jail (the disk stays).
	cleanup(spec)
	if _, err := os.Stat(j.Base); !os.IsNotExist(err) {
		t.Errorf("jail left after cleanup: %v", err)
	}
	if _, err := os.Stat(spec.Disk); err != nil {
		t.Errorf("disk gone with the jail: %v", err)
	}
}

func TestIsJailedFirecrackerOf(t *testing.T) {
	spec := backend.Spec{ID: "vm1", RunAsUID: 1900000001}
	cmd := []byte("/firecracker\x00--id=vm1\x00--start-time-us=1\x00--start-time-cpu-us=2\x00--api-sock\x00/fc.sock\x00")
	if !isJailedFirecrackerOf(cmd, 1900000001, spec) {
		t.Error("jailed firecracker not recognised")
	}
	if isJailedFirecrackerOf(cmd, 1900000002, spec) {
		t.Error("recognised under another uid")
	}
	other := spec
	other.ID = "vm10"
	if isJailedFirecrackerOf(cmd, 1900000001, other) {
		t.Error("recognised for another VM")
	}
}

// TestRealJailer would boot a VM through a real jailer; there is none on
// the development machine.
func TestRealJailer(t *testing.T) {
	fc, err := exec.LookPath("firecracker")
	if err != nil {
		t.Skip("no firecracker binary on PATH (nor a jailer next to it): the jailed start is untested here")
	}
	if findJailer("", fc) == "" {
		t.Skip("no jailer next to " + fc + ": the jailed start is untested here")
	}
	if os.Geteuid() != 0 {
		t.Skip("the jailer needs root")
	}
	t.Skip("a jailer exists here, but no jailed boot test is written yet: run the conformance suite as root with it")
}
