package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

const (
	testMachineID  = "0123456789abcdef0123456789abcdef"
	testMachineID2 = "fedcba9876543210fedcba9876543210"
)

// newRoot is a guest root as the images make it: /etc with hostname and
// hosts, /run (the agent's tmpfs).
func newRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"etc", "run"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("smolvm\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/hosts"), []byte("127.0.0.1\tlocalhost\n127.0.1.1\tsmolvm\n"), 0o644)
	return root
}

func readString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// noTemps fails when a temp file of an atomic write is left in dir.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".smolvm-") {
			t.Errorf("temp file %s left in %s", e.Name(), dir)
		}
	}
}

func TestWriteIdentityFiles(t *testing.T) {
	root := newRoot(t)
	logf := func(f string, a ...any) { t.Logf(f, a...) }
	binds, err := writeIdentityFiles(root, "vm-1", testMachineID, logf)
	if err != nil || len(binds) != 0 {
		t.Fatalf("binds %v, err %v", binds, err)
	}
	if got := readString(t, filepath.Join(root, "etc/hostname")); got != "vm-1\n" {
		t.Errorf("/etc/hostname = %q", got)
	}
	idPath := filepath.Join(root, "etc/machine-id")
	if got := readString(t, idPath); got != testMachineID+"\n" {
		t.Errorf("/etc/machine-id = %q", got)
	}
	st, err := os.Stat(idPath)
	if err != nil || st.Mode().Perm() != 0o444 {
		t.Errorf("machine-id mode %v, %v; want 0444", st.Mode(), err)
	}
	// The values are on the agent's tmpfs, /etc links to them.
	for _, name := range []string{"hostname", "machine-id"} {
		if l, err := os.Readlink(filepath.Join(root, "etc", name)); err != nil || l != "../run/smolvm-identity/"+name {
			t.Errorf("/etc/%s links to %q (%v), want ../run/smolvm-identity/%s", name, l, err, name)
		}
	}
	// The image's own /etc/hosts is left alone.
	if got := readString(t, filepath.Join(root, "etc/hosts")); strings.Contains(got, "vm-1") {
		t.Errorf("the image's /etc/hosts was rewritten: %q", got)
	}
	noTemps(t, filepath.Join(root, "etc"))

	// The same identity again writes nothing (a restart or resume).
	before, _ := os.Stat(idPath)
	if _, err := writeIdentityFiles(root, "vm-1", testMachineID, logf); err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(idPath)
	if !os.SameFile(before, after) {
		t.Error("an unchanged machine-id was written again")
	}
	// A new one replaces the file (a new inode: rename, never in place).
	if _, err := writeIdentityFiles(root, "vm-2", testMachineID2, logf); err != nil {
		t.Fatal(err)
	}
	again, _ := os.Stat(idPath)
	if os.SameFile(after, again) || readString(t, idPath) != testMachineID2+"\n" {
		t.Errorf("machine-id not replaced: %q", readString(t, idPath))
	}
	// Empty fields keep what is there.
	if _, err := writeIdentityFiles(root, "", "", logf); err != nil {
		t.Fatal(err)
	}
	if readString(t, idPath) != testMachineID2+"\n" || readString(t, filepath.Join(root, "etc/hostname")) != "vm-2\n" {
		t.Error("an empty request changed the identity files")
	}
	noTemps(t, filepath.Join(root, "etc"))
	noTemps(t, filepath.Join(root, identityDir))

	// After a reboot /run is empty: the links dangle until the host gives
	// the identity again, which then lands in /run behind the same links.
	if err := os.RemoveAll(filepath.Join(root, "run", "smolvm-identity")); err != nil {
		t.Fatal(err)
	}
	if got := bootHostname(BootConfig{Hostname: "smolvm"}, filepath.Join(root, "etc/hostname")); got != "smolvm" {
		t.Errorf("boot hostname with a dangling link = %q, want the default", got)
	}
	if _, err := writeIdentityFiles(root, "vm-3", testMachineID, logf); err != nil {
		t.Fatal(err)
	}
	if readString(t, idPath) != testMachineID+"\n" || readString(t, filepath.Join(root, "etc/hostname")) != "vm-3\n" {
		t.Error("identity not restored behind the links after a reboot")
	}
}

