package testutil

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/consolelog"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/procfs"
)

// Timeouts for VM tests under TCG on a small, possibly busy host.
const (
	BootTimeout = 90 * time.Second // VMM start to agent answering
	OpTimeout   = 60 * time.Second // one backend operation
)

// ImageDir is the image cache the tests use: $SMOLVM_IMAGE_DIR or the
// default cache (~/.cache/smolvm/images).
func ImageDir() string { return image.DefaultDir() }

// Image returns the built image name ("busybox", "debian"), failing the
// test when it is missing.
func Image(t testing.TB, name string) image.Image {
	t.Helper()
	img, err := image.Open(ImageDir(), name)
	if err != nil {
		t.Fatalf("guest image %q unavailable: %v\nrun scripts/setup (or: smolvm image build %s)", name, err, name)
	}
	return img
}

// RequireQEMU fails the test when qemu-system-x86_64 or qemu-img is missing.
func RequireQEMU(t testing.TB) {
	t.Helper()
	for _, b := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Fatalf("%s not found: run scripts/setup", b)
		}
	}
}

// ShortDir creates a fresh directory with a short path under /tmp (unix
// socket paths must stay under 108 bytes; t.TempDir() paths are long) and
// removes it when the test ends.
func ShortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "smv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// SpecOptions adjust Spec.
type SpecOptions struct {
	MemoryMiB    int  // default 256
	CPUs         int  // default 1
	Network      bool // user networking (smol.net=1 in the guest)
	PortForwards []backend.PortForward
	NoDisk       bool          // initramfs only: no root disk
	Accel        backend.Accel // default auto
	KernelArgs   string        // appended after the defaults
}

// Spec returns a spec for img under a fresh short directory: Dir and RunDir
// inside it, Disk = Dir/disk.qcow2 over img.Rootfs, quiet kernel, root on
// /dev/vda. Call Backend.Prepare before Start.
func Spec(t testing.TB, img image.Image, id string, o SpecOptions) backend.Spec {
	t.Helper()
	root := ShortDir(t)
	return SpecIn(root, img, id, o)
}

// SpecIn is Spec with Dir and RunDir under root (root/<id>, root/<id>.r),
// both created.
func SpecIn(root string, img image.Image, id string, o SpecOptions) backend.Spec {
	s := BaseSpec(img, o)
	s.ID = id
	s.Dir = filepath.Join(root, id)
	s.RunDir = filepath.Join(root, id+".r")
	if s.BaseDisk != "" {
		s.Disk = filepath.Join(s.Dir, "disk.qcow2")
	}
	os.MkdirAll(s.Dir, 0o700)
	os.MkdirAll(s.RunDir, 0o700)
	return s
}

// BaseSpec is the image part of a spec (kernel, initrd, base disk,
// resources, kernel arguments) without ID, directories or Disk: what a
// backendtest.Factory returns.
func BaseSpec(img image.Image, o SpecOptions) backend.Spec {
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 256
	}
	if o.CPUs == 0 {
		o.CPUs = 1
	}
	if o.Accel == "" {
		o.Accel = backend.AccelAuto
	}
	s := backend.Spec{
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		MemoryMiB:    o.MemoryMiB,
		CPUs:         o.CPUs,
		Accel:        o.Accel,
		Network:      o.Network,
		PortForwards: o.PortForwards,
	}
	args := []string{img.KernelArgs, "quiet"}
	if !o.NoDisk {
		s.BaseDisk = img.Rootfs
		s.DiskFormat = "qcow2"
		args = append(args, "smol.root=/dev/vda")
	}
	if o.Network {
		args = append(args, "smol.net=1")
	}
	args = append(args, o.KernelArgs)
	s.KernelArgs = strings.Join(strings.Fields(strings.Join(args, " ")), " ")
	return s
}

// Boot prepares the disk, starts the VM and registers a cleanup that stops
// it (and kills it if Stop fails). The returned machine is also tracked by
// the watchdog.
func Boot(t testing.TB, b backend.Backend, spec backend.Spec) backend.Machine {
	if spec.Network {
		if err := EnsureNetHelper(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), OpTimeout)
	defer cancel()
	if spec.BaseDisk != "" {
		if err := b.Prepare(ctx, spec); err != nil {
			t.Fatalf("prepare %s: %v", spec.ID, err)
		}
	}
	m, err := b.Start(ctx, spec)
	if err != nil {
		t.Fatalf("start %s: %v", spec.ID, err)
	}
	StopOnCleanup(t, b, m)
	return m
}

// StopOnCleanup tracks m (watchdog) and stops it when the test ends; a VMM
// that survives Stop is killed.
func StopOnCleanup(t testing.TB, b backend.Backend, m backend.Machine) {
	t.Helper()
	Track(m)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := b.Stop(ctx, m); err != nil {
			t.Logf("stop %s: %v", m.ID, err)
		}
		if KillVMM(m) {
			t.Errorf("VMM of %s (pid %d) survived Stop; killed", m.ID, m.PID)
		}
		Untrack(m)
	})
}

