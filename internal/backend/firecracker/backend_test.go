package firecracker

// FAKE VMM TESTS — NOT FIRECRACKER TESTS. These run the backend against the
// stand-in in fake_test.go (the test binary re-executed as "firecracker").
// They check our process handling, sockets, files, disk copies and the
// order and content of API calls, not Firecracker's behaviour; the real
// test is in real_test.go and skips without a firecracker binary.

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

func TestMain(m *testing.M) {
	if os.Getenv(fakeEnv) == "1" {
		os.Exit(runFakeFirecracker(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeBackend returns a Backend whose binary is this test binary in fake mode.
func fakeBackend(t *testing.T) *Backend {
	t.Helper()
	t.Setenv(fakeEnv, "1")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Binary: exe})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type fixture struct {
	kernel, initrd, base string
	root                 string
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	root := t.TempDir()
	f := fixture{
		kernel: filepath.Join(root, "vmlinux"),
		initrd: filepath.Join(root, "initramfs.cpio"),
		base:   filepath.Join(root, "base.ext4"),
		root:   root,
	}
	os.WriteFile(f.kernel, []byte("not really a kernel"), 0o644)
	os.WriteFile(f.initrd, []byte("not really an initramfs"), 0o644)
	writeSparseImage(t, f.base, "base-content")
	return f
}

// writeSparseImage makes a 64 MiB image: a first line, a block at 32 MiB,
// holes elsewhere.
func writeSparseImage(t *testing.T, path, first string) {
	t.Helper()
	fh, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	fh.WriteString(first + "\n")
	fh.WriteAt([]byte("middle-block"), 32<<20)
	if err := fh.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
}

func (f fixture) spec(t *testing.T, id string) backend.Spec {
	dir := filepath.Join(f.root, "vms", id)
	return backend.Spec{
		ID: id, Dir: dir, RunDir: testutil.ShortDir(t),
		Kernel: f.kernel, Initrd: f.initrd, BaseDisk: f.base,
		Disk: filepath.Join(dir, "disk.raw"), DiskFormat: "raw",
		MemoryMiB: 64, CPUs: 1,
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// agentConn dials the fake agent and checks its greeting, which arrives in
// the same write as the OK line.
func agentConn(t *testing.T, b *Backend, m backend.Machine) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := b.DialAgent(ctxT(t), m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	if hello, err := br.ReadString('\n'); err != nil || hello != "HELLO\n" {
		t.Fatalf("greeting %q, %v", hello, err)
	}
	return c, br
}

func ask(t *testing.T, c net.Conn, br *bufio.Reader, cmd string) string {
	t.Helper()
	if _, err := c.Write([]byte(cmd + "\n")); err != nil {
		t.Fatal(err)
	}
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSuffix(line, "\n")
}

func wantStatus(t *testing.T, b *Backend, m backend.Machine, want backend.Status) {
	t.Helper()
	got, err := b.Status(ctxT(t), m)
	if err != nil || got != want {
		t.Fatalf("status %q, %v; want %q", got, err, want)
	}
}

func mustStart(t *testing.T, b *Backend, spec backend.Spec) backend.Machine {
	t.Helper()
	if err := b.Prepare(ctxT(t), spec); err != nil {
		t.Fatal(err)
	}
	m, err := b.Start(ctxT(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), m) })
	return m
}

func TestFakeLifecycle(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	spec := f.spec(t, "vm-life")

	if v, err := b.Version(ctxT(t)); err != nil || v != fakeVersion {
		t.Fatalf("Version = %q, %v", v, err)
	}
	m := mustStart(t, b, spec)
	if m.Backend != Name || m.PID <= 0 || m.Accel != backend.AccelKVM || m.MemoryFile != "" {
		t.Fatalf("machine %+v", m)
	}
	if pid, _ := os.ReadFile(filepath.Join(spec.Dir, pidName)); strings.TrimSpace(string(pid)) == "" {
		t.Error("no pid file")
	}
	if target, err := os.Readlink(filepath.Join(spec.RunDir, driveLinkName)); err != nil || target != spec.Disk {
		t.Errorf("drive link -> %q, %v", target, err)
	}
	wantStatus(t, b, m, backend.StatusRunning)

	c, br := agentConn(t, b, m)
	if got := ask(t, c, br, "DISK"); got != "base-content" {
		t.Errorf("guest disk starts with %q", got)
	}
	if got := ask(t, c, br, "MEM"); got != "fresh" {
		t.Errorf("guest memory %q", got)
	}

	if err := b.Pause(ctxT(t), m); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, b, m, backend.StatusPaused)
	if err := b.Resume(ctxT(t), m); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, b, m, backend.StatusRunning)

	if err := b.Stop(ctxT(t), m); err != nil {
		t.Fatal(err)
	}
	wantStatus(t, b, m, backend.StatusStopped)
	if err := syscall.Kill(m.PID, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("pid %d still exists after Stop: %v", m.PID, err)
	}
	for _, p := range []string{apiSock(spec), vsockSock(spec), driveLink(spec), filepath.Join(spec.Dir, pidName)} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s left behind", p)
		}
	}
	if err := b.Stop(ctxT(t), m); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if !strings.Contains(logTail(spec.Dir), "SMOLVM-AGENT READY") {
		t.Errorf("console output not in the log:\n%s", logTail(spec.Dir))
	}
	for name, err := range map[string]error{
		"pause":    b.Pause(ctxT(t), m),
		"resume":   b.Resume(ctxT(t), m),
		"snapshot": func() error { _, err := b.Snapshot(ctxT(t), m, backend.SnapshotFull, t.TempDir()); return err }(),
		"dial":     func() error { _, err := b.DialAgent(ctxT(t), m); return err }(),
	} {
		if !errors.Is(err, backend.ErrNotRunning) {
			t.Errorf("%s on a stopped VM: %v, want ErrNotRunning", name, err)
		}
	}
}