// TestPersistIdentityFiles: before a sync the links become regular files
// with the values (a boot from the disk alone reads them); a later change
// makes them links again.
func TestPersistIdentityFiles(t *testing.T) {
	root := newRoot(t)
	os.Remove(filepath.Join(root, "etc/hosts"))
	if _, err := writeIdentityFiles(root, "vm-p", testMachineID, t.Logf); err != nil {
		t.Fatal(err)
	}
	persistIdentityFiles(root, t.Logf)
	for name, want := range map[string]string{"hostname": "vm-p\n", "machine-id": testMachineID + "\n", "hosts": "127.0.1.1\tvm-p\n"} {
		p := filepath.Join(root, "etc", name)
		if st, err := os.Lstat(p); err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != identityFileMode[name] {
			t.Errorf("/etc/%s after persist: %v, %v; want a regular file, mode %v", name, st.Mode(), err, identityFileMode[name])
		}
		if got := readString(t, p); !strings.Contains(got, want) {
			t.Errorf("/etc/%s = %q, want %q in it", name, got, want)
		}
	}
	noTemps(t, filepath.Join(root, "etc"))
	// A boot from that disk: /run is empty, the name is on disk.
	os.RemoveAll(filepath.Join(root, identityDir))
	if got := bootHostname(BootConfig{Hostname: "smolvm"}, filepath.Join(root, "etc/hostname")); got != "vm-p" {
		t.Errorf("boot hostname from the persisted disk = %q, want vm-p", got)
	}
	if _, err := writeIdentityFiles(root, "vm-q", testMachineID2, t.Logf); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(filepath.Join(root, "etc/machine-id")); err != nil || l != "../run/smolvm-identity/machine-id" {
		t.Errorf("machine-id after a new identity: link %q, %v", l, err)
	}
	if readString(t, filepath.Join(root, "etc/hostname")) != "vm-q\n" {
		t.Error("new hostname not behind the link")
	}
	// Dangling links (nothing in /run) are left as they are.
	os.RemoveAll(filepath.Join(root, identityDir))
	persistIdentityFiles(root, t.Logf)
	if _, err := os.Readlink(filepath.Join(root, "etc/hostname")); err != nil {
		t.Errorf("a dangling link was replaced: %v", err)
	}
}

// TestWriteHostsIsTheAgents: the agent's /etc/hosts moves to /run and
// follows the name, also from a dangling link (a reboot); an image's own
// is never touched.
func TestWriteHostsIsTheAgents(t *testing.T) {
	root := newRoot(t)
	hosts := filepath.Join(root, "etc/hosts")
	os.Remove(hosts) // none: the agent writes its own
	writeHosts(root, "boot")
	if got := readString(t, hosts); !strings.HasPrefix(got, "# smolvm-agent\n") || !strings.Contains(got, "127.0.1.1\tboot\n") {
		t.Errorf("/etc/hosts = %q", got)
	}
	if l, err := os.Readlink(hosts); err != nil || l != "../run/smolvm-identity/hosts" {
		t.Errorf("/etc/hosts links to %q (%v)", l, err)
	}
	os.RemoveAll(filepath.Join(root, identityDir))
	writeHosts(root, "again")
	if got := readString(t, hosts); !strings.Contains(got, "127.0.1.1\tagain\n") {
		t.Errorf("/etc/hosts after a reboot = %q", got)
	}
	noTemps(t, filepath.Join(root, "etc"))

	own := newRoot(t) // the image's own file
	writeHosts(own, "vm")
	if st, err := os.Lstat(filepath.Join(own, "etc/hosts")); err != nil || !st.Mode().IsRegular() ||
		strings.Contains(readString(t, filepath.Join(own, "etc/hosts")), "\tvm\n") {
		t.Errorf("the image's own /etc/hosts was replaced (%v)", err)
	}
}

