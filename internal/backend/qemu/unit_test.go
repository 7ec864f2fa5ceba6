package qemu

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/backend"
)

func testSpec() backend.Spec {
	return backend.Spec{
		ID: "vm1", Dir: "/var/lib/smolvm/vms/vm1", RunDir: "/tmp/smv1",
		Kernel: "/img/bzImage", Initrd: "/img/initrd.gz", BaseDisk: "/img/rootfs.ext4",
		Disk: "/var/lib/smolvm/vms/vm1/disk.qcow2", DiskFormat: "qcow2",
		MemoryMiB: 512, CPUs: 2, Network: true, MAC: "52:54:00:aa:bb:cc",
		PortForwards: []backend.PortForward{{HostPort: 8022, GuestPort: 22}, {HostAddr: "0.0.0.0", HostPort: 8080, GuestPort: 80}},
		KernelArgs:   "init_on_free=1 smol.root=/dev/vda",
	}
}

// argAfter returns the values following each occurrence of flag.
func argsAfter(args []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			out = append(out, args[i+1])
		}
	}
	return out
}

func TestBuildArgsMicrovmTCG(t *testing.T) {
	spec := testSpec()
	l := launch{Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max", TSCkHz: 2445404,
		MemoryFile: "/dev/shm/smolvm-x/ram", MemoryShared: true, Disk: spec.Disk, DiskFormat: "qcow2"}
	args := mustArgs(t, spec, l)
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-nodefaults -no-user-config -nographic",
		"-machine microvm,memory-backend=mem0",
		"-accel tcg", "-cpu max", "-m 512M", "-smp 2",
		"-object memory-backend-file,id=mem0,size=512M,mem-path=/dev/shm/smolvm-x/ram,share=on",
		"-kernel /img/bzImage", "-initrd /img/initrd.gz",
		"-chardev socket,id=qmp,server=on,wait=off,path=/tmp/smv1/qmp.sock",
		"-mon chardev=qmp,mode=control",
		"-pidfile /var/lib/smolvm/vms/vm1/qemu.pid",
		"-chardev ringbuf,id=console,size=1048576 -serial chardev:console",
		"-device virtio-serial-device,id=vser0",
		"-chardev socket,id=agent,server=on,wait=off,path=/tmp/smv1/agent.sock",
		"-device virtserialport,bus=vser0.0,chardev=agent,name=org.smolvm.agent",
		"-blockdev driver=qcow2,node-name=disk0,file.driver=file,file.filename=/var/lib/smolvm/vms/vm1/disk.qcow2",
		"-device virtio-blk-device,drive=disk0",
		"-netdev user,id=net0,hostfwd=tcp:127.0.0.1:8022-:22,hostfwd=tcp:0.0.0.0:8080-:80",
		"-device virtio-net-device,netdev=net0,mac=52:54:00:aa:bb:cc",
		"-device virtio-rng-device",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q\n%s", want, joined)
		}
	}
	if got := argsAfter(args, "-append"); len(got) != 1 ||
		got[0] != "console=ttyS0 reboot=t panic=-1 tsc_early_khz=2445404 init_on_free=1 smol.root=/dev/vda" {
		t.Errorf("-append = %q", got)
	}
	for _, no := range []string{"-incoming", "-S", "readonly=on", "-pci"} {
		if slices.Contains(args, no) || strings.Contains(joined, no) {
			t.Errorf("unexpected %q in %s", no, joined)
		}
	}
	// Device order is part of the migration contract.
	devs := argsAfter(args, "-device")
	want := []string{"virtio-serial-device,id=vser0", "virtserialport,bus=vser0.0,chardev=agent,name=org.smolvm.agent",
		"virtserialport,bus=vser0.0,chardev=agent1,name=org.smolvm.agent.1",
		"virtserialport,bus=vser0.0,chardev=agent2,name=org.smolvm.agent.2",
		"virtserialport,bus=vser0.0,chardev=agent3,name=org.smolvm.agent.3",
		"virtio-blk-device,drive=disk0", "virtio-net-device,netdev=net0,mac=52:54:00:aa:bb:cc", "virtio-rng-device",
		"virtio-balloon-device,free-page-reporting=on"}
	if !slices.Equal(devs, want) {
		t.Errorf("devices %q\nwant %q", devs, want)
	}
}