func TestFakeSnapshotRestore(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	a := mustStart(t, b, f.spec(t, "vm-a"))

	// "Guest" writes before the snapshot, then after it.
	writeFirstLine(t, a.Disk, "at-snapshot")
	snap := filepath.Join(f.root, "snap-1")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), a, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, b, a, backend.StatusPaused) // left paused
	if res.MemoryFormat != "raw" || res.BaseImage != "" {
		t.Errorf("result %+v", res)
	}
	roles := map[string]string{}
	for _, art := range res.Artifacts {
		roles[art.Role] = art.Name
		if _, err := os.Stat(filepath.Join(snap, art.Name)); err != nil {
			t.Errorf("artifact %+v: %v", art, err)
		}
	}
	for _, r := range []string{"state", "memory", "disk"} {
		if roles[r] == "" {
			t.Errorf("no %s artifact in %+v", r, res.Artifacts)
		}
	}
	if got := firstLine(t, filepath.Join(snap, roles["disk"])); got != "at-snapshot" {
		t.Errorf("snapshot disk starts with %q", got)
	}
	writeFirstLine(t, a.Disk, "after-snapshot")

	// Restore twice, side by side with the source: each clone must open its
	// own disk copy through the pinned relative drive path.
	for i, resume := range []bool{true, false} {
		spec := f.spec(t, []string{"vm-b", "vm-c"}[i])
		m, err := b.Restore(ctxT(t), backend.RestoreRequest{Spec: spec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res, Resume: resume})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Stop(context.Background(), m) })
		if m.MemoryFile != filepath.Join(snap, roles["memory"]) || m.MemoryShared {
			t.Errorf("restored machine memory %q shared=%v", m.MemoryFile, m.MemoryShared)
		}
		if resume {
			wantStatus(t, b, m, backend.StatusRunning)
		} else {
			wantStatus(t, b, m, backend.StatusPaused)
		}
		c, br := agentConn(t, b, m)
		if got := ask(t, c, br, "DISK"); got != "at-snapshot" {
			t.Errorf("restored guest disk starts with %q, want the snapshot's", got)
		}
		if got := ask(t, c, br, "MEM"); got != "guest-memory-of vm-a" {
			t.Errorf("restored guest memory %q", got)
		}
		// Writes to the clone stay in the clone.
		writeFirstLine(t, m.Disk, "clone-"+spec.ID)
	}
	if got := firstLine(t, a.Disk); got != "after-snapshot" {
		t.Errorf("source disk now %q", got)
	}
	if got := firstLine(t, filepath.Join(snap, roles["disk"])); got != "at-snapshot" {
		t.Errorf("snapshot disk changed to %q", got)
	}
	wantStatus(t, b, a, backend.StatusPaused)
}

