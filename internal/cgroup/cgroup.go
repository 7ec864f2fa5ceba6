// Package cgroup puts each VM's VMM in a cgroup v2 group of its own with
// memory, CPU and pids limits, when the host has a cgroup v2 hierarchy with
// those controllers and smolvm may manage a part of it (delegated, or
// root). Detect decides, and says why not; nothing here is required: a
// host without it runs VMs without per-VM limits.
//
// Where VM groups go (the parent): $SMOLVM_CGROUP when set (a cgroup path
// relative to the cgroup2 mount, or an absolute directory under it; "off"
// disables limits), else the cgroup smolvm itself runs in, provided that is
// the root of the (namespaced) hierarchy. A non-root cgroup that holds
// processes (smolvm's own) cannot enable controllers for children (cgroup
// v2's "no internal processes" rule), so then limits need SMOLVM_CGROUP set
// to an empty cgroup delegated to smolvm (systemd: Delegate=yes).
package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/smolvm-go/smolvm/internal/procfs"
	"golang.org/x/sys/unix"
)

// Needed are the controllers a VM's limits use.
var Needed = []string{"memory", "cpu", "pids"}

// EnvParent names the parent cgroup for VM groups ("off": no limits).
const EnvParent = "SMOLVM_CGROUP"

// Support is what Detect found.
type Support struct {
	OK     bool
	Reason string // why limits are off (OK false), or a note
	Mount  string // the cgroup2 mount point
	Parent string // the directory VM groups are created in (OK)
	// EnableSubtree: Parent's cgroup.subtree_control lacks some of
	// Needed, which Create enables first.
	EnableSubtree bool
}

// Detect looks at this process's mounts and cgroup.
func Detect() Support {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return Support{Reason: "cannot read /proc/self/mountinfo: " + err.Error()}
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return Support{Reason: "cannot read /proc/self/cgroup: " + err.Error()}
	}
	return detect(string(mi), string(self), os.Getenv(EnvParent))
}

// words returns the space-separated words of a cgroup interface file.
func words(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(b)), nil
}

func missing(have []string) []string {
	var out []string
	for _, c := range Needed {
		if !slices.Contains(have, c) {
			out = append(out, c)
		}
	}
	return out
}

func detect(mountinfo, selfCgroup, override string) Support {
	if override == "off" {
		return Support{Reason: EnvParent + "=off"}
	}
	mounts := procfs.ParseMountinfo(mountinfo)
	var mp string
	for _, m := range mounts {
		if m.FSType == "cgroup2" {
			mp = m.Point
			break
		}
	}
	if mp == "" {
		return Support{Reason: "no cgroup v2 hierarchy is mounted"}
	}
	s := Support{Mount: mp}
	have, err := words(filepath.Join(mp, "cgroup.controllers"))
	if err != nil {
		s.Reason = fmt.Sprintf("cgroup v2 at %s: %v", mp, err)
		return s
	}
	if miss := missing(have); len(miss) > 0 {
		s.Reason = fmt.Sprintf("cgroup v2 at %s lacks the %s controller(s)", mp, strings.Join(miss, ", "))
		var v1 []string
		for _, m := range mounts {
			if m.FSType != "cgroup" {
				continue
			}
			for _, o := range strings.Split(m.SuperOpts, ",") {
				if slices.Contains(miss, o) {
					v1 = append(v1, o+" at "+m.Point)
				}
			}
		}
		if len(v1) > 0 {
			s.Reason += " (a hybrid hierarchy: they are bound to cgroup v1: " + strings.Join(v1, ", ") + ")"
		}
		return s
	}

	// The parent directory for VM groups.
	var parent string
	if override != "" {
		parent = override
		if !filepath.IsAbs(parent) {
			parent = filepath.Join(mp, parent)
		}
		parent = filepath.Clean(parent)
		if rel, err := filepath.Rel(mp, parent); err != nil || !filepath.IsLocal(rel) && rel != "." {
			s.Reason = fmt.Sprintf("%s=%s is not under the cgroup v2 mount %s", EnvParent, override, mp)
			return s
		}
	} else {
		own := ""
		for line := range strings.SplitSeq(selfCgroup, "\n") {
			if p, ok := strings.CutPrefix(line, "0::"); ok {
				own = p
			}
		}
		if own == "" {
			s.Reason = "this process is in no cgroup v2 group (/proc/self/cgroup has no 0:: line)"
			return s
		}
		if own != "/" {
			s.Reason = fmt.Sprintf("smolvm runs in cgroup %s, which holds processes: controllers cannot be enabled for its children; "+
				"set %s to an empty cgroup delegated to smolvm (systemd: Delegate=yes) to limit each VM", own, EnvParent)
			return s
		}
		parent = mp
	}
	st, err := os.Stat(parent)
	if err != nil || !st.IsDir() {
		s.Reason = fmt.Sprintf("cgroup %s does not exist", parent)
		return s
	}
	avail, err := words(filepath.Join(parent, "cgroup.controllers"))
	if err != nil {
		s.Reason = fmt.Sprintf("cgroup %s: %v", parent, err)
		return s
	}
	if miss := missing(avail); len(miss) > 0 {
		s.Reason = fmt.Sprintf("cgroup %s is not delegated the %s controller(s) (its parent's cgroup.subtree_control lacks them)", parent, strings.Join(miss, ", "))
		return s
	}
	if unix.Access(parent, unix.W_OK) != nil {
		s.Reason = fmt.Sprintf("no write access to cgroup %s (not delegated to uid %d)", parent, os.Geteuid())
		return s
	}
	enabled, err := words(filepath.Join(parent, "cgroup.subtree_control"))
	if err != nil {
		s.Reason = fmt.Sprintf("cgroup %s: %v", parent, err)
		return s
	}
	if len(missing(enabled)) > 0 {
		if parent != mp {
			if procs, _ := words(filepath.Join(parent, "cgroup.procs")); len(procs) > 0 {
				s.Reason = fmt.Sprintf("cgroup %s holds processes, so the %s controller(s) cannot be enabled for VM groups under it; point %s at an empty cgroup",
					parent, strings.Join(missing(enabled), ", "), EnvParent)
				return s
			}
		}
		if unix.Access(filepath.Join(parent, "cgroup.subtree_control"), unix.W_OK) != nil {
			s.Reason = fmt.Sprintf("cannot enable controllers in %s/cgroup.subtree_control (no write access)", parent)
			return s
		}
		s.EnableSubtree = true
	}
	s.OK, s.Parent = true, parent
	return s
}