func TestBuildArgsQ35RestoreNoDiskNoNet(t *testing.T) {
	spec := testSpec()
	spec.Network = false
	spec.Dir = "/data/with,comma"
	l := launch{Machine: MachineQ35, Accel: backend.AccelKVM, CPU: "host",
		MemoryFile: "/snap/memory.raw", MemoryShared: false, MemoryReadonly: true,
		Incoming: true, StartPaused: true}
	args := mustArgs(t, spec, l)
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-machine q35,memory-backend=mem0", "-accel kvm", "-cpu host",
		"mem-path=/snap/memory.raw,share=off,readonly=on,rom=off",
		"-device virtio-serial-pci,id=vser0", "-device virtio-rng-pci",
		"-incoming defer", "-S",
		"mem-path=/snap/memory.raw",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "tsc_early_khz") || strings.Contains(joined, "-netdev") || strings.Contains(joined, "-blockdev") {
		t.Errorf("unexpected options in %s", joined)
	}
}

func TestLaunchFromCmdline(t *testing.T) {
	spec := testSpec()
	args := mustArgs(t, spec, launch{Machine: MachineQ35, Accel: backend.AccelTCG, CPU: "max", MemoryFile: "/x", MemoryShared: true})
	m, a, c := launchFromCmdline(append([]string{"qemu-system-x86_64"}, args...))
	if m != MachineQ35 || a != backend.AccelTCG || c != "max" {
		t.Fatalf("got %s %s %s", m, a, c)
	}
}

func TestParseMHz(t *testing.T) {
	for in, want := range map[string]int{"2445.404": 2445404, "2596.1": 2596100, "3000": 3000000, "x": 0, "": 0, "1.23456": 1234} {
		if got := parseMHzAsKHz(in); got != want {
			t.Errorf("parseMHzAsKHz(%q) = %d, want %d", in, got, want)
		}
	}
	if hostTSCkHz("/proc/cpuinfo") <= 0 {
		t.Log("no cpu MHz in /proc/cpuinfo on this host")
	}
}

func TestProbeAccelFake(t *testing.T) {
	kvm, cpuVMX, cpuNone, pvm, missing := fakeHostFiles(t)

	cases := []struct {
		name   string
		env    hostEnv
		req    backend.Accel
		want   backend.Accel
		notice string
	}{
		{"good kvm", hostEnv{DevKVM: kvm, CPUInfo: cpuVMX, PVMModule: missing}, backend.AccelAuto, backend.AccelKVM, ""},
		{"pvm", hostEnv{DevKVM: kvm, CPUInfo: cpuNone, PVMModule: pvm}, backend.AccelAuto, backend.AccelTCG, "/dev/kvm is PVM: kvm_pvm loaded"},
		{"no flags", hostEnv{DevKVM: kvm, CPUInfo: cpuNone, PVMModule: missing}, backend.AccelAuto, backend.AccelTCG, "CPU has no vmx/svm flag"},
		{"no dev", hostEnv{DevKVM: missing, CPUInfo: cpuVMX, PVMModule: missing}, "", backend.AccelTCG, "does not exist"},
		{"forced tcg", hostEnv{DevKVM: kvm, CPUInfo: cpuVMX, PVMModule: missing}, backend.AccelTCG, backend.AccelTCG, ""},
		{"forced kvm on pvm", hostEnv{DevKVM: kvm, CPUInfo: cpuNone, PVMModule: pvm}, backend.AccelKVM, backend.AccelKVM, "KVM forced"},
	}
	for _, c := range cases {
		// The PVM reason names the real device path; make the fake env match.
		got, notice, err := probeAccel(c.req, c.env)
		if err != nil || got != c.want {
			t.Errorf("%s: got %s, %v; want %s", c.name, got, err, c.want)
		}
		if c.notice == "" && notice != "" || !strings.Contains(notice, strings.ReplaceAll(c.notice, "/dev/kvm", c.env.DevKVM)) {
			t.Errorf("%s: notice %q, want it to contain %q", c.name, notice, c.notice)
		}
	}
	if _, _, err := probeAccel("hvf", hostEnv{}); err == nil {
		t.Error("unknown accelerator accepted")
	}
}

