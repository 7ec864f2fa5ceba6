package cgroup

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// tree lays out a fake cgroup2 mount under t.TempDir: files maps paths
// relative to the mount to contents. It returns the mount point.
func tree(t *testing.T, files map[string]string) string {
	t.Helper()
	mp := filepath.Join(t.TempDir(), "cgroup")
	for p, c := range files {
		full := filepath.Join(mp, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return mp
}

func v2Mountinfo(mp string) string {
	return "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n" +
		"30 24 0:26 / " + strings.ReplaceAll(mp, " ", `\040`) + " rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
}

const allControllers = "cpuset cpu io memory hugetlb pids rdma misc\n"

// TestDetectHybridLikeThisHost: cgroup2 mounted at .../unified with no
// controllers, memory/cpu/pids on cgroup v1 (this development host).
func TestDetectHybridLikeThisHost(t *testing.T) {
	root := t.TempDir()
	uni := filepath.Join(root, "unified")
	os.MkdirAll(uni, 0o755)
	os.WriteFile(filepath.Join(uni, "cgroup.controllers"), nil, 0o644)
	mi := "31 23 0:28 / " + root + " rw,relatime - tmpfs tmpfs rw,mode=755\n" +
		"32 31 0:29 / " + root + "/cpu rw,relatime - cgroup cgroup rw,cpu\n" +
		"35 31 0:32 / " + root + "/memory rw,relatime - cgroup cgroup rw,memory\n" +
		"39 31 0:36 / " + root + "/pids rw,relatime - cgroup cgroup rw,pids\n" +
		"41 31 0:38 / " + uni + " rw,relatime - cgroup2 cgroup2 rw\n"
	s := detect(mi, "4:memory:/x\n0::/\n", "")
	if s.OK {
		t.Fatalf("hybrid host detected as usable: %+v", s)
	}
	for _, want := range []string{"lacks the memory, cpu, pids", "hybrid", "memory at " + root + "/memory"} {
		if !strings.Contains(s.Reason, want) {
			t.Errorf("reason %q lacks %q", s.Reason, want)
		}
	}
}

func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name     string
		files    map[string]string
		self     string
		override string
		noMount  bool
		ok       bool
		enable   bool
		parent   string // relative to the mount
		reason   string // substring when !ok
	}{
		{name: "no cgroup2", noMount: true, reason: "no cgroup v2"},
		{name: "off", override: "off", reason: "SMOLVM_CGROUP=off"},
		{name: "root cgroup, subtree to enable",
			files: map[string]string{"cgroup.controllers": allControllers, "cgroup.subtree_control": "", "cgroup.procs": "1\n"},
			self:  "0::/\n", ok: true, enable: true, parent: "."},
		{name: "root cgroup, already enabled",
			files: map[string]string{"cgroup.controllers": allControllers, "cgroup.subtree_control": "cpu memory pids io\n"},
			self:  "0::/\n", ok: true, parent: "."},
		{name: "own cgroup with processes",
			files: map[string]string{"cgroup.controllers": allControllers, "user.slice/cgroup.controllers": allControllers},
			self:  "0::/user.slice\n", reason: "set SMOLVM_CGROUP"},
		{name: "no 0:: line",
			files: map[string]string{"cgroup.controllers": allControllers},
			self:  "4:memory:/x\n", reason: "no cgroup v2 group"},
		{name: "delegated, empty, to enable",
			files: map[string]string{"cgroup.controllers": allControllers,
				"smolvm.slice/cgroup.controllers": "cpu memory pids\n", "smolvm.slice/cgroup.subtree_control": "", "smolvm.slice/cgroup.procs": ""},
			self: "0::/user.slice\n", override: "smolvm.slice", ok: true, enable: true, parent: "smolvm.slice"},
		{name: "delegated without pids",
			files: map[string]string{"cgroup.controllers": allControllers,
				"smolvm.slice/cgroup.controllers": "cpu memory\n", "smolvm.slice/cgroup.subtree_control": ""},
			override: "smolvm.slice", reason: "not delegated the pids"},
		{name: "delegated but holds processes",
			files: map[string]string{"cgroup.controllers": allControllers,
				"smolvm.slice/cgroup.controllers": "cpu memory pids\n", "smolvm.slice/cgroup.subtree_control": "memory\n", "smolvm.slice/cgroup.procs": "42\n"},
			override: "smolvm.slice", reason: "holds processes"},
		{name: "delegated, enabled, holds processes is fine",
			files: map[string]string{"cgroup.controllers": allControllers,
				"smolvm.slice/cgroup.controllers": "cpu memory pids\n", "smolvm.slice/cgroup.subtree_control": "cpu memory pids\n", "smolvm.slice/cgroup.procs": "42\n"},
			override: "smolvm.slice", ok: true, parent: "smolvm.slice"},
		{name: "override outside the mount",
			files:    map[string]string{"cgroup.controllers": allControllers},
			override: "../../etc", reason: "not under the cgroup v2 mount"},
		{name: "override missing",
			files:    map[string]string{"cgroup.controllers": allControllers},
			override: "nope", reason: "does not exist"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mp := tree(t, tc.files)
			mi := v2Mountinfo(mp)
			if tc.noMount {
				mi = "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n"
			}
			s := detect(mi, tc.self, tc.override)
			if s.OK != tc.ok {
				t.Fatalf("OK = %v (%q), want %v", s.OK, s.Reason, tc.ok)
			}
			if !tc.ok {
				if !strings.Contains(s.Reason, tc.reason) {
					t.Errorf("reason %q lacks %q", s.Reason, tc.reason)
				}
				return
			}
			if want := filepath.Join(mp, tc.parent); s.Parent != want || s.EnableSubtree != tc.enable {
				t.Errorf("parent %q enable %v, want %q %v", s.Parent, s.EnableSubtree, want, tc.enable)
			}
		})
	}
}

