package smolvm_test

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/smolvm-go/smolvm"
)

// TestDownloadModeMasked: a guest file's mode reaches the host masked by the
// umask and without setuid, setgid or sticky bits.
func TestDownloadModeMasked(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	if got := mustOK(t, vm, "echo hi > /tmp/suid && chmod 7777 /tmp/suid && stat -c %a /tmp/suid"); got != "7777" {
		t.Fatalf("guest mode %q, want 7777", got)
	}
	dir := t.TempDir()
	for _, c := range []struct {
		umask int
		want  fs.FileMode
	}{{0o022, 0o755}, {0o077, 0o700}, {0o002, 0o775}} {
		old := syscall.Umask(c.umask)
		dst := filepath.Join(dir, "suid")
		err := vm.DownloadFile(ctx, "/tmp/suid", dst)
		syscall.Umask(old)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Lstat(dst)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != c.want { // Mode() includes setuid, setgid and sticky
			t.Errorf("umask %#o: downloaded mode %v, want %v", c.umask, st.Mode(), c.want)
		}
		os.Remove(dst)
	}
	mustOK(t, vm, "rm /tmp/suid")
}

// TestPrivateFilesAfterBoot checks a booted VM's directories and files:
// every directory 0700, every regular file 0600 (sockets aside: their
// directory is 0700), all ours: the data dir's state and locks, the VM dir
// (disk, console and VMM logs, pid file), the run dir and its parent, and
// the guest RAM file and its dir.
func TestPrivateFilesAfterBoot(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	mustOK(t, vm, "true")
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m := vm.Manager()
	runDir := info.RunDir
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(info.PID), "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	ram := ""
	for _, f := range bytes.Split(cmdline, []byte{0}) {
		for _, kv := range strings.Split(string(f), ",") {
			if p, ok := strings.CutPrefix(kv, "mem-path="); ok {
				ram = p
			}
		}
	}
	if ram == "" {
		t.Fatalf("no mem-path in the QEMU command line: %q", cmdline)
	}
	seen := map[string]bool{}
	check := func(root string, recurse bool) {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				t.Errorf("%s: %v", p, err)
				return nil
			}
			st, err := os.Lstat(p)
			if err != nil {
				return nil // gone meanwhile (a temp file)
			}
			if uid := st.Sys().(*syscall.Stat_t).Uid; int(uid) != os.Geteuid() {
				t.Errorf("%s: owned by uid %d", p, uid)
			}
			switch {
			case st.IsDir() && filepath.Base(p) == "root" && filepath.Dir(p) == runDir && os.Geteuid() == 0:
				// The empty chroot of a QEMU that drops its uid: root's, 0500.
				if st.Mode() != fs.ModeDir|0o500 {
					t.Errorf("%s: chroot dir mode %v, want dr-x------", p, st.Mode())
				}
			case st.IsDir():
				if st.Mode() != fs.ModeDir|0o700 {
					t.Errorf("%s: directory mode %v, want drwx------", p, st.Mode())
				}
				if p != root && !recurse {
					return filepath.SkipDir
				}
			case st.Mode().IsRegular():
				if st.Mode() != 0o600 {
					t.Errorf("%s: file mode %v, want -rw-------", p, st.Mode())
				}
			case st.Mode()&fs.ModeSocket != 0:
			default:
				t.Errorf("%s: unexpected %v", p, st.Mode())
			}
			seen[filepath.Base(p)] = true
			return nil
		})
	}
	check(m.DataDir(), false) // the state database; snapshots and other VMs are other tests'
	check(filepath.Join(m.DataDir(), "locks"), true)
	check(filepath.Dir(info.Dir), false)
	check(info.Dir, true)
	check(filepath.Dir(runDir), false)
	check(runDir, true)
	check(filepath.Dir(ram), true)
	for _, want := range []string{"state.db", "console.log", "qemu.log", "qemu.pid", "agent.sock", "agent.0.lock", filepath.Base(ram)} {
		if !seen[want] {
			t.Errorf("%s not found: the test checked nothing for it", want)
		}
	}
	if info.Dir == "" || runDir == "" {
		t.Fatal("empty dirs")
	}
}

