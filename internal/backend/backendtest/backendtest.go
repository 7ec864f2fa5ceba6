package backendtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// Factory returns the backend under test and a base spec: Kernel, Initrd,
// BaseDisk, DiskFormat, MemoryMiB, CPUs, Accel and KernelArgs (including
// the root device argument when there is a disk). Run fills in ID, Dir,
// RunDir and Disk for every VM, and Network (+ "smol.net=1") when the
// backend declares UserNetworking.
type Factory func(t *testing.T) (backend.Backend, backend.Spec)

type suite struct {
	b    backend.Backend
	caps backend.Capabilities
	base backend.Spec
	root string
	n    int
	opts Options
	// memDir and diskMarker are the guest paths the snapshot tests keep
	// their state in: /run/smt (a tmpfs of our own: memory state) and
	// /var/smt-disk-marker (on the root disk).
	memDir, diskMarker string
}

// Options adapt the suite to a backend.
type Options struct {
	// ModelGuest says the guest is a model, not a VM (fakebackend): its
	// commands run on the host with the machine's root directory as their
	// working directory, "run" in it being the machine's memory. The suite
	// then keeps its guest state at paths relative to that directory
	// (run/smt, var/smt-disk-marker), mounts nothing, and does not check
	// that a background process survives a snapshot (a model has no
	// processes that do; every other check runs).
	ModelGuest bool
}

// Run runs the conformance suite.
func Run(t *testing.T, f Factory) { RunWith(t, f, Options{}) }