func TestCreateWritesLimits(t *testing.T) {
	mp := tree(t, map[string]string{"cgroup.controllers": allControllers, "cgroup.subtree_control": ""})
	s := detect(v2Mountinfo(mp), "0::/\n", "")
	if !s.OK {
		t.Fatal(s.Reason)
	}
	g, err := s.Create("vm1", Limits{MemoryBytes: 768 << 20, CPUs: 2, Pids: 1024})
	if err != nil {
		t.Fatal(err)
	}
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if g.Dir != filepath.Join(mp, "smolvm-vm1") {
		t.Errorf("group dir %s", g.Dir)
	}
	for f, want := range map[string]string{
		filepath.Join(mp, "cgroup.subtree_control"): "+memory +cpu +pids",
		filepath.Join(g.Dir, "memory.max"):          "805306368",
		filepath.Join(g.Dir, "cpu.max"):             "200000 100000",
		filepath.Join(g.Dir, "pids.max"):            "1024",
	} {
		if got := read(f); got != want {
			t.Errorf("%s = %q, want %q", f, got, want)
		}
	}
	for _, bad := range []string{"", "..", "a/b"} {
		if _, err := s.Create(bad, Limits{}); err == nil {
			t.Errorf("group id %q accepted", bad)
		}
	}
	if _, err := (Support{Reason: "x"}).Create("vm2", Limits{}); err == nil {
		t.Error("Create on an unavailable hierarchy succeeded")
	}
}

// TestRealCgroup starts a process inside a real VM group (CLONE_INTO_CGROUP)
// where this host supports it; elsewhere it skips, saying why.
func TestRealCgroup(t *testing.T) {
	s := Detect()
	if !s.OK {
		t.Skip("per-VM cgroups unavailable here: " + s.Reason)
	}
	g, err := s.Create("cgtest-"+strings.ReplaceAll(t.Name(), "/", "-"), Limits{MemoryBytes: 64 << 20, CPUs: 1, Pids: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Remove()
	f, err := g.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	b, _ := os.ReadFile("/proc/" + itoa(cmd.Process.Pid) + "/cgroup")
	if !strings.Contains(string(b), GroupName("cgtest-"+t.Name())) {
		t.Errorf("process cgroup %q, want its VM group", b)
	}
	if m, _ := os.ReadFile(filepath.Join(g.Dir, "memory.max")); strings.TrimSpace(string(m)) != "67108864" {
		t.Errorf("memory.max %q", m)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
