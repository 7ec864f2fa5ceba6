package smolvm_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/cli"
	"github.com/smolvm-go/smolvm/internal/remote"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/testutil/s3server"
)

// s3Env sets the store's credentials in this process's environment (the
// S3 client reads them there, as a user's would be). Only the remote tests
// read AWS_* variables, so a parallel test is not disturbed.
var s3EnvMu sync.Mutex

func s3Env(t *testing.T, s *s3server.Server) {
	s3EnvMu.Lock()
	defer s3EnvMu.Unlock()
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
}

// TestRemoteTwoHosts: two data dirs that share only a real S3 server
// (versitygw on 127.0.0.1) and the image cache. Host A boots a VM with a
// running process and a tmpfs file, takes a full snapshot and pushes it
// (a second push uploads nothing); A's data dir is then deleted entirely.
// Host B is smolvm CLI processes on another data dir, in their own network
// namespace (ip netns, when this machine allows it; else they share its
// network and the test says so) whose loopback has the store's address
// and port: a forwarder there reaches versitygw through a unix socket, so
// every server stays on loopback. On B a restore of the snapshot by id
// fails (not found, a fix naming pulling) until the remote is added, then
// auto-pulls from the default remote: the process and the file are back;
// 3 clones forked from it answer with their own hostnames. Then remote
// snapshots rebuilt from B's copy with a manifest naming ../x, a flipped
// byte, or a qcow2 disk whose header names /etc/passwd are each refused
// by a pull, which lists nothing and leaves nothing on disk; an
// interrupted pull resumes; and the CLI (in-process) adds the remote,
// lists it, pulls under a new id and pushes. One VM is booted (plus the
// restore and the clones of its snapshot).
func TestRemoteTwoHosts(t *testing.T) {
	if os.Getenv("SMOLVM_TEST_CHILD") == "s3-forwarder" {
		forwardS3() // host B's end of the path to the store, in its namespace
		return
	}
	t.Parallel()
	ctx := testCtx(t)
	s3 := s3server.Start(t, "smolvm-remote")
	s3Env(t, s3)
	url := "s3://" + s3.Bucket + "/fleet"

	// Host A.
	dirA, err := os.MkdirTemp(testRoot, "hostA")
	if err != nil {
		t.Fatal(err)
	}
	a, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dirA, ImageDir: testImageDir, RunDir: filepath.Join(testRoot, "run"), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	// A failure before host A's VM is deleted below must not leave its
	// QEMU running (boot only closes the handle): delete it through A's
	// manager, which the test closes only on its success path.
	aClosed := false
	t.Cleanup(func() {
		if !aClosed {
			if vm, err := a.Open(context.Background(), "traveller"); err == nil {
				vm.Delete(context.Background())
				vm.Close()
			}
			a.Close()
		}
	})
	if err := a.AddRemote(ctx, smolvm.Remote{Name: "shared", URL: url, Endpoint: s3.Endpoint}); err != nil {
		t.Fatal(err)
	}
	vm := boot(t, a, smolvm.Config{Name: "traveller", Image: "busybox", NoNetwork: true, MemoryMiB: 256})
	startWorkload(t, vm)
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "trip", Type: smolvm.SnapshotFull}); err != nil {
		t.Fatal(err)
	}
	var phases []string
	st, err := a.PushSnapshot(ctx, "trip", smolvm.PushOptions{Progress: func(p smolvm.TransferProgress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("push: %+v (progress phases %v)", st, phases)
	if st.Remote != "shared" || st.Chunks == 0 || st.Uploaded != st.Chunks || len(phases) == 0 {
		t.Fatalf("first push: %+v, progress %v", st, phases)
	}
	if st2, err := a.PushSnapshot(ctx, "trip", smolvm.PushOptions{}); err != nil || st2.Uploaded != 0 || st2.Chunks != st.Chunks {
		t.Fatalf("second push: %+v %v (want 0 chunks uploaded)", st2, err)
	}
	// The push read the disk image's unwritten extents (cached now, so data
	// to SEEK_DATA): the snapshot still verifies in full and exports (its
	// digests re-checked) afterwards, and again after the export read it.
	if err := a.VerifySnapshot(ctx, "trip"); err != nil {
		t.Fatalf("full verify after the push: %v", err)
	}
	if err := a.ExportSnapshot(ctx, "trip", io.Discard); err != nil {
		t.Fatalf("export after the push: %v", err)
	}
	if err := a.VerifySnapshot(ctx, "trip"); err != nil {
		t.Fatalf("full verify after the export: %v", err)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	a.Close()
	aClosed = true
	if err := os.RemoveAll(dirA); err != nil {
		t.Fatal(err)
	}

	// Host B: smolvm CLI processes on their own data dir, with only the
	// remote config and the store's credentials in their environment.
	dirB, err := os.MkdirTemp(testRoot, "hostB")
	if err != nil {
		t.Fatal(err)
	}
	inB := hostBNamespace(t, s3) // before cleanupAll: the VMs go before the namespace
	t.Cleanup(func() { cleanupAll(dirB) })
	hostB := func(args ...string) (string, error) {
		argv := append(append(inB, smolvmBinary(t), "--data-dir", dirB, "--image-dir", testImageDir), args...)
		c := exec.CommandContext(ctx, argv[0], argv[1:]...)
		c.Env = append(os.Environ(), s3.Env()...)
		var stderr bytes.Buffer
		c.Stderr = &stderr
		out, err := c.Output() // stdout: one JSON object with --json
		if err != nil || !strings.Contains(strings.Join(args, " "), "--json") {
			return string(out) + stderr.String(), err
		}
		return string(out), nil
	}
	if out, err := hostB("--json", "sandbox", "snapshot", "restore", "trip", "--resume"); err == nil ||
		!strings.Contains(out, `"snapshot_not_found"`) || !strings.Contains(out, "snapshot pull trip") {
		t.Fatalf("restore on B without a remote: %v %s (want snapshot_not_found with a fix that names pulling)", err, out)
	}
	if out, err := hostB("remote", "add", "shared", url, "--endpoint", s3.Endpoint); err != nil {
		t.Fatalf("remote add on B: %v %s", err, out)
	}
	if out, err := hostB("sandbox", "snapshot", "list", "--remote", "shared"); err != nil || !strings.Contains(out, "trip") || !strings.Contains(out, "traveller") {
		t.Fatalf("snapshot list --remote on B: %v %s", err, out)
	}
	if out, err := hostB("sandbox", "snapshot", "restore", "trip", "--resume"); err != nil { // auto-pull
		t.Fatalf("restore on B: %v %s", err, out)
	} else {
		t.Logf("host B: %s", out)
	}
	b, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dirB, ImageDir: testImageDir, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	restored, err := b.Open(ctx, "traveller")
	if err != nil {
		t.Fatal(err)
	}
	if tmpfs, proc, disk := checkWorkload(t, restored); !tmpfs || !proc || !disk {
		t.Errorf("restore on host B: tmpfs=%v process=%v disk=%v", tmpfs, proc, disk)
	}
	restored.Close()
	if err := b.VerifySnapshot(ctx, "trip"); err != nil {
		t.Fatal(err)
	}
	out, err := hostB("--json", "sandbox", "snapshot", "restore", "trip", "--clones", "3", "--resume")
	if err != nil {
		t.Fatalf("fork on B: %v %s", err, out)
	}
	var forked struct {
		Data []smolvm.Info `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &forked); err != nil || len(forked.Data) != 3 {
		t.Fatalf("fork on B: %v %s", err, out)
	}
	for _, i := range forked.Data {
		c, err := b.Open(ctx, i.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustOK(t, c, "hostname; cat /tmp/marker"); got != c.ID()+"\nin-memory" {
			t.Errorf("clone %s answers %q", c.ID(), got)
		}
		c.Close()
	}
	for _, id := range append([]string{"traveller"}, forked.Data[0].ID, forked.Data[1].ID, forked.Data[2].ID) {
		if out, err := hostB("sandbox", "delete", id); err != nil {
			t.Errorf("delete %s on B: %v %s", id, err, out)
		}
	}

	// Hostile remote snapshots, rebuilt from B's verified copy.
	info, err := b.GetSnapshot(ctx, "trip")
	if err != nil {
		t.Fatal(err)
	}
	t.Run("resume", func(t *testing.T) { resumedPull(t, s3, url) })
	t.Run("hostile", func(t *testing.T) { hostilePulls(t, s3, url, info.Dir) })
	t.Run("cli", func(t *testing.T) { remoteCLI(t, s3, url) })
}

// pushVariant pushes the snapshot in dir under id with its manifest and
// files changed by mod (which gets a private copy of the files).
// after, when set, changes the files once the manifest has their digests.
func pushVariant(t *testing.T, st remote.Store, id, dir string, mod func(m map[string]any, tmp string), after func(tmp string)) {
	t.Helper()
	ctx := testCtx(t)
	data, err := os.ReadFile(filepath.Join(dir, snapshot.ManifestName))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	var files []remote.File
	for _, a := range m["artifacts"].([]any) {
		name := a.(map[string]any)["name"].(string)
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tmp, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
		files = append(files, remote.File{Name: name, Path: filepath.Join(tmp, name)})
	}
	m["id"] = id
	mod(m, tmp)
	out, err := smolvm.PushedManifestFor(tmp, m)
	if err != nil {
		t.Fatal(err)
	}
	if after != nil {
		after(tmp)
	}
	if _, err := remote.Push(ctx, st, id, out, files, remote.PushOptions{}); err != nil {
		t.Fatal(err)
	}
}

func hostilePulls(t *testing.T, s3 *s3server.Server, url, dir string) {
	ctx := testCtx(t)
	st, err := remote.NewS3(ctx, remote.S3Config{URL: url, Endpoint: s3.Endpoint})
	if err != nil {
		t.Fatal(err)
	}
	pushVariant(t, st, "dotdot", dir, func(m map[string]any, _ string) {
		m["artifacts"].([]any)[0].(map[string]any)["name"] = "../x"
		m["result"].(map[string]any)["artifacts"].([]any)[0].(map[string]any)["name"] = "../x"
	}, nil)
	pushVariant(t, st, "flipped", dir, func(map[string]any, string) {}, func(tmp string) {
		f, err := os.OpenFile(filepath.Join(tmp, "state.bin"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var b [1]byte
		f.ReadAt(b[:], 100)
		b[0] ^= 1
		f.WriteAt(b[:], 100)
	})
	pushVariant(t, st, "backing", dir, func(m map[string]any, tmp string) {
		p := filepath.Join(tmp, "disk.qcow2")
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		const at, backing = 3072, "/etc/passwd"
		var hdr [12]byte
		binary.BigEndian.PutUint64(hdr[:8], at)
		binary.BigEndian.PutUint32(hdr[8:], uint32(len(backing)))
		f.WriteAt(hdr[:], 8)
		f.WriteAt([]byte(backing), at)
		f.Close()
	}, nil)
	cases := []struct {
		id     string
		want   error
		naming string
	}{
		{"dotdot", smolvm.ErrSnapshotCorrupt, "../x"},
		{"flipped", smolvm.ErrSnapshotCorrupt, "state.bin"},
		{"backing", smolvm.ErrSnapshotCorrupt, "/etc/passwd"},
		{"absent", smolvm.ErrSnapshotNotFound, "absent"},
	}
	for _, c := range cases {
		t.Run(c.id, func(t *testing.T) {
			m := newManager(t)
			if err := m.AddRemote(ctx, smolvm.Remote{Name: "shared", URL: url, Endpoint: s3.Endpoint}); err != nil {
				t.Fatal(err)
			}
			_, err := m.PullSnapshot(ctx, c.id, smolvm.PullOptions{})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.naming) {
				t.Fatalf("pull %s: %v; want %v naming %q", c.id, err, c.want, c.naming)
			}
			if l, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{}); len(l) != 0 {
				t.Errorf("listed after a refused pull: %+v", l)
			}
			for _, sub := range []string{"snapshots", "pulls"} {
				if ents, _ := os.ReadDir(filepath.Join(m.DataDir(), sub)); len(ents) != 0 {
					t.Errorf("left in %s: %v", sub, ents)
				}
			}
		})
	}
}

// remoteCLI drives the CLI in this process: remote add/ls/rm, snapshot
// list --remote, pull under a new id, push.
func remoteCLI(t *testing.T, s3 *s3server.Server, url string) {
	dir := t.TempDir()
	smol := func(args ...string) (string, string, int) {
		var out, errb bytes.Buffer
		code := cli.Main(append([]string{"--data-dir", dir, "--image-dir", testImageDir}, args...), &out, &errb)
		return out.String(), errb.String(), code
	}
	must := func(args ...string) string {
		t.Helper()
		out, errs, code := smol(args...)
		if code != 0 {
			t.Fatalf("smolvm %s: exit %d: %s%s", strings.Join(args, " "), code, out, errs)
		}
		return out + errs
	}
	must("remote", "add", "shared", url, "--endpoint", s3.Endpoint)
	must("remote", "add", "spare", "s3://spare-bucket", "--endpoint", s3.Endpoint)
	if out := must("remote", "ls"); !strings.Contains(out, "shared") || !strings.Contains(out, "spare") {
		t.Errorf("remote ls: %s", out)
	}
	if out, _, code := smol("remote", "add", "shared", url); code == 0 || !strings.Contains(out, "") {
		t.Errorf("second add of a name: exit %d", code)
	}
	must("remote", "rm", "spare")
	if out := must("sandbox", "snapshot", "list", "--remote", "shared"); !strings.Contains(out, "trip") || !strings.Contains(out, "traveller") {
		t.Errorf("snapshot list --remote: %s", out)
	}
	out := must("sandbox", "snapshot", "pull", "trip", "--snapshot-id", "trip-b")
	if !strings.Contains(out, "pulled snapshot trip-b") || !strings.Contains(out, "pull trip: download") {
		t.Errorf("pull: %s", out)
	}
	out = must("sandbox", "snapshot", "push", "trip-b")
	if !strings.Contains(out, "pushed trip-b to shared") || !strings.Contains(out, " 0 uploaded") {
		t.Errorf("push of a pulled copy (every chunk already there): %s", out)
	}
	if out := must("sandbox", "snapshot", "list", "--remote", "shared"); !strings.Contains(out, "trip-b") {
		t.Errorf("snapshot list --remote after the push: %s", out)
	}
	jout, _, code := smol("--json", "sandbox", "snapshot", "pull", "nope")
	if code == 0 || !strings.Contains(jout, `"snapshot_not_found"`) || !strings.Contains(jout, "snapshot list --remote shared") {
		t.Errorf("pull of a missing snapshot: exit %d %s", code, jout)
	}
	must("sandbox", "snapshot", "delete", "trip-b", "--remote", "shared")
	if out := must("sandbox", "snapshot", "list", "--remote", "shared"); strings.Contains(out, "trip-b") || !strings.Contains(out, "trip") {
		t.Errorf("snapshot list --remote after delete --remote: %s", out)
	}
	if out := must("sandbox", "snapshot", "list"); !strings.Contains(out, "trip-b") {
		t.Errorf("delete --remote removed the local snapshot: %s", out)
	}
}

// dropsChunks is a store whose chunk reads fail (as an unreachable server)
// after the first n.
type dropsChunks struct {
	remote.Store
	mu sync.Mutex
	n  int
}

func (d *dropsChunks) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	if strings.HasPrefix(key, "chunks/") {
		d.mu.Lock()
		d.n--
		n := d.n
		d.mu.Unlock()
		if n < 0 {
			return nil, fmt.Errorf("%w: dropped by the test", remote.ErrUnreachable)
		}
	}
	return d.Store.Get(ctx, key)
}

// resumedPull: a pull that loses the store half-way fails with
// ErrRemoteUnreachable and lists nothing, and keeps its chunks in the
// private staging dir; the next pull of that id downloads only the rest.
func resumedPull(t *testing.T, s3 *s3server.Server, url string) {
	ctx := testCtx(t)
	m := newManager(t)
	if err := m.AddRemote(ctx, smolvm.Remote{Name: "shared", URL: url, Endpoint: s3.Endpoint}); err != nil {
		t.Fatal(err)
	}
	smolvm.WrapRemoteStores(m, func(st remote.Store) remote.Store { return &dropsChunks{Store: st, n: 12} })
	_, err := m.PullSnapshot(ctx, "trip", smolvm.PullOptions{SnapshotID: "trip-r"})
	if !errors.Is(err, smolvm.ErrRemoteUnreachable) {
		t.Fatalf("interrupted pull: %v, want ErrRemoteUnreachable", err)
	}
	if l, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{}); len(l) != 0 {
		t.Errorf("listed after an interrupted pull: %+v", l)
	}
	if ents, _ := os.ReadDir(filepath.Join(m.DataDir(), "snapshots")); len(ents) != 0 {
		t.Errorf("left in snapshots/: %v", ents)
	}
	st, err := os.Stat(filepath.Join(m.DataDir(), "pulls", "trip-r"))
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("staging dir of the interrupted pull: %v %v", st, err)
	}
	smolvm.WrapRemoteStores(m, nil)
	var stats smolvm.PullStats
	if _, err := m.PullSnapshot(ctx, "trip", smolvm.PullOptions{SnapshotID: "trip-r", Stats: &stats}); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed pull: %+v", stats)
	// Up to 12 chunks were read before the store went away (some of
	// them cancelled in flight): the resumed pull keeps what landed.
	if stats.Downloaded == 0 || stats.Downloaded >= stats.Chunks || stats.Downloaded < stats.Chunks-12 {
		t.Errorf("resumed pull downloaded %d of %d chunks; want fewer (what the interrupted pull wrote is kept), and at most 12 fewer", stats.Downloaded, stats.Chunks)
	}
	if err := m.VerifySnapshot(ctx, "trip-r"); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(m.DataDir(), "pulls")); len(ents) != 0 {
		t.Errorf("staging left after the pull: %v", ents)
	}
}

// hostBNamespace makes a network namespace for host B whose loopback
// carries the store's endpoint (same address and port) to versitygw
// through a unix socket: no server binds anything but loopback. It
// returns the command prefix that runs a program there, or nil (and says
// so) when namespaces cannot be made here. Everything is removed in
// t.Cleanup.
func hostBNamespace(t *testing.T, s3 *s3server.Server) []string {
	t.Helper()
	name := fmt.Sprintf("smolvm-b%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Logf("no network namespace for host B (%v: %s): it shares this machine's network", err, out)
		return nil
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("netns lo up: %v %s", err, out)
	}
	if out, err := exec.Command("ip", "netns", "exec", name, "ip", "-o", "link").CombinedOutput(); err != nil || strings.Count(string(out), "\n") != 1 || !strings.Contains(string(out), " lo:") {
		t.Fatalf("host B's namespace has other links than its loopback: %v %s", err, out)
	}
	sock := filepath.Join(t.TempDir(), "s3.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	target := strings.TrimPrefix(s3.Endpoint, "http://")
	go relay(ln, "tcp", target)
	fwd := exec.Command("ip", "netns", "exec", name, os.Args[0], "-test.run=^TestRemoteTwoHosts$")
	fwd.Env = append(os.Environ(), "SMOLVM_TEST_CHILD=s3-forwarder", "FWD_LISTEN="+target, "FWD_SOCK="+sock)
	stdout, err := fwd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	fwd.Stderr = os.Stderr
	if err := fwd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fwd.Process.Kill(); fwd.Wait() })
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
	}()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "READY") {
			t.Fatalf("forwarder in %s: %q", name, line)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("forwarder in %s did not start", name)
	}
	t.Logf("host B runs in network namespace %s; the store is reached through a unix socket", name)
	return []string{"ip", "netns", "exec", name}
}

// forwardS3 is the forwarder child: it listens on FWD_LISTEN (loopback of
// its namespace) and carries each connection to the unix socket FWD_SOCK.
func forwardS3() {
	ln, err := net.Listen("tcp", os.Getenv("FWD_LISTEN"))
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	fmt.Println("READY")
	relay(ln, "unix", os.Getenv("FWD_SOCK"))
}

// relay carries each connection ln accepts to a new one to addr, until ln
// is closed.
func relay(ln net.Listener, network, addr string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			d, err := net.Dial(network, addr)
			if err != nil {
				return
			}
			defer d.Close()
			go io.Copy(d, c)
			io.Copy(c, d)
		}()
	}
}
