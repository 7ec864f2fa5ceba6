package qemu

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
	"github.com/smolvm-go/smolvm/internal/qmp"
)

// QEMU's seccomp filter (-sandbox). Every QEMU we start runs under it:
// obsolete system calls, spawning processes (execve: this also makes
// slirp's guestfwd "cmd:" and smb unusable), changing scheduling and
// resource limits are refused, and a refused call kills QEMU (SIGSYS).
//
// elevateprivileges: QEMU installs the filter early in its start-up, before
// it handles -run-with user= (the setgid/setuid of the privilege drop then
// happen under the filter). With elevateprivileges=deny or =children the
// filter kills QEMU at that setgid (checked on QEMU 10.0.2: SIGSYS in
// setgid(2), whatever the order of the options). A QEMU that drops its
// privileges therefore runs with elevateprivileges=allow: after the drop it
// has no capabilities (CapEff 0) and no_new_privs set (QEMU sets it with
// the filter), so set*id cannot give it back any privilege, and execve of
// a set-uid binary is refused by spawn=deny anyway. Without a drop (smolvm
// not root) elevateprivileges=deny.
const (
	sandboxDeny = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
	sandboxDrop = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
)

// chrootDirName is the empty directory inside RunDir that a QEMU which
// drops its privileges chroots into.
const chrootDirName = "root"

// dropsPrivileges reports whether QEMU for spec starts as root and drops to
// the VM's own uid: smolvm runs as root and the spec carries a uid.
func dropsPrivileges(spec backend.Spec) bool {
	return spec.RunAsUID > 0 && spec.RunAsGID > 0 && os.Geteuid() == 0
}

// confineArgs renders -sandbox and, when l drops privileges, -run-with.
func confineArgs(l launch) []string {
	if l.RunAsUID <= 0 {
		return []string{"-sandbox", sandboxDeny}
	}
	rw := "user=" + strconv.Itoa(l.RunAsUID) + ":" + strconv.Itoa(l.RunAsGID)
	if l.Chroot != "" {
		rw += ",chroot=" + optVal(l.Chroot)
	}
	return []string{"-sandbox", sandboxDrop, "-run-with", rw}
}

// confine fills l's privilege drop for spec: the VM's uid and gid and an
// empty root-owned directory (mode 0500: the dropped QEMU can neither list
// nor write it) to chroot into. QEMU opens everything named on its command
// line (kernel, initrd, disk, RAM file, sockets, console log, pid file)
// before it drops, as root; anything it needs later is handed to it as a
// descriptor (see passFile).
func confine(spec backend.Spec, l *launch) error {
	if !dropsPrivileges(spec) {
		return nil
	}
	dir := filepath.Join(spec.RunDir, chrootDirName)
	// A leftover from an earlier run is removed when empty and recreated,
	// so its owner and mode are ours; anything else is refused.
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("qemu: chroot dir %s: %w (remove it)", dir, err)
	}
	if err := os.Mkdir(dir, 0o500); err != nil {
		return fmt.Errorf("qemu: chroot dir: %w", err)
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("qemu: chroot dir: %w", err)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); !ok || sys.Uid != 0 || !st.IsDir() || st.Mode().Perm() != 0o500 {
		return fmt.Errorf("qemu: chroot dir %s is not a root-owned 0500 directory", dir)
	}
	l.RunAsUID, l.RunAsGID, l.Chroot = spec.RunAsUID, spec.RunAsGID, dir
	return nil
}

// passFile hands f to QEMU through a new fdset (QMP add-fd, the descriptor
// sent with the command) and returns the path QEMU opens it by,
// /dev/fdset/N, and a release that removes the fdset. QEMU duplicates the
// descriptor when it opens the path, so release may run as soon as the
// command that opened it has returned. The file is opened by us: a QEMU
// that dropped its privileges (and chrooted) could not open it itself.
// QEMU matches the access mode: open f O_WRONLY for an outgoing migration,
// O_RDONLY for an incoming one.
func passFile(ctx context.Context, c *qmp.Client, f *os.File, opaque string) (string, func(), error) {
	var added struct {
		FdsetID int `json:"fdset-id"`
	}
	cctx, cancel := withTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	if err := c.ExecuteWithFile(cctx, "add-fd", map[string]any{"opaque": opaque}, &added, f); err != nil {
		var qe *qmp.Error
		if errors.As(err, &qe) {
			return "", nil, &backend.VMMError{Op: "add-fd", Class: qe.Class, Message: qe.Desc}
		}
		return "", nil, fmt.Errorf("qemu: add-fd: %w", err)
	}
	release := func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		c.Execute(rctx, "remove-fd", map[string]any{"fdset-id": added.FdsetID}, nil)
	}
	return "/dev/fdset/" + strconv.Itoa(added.FdsetID), release, nil
}

// createPrivate creates path for writing (it must not exist), mode 0600.
func createPrivate(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
}

// private makes a file qemu-img created (0644 under the usual umask)
// readable by its owner only: disks hold guest data.
func private(path string) error {
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	return nil
}

// Per-VM cgroup limits (see package cgroup): memory is the guest's RAM
// plus what QEMU needs besides it, and under TCG its translation cache
// (up to 1 GiB by default); CPU time is capped at the VM's vCPUs; pids
// bound QEMU's threads.
const (
	vmmOverheadMiB = 256
	tcgCacheMiB    = 1024
	vmmPids        = 512
)

// memoryLimit is the memory.max of a VM's group.
func memoryLimit(memMiB int, accel backend.Accel) int64 {
	mib := int64(memMiB) + vmmOverheadMiB
	if accel == backend.AccelTCG {
		mib += tcgCacheMiB
	}
	return mib << 20
}

// CgroupSupport reports whether VMs get per-VM cgroup limits here, and why
// not (detected once per Backend).
func (b *Backend) CgroupSupport() cgroup.Support {
	b.cgOnce.Do(func() {
		b.cg = cgroup.Detect()
		if !b.cg.OK {
			b.log.Debug("per-VM cgroup limits off", "reason", b.cg.Reason)
		}
	})
	return b.cg
}

// placeInGroup creates spec's cgroup, when available, and makes attr start
// the process inside it (CLONE_INTO_CGROUP). The returned func closes the
// group's descriptor once the process has started.
func (b *Backend) placeInGroup(spec backend.Spec, l launch, attr *syscall.SysProcAttr) (func(), error) {
	s := b.CgroupSupport()
	if !s.OK {
		return func() {}, nil
	}
	g, err := s.Create(spec.ID, cgroup.Limits{MemoryBytes: memoryLimit(spec.MemoryMiB, l.Accel), CPUs: max(spec.CPUs, 1), Pids: vmmPids})
	if err != nil {
		return nil, fmt.Errorf("qemu: %w (set %s=off to run without per-VM limits)", err, cgroup.EnvParent)
	}
	f, err := g.Open()
	if err != nil {
		g.Remove()
		return nil, fmt.Errorf("qemu: cgroup: %w", err)
	}
	attr.UseCgroupFD, attr.CgroupFD = true, int(f.Fd())
	return func() { f.Close() }, nil
}

// removeGroup removes a stopped VM's cgroup (if any).
func (b *Backend) removeGroup(id string) {
	if s := b.CgroupSupport(); s.OK && id != "" {
		os.Remove(filepath.Join(s.Parent, cgroup.GroupName(id)))
	}
}