// Limits of one VM's group.
type Limits struct {
	MemoryBytes int64 // memory.max (0: none)
	CPUs        int   // cpu.max quota in whole CPUs (0: none)
	Pids        int   // pids.max (0: none)
}

// cpuPeriod is the cpu.max period (the kernel's default, 100 ms).
const cpuPeriod = 100000

// Group is one VM's cgroup.
type Group struct{ Dir string }

// GroupName is the directory name of VM id's group.
func GroupName(id string) string { return "smolvm-" + id }

var errInvalidID = errors.New("cgroup: invalid group id")

// Create makes the group of VM id under s.Parent (enabling the controllers
// in the parent first when needed) and writes its limits. An empty group
// left by an earlier run is reused.
func (s Support) Create(id string, l Limits) (*Group, error) {
	if !s.OK {
		return nil, fmt.Errorf("cgroup: unavailable: %s", s.Reason)
	}
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return nil, errInvalidID
	}
	if s.EnableSubtree {
		ctl := "+" + strings.Join(Needed, " +")
		if err := writeFile(filepath.Join(s.Parent, "cgroup.subtree_control"), ctl); err != nil {
			return nil, fmt.Errorf("cgroup: enable controllers in %s: %w", s.Parent, err)
		}
	}
	dir := filepath.Join(s.Parent, GroupName(id))
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	g := &Group{Dir: dir}
	var vals [][2]string
	if l.MemoryBytes > 0 {
		vals = append(vals, [2]string{"memory.max", strconv.FormatInt(l.MemoryBytes, 10)})
	}
	if l.CPUs > 0 {
		vals = append(vals, [2]string{"cpu.max", fmt.Sprintf("%d %d", l.CPUs*cpuPeriod, cpuPeriod)})
	}
	if l.Pids > 0 {
		vals = append(vals, [2]string{"pids.max", strconv.Itoa(l.Pids)})
	}
	for _, v := range vals {
		if err := writeFile(filepath.Join(dir, v[0]), v[1]); err != nil {
			g.Remove()
			return nil, fmt.Errorf("cgroup: %s: %w", v[0], err)
		}
	}
	return g, nil
}

// Open returns the group directory opened for clone3's CLONE_INTO_CGROUP
// (syscall.SysProcAttr.UseCgroupFD/CgroupFD): the VMM starts inside it.
func (g *Group) Open() (*os.File, error) {
	return os.OpenFile(g.Dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

// Remove deletes the group; it fails while processes are in it.
func (g *Group) Remove() error { return os.Remove(g.Dir) }

func writeFile(path, val string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(val)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