// RunWith runs the conformance suite with options.
func RunWith(t *testing.T, f Factory, o Options) {
	b, base := f(t)
	s := &suite{b: b, caps: b.Capabilities(), base: base, root: testutil.ShortDir(t), opts: o,
		memDir: "/run/smt", diskMarker: "/var/smt-disk-marker"}
	if o.ModelGuest {
		s.memDir, s.diskMarker = "run/smt", "var/smt-disk-marker"
	}
	t.Logf("backend %s, capabilities %+v", b.Name(), s.caps)

	t.Run("StartFailureLeavesNothing", s.testStartFailure)

	specA := s.spec("a", s.caps.UserNetworking)
	mA := testutil.Boot(t, b, specA)
	t0 := time.Now()
	cA := testutil.Agent(t, b, mA)
	t.Logf("vm a: agent up %v after start", time.Since(t0).Round(time.Millisecond))

	t.Run("AgentReachable", func(t *testing.T) {
		out := testutil.Run(t, cA, "echo hello-$((40+2))")
		if strings.TrimSpace(out) != "hello-42" {
			t.Fatalf("echo: %q", out)
		}
		if _, err := cA.Ping(ctxT(t, 10*time.Second)); err != nil {
			t.Fatalf("ping: %v", err)
		}
	})
	t.Run("Status", func(t *testing.T) {
		s.wantStatus(t, mA, backend.StatusRunning)
	})
	t.Run("PauseResume", func(t *testing.T) { s.testPauseResume(t, mA, cA) })
	t.Run("ExposePort", func(t *testing.T) { s.testExposePort(t, mA, cA) })
	t.Run("Snapshots", func(t *testing.T) { s.testSnapshots(t, mA, cA) })
	t.Run("StopLeavesNothing", func(t *testing.T) { s.testStop(t, mA) })
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// spec derives a VM spec from the base spec.
func (s *suite) spec(id string, network bool) backend.Spec {
	sp := s.base
	sp.ID = id
	sp.Dir = filepath.Join(s.root, id)
	sp.RunDir = filepath.Join(s.root, id+".r")
	sp.Disk = ""
	if sp.BaseDisk != "" {
		ext := sp.DiskFormat
		if ext == "" {
			ext = "qcow2"
		}
		sp.Disk = filepath.Join(sp.Dir, "disk."+ext)
	}
	sp.Network = network
	sp.PortForwards = nil
	if network && !strings.Contains(sp.KernelArgs, "smol.net=") {
		sp.KernelArgs = strings.TrimSpace(sp.KernelArgs + " smol.net=1")
	}
	os.MkdirAll(sp.Dir, 0o700)
	os.MkdirAll(sp.RunDir, 0o700)
	return sp
}

// derived is a spec for a VM restored from snapshots of src.
func (s *suite) derived(src backend.Spec, id string) backend.Spec {
	sp := src
	sp.ID = id
	sp.Dir = filepath.Join(s.root, id)
	sp.RunDir = filepath.Join(s.root, id+".r")
	if sp.Disk != "" {
		sp.Disk = filepath.Join(sp.Dir, filepath.Base(src.Disk))
	}
	os.MkdirAll(sp.Dir, 0o700)
	os.MkdirAll(sp.RunDir, 0o700)
	return sp
}

func (s *suite) wantStatus(t *testing.T, m backend.Machine, want backend.Status) {
	t.Helper()
	st, err := s.b.Status(ctxT(t, testutil.OpTimeout), m)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	if st != want {
		t.Fatalf("status = %s, want %s", st, want)
	}
}

// assertGone checks that nothing of m is left: no process naming its
// RunDir, no sockets, Status stopped.
func (s *suite) assertGone(t *testing.T, m backend.Machine) {
	t.Helper()
	if pids := testutil.ProcessesFor(m.RunDir); len(pids) > 0 {
		t.Errorf("processes still running for %s: %v", m.RunDir, pids)
	}
	ents, _ := os.ReadDir(m.RunDir)
	for _, e := range ents {
		if e.Type()&os.ModeSocket != 0 || strings.HasSuffix(e.Name(), ".sock") {
			t.Errorf("socket left behind: %s", filepath.Join(m.RunDir, e.Name()))
		}
	}
	if m.PID > 0 {
		st, err := s.b.Status(ctxT(t, testutil.OpTimeout), m)
		if err != nil || st != backend.StatusStopped {
			t.Errorf("status after stop = %s, %v; want stopped", st, err)
		}
	}
}

func (s *suite) testStartFailure(t *testing.T) {
	// 1. A kernel file that does not exist.
	sp := s.spec(s.nextID("fail"), false)
	sp.Kernel = filepath.Join(sp.Dir, "no-such-kernel")
	sp.BaseDisk, sp.Disk = "", ""
	if m, err := s.b.Start(ctxT(t, testutil.OpTimeout), sp); err == nil {
		testutil.StopOnCleanup(t, s.b, m)
		t.Fatal("start with a missing kernel succeeded")
	} else {
		t.Logf("missing kernel: %v", firstLine(err))
	}
	s.assertGone(t, backend.Machine{Spec: sp})

	// 2. A kernel the VMM accepts as a file but cannot load: the VMM
	// starts and fails (or exits) during start.
	sp = s.spec(s.nextID("fail"), false)
	bad := filepath.Join(sp.Dir, "garbage-kernel")
	junk := make([]byte, 64<<10)
	rand.Read(junk)
	if err := os.WriteFile(bad, junk, 0o644); err != nil {
		t.Fatal(err)
	}
	sp.Kernel = bad
	sp.BaseDisk, sp.Disk = "", ""
	m, err := s.b.Start(ctxT(t, testutil.OpTimeout), sp)
	if err == nil {
		// Some VMMs only notice once the guest runs; then Stop must clean up.
		testutil.StopOnCleanup(t, s.b, m)
		t.Logf("garbage kernel accepted at start (pid %d); stopping", m.PID)
		if err := s.b.Stop(ctxT(t, testutil.OpTimeout), m); err != nil {
			t.Fatalf("stop: %v", err)
		}
		s.assertGone(t, m)
		return
	}
	t.Logf("garbage kernel: %v", firstLine(err))
	var ve *backend.VMMError
	if !errors.As(err, &ve) {
		t.Errorf("want a *backend.VMMError, got %T", err)
	}
	s.assertGone(t, backend.Machine{Spec: sp})
}

func (s *suite) nextID(prefix string) string {
	s.n++
	return prefix + strconv.Itoa(s.n)
}

func firstLine(err error) string {
	l, _, _ := strings.Cut(err.Error(), "\n")
	return l
}

func (s *suite) testPauseResume(t *testing.T, m backend.Machine, c *agentclient.Client) {
	if !s.caps.Pause {
		t.Skip("backend does not declare capability Pause")
	}
	if err := s.b.Pause(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Fatalf("pause: %v", err)
	}
	s.wantStatus(t, m, backend.StatusPaused)
	if _, err := c.Ping(ctxT(t, 700*time.Millisecond)); err == nil {
		t.Error("agent answered while the VM was paused")
	}
	if err := s.b.Pause(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Errorf("pause of a paused VM: %v", err)
	}
	if err := s.b.Resume(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Fatalf("resume: %v", err)
	}
	s.wantStatus(t, m, backend.StatusRunning)
	if _, err := c.Ping(ctxT(t, 20*time.Second)); err != nil {
		t.Fatalf("ping after resume: %v", err)
	}
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func (s *suite) testExposePort(t *testing.T, m backend.Machine, c *agentclient.Client) {
	if !s.caps.UserNetworking {
		t.Skip("backend does not declare capability UserNetworking")
	}
	if !s.caps.PortForward {
		t.Skip("backend does not declare capability PortForward")
	}
	token := randToken()
	// A tiny HTTP server in the guest: busybox httpd, else python3.
	testutil.Run(t, c, fmt.Sprintf(`mkdir -p /run/www && echo %s > /run/www/index.html
if command -v busybox >/dev/null && busybox --list 2>/dev/null | grep -qx httpd; then
  busybox httpd -p 8080 -h /run/www
else
  cd /run/www && python3 -m http.server 8080 </dev/null >/dev/null 2>&1 &
fi`, token))
	port := freePort(t)
	if err := s.b.ExposePort(ctxT(t, testutil.OpTimeout), m, backend.PortForward{HostPort: port, GuestPort: 8080}); err != nil {
		t.Fatalf("expose port: %v", err)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/index.html", port)
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.TrimSpace(string(body)) == token {
				break
			}
			err = fmt.Errorf("status %s, body %q", resp.Status, body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s through the forward: %v", url, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A second forward to the same host port must fail.
	if err := s.b.ExposePort(ctxT(t, testutil.OpTimeout), m, backend.PortForward{HostPort: port, GuestPort: 8081}); err == nil {
		t.Error("exposing an already forwarded host port succeeded")
	}
}

func randToken() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// setState writes token into guest memory (tmpfs) and, with a disk, onto
// the disk (synced), and makes sure the background counter runs. The
// counter is replaced by rename, so a reader never sees it truncated and
// empty (which made checkMemState fail with "bad number" once).
func (s *suite) setState(t *testing.T, c *agentclient.Client, token string) {
	t.Helper()
	if s.opts.ModelGuest {
		script := fmt.Sprintf("mkdir -p %[1]s && echo %[2]s > %[1]s/marker", s.memDir, token)
		if s.base.BaseDisk != "" {
			script += fmt.Sprintf("\nmkdir -p var && echo %s > %s && sync", token, s.diskMarker)
		}
		testutil.Run(t, c, script)
		return
	}
	script := fmt.Sprintf(`mkdir -p %[1]s && (grep -q ' %[1]s ' /proc/mounts || mount -t tmpfs smt %[1]s)
echo %[2]s > %[1]s/marker
if ! { [ -f %[1]s/pid ] && kill -0 "$(cat %[1]s/pid)" 2>/dev/null; }; then
  sh -c 'i=0; while :; do i=$((i+1)); echo $i > %[1]s/counter.tmp && mv %[1]s/counter.tmp %[1]s/counter; sleep 0.1; done' </dev/null >/dev/null 2>&1 &
  echo $! > %[1]s/pid
fi`, s.memDir, token)
	if s.base.BaseDisk != "" {
		script += fmt.Sprintf("\necho %s > %s && sync", token, s.diskMarker)
	}
	testutil.Run(t, c, script)
}

// checkMemState verifies the tmpfs marker and that the background process
// survived and still counts.
func (s *suite) checkMemState(t *testing.T, c *agentclient.Client, token string) {
	t.Helper()
	if s.opts.ModelGuest {
		if out := testutil.Run(t, c, "cat "+s.memDir+"/marker"); strings.TrimSpace(out) != token {
			t.Errorf("memory marker = %q, want %s", out, token)
		}
		return
	}
	out := testutil.Run(t, c, fmt.Sprintf(`cat %[1]s/marker; pid=$(cat %[1]s/pid); kill -0 $pid && echo alive
a=$(cat %[1]s/counter); sleep 0.5; b=$(cat %[1]s/counter); [ "$b" -gt "$a" ] && echo counting`, s.memDir))
	f := strings.Fields(out)
	if len(f) < 1 || f[0] != token {
		t.Errorf("memory marker = %q, want %s", out, token)
	}
	if !strings.Contains(out, "alive") || !strings.Contains(out, "counting") {
		t.Errorf("background process lost across restore: %q", out)
	}
}

func (s *suite) checkDiskState(t *testing.T, c *agentclient.Client, token string) {
	t.Helper()
	if s.base.BaseDisk == "" {
		return
	}
	out := testutil.Run(t, c, "cat "+s.diskMarker+" 2>/dev/null || echo none")
	if strings.TrimSpace(out) != token {
		t.Errorf("disk marker = %q, want %s", strings.TrimSpace(out), token)
	}
}

// hashDir returns sha256 of every regular file in dir.
func hashDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		io.Copy(h, f)
		f.Close()
		out[e.Name()] = hex.EncodeToString(h.Sum(nil))
	}
	return out
}

func sameHashes(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	for name, h := range before {
		if after[name] != h {
			t.Errorf("%s: snapshot file %s changed (%s -> %s)", what, name, h[:12], after[name])
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok {
			t.Errorf("%s: new file %s appeared in the snapshot dir", what, name)
		}
	}
}

type snap struct {
	kind backend.SnapshotKind
	dir  string
	res  backend.SnapshotResult
	spec backend.Spec // the snapshotted VM's spec
	hash map[string]string
}

func (s *suite) takeSnapshot(t *testing.T, m backend.Machine, kind backend.SnapshotKind) snap {
	t.Helper()
	dir := filepath.Join(s.root, s.nextID("snap-"+string(kind)+"-"))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	res, err := s.b.Snapshot(ctxT(t, 2*testutil.OpTimeout), m, kind, dir)
	if err != nil {
		t.Fatalf("snapshot %s: %v", kind, err)
	}
	el := time.Since(t0)
	var sizes []string
	for _, a := range res.Artifacts {
		st, err := os.Stat(filepath.Join(dir, a.Name))
		if err != nil {
			t.Fatalf("artifact %s (%s) missing: %v", a.Name, a.Role, err)
		}
		sizes = append(sizes, fmt.Sprintf("%s=%s", a.Role, humanSize(st.Size())))
	}
	t.Logf("snapshot %s of %s: %v, memory format %q, base %q, %s", kind, m.ID, el.Round(time.Millisecond), res.MemoryFormat, res.BaseImage, strings.Join(sizes, " "))
	st, err := s.b.Status(ctxT(t, testutil.OpTimeout), m)
	if err != nil || st != backend.StatusPaused {
		t.Errorf("status after snapshot = %s, %v; want paused", st, err)
	}
	switch kind {
	case backend.SnapshotDisk:
		if res.MemoryFormat != "" {
			t.Errorf("disk snapshot has memory format %q", res.MemoryFormat)
		}
	default:
		if res.MemoryFormat == "" {
			t.Errorf("%s snapshot has no memory format", kind)
		}
	}
	if kind == backend.SnapshotDiff && s.caps.DiffDisk && m.BaseDisk != "" && res.BaseImage == "" {
		t.Errorf("diff snapshot records no base image")
	}
	if kind == backend.SnapshotFull && res.BaseImage != "" {
		t.Errorf("full snapshot depends on base image %s", res.BaseImage)
	}
	return snap{kind: kind, dir: dir, res: res, spec: m.Spec, hash: hashDir(t, dir)}
}

// restore brings sn back as a new VM with id and connects to its agent.
func (s *suite) restore(t *testing.T, sn snap, id string) (backend.Machine, *agentclient.Client) {
	t.Helper()
	sp := s.derived(sn.spec, id)
	t0 := time.Now()
	m, err := s.b.Restore(ctxT(t, 2*testutil.OpTimeout), backend.RestoreRequest{
		Spec: sp, SnapshotDir: sn.dir, Kind: sn.kind, Result: sn.res, Resume: true,
	})
	if err != nil {
		t.Fatalf("restore %s: %v", sn.kind, err)
	}
	tRestore := time.Since(t0)
	testutil.StopOnCleanup(t, s.b, m)
	c := testutil.Agent(t, s.b, m)
	t.Logf("restore %s as %s: VMM ready %v, agent answering %v", sn.kind, id, tRestore.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	s.wantStatus(t, m, backend.StatusRunning)
	return m, c
}

func (s *suite) stopRestored(t *testing.T, m backend.Machine, c *agentclient.Client, sn snap) {
	t.Helper()
	c.Close()
	if err := s.b.Stop(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Fatalf("stop %s: %v", m.ID, err)
	}
	s.assertGone(t, m)
	sameHashes(t, "after restoring and stopping "+m.ID, sn.hash, hashDir(t, sn.dir))
}

func (s *suite) resume(t *testing.T, m backend.Machine, c *agentclient.Client) {
	t.Helper()
	if err := s.b.Resume(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Fatalf("resume after snapshot: %v", err)
	}
	if _, err := c.Ping(ctxT(t, 30*time.Second)); err != nil {
		t.Fatalf("source agent after snapshot: %v", err)
	}
}

// ensureRunning resumes the shared VM if an earlier failed subtest left it
// paused.
func (s *suite) ensureRunning(t *testing.T, m backend.Machine) {
	t.Helper()
	st, err := s.b.Status(ctxT(t, testutil.OpTimeout), m)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	switch st {
	case backend.StatusRunning:
	case backend.StatusPaused:
		if err := s.b.Resume(ctxT(t, testutil.OpTimeout), m); err != nil {
			t.Fatalf("resume: %v", err)
		}
	default:
		t.Fatalf("shared VM is %s", st)
	}
}

func (s *suite) testSnapshots(t *testing.T, mA backend.Machine, cA *agentclient.Client) {
	t.Run("Full", func(t *testing.T) {
		if !s.caps.MemorySnapshot {
			t.Skip("backend does not declare capability MemorySnapshot")
		}
		s.ensureRunning(t, mA)
		token := "full-" + randToken()
		s.setState(t, cA, token)
		sn := s.takeSnapshot(t, mA, backend.SnapshotFull)

		// Two VMs from the same snapshot at once, each independent.
		mB, cB := s.restore(t, sn, s.nextID("full"))
		s.checkMemState(t, cB, token)
		s.checkDiskState(t, cB, token)
		mB2, cB2 := s.restore(t, sn, s.nextID("clone"))
		s.checkMemState(t, cB2, token)
		testutil.Run(t, cB2, "echo clone > "+s.memDir+"/marker")
		if out := testutil.Run(t, cB, "cat "+s.memDir+"/marker"); strings.TrimSpace(out) != token {
			t.Errorf("clones share memory: marker in the first = %q", out)
		}
		s.stopRestored(t, mB2, cB2, sn)

		// A snapshot of a restored VM restores too (for QEMU: taken through
		// the migration stream and a helper VM, since the restored RAM is a
		// private mapping).
		token2 := "again-" + randToken()
		s.setState(t, cB, token2)
		sn2 := s.takeSnapshot(t, mB, backend.SnapshotFull)
		s.stopRestored(t, mB, cB, sn)
		mE, cE := s.restore(t, sn2, s.nextID("again"))
		s.checkMemState(t, cE, token2)
		s.checkDiskState(t, cE, token2)
		s.stopRestored(t, mE, cE, sn2)

		// The source keeps running after being snapshotted.
		s.resume(t, mA, cA)
		s.checkMemState(t, cA, token)
	})
	t.Run("Diff", func(t *testing.T) {
		if !s.caps.MemorySnapshot {
			t.Skip("backend does not declare capability MemorySnapshot")
		}
		s.ensureRunning(t, mA)
		token := "diff-" + randToken()
		s.setState(t, cA, token)
		sn := s.takeSnapshot(t, mA, backend.SnapshotDiff)
		if s.caps.DiffDisk && s.base.BaseDisk != "" {
			if base, _ := filepath.Abs(s.base.BaseDisk); sn.res.BaseImage != base {
				t.Errorf("diff base image = %q, want %q", sn.res.BaseImage, base)
			}
		}
		m, c := s.restore(t, sn, s.nextID("diff"))
		s.checkMemState(t, c, token)
		s.checkDiskState(t, c, token)
		s.stopRestored(t, m, c, sn)
		s.resume(t, mA, cA)
	})
	t.Run("Disk", func(t *testing.T) {
		if !s.caps.DiskSnapshot {
			t.Skip("backend does not declare capability DiskSnapshot")
		}
		if s.base.BaseDisk == "" {
			t.Skip("the base spec has no disk")
		}
		s.ensureRunning(t, mA)
		token := "disk-" + randToken()
		s.setState(t, cA, token)
		if err := cA.Sync(ctxT(t, testutil.OpTimeout)); err != nil {
			t.Fatalf("sync: %v", err)
		}
		sn := s.takeSnapshot(t, mA, backend.SnapshotDisk)
		m, c := s.restore(t, sn, s.nextID("disk"))
		s.checkDiskState(t, c, token)
		// A cold boot: no memory state.
		if out := testutil.Run(t, c, "cat "+s.memDir+"/marker 2>/dev/null || echo none"); strings.TrimSpace(out) != "none" {
			t.Errorf("disk snapshot restored memory state: %q", out)
		}
		s.stopRestored(t, m, c, sn)
		s.resume(t, mA, cA)
	})
}

func (s *suite) testStop(t *testing.T, m backend.Machine) {
	t0 := time.Now()
	// Given only the spec, as when the process that launched the VMM died
	// before recording the machine (killed create or restore): Stop must
	// still find the VMM and leave nothing.
	if err := s.b.Stop(ctxT(t, testutil.OpTimeout), backend.Machine{Spec: m.Spec, Backend: m.Backend}); err != nil {
		t.Fatalf("stop: %v", err)
	}
	t.Logf("stop took %v", time.Since(t0).Round(time.Millisecond))
	s.assertGone(t, m)
	if err := s.b.Stop(ctxT(t, testutil.OpTimeout), m); err != nil {
		t.Errorf("second stop: %v", err)
	}
	if c, err := s.b.DialAgent(ctxT(t, 2*time.Second), m); err == nil {
		c.Close()
		t.Error("DialAgent succeeded on a stopped VM")
	}
	if err := s.b.Pause(ctxT(t, testutil.OpTimeout), m); !errors.Is(err, backend.ErrNotRunning) {
		t.Errorf("pause of a stopped VM: %v, want ErrNotRunning", err)
	}
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}