// TestPlantedRunDirRefused: a run dir another local user pre-created (or a
// symlink planted in its place) is refused with an error naming it, and
// nothing is created or removed through it. QEMU never starts.
func TestPlantedRunDirRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns a directory to another user: run it as root (the project's test setup does)")
	}
	m := newManager(t)
	ctx := testCtx(t)
	vm, err := m.New(ctx, smolvm.Config{Image: "busybox"})
	if err != nil {
		t.Fatal(err)
	}
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	runDir := info.RunDir
	if runDir == "" {
		t.Fatal("Info has no RunDir")
	}
	os.MkdirAll(filepath.Dir(runDir), 0o700)
	elsewhere := t.TempDir()
	bait := filepath.Join(elsewhere, "qmp.sock")
	if err := os.WriteFile(bait, []byte("planted"), 0o666); err != nil {
		t.Fatal(err)
	}
	plant := map[string]func() error{
		"other user 0777": func() error {
			if err := os.Mkdir(runDir, 0o777); err != nil {
				return err
			}
			if err := os.Chmod(runDir, 0o777); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(runDir, "qmp.sock"), []byte("planted"), 0o666); err != nil {
				return err
			}
			return os.Chown(runDir, 65534, 65534)
		},
		"ours but 0755": func() error { return os.Mkdir(runDir, 0o755) },
		"symlink":       func() error { return os.Symlink(elsewhere, runDir) },
	}
	for name, mk := range plant {
		t.Run(name, func(t *testing.T) {
			os.RemoveAll(runDir)
			if err := mk(); err != nil {
				t.Fatal(err)
			}
			before := listing(t, runDir)
			err := vm.Start(ctx)
			if !errors.Is(err, smolvm.ErrUnsafeDir) {
				t.Fatalf("Start in a planted run dir: %v, want ErrUnsafeDir", err)
			}
			if msg := err.Error(); !strings.Contains(msg, runDir) || !strings.Contains(msg, "remove") {
				t.Errorf("error does not name %s and say what to do: %s", runDir, msg)
			}
			if pids := qemuProcessesUnder(runDir); len(pids) > 0 {
				t.Errorf("QEMU started: %v", pids)
			}
			if after := listing(t, runDir); after != before {
				t.Errorf("the planted dir changed:\nbefore %s\nafter  %s", before, after)
			}
			if b, _ := os.ReadFile(bait); string(b) != "planted" {
				t.Errorf("a file behind the symlink changed: %q", b)
			}
		})
	}
	os.RemoveAll(runDir)
}

// listing describes dir's entries (not following a symlink at dir).
func listing(t *testing.T, dir string) string {
	t.Helper()
	st, err := os.Lstat(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString(st.Mode().String())
	if st.Mode()&fs.ModeSymlink != 0 {
		dir, _ = os.Readlink(dir)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		i, _ := e.Info()
		b.WriteString(" " + e.Name() + ":" + i.Mode().String())
	}
	return b.String()
}

// TestDoctorReportsOpenRunDir: doctor flags a base run dir that a start
// would refuse (here: ours but 0755, as older versions made it).
func TestDoctorReportsOpenRunDir(t *testing.T) {
	ctx := testCtx(t)
	base := filepath.Join(t.TempDir(), "run")
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: t.TempDir(), ImageDir: testImageDir, RunDir: base, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	runCheck := func() smolvm.Check {
		checks, err := m.Doctor(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range checks {
			if c.Name == "run dir" {
				return c
			}
		}
		t.Fatalf("no run dir check in %+v", checks)
		return smolvm.Check{}
	}
	if c := runCheck(); !c.OK {
		t.Errorf("missing run dir: %+v", c)
	}
	if err := os.Mkdir(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if c := runCheck(); c.OK || !strings.Contains(c.Detail, base) || c.Fix.Action != smolvm.FixRemoveDir || c.Fix.Arg(smolvm.ArgPath) != base {
		t.Errorf("0755 run dir: %+v", c)
	}
	os.Chmod(base, 0o700)
	if c := runCheck(); !c.OK {
		t.Errorf("0700 run dir: %+v", c)
	}
}

// TestPlantedBaseRunDirRefused: the base run dir (/tmp/smolvm-<uid> by
// default) pre-created by another user is refused too: whoever owns it
// could swap the per-VM dirs inside.
func TestPlantedBaseRunDirRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns a directory to another user: run it as root (the project's test setup does)")
	}
	ctx := testCtx(t)
	base := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(base, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(base, 0o777)
	if err := os.Chown(base, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: t.TempDir(), ImageDir: testImageDir, RunDir: base, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	vm, err := m.New(ctx, smolvm.Config{Image: "busybox"})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Delete(ctx)
	err = vm.Start(ctx)
	if !errors.Is(err, smolvm.ErrUnsafeDir) || !strings.Contains(err.Error(), base+":") || !strings.Contains(err.Error(), "uid 65534") {
		t.Fatalf("Start under a base run dir owned by another user: %v", err)
	}
	t.Logf("refused: %v", err)
	if ents, _ := os.ReadDir(base); len(ents) != 0 {
		t.Errorf("created in the planted base: %v", ents)
	}
}