func TestFakeDiskSnapshotColdBoots(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	a := mustStart(t, b, f.spec(t, "vm-d"))
	writeFirstLine(t, a.Disk, "disk-kind")
	snap := filepath.Join(f.root, "snap-d")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), a, backend.SnapshotDisk, snap)
	if err != nil {
		t.Fatal(err)
	}
	if res.MemoryFormat != "" {
		t.Errorf("disk snapshot declares memory format %q", res.MemoryFormat)
	}
	b.Stop(ctxT(t), a)
	spec := f.spec(t, "vm-e")
	m, err := b.Restore(ctxT(t), backend.RestoreRequest{Spec: spec, SnapshotDir: snap, Kind: backend.SnapshotDisk, Result: res, Resume: false})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), m) })
	wantStatus(t, b, m, backend.StatusPaused)
	if m.MemoryFile != "" {
		t.Errorf("cold boot has MemoryFile %q", m.MemoryFile)
	}
	c, br := agentConn(t, b, m)
	if got := ask(t, c, br, "MEM"); got != "fresh" {
		t.Errorf("disk restore loaded memory %q; want a cold boot", got)
	}
	if got := ask(t, c, br, "DISK"); got != "disk-kind" {
		t.Errorf("disk %q", got)
	}
}

func TestFakeStartFailureLeavesNothing(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	spec := f.spec(t, "vm-fail")
	if err := b.Prepare(ctxT(t), spec); err != nil {
		t.Fatal(err)
	}
	t.Setenv(fakeFaultEnv, "InstanceStart")
	_, err := b.Start(ctxT(t), spec)
	var ve *backend.VMMError
	if !errors.As(err, &ve) || ve.Op != "start" || ve.Class != "HTTP 400" || !strings.Contains(ve.Message, "fault injected") {
		t.Fatalf("err = %#v", err)
	}
	if !strings.Contains(ve.Log, "fake firecracker") {
		t.Errorf("VMMError.Log lacks the VMM output: %q", ve.Log)
	}
	ents, _ := os.ReadDir(spec.RunDir)
	if len(ents) != 0 {
		t.Errorf("RunDir not empty: %v", ents)
	}
	if _, err := os.Stat(filepath.Join(spec.Dir, pidName)); err == nil {
		t.Error("pid file left")
	}
}

func TestFakeRestoreFailures(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	a := mustStart(t, b, f.spec(t, "vm-f"))
	snap := filepath.Join(f.root, "snap-f")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), a, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	// A corrupt state file: the load fails, the VMM exits, nothing is left.
	os.WriteFile(filepath.Join(snap, stateFile), []byte("garbage"), 0o644)
	spec := f.spec(t, "vm-g")
	_, err = b.Restore(ctxT(t), backend.RestoreRequest{Spec: spec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res, Resume: true})
	var ve *backend.VMMError
	if !errors.As(err, &ve) || ve.Op != "snapshot/load" || !strings.Contains(ve.Message, "bad vmstate") {
		t.Fatalf("err = %v", err)
	}
	if ents, _ := os.ReadDir(spec.RunDir); len(ents) != 0 {
		t.Errorf("RunDir not empty: %v", ents)
	}
	if _, err := os.Stat(spec.Disk); err == nil {
		t.Error("the failed restore left its disk copy")
	}
	// A missing memory file is reported before anything is copied or started.
	os.Remove(filepath.Join(snap, memoryFile))
	hspec := f.spec(t, "vm-h")
	_, err = b.Restore(ctxT(t), backend.RestoreRequest{Spec: hspec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res})
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "memory artifact") {
		t.Errorf("missing memory: %v", err)
	}
	if _, err := os.Stat(hspec.Disk); err == nil {
		t.Error("disk copied before the artifacts were checked")
	}
}

func TestFakeRunDirInUse(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	spec := f.spec(t, "vm-i")
	mustStart(t, b, spec)
	other := f.spec(t, "vm-j")
	other.RunDir = spec.RunDir
	if err := b.Prepare(ctxT(t), other); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Start(ctxT(t), other); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second VM in the same RunDir: %v", err)
	}
}