// TestWriteIdentityFilesHostsAndDbus: the agent's own /etc/hosts follows
// the hostname; dbus's machine-id follows when it is a file, and is left
// alone when it is the usual symlink.
func TestWriteIdentityFilesHostsAndDbus(t *testing.T) {
	root := newRoot(t)
	hosts := filepath.Join(root, "etc/hosts")
	os.WriteFile(hosts, []byte("# smolvm-agent\n127.0.1.1\told\n"), 0o644) // the agent's own file, as an older agent left it
	dbus := filepath.Join(root, "var/lib/dbus")
	os.MkdirAll(dbus, 0o755)
	os.WriteFile(filepath.Join(dbus, "machine-id"), []byte(testMachineID2+"\n"), 0o444)
	if _, err := writeIdentityFiles(root, "vm-3", testMachineID, t.Logf); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, hosts); !strings.Contains(got, "127.0.1.1\tvm-3\n") || strings.Contains(got, "old") {
		t.Errorf("agent's /etc/hosts = %q", got)
	}
	if got := readString(t, filepath.Join(dbus, "machine-id")); got != testMachineID+"\n" {
		t.Errorf("dbus machine-id = %q", got)
	}

	root2 := newRoot(t)
	dbus2 := filepath.Join(root2, "var/lib/dbus")
	os.MkdirAll(dbus2, 0o755)
	os.Symlink("/etc/machine-id", filepath.Join(dbus2, "machine-id"))
	if _, err := writeIdentityFiles(root2, "", testMachineID, t.Logf); err != nil {
		t.Fatal(err)
	}
	if l, err := os.Readlink(filepath.Join(dbus2, "machine-id")); err != nil || l != "/etc/machine-id" {
		t.Errorf("dbus symlink replaced: %q %v", l, err)
	}
}