// On this machine (/dev/kvm is PVM) auto must pick TCG with the PVM notice.
func TestProbeAccelThisHost(t *testing.T) {
	a, notice, err := ProbeAccel(backend.AccelAuto)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("auto -> %s; %s", a, notice)
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		want := "notice: KVM unusable here (/dev/kvm is PVM: kvm_pvm loaded) — using TCG software emulation (slower)"
		if a != backend.AccelTCG || notice != want {
			t.Fatalf("got %s %q, want tcg %q", a, notice, want)
		}
	}
}

func TestMapStatus(t *testing.T) {
	for in, want := range map[string]backend.Status{
		"running": backend.StatusRunning, "paused": backend.StatusPaused, "postmigrate": backend.StatusPaused,
		"prelaunch": backend.StatusPaused, "inmigrate": backend.StatusPaused, "internal-error": backend.StatusError,
		"guest-panicked": backend.StatusError, "shutdown": backend.StatusError,
	} {
		if got := mapStatus(qmpStatus{Status: in, Running: in == "running"}); got != want {
			t.Errorf("%s -> %s, want %s", in, got, want)
		}
	}
}

func TestSparseCopy(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 8<<20 + 1000 // odd tail
	f.Truncate(size)
	data := make([]byte, 3*4096+17)
	rand.Read(data)
	f.WriteAt(data, 1<<20+100)             // straddles blocks
	f.WriteAt(make([]byte, 64<<10), 3<<20) // explicit zeros: must become a hole
	f.WriteAt([]byte("tail"), size-4)
	f.Close()

	dst := filepath.Join(dir, "dst")
	n, err := sparseCopy(dst, src)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("copy differs")
	}
	if n > 6*4096+1000 {
		t.Errorf("wrote %d bytes of data; zero blocks were not skipped", n)
	}
	if alloc := allocatedBytes(dst); alloc > 64<<10 {
		t.Errorf("dst allocates %d bytes; want a sparse file", alloc)
	}
}