func TestUnsupportedAndMissing(t *testing.T) {
	if _, err := New(Options{Binary: "/nonexistent/firecracker"}); !errors.Is(err, backend.ErrVMMNotFound) {
		t.Errorf("New with a missing binary: %v", err)
	}
	b := fakeBackend(t)
	f := newFixture(t)
	ctx := ctxT(t)
	if err := b.ExposePort(ctx, backend.Machine{}, backend.PortForward{HostPort: 1, GuestPort: 2}); !errors.Is(err, backend.ErrUnsupported) {
		t.Errorf("ExposePort: %v", err)
	}
	spec := f.spec(t, "vm-x")
	spec.Accel = backend.AccelTCG
	if _, err := b.Start(ctx, spec); !errors.Is(err, backend.ErrUnsupported) {
		t.Errorf("TCG: %v", err)
	}
	spec = f.spec(t, "vm-y")
	spec.DiskFormat = "qcow2"
	if err := b.Prepare(ctx, spec); !errors.Is(err, backend.ErrUnsupported) {
		t.Errorf("qcow2: %v", err)
	}
	spec = f.spec(t, "vm-z")
	spec.BaseDisk = filepath.Join(f.root, "missing.ext4")
	if err := b.Prepare(ctx, spec); !errors.Is(err, backend.ErrBackingMissing) {
		t.Errorf("missing base: %v", err)
	}
	caps := b.Capabilities()
	want := backend.Capabilities{Pause: true, MemorySnapshot: true, DiskSnapshot: true, MappedRestore: true,
		KernelFormat: backend.KernelVmlinux, DiskFormat: backend.DiskRaw}
	if caps != want {
		t.Errorf("capabilities %+v", caps)
	}
}

func TestCopyDiskKeepsContentAndHoles(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeSparseImage(t, src, "hello")
	// A written-but-zero block inside the data: must not be allocated in the copy.
	fh, _ := os.OpenFile(src, os.O_RDWR, 0)
	fh.WriteAt(make([]byte, 4<<20), 8<<20)
	fh.Close()
	dst := filepath.Join(dir, "dst")
	os.WriteFile(dst, []byte("old content to replace"), 0o644)
	method, err := copyDisk(context.Background(), src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if method != copyReflink && method != copySparse {
		t.Fatalf("method %q", method)
	}
	a, _ := os.ReadFile(src)
	bb, _ := os.ReadFile(dst)
	if string(a) != string(bb) {
		t.Fatal("copy differs from source")
	}
	var st syscall.Stat_t
	syscall.Stat(dst, &st)
	if alloc := st.Blocks * 512; alloc > 2<<20 {
		t.Errorf("copy (%s) allocates %d bytes of a 64 MiB mostly-hole image", method, alloc)
	}
	t.Logf("copy method here: %s, allocated %d bytes", method, st.Blocks*512)
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Errorf("temporary files left: %v", ents)
	}
}

func TestNames(t *testing.T) {
	for id, want := range map[string]string{
		"vm-1":                  "vm-1",
		"my_vm.2":               "my-vm-2",
		"":                      "smolvm",
		strings.Repeat("a", 80): strings.Repeat("a", 64),
	} {
		if got := instanceID(id); got != want {
			t.Errorf("instanceID(%q) = %q, want %q", id, got, want)
		}
	}
	if n := tapName("some-long-vm-identifier"); len(n) > 15 || !strings.HasPrefix(n, "fc") {
		t.Errorf("tapName = %q", n)
	}
	if tapName("a") == tapName("b") {
		t.Error("tap names collide")
	}
	if mac := guestMAC(backend.Spec{ID: "x"}); len(mac) != 17 || !strings.HasPrefix(mac, "06:") {
		t.Errorf("guestMAC = %q", mac)
	}
}

func writeFirstLine(t *testing.T, path, line string) {
	t.Helper()
	fh, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	buf := make([]byte, 32) // pad so a shorter line fully replaces a longer one
	copy(buf, line+"\n")
	if _, err := fh.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
}

func firstLine(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s, _, _ := strings.Cut(string(b[:min(len(b), 64)]), "\n")
	return s
}

func TestFakeVMMDiesDuringLoad(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	a := mustStart(t, b, f.spec(t, "vm-k"))
	snap := filepath.Join(f.root, "snap-k")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), a, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(fakeFaultEnv, "LoadCrash")
	spec := f.spec(t, "vm-l")
	_, err = b.Restore(ctxT(t), backend.RestoreRequest{Spec: spec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res})
	var ve *backend.VMMError
	if !errors.As(err, &ve) || ve.Op != "snapshot/load" || !strings.Contains(ve.Message, "exited") {
		t.Fatalf("err = %v", err)
	}
	if ents, _ := os.ReadDir(spec.RunDir); len(ents) != 0 {
		t.Errorf("RunDir not empty: %v", ents)
	}
}

