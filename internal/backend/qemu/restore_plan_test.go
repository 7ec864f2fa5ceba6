package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/steps"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// planFixture is a snapshot dir with the files a restore plan reads (no
// VM): qemu.json, state.bin, a sparse memory.raw of memMiB and a disk.
type planFixture struct {
	root, snap string
	req        backend.RestoreRequest
}

func newPlanFixture(t *testing.T, kind backend.SnapshotKind, format string, cfg snapshotConfig) planFixture {
	t.Helper()
	root := t.TempDir()
	snap := filepath.Join(root, "snap")
	if err := os.Mkdir(snap, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(snap, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cb, _ := json.Marshal(cfg)
	write(ConfigFile, cb)
	write(DiskFile, []byte("qcow2 stand-in: the plan does not read it"))
	arts := []backend.Artifact{{Role: "disk", Name: DiskFile}, {Role: RoleConfig, Name: ConfigFile}}
	if kind != backend.SnapshotDisk {
		write(StateFile, []byte("x"))
		arts = append(arts, backend.Artifact{Role: "state", Name: StateFile})
		if format == MemoryRaw {
			write(MemoryFile, nil)
			if err := os.Truncate(filepath.Join(snap, MemoryFile), int64(cfg.MemoryMiB)<<20); err != nil {
				t.Fatal(err)
			}
			arts = append(arts, backend.Artifact{Role: "memory", Name: MemoryFile})
		}
	}
	spec := backend.Spec{ID: "r1", Dir: filepath.Join(root, "vm"), RunDir: filepath.Join(root, "run"),
		Kernel: "/img/bzImage", Initrd: "/img/initrd.gz", KernelArgs: "smol.root=/dev/vda",
		MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, Accel: backend.AccelTCG}
	return planFixture{root: root, snap: snap, req: backend.RestoreRequest{Spec: spec, SnapshotDir: snap, Kind: kind,
		Result: backend.SnapshotResult{MemoryFormat: format, Artifacts: arts}}}
}

func planBackend(t *testing.T) *Backend {
	return New(Options{MemoryDir: filepath.Join(t.TempDir(), "shm")})
}

// qmpNames lists the plan's QMP commands as "step=command".
func qmpNames(p RestorePlan) []string {
	var out []string
	for _, q := range p.QMP {
		out = append(out, q.Step+"="+q.Execute)
	}
	return out
}

func capsOf(t *testing.T, q QMPCommand) map[string]bool {
	t.Helper()
	b, _ := json.Marshal(q.Arguments["capabilities"])
	var caps []migCap
	if err := json.Unmarshal(b, &caps); err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, c := range caps {
		out[c.Capability] = c.State
	}
	return out
}

// The plan of a full snapshot with raw memory: the snapshotted machine and
// CPU, the memory image mapped privately and read-only, no kernel, paused
// for an incoming migration; an overlay over the snapshot's disk; QMP sets
// the capabilities, loads the state from the state file and resumes.
func TestPlanRestoreFullRaw(t *testing.T) {
	cfg := snapshotConfig{Version: 1, Machine: MachineQ35, Accel: backend.AccelTCG, CPU: "max,-la57", MemoryMiB: 256, CPUs: 1,
		HasDisk: true, Kind: "full", MemoryFormat: MemoryRaw, IgnoreShared: true}
	f := newPlanFixture(t, backend.SnapshotFull, MemoryRaw, cfg)
	f.req.Resume = true
	p, err := planBackend(t).PlanRestore(f.req)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(p.Args, " ")
	mem := filepath.Join(f.snap, MemoryFile)
	disk := filepath.Join(f.req.Spec.Dir, DiskFile)
	for _, want := range []string{
		"-machine q35,memory-backend=mem0", "-accel tcg", "-cpu max,-la57", "-m 256M", "-smp 1",
		"mem-path=" + mem + ",share=off,readonly=on,rom=off",
		"-blockdev driver=qcow2,node-name=disk0,file.driver=file,file.filename=" + disk,
		"-incoming defer", "-S", "-no-reboot",
		"path=" + filepath.Join(f.req.Spec.RunDir, "qmp.sock"),
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q\n%s", want, joined)
		}
	}
	for _, no := range []string{"-kernel", "-initrd", "-append"} {
		if slices.Contains(p.Args, no) {
			t.Errorf("argv has %s: a restore loads a booted guest", no)
		}
	}
	if p.Overlay != (Overlay{Path: disk, Backing: filepath.Join(f.snap, DiskFile)}) {
		t.Errorf("overlay %+v", p.Overlay)
	}
	if p.Spec.Disk != disk || p.Spec.DiskFormat != "qcow2" || p.MemoryFile != mem || p.MemoryFormat != MemoryRaw {
		t.Errorf("spec disk %q %q, memory %q %q", p.Spec.Disk, p.Spec.DiskFormat, p.MemoryFile, p.MemoryFormat)
	}
	if p.QMPSocket != filepath.Join(f.req.Spec.RunDir, "qmp.sock") || p.AgentSocket != filepath.Join(f.req.Spec.RunDir, "agent.sock") {
		t.Errorf("sockets %q %q", p.QMPSocket, p.AgentSocket)
	}
	if got := qmpNames(p); !slices.Equal(got, []string{"set capabilities=migrate-set-capabilities", "load state=migrate-incoming", "resume=cont"}) {
		t.Fatalf("QMP sequence %q", got)
	}
	if caps := capsOf(t, p.QMP[0]); !caps["x-ignore-shared"] || caps["mapped-ram"] || len(caps) != 2 {
		t.Errorf("capabilities %v: raw memory skips the (mapped) RAM", caps)
	}
	in := p.QMP[1]
	state := filepath.Join(f.snap, StateFile)
	if in.InputFile != state || p.StateFile != state || !in.AwaitMigration || in.Arguments["exit-on-error"] != false {
		t.Errorf("migrate-incoming %+v", in)
	}
	if got := in.withInput("/dev/fdset/3")["channels"]; !strings.Contains(mustJSON(t, got), `"filename":"/dev/fdset/3"`) {
		t.Errorf("channel with the passed descriptor: %s", mustJSON(t, got))
	}
	if !strings.Contains(mustJSON(t, in.Arguments), `"filename":"`+state+`"`) {
		t.Errorf("the plan's channel does not name the state file: %s", mustJSON(t, in.Arguments))
	}
	if _, err := os.Stat(f.req.Spec.Dir); !os.IsNotExist(err) {
		t.Errorf("planning created the VM dir (%v)", err)
	}
}

// A stream snapshot (a restored VM's) loads RAM from the stream into a
// fresh shared file; capabilities come from qemu.json; no resume, no cont.
func TestPlanRestoreStreamPaused(t *testing.T) {
	cfg := snapshotConfig{Version: 1, Machine: MachineMicrovm, Accel: backend.AccelKVM, CPU: "host", MemoryMiB: 128, CPUs: 2,
		HasDisk: true, Kind: "full", MemoryFormat: MemoryStream, MappedRAM: true}
	f := newPlanFixture(t, backend.SnapshotFull, MemoryStream, cfg)
	b := planBackend(t)
	p, err := b.PlanRestore(f.req)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(p.Args, " ")
	ram, _ := b.memoryFile(f.req.Spec)
	for _, want := range []string{"-machine microvm", "-cpu max", "mem-path=" + ram + ",share=on", "-incoming defer", "-S"} {
		if !strings.Contains(joined, want) {
			t.Errorf("argv lacks %q\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "readonly=on") {
		t.Error("stream restore maps a read-only image")
	}
	if got := qmpNames(p); !slices.Equal(got, []string{"set capabilities=migrate-set-capabilities", "load state=migrate-incoming"}) {
		t.Fatalf("QMP sequence %q", got)
	}
	if caps := capsOf(t, p.QMP[0]); caps["x-ignore-shared"] || !caps["mapped-ram"] {
		t.Errorf("capabilities %v, want those recorded in qemu.json", caps)
	}
}

// A disk snapshot cold-boots: kernel, no migration, paused unless Resume.
func TestPlanRestoreDiskColdBoots(t *testing.T) {
	cfg := snapshotConfig{Version: 1, Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max", MemoryMiB: 64, CPUs: 1, HasDisk: true, Kind: "disk"}
	f := newPlanFixture(t, backend.SnapshotDisk, "", cfg)
	f.req.Spec.MemoryMiB = 96 // a disk snapshot may boot with other resources
	for _, resume := range []bool{false, true} {
		f.req.Resume = resume
		p, err := planBackend(t).PlanRestore(f.req)
		if err != nil {
			t.Fatal(err)
		}
		if len(p.QMP) != 0 || p.StateFile != "" {
			t.Errorf("disk restore has QMP %q, state %q", qmpNames(p), p.StateFile)
		}
		if got := argsAfter(p.Args, "-kernel"); !slices.Equal(got, []string{"/img/bzImage"}) {
			t.Errorf("-kernel %q", got)
		}
		if slices.Contains(p.Args, "-incoming") || slices.Contains(p.Args, "-S") == resume || !slices.Contains(p.Args, "-m") {
			t.Errorf("resume %v: argv %q", resume, p.Args)
		}
		if p.Overlay.Path == "" {
			t.Error("no overlay over the snapshot's disk")
		}
	}
}

// Every mismatch between the snapshot and the spec is refused by the plan,
// before anything exists, with an error naming it.
func TestPlanRestoreRefuses(t *testing.T) {
	cfg := snapshotConfig{Version: 1, Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max", MemoryMiB: 64, CPUs: 1,
		HasDisk: true, Kind: "full", MemoryFormat: MemoryRaw, IgnoreShared: true}
	cases := []struct {
		name   string
		change func(f *planFixture)
		want   string
	}{
		{"kind", func(f *planFixture) { f.req.Kind = "memory" }, "restore kind"},
		{"memory size", func(f *planFixture) { f.req.Spec.MemoryMiB = 128 }, "memory image is 64 MiB"},
		{"cpus", func(f *planFixture) { f.req.Spec.CPUs = 2 }, "cpus 1"},
		{"network", func(f *planFixture) { f.req.Spec.Network = true }, "network false"},
		{"format", func(f *planFixture) { f.req.Result.MemoryFormat = "zstd" }, `unknown memory format "zstd"`},
		{"state file gone", func(f *planFixture) { os.Remove(filepath.Join(f.snap, StateFile)) }, "state file missing"},
		{"no state artifact", func(f *planFixture) { f.req.Result.Artifacts = dropRole(f.req.Result.Artifacts, "state") }, "no state artifact"},
		{"no memory artifact", func(f *planFixture) { f.req.Result.Artifacts = dropRole(f.req.Result.Artifacts, "memory") }, "no memory artifact"},
		{"no disk artifact", func(f *planFixture) { f.req.Result.Artifacts = dropRole(f.req.Result.Artifacts, "disk") }, "no disk artifact"},
		{"bad config", func(f *planFixture) { os.WriteFile(filepath.Join(f.snap, ConfigFile), []byte("{"), 0o600) }, ConfigFile},
		{"hostile cpu model", func(f *planFixture) {
			c := cfg
			c.CPU = "max,x=y"
			b, _ := json.Marshal(c)
			os.WriteFile(filepath.Join(f.snap, ConfigFile), b, 0o600)
		}, "cpu model"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newPlanFixture(t, backend.SnapshotFull, MemoryRaw, cfg)
			c.change(&f)
			_, err := planBackend(t).PlanRestore(f.req)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error with %q", err, c.want)
			}
			if _, err := os.Stat(f.req.Spec.Dir); !os.IsNotExist(err) {
				t.Errorf("a refused plan created the VM dir (%v)", err)
			}
		})
	}
}

func dropRole(arts []backend.Artifact, role string) []backend.Artifact {
	return slices.DeleteFunc(slices.Clone(arts), func(a backend.Artifact) bool { return a.Role == role })
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A restore whose QEMU cannot start is rolled back: the step that failed is
// named, the cause's sentinel survives, and the overlay the "create disk"
// step made is removed again.
func TestRestoreRollsBackOverlay(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img is not installed: run scripts/setup")
	}
	cfg := snapshotConfig{Version: 1, Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max", MemoryMiB: 64, CPUs: 1,
		HasDisk: true, Kind: "full", MemoryFormat: MemoryRaw, IgnoreShared: true}
	f := newPlanFixture(t, backend.SnapshotFull, MemoryRaw, cfg)
	snapDisk := filepath.Join(f.snap, DiskFile)
	os.Remove(snapDisk)
	b := New(Options{QEMUPath: "/nonexistent/qemu-system-x86_64", MemoryDir: filepath.Join(f.root, "shm")})
	if err := b.qemuImg(context.Background(), "create", "-q", "-f", "qcow2", snapDisk, "1M"); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(f.root, "bzImage")
	os.WriteFile(kernel, []byte("k"), 0o600)
	f.req.Spec.Kernel, f.req.Spec.Initrd = kernel, ""
	_, err := b.Restore(context.Background(), f.req)
	if !errors.Is(err, backend.ErrVMMNotFound) || !strings.Contains(err.Error(), "start vmm") {
		t.Fatalf("got %v, want ErrVMMNotFound from the start vmm step", err)
	}
	var se *steps.Error
	if !errors.As(err, &se) || se.Step != "start vmm" || se.Rollback != nil {
		t.Fatalf("step error %+v", se)
	}
	if _, err := os.Stat(filepath.Join(f.req.Spec.Dir, DiskFile)); !os.IsNotExist(err) {
		t.Errorf("the overlay survived the failed restore (%v)", err)
	}
	if _, err := os.Stat(snapDisk); err != nil {
		t.Errorf("the snapshot's disk: %v", err)
	}
}

// A real QEMU that starts but cannot load the snapshot's state (a garbage
// migration stream) is rolled back: the error names the "load state" step
// and carries QEMU's log, QEMU is stopped, its sockets and the overlay are
// gone, and the snapshot's memory image is untouched. No guest boots.
func TestRestoreFailedLoadRollsBack(t *testing.T) {
	testutil.RequireQEMU(t)
	cfg := snapshotConfig{Version: 1, Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max", MemoryMiB: 64, CPUs: 1,
		HasDisk: true, Kind: "full", MemoryFormat: MemoryRaw, IgnoreShared: true}
	f := newPlanFixture(t, backend.SnapshotFull, MemoryRaw, cfg)
	ctx := context.Background()
	b := New(Options{MemoryDir: filepath.Join(f.root, "shm"), Logger: testLogger()})
	snapDisk := filepath.Join(f.snap, DiskFile)
	os.Remove(snapDisk)
	if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", snapDisk, "1M"); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(f.snap, StateFile), []byte("not a migration stream\n"), 0o600)
	kernel := filepath.Join(f.root, "bzImage")
	os.WriteFile(kernel, []byte("k"), 0o600)
	f.req.Spec.Kernel, f.req.Spec.Initrd = kernel, ""
	f.req.Spec.RunDir = filepath.Join(testutil.ShortDir(t), "r")
	f.req.Resume = true
	var launched backend.Machine
	t.Cleanup(func() { // should the rollback have failed to stop it
		if processAlive(launched) {
			syscall.Kill(launched.PID, syscall.SIGKILL)
		}
	})
	_, err := b.restore(ctx, f.req, helperOpts{launched: func(m backend.Machine) { launched = m }})
	var se *steps.Error
	if !errors.As(err, &se) || se.Step != "load state" || se.Rollback != nil {
		t.Fatalf("got %v, want a failed load state step, rolled back cleanly", err)
	}
	var ve *backend.VMMError
	if !errors.As(err, &ve) || ve.Log == "" {
		t.Errorf("no QEMU log in the error: %v", err)
	}
	t.Logf("error: %v", err)
	if launched.PID <= 0 {
		t.Fatal("QEMU never started: the test did not reach the step under test")
	}
	if processAlive(launched) || findQEMU(f.req.Spec.RunDir) != 0 {
		t.Error("QEMU still runs after the rollback")
	}
	for _, p := range []string{qmpSocket(f.req.Spec.RunDir), agentSocket(f.req.Spec.RunDir), filepath.Join(f.req.Spec.Dir, DiskFile)} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived the rollback (%v)", p, err)
		}
	}
	if st, err := os.Stat(filepath.Join(f.snap, MemoryFile)); err != nil || st.Size() != 64<<20 {
		t.Errorf("the snapshot's memory image: %v", err)
	}
}