func TestPrepareAndMissingBacking(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	ctx := context.Background()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o444); err != nil {
		t.Fatal(err)
	}
	b := New(Options{})
	spec := backend.Spec{ID: "p", Dir: filepath.Join(dir, "vm"), BaseDisk: base, Disk: filepath.Join(dir, "vm", "disk.qcow2")}
	if err := b.Prepare(ctx, spec); err != nil {
		t.Fatal(err)
	}
	ii, err := b.info(ctx, spec.Disk, "qcow2")
	if err != nil || ii.Format != "qcow2" || ii.backingPath() != base || ii.BackingFilenameFormat != "raw" {
		t.Fatalf("overlay info %+v %v", ii, err)
	}
	if err := b.Prepare(ctx, spec); !errors.Is(err, os.ErrExist) {
		t.Errorf("second prepare: %v, want ErrExist", err)
	}

	// A diff snapshot whose base image has gone: restore must refuse before
	// starting QEMU, name the path and suggest a full snapshot.
	snap := filepath.Join(dir, "snap")
	os.Mkdir(snap, 0o755)
	if _, err := sparseCopy(filepath.Join(snap, DiskFile), spec.Disk); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(snap, StateFile), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(snap, MemoryFile), nil, 0o644)
	os.Truncate(filepath.Join(snap, MemoryFile), 256<<20)
	moved := base + ".moved"
	if err := os.Rename(base, moved); err != nil {
		t.Fatal(err)
	}
	req := backend.RestoreRequest{
		Spec:        backend.Spec{ID: "r", Dir: filepath.Join(dir, "r"), RunDir: filepath.Join(dir, "rr"), Kernel: "/nonexistent", MemoryMiB: 256, BaseDisk: base},
		SnapshotDir: snap, Kind: backend.SnapshotDiff,
		Result: backend.SnapshotResult{MemoryFormat: MemoryRaw, BaseImage: base, Artifacts: []backend.Artifact{
			{Role: "state", Name: StateFile}, {Role: "memory", Name: MemoryFile}, {Role: "disk", Name: DiskFile}}},
	}
	_, err = b.Restore(ctx, req)
	if !errors.Is(err, backend.ErrBackingMissing) || !strings.Contains(err.Error(), base) || !strings.Contains(err.Error(), "full snapshot") {
		t.Fatalf("restore with a missing base: %v", err)
	}
	t.Logf("error: %v", err)
	// Same with BaseImage unrecorded: the qcow2 header still names it.
	req.Result.BaseImage = ""
	if _, err = b.Restore(ctx, req); !errors.Is(err, backend.ErrBackingMissing) || !strings.Contains(err.Error(), base) {
		t.Fatalf("restore with a missing backing file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "r", DiskFile)); err == nil {
		t.Error("restore left a disk behind")
	}
	// A missing artifact is named too.
	os.Rename(moved, base)
	os.Remove(filepath.Join(snap, StateFile))
	if _, err = b.Restore(ctx, req); err == nil || !strings.Contains(err.Error(), "state") {
		t.Fatalf("restore without state: %v", err)
	}
}

func TestQEMUNotFound(t *testing.T) {
	b := New(Options{QEMUPath: "/nonexistent/qemu-system-x86_64"})
	dir, _ := os.MkdirTemp("/tmp", "smvt")
	defer os.RemoveAll(dir)
	k := filepath.Join(dir, "k")
	os.WriteFile(k, []byte("k"), 0o644)
	_, err := b.Start(context.Background(), backend.Spec{ID: "x", Dir: dir, RunDir: dir, Kernel: k, MemoryMiB: 64, Accel: backend.AccelTCG})
	if !errors.Is(err, backend.ErrVMMNotFound) {
		t.Fatalf("got %v, want ErrVMMNotFound", err)
	}
}

// A mapped file that shrinks under a copy gives an error, not a crash.
func TestGuardFaultTurnsSIGBUSIntoError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, bytes.Repeat([]byte{1}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := os.Truncate(p, 0); err != nil {
		t.Fatal(err)
	}
	var sum byte
	err = guardFault(func() error {
		sum += mem[512<<10] // beyond the new end of file: SIGBUS
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "memory fault") {
		t.Fatalf("guardFault = %v, want a memory fault error", err)
	}
	// Other panics pass through.
	defer func() {
		if r := recover(); r != "boom" {
			t.Errorf("recovered %v, want boom", r)
		}
	}()
	guardFault(func() error { panic("boom") })
}

// Helper RunDirs of dead processes are swept; others are kept.
func TestSweepHelperRunDirs(t *testing.T) {
	base := t.TempDir()
	child := exec.Command("true")
	if err := child.Run(); err != nil {
		t.Fatal(err)
	}
	dead := child.Process.Pid // reaped: no such process now
	names := map[string]bool{ // name -> kept
		fmt.Sprintf("%s%d-aa", helperRunPrefix, os.Getpid()): true,
		fmt.Sprintf("%s%d-bb", helperRunPrefix, dead):        false,
		helperRunPrefix + "junk":                             true,
		"0123456789ab":                                       true,
	}
	for n := range names {
		if err := os.Mkdir(filepath.Join(base, n), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	sweepHelperRunDirs(base)
	for n, kept := range names {
		_, err := os.Stat(filepath.Join(base, n))
		if got := err == nil; got != kept {
			t.Errorf("%s: kept=%v, want %v", n, got, kept)
		}
	}
}