// As root, Network gets a TAP (created with ip tuntap), a restore gets its
// own TAP through network_overrides, and Stop deletes them.
func TestFakeTAPNetwork(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("TAP networking needs root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	b := fakeBackend(t)
	f := newFixture(t)
	suffix := strconv.FormatInt(time.Now().UnixNano(), 36)
	spec := f.spec(t, "net-a-"+suffix)
	spec.Network = true
	a := mustStart(t, b, spec)
	tapA := tapName(spec.ID)
	if _, err := os.Stat("/sys/class/net/" + tapA); err != nil {
		t.Fatalf("TAP %s not created: %v", tapA, err)
	}
	c, br := agentConn(t, b, a)
	if got := ask(t, c, br, "TAP"); got != tapA {
		t.Errorf("VMM attached %q, want %q", got, tapA)
	}
	snap := filepath.Join(f.root, "snap-net")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), a, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	// The restore request does not even ask for a network: the snapshot
	// has an interface, so the clone gets a TAP and says so.
	rspec := f.spec(t, "net-b-"+suffix)
	r, err := b.Restore(ctxT(t), backend.RestoreRequest{Spec: rspec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), r) })
	tapB := tapName(rspec.ID)
	if !r.Network {
		t.Error("restored machine does not record its network")
	}
	c2, br2 := agentConn(t, b, r)
	if got := ask(t, c2, br2, "TAP"); got != tapB {
		t.Errorf("restored VMM attached %q, want the override %q", got, tapB)
	}
	for _, m := range []backend.Machine{a, r} {
		if err := b.Stop(ctxT(t), m); err != nil {
			t.Fatal(err)
		}
	}
	for _, tap := range []string{tapA, tapB} {
		if _, err := os.Stat("/sys/class/net/" + tap); err == nil {
			t.Errorf("TAP %s left after Stop", tap)
		}
	}
}

// A VM without a disk (initramfs only) boots, snapshots and restores.
func TestFakeNoDisk(t *testing.T) {
	b := fakeBackend(t)
	f := newFixture(t)
	spec := f.spec(t, "vm-nodisk")
	spec.BaseDisk, spec.Disk = "", ""
	m, err := b.Start(ctxT(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), m) })
	if strings.Contains(bootArgs(spec), "smol.root") {
		t.Errorf("boot args %q name a root disk", bootArgs(spec))
	}
	c, br := agentConn(t, b, m)
	if got := ask(t, c, br, "DISK"); got != "no-disk" {
		t.Errorf("disk-less VM has a disk: %q", got)
	}
	snap := filepath.Join(f.root, "snap-nodisk")
	os.Mkdir(snap, 0o755)
	res, err := b.Snapshot(ctxT(t), m, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range res.Artifacts {
		if a.Role == "disk" {
			t.Errorf("disk artifact for a disk-less VM: %+v", a)
		}
	}
	rspec := f.spec(t, "vm-nodisk2")
	rspec.BaseDisk, rspec.Disk = "", ""
	r, err := b.Restore(ctxT(t), backend.RestoreRequest{Spec: rspec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), r) })
	c2, br2 := agentConn(t, b, r)
	if got := ask(t, c2, br2, "MEM"); got != "guest-memory-of vm-nodisk" {
		t.Errorf("restored memory %q", got)
	}
}

func TestBootArgs(t *testing.T) {
	for _, tc := range []struct {
		spec backend.Spec
		want string
	}{
		{backend.Spec{Disk: "/d", Initrd: "/i"}, BaseKernelArgs + " smol.root=/dev/vda"},
		{backend.Spec{Disk: "/d", Initrd: "/i", KernelArgs: "quiet smol.root=/dev/vda"}, BaseKernelArgs + " quiet smol.root=/dev/vda"},
		{backend.Spec{Initrd: "/i", KernelArgs: " init_on_free=1 "}, BaseKernelArgs + " init_on_free=1"},
		{backend.Spec{Disk: "/d"}, BaseKernelArgs}, // no initramfs: Firecracker's root=/dev/vda
	} {
		if got := bootArgs(tc.spec); got != tc.want {
			t.Errorf("bootArgs(%+v) = %q, want %q", tc.spec, got, tc.want)
		}
	}
}