// TestWriteIdentityFilesFallsBackToRun: when /etc refuses the link (in a
// guest: a read-only root), the value is in /run all the same, and the
// caller is told to bind the /run copy over the /etc file only when that
// is a regular file.
func TestWriteIdentityFilesFallsBackToRun(t *testing.T) {
	root := newRoot(t)
	os.Mkdir(filepath.Join(root, "etc/machine-id"), 0o755) // in the way of the rename
	binds, err := writeIdentityFiles(root, "", testMachineID, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if len(binds) != 0 {
		t.Errorf("bind over a directory requested: %v", binds)
	}
	if got := readString(t, filepath.Join(root, identityDir, "machine-id")); got != testMachineID+"\n" {
		t.Errorf("/run/smolvm-identity/machine-id = %q", got)
	}
	noTemps(t, filepath.Join(root, identityDir))
	noTemps(t, filepath.Join(root, "etc"))

	// Regular files that cannot be replaced: covered by their /run copy.
	// A rename over a mount point fails (EBUSY) as one on a read-only root
	// does (EROFS); without root, a read-only /etc does it.
	root = newRoot(t)
	etc := filepath.Join(root, "etc")
	os.WriteFile(filepath.Join(etc, "machine-id"), []byte(testMachineID2+"\n"), 0o444)
	if os.Geteuid() == 0 {
		for _, name := range []string{"hostname", "machine-id"} {
			p := filepath.Join(etc, name)
			if err := unix.Mount(p, p, "", unix.MS_BIND, ""); err != nil {
				t.Skipf("cannot bind-mount in this sandbox: %v", err)
			}
			t.Cleanup(func() { unix.Unmount(p, unix.MNT_DETACH) })
		}
	} else {
		os.Chmod(etc, 0o555)
		t.Cleanup(func() { os.Chmod(etc, 0o755) })
	}
	binds, err = writeIdentityFiles(root, "vm-ro", testMachineID, t.Logf)
	if err != nil || strings.Join(binds, ",") != "hostname,machine-id" {
		t.Errorf("binds %v (%v), want hostname,machine-id", binds, err)
	}
	if got := readString(t, filepath.Join(root, identityDir, "hostname")); got != "vm-ro\n" {
		t.Errorf("/run/smolvm-identity/hostname = %q", got)
	}
	if got := readString(t, filepath.Join(root, identityDir, "machine-id")); got != testMachineID+"\n" {
		t.Errorf("/run/smolvm-identity/machine-id = %q", got)
	}
	noTemps(t, etc)

	// Neither place writable: an error, nothing half-written.
	root2 := newRoot(t)
	os.Mkdir(filepath.Join(root2, "etc/machine-id"), 0o755)
	os.Remove(filepath.Join(root2, "run"))
	os.WriteFile(filepath.Join(root2, "run"), nil, 0o644) // not a directory
	if _, err := writeIdentityFiles(root2, "", testMachineID, t.Logf); err == nil {
		t.Error("no error with nowhere to write")
	}
}

// TestBootHostname: smol.hostname wins (old snapshots), else the root's
// /etc/hostname when valid, else the default.
func TestBootHostname(t *testing.T) {
	dir := t.TempDir()
	etc := filepath.Join(dir, "hostname")
	os.WriteFile(etc, []byte("from-disk\n"), 0o644)
	given, _ := ParseCmdline("smol.hostname=from-cmdline")
	plain, _ := ParseCmdline("quiet smol.root=/dev/vda")
	for _, c := range []struct {
		cfg     BootConfig
		content string
		want    string
	}{
		{given, "from-disk\n", "from-cmdline"},
		{plain, "from-disk\n", "from-disk"},
		{plain, "bad name!\n", "smolvm"},
		{plain, strings.Repeat("a", 65) + "\n", "smolvm"},
		{plain, strings.Repeat("a", 300), "smolvm"},
		{plain, "", "smolvm"},
	} {
		os.WriteFile(etc, []byte(c.content), 0o644)
		if got := bootHostname(c.cfg, etc); got != c.want {
			t.Errorf("cmdline %+v, /etc/hostname %q: %q, want %q", c.cfg.HostnameGiven, c.content, got, c.want)
		}
	}
	if got := bootHostname(plain, filepath.Join(dir, "missing")); got != "smolvm" {
		t.Errorf("no /etc/hostname: %q", got)
	}
}

// TestSetIdentityValidates: the server refuses an invalid request as
// "invalid" before anything is applied (the hook is never called).
func TestSetIdentityValidates(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	s := NewServer(Options{EnvFile: filepath.Join(t.TempDir(), "env"), Logf: t.Logf,
		SetIdentity: func(string, []byte) error { mu.Lock(); calls++; mu.Unlock(); return nil }})
	defer s.Close()
	for _, req := range []agentproto.SetIdentityRequest{
		{MachineID: "not-hex-not-hex-not-hex-not-hex-"},
		{MachineID: strings.Repeat("0", 32)},
		{Hostname: "a b"},
		{MAC: "52:54:00:00:00"},
		{Seed: make([]byte, agentproto.MaxSeedLen+1)},
	} {
		var pe *agentproto.Error
		if err := s.setIdentity(req); !errors.As(err, &pe) || pe.Code != agentproto.CodeInvalid {
			t.Errorf("%+v: %v, want invalid", req, err)
		}
	}
	if err := s.setIdentity(agentproto.SetIdentityRequest{Hostname: "ok", MachineID: testMachineID}); err != nil {
		t.Fatal(err)
	}
	if calls != 1 {
		t.Errorf("hook called %d times, want once (for the valid request)", calls)
	}
	// Without System or a hook nothing on this machine is touched.
	plain := NewServer(Options{EnvFile: filepath.Join(t.TempDir(), "env"), Logf: t.Logf})
	defer plain.Close()
	if err := plain.setIdentity(agentproto.SetIdentityRequest{MachineID: testMachineID}); !errors.Is(err, errUnsupported) {
		t.Errorf("without System: %v", err)
	}
}