// Agent connects to the VM's agent, waiting up to BootTimeout, and closes
// the client when the test ends.
func Agent(t testing.TB, b backend.Backend, m backend.Machine) *agentclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), BootTimeout)
	defer cancel()
	c, err := agentclient.Connect(ctx, func(ctx context.Context) (net.Conn, error) { return b.DialAgent(ctx, m) })
	if err != nil {
		t.Fatalf("agent of %s: %v\n--- console ---\n%s", m.ID, err, ConsoleTail(b, m, 3000))
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Run executes a shell command in the guest and returns its stdout; it
// fails the test on a transport error or a non-zero exit.
func Run(t testing.TB, c *agentclient.Client, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), OpTimeout)
	defer cancel()
	var out, errb strings.Builder
	res, err := c.Exec(ctx, agentproto.ExecRequest{Shell: script}, &out, &errb)
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exec %q: exit %d (%s)\nstdout: %s\nstderr: %s", script, res.ExitCode, res.Error, out.String(), errb.String())
	}
	return out.String()
}

// ConsoleTail returns the last n bytes of the VM's serial console log
// (Dir/console.log), first draining the VMM's console buffer into it when
// the backend keeps one (QEMU's ring buffer) and the VM still runs.
func ConsoleTail(b backend.Backend, m backend.Machine, n int) string {
	log := filepath.Join(m.Dir, "console.log")
	if d, ok := b.(backend.ConsoleDrainer); ok {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d.DrainConsole(ctx, m)
		cancel()
	}
	b2, err := consolelog.Tail(log, int64(n))
	if err != nil {
		return "(no console log: " + err.Error() + ")"
	}
	return string(b2)
}

// ProcessesFor lists live processes whose command line mentions dir (a
// VM's RunDir): what must be gone after Stop or a failed Start.
func ProcessesFor(dir string) []int {
	var pids []int
	for _, pid := range procfs.Others() {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil || len(b) == 0 {
			continue
		}
		if strings.Contains(string(b), dir+"/") || strings.Contains(string(b), dir+"\x00") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KillVMM SIGKILLs m's VMM if it is still alive (checked against the
// RunDir in its command line) and reports whether it had to.
func KillVMM(m backend.Machine) bool {
	if m.PID <= 0 || m.RunDir == "" || !pidMentions(m.PID, m.RunDir) {
		return false
	}
	syscall.Kill(m.PID, syscall.SIGKILL)
	for range 200 {
		if !pidMentions(m.PID, m.RunDir) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

func pidMentions(pid int, dir string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && strings.Contains(string(b), dir)
}

// --- watchdog: kills tracked VMMs if the test binary dies ---

var wd struct {
	sync.Mutex
	file    string
	started bool
	tracked map[int]backend.Machine
}

// Track registers m's VMM with the watchdog, a small detached shell that
// SIGKILLs every tracked VMM once this test process is gone.
func Track(m backend.Machine) {
	if m.PID <= 0 || m.RunDir == "" {
		return
	}
	wd.Lock()
	defer wd.Unlock()
	if !wd.started {
		wd.started = true
		if err := startWatchdog(); err != nil {
			fmt.Fprintf(os.Stderr, "testutil: watchdog not started: %v\n", err)
		}
	}
	if wd.tracked == nil {
		wd.tracked = map[int]backend.Machine{}
	}
	wd.tracked[m.PID] = m
	writeTrackedLocked()
}

// Untrack removes m from the watchdog's list.
func Untrack(m backend.Machine) {
	wd.Lock()
	defer wd.Unlock()
	delete(wd.tracked, m.PID)
	writeTrackedLocked()
}

func writeTrackedLocked() {
	if wd.file == "" {
		return
	}
	var sb strings.Builder
	for pid, m := range wd.tracked {
		mem := "-"
		if m.MemoryShared && m.MemoryFile != "" {
			mem = m.MemoryFile
		}
		fmt.Fprintf(&sb, "%d\t%s\t%s\n", pid, m.RunDir, mem)
	}
	tmp := wd.file + ".tmp"
	if os.WriteFile(tmp, []byte(sb.String()), 0o600) == nil {
		os.Rename(tmp, wd.file)
	}
}

// The watchdog polls our pid; when we are gone it kills each tracked pid
// whose cmdline still names its RunDir (guards against pid reuse) and
// removes the VM's shared RAM file.
const watchdogScript = `
parent=$1; list=$2
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
if [ -f "$list" ]; then
  tab=$(printf '\t')
  while IFS="$tab" read -r pid dir mem; do
    [ -n "$pid" ] || continue
    if tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | grep -qF -- "$dir"; then kill -9 "$pid" 2>/dev/null; fi
    case "$mem" in /dev/shm/smolvm-*/*) rm -f "$mem"; rmdir "${mem%/*}" 2>/dev/null;; esac
  done < "$list"
fi
rm -f "$list" "$list.tmp"
`

func startWatchdog() error {
	f, err := os.CreateTemp("", "smolvm-test-vmms-*")
	if err != nil {
		return err
	}
	f.Close()
	wd.file = f.Name()
	cmd := exec.Command("/bin/sh", "-c", watchdogScript, "watchdog", strconv.Itoa(os.Getpid()), wd.file)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait() // never returns while we live; reaps it if it dies early
	return nil
}
