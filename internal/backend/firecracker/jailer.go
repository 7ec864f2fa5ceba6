package firecracker

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
)

// Firecracker's jailer (docs/jailer.md of the Firecracker repository):
//
//	jailer --id ID --exec-file FC --uid UID --gid GID --chroot-base-dir BASE
//	       [--cgroup-version 2 --parent-cgroup P --cgroup FILE=VALUE ...] -- FC-ARGS
//
// It builds BASE/<basename FC>/ID/root, copies FC there, pivots into it in
// a new mount namespace, creates /dev/kvm and /dev/net/tun in it, chowns
// it to UID:GID, drops to them and execs FC (same pid) with --id ID and
// the arguments after "--". Everything FC opens must be inside that root.
//
// smolvm runs Firecracker through the jailer when it runs as root, the VM
// has its own uid (Spec.RunAsUID) and a jailer binary sits next to the
// firecracker binary (a jailer must match its Firecracker's version) or
// Options.Jailer names one. The jail is Dir/jail (the disk's filesystem,
// so the disk is hard-linked in, not copied); the kernel and initramfs are
// linked or copied in; the API and vsock sockets are created inside the
// jail and reached through symlinks at their usual RunDir paths.
//
// NOT RUN: no jailer (nor a usable Firecracker) exists on the development
// machine; this follows the documented interface and only the argv and the
// staging are tested. Snapshots and restores of jailed VMs are refused
// (ErrUnsupported): their files would have to be staged in the jail too.

// jailDirName is the --chroot-base-dir inside the VM's Dir.
const jailDirName = "jail"

// In-jail names of what the jailed Firecracker opens.
const (
	jailKernel = "vmlinux"
	jailInitrd = "initrd"
)

// jail is how one VM's Firecracker runs under the jailer.
type jail struct {
	Jailer   string // jailer binary
	Exec     string // firecracker binary (--exec-file)
	Base     string // --chroot-base-dir
	ID       string // --id (firecracker's instance id)
	UID, GID int
	// Cgroup v2 limits through the jailer (--cgroup-version 2), when
	// per-VM cgroups are available; ParentCgroup is relative to the mount.
	ParentCgroup string
	Limits       *cgroup.Limits
}

// findJailer resolves Options.Jailer: "off" disables it, a path or name is
// looked up, and empty means "jailer" in the firecracker binary's directory
// (never one found elsewhere on PATH: versions must match).
func findJailer(opt, fcBin string) string {
	switch opt {
	case "off":
		return ""
	case "":
		p := filepath.Join(filepath.Dir(fcBin), "jailer")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0 {
			return p
		}
		return ""
	}
	p, err := exec.LookPath(opt)
	if err != nil {
		return ""
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// jailFor returns the jail of spec's VM, or nil when it runs unjailed.
func (b *Backend) jailFor(spec backend.Spec) *jail {
	if b.jailer == "" || os.Geteuid() != 0 || spec.RunAsUID <= 0 || spec.RunAsGID <= 0 || spec.Dir == "" {
		return nil
	}
	j := &jail{Jailer: b.jailer, Exec: b.bin, Base: filepath.Join(spec.Dir, jailDirName),
		ID: instanceID(spec.ID), UID: spec.RunAsUID, GID: spec.RunAsGID}
	if s := cgroup.Detect(); s.OK {
		if rel, err := filepath.Rel(s.Mount, s.Parent); err == nil && rel != "." && filepath.IsLocal(rel) {
			j.ParentCgroup = rel
			j.Limits = &cgroup.Limits{MemoryBytes: int64(max(spec.MemoryMiB, 128)+vmmOverheadMiB) << 20, CPUs: max(spec.CPUs, 1), Pids: 256}
		}
	}
	return j
}

// vmmOverheadMiB is what the jailed Firecracker may use besides guest RAM.
const vmmOverheadMiB = 128

// Root is the jail's root directory (chroot_dir).
func (j *jail) Root() string {
	return filepath.Join(j.Base, filepath.Base(j.Exec), j.ID, "root")
}

// Argv is the jailer's command line (without the binary).
func (j *jail) Argv() []string {
	a := []string{
		"--id", j.ID,
		"--exec-file", j.Exec,
		"--uid", strconv.Itoa(j.UID),
		"--gid", strconv.Itoa(j.GID),
		"--chroot-base-dir", j.Base,
	}
	if j.Limits != nil && j.ParentCgroup != "" {
		a = append(a, "--cgroup-version", "2", "--parent-cgroup", j.ParentCgroup)
		if j.Limits.MemoryBytes > 0 {
			a = append(a, "--cgroup", "memory.max="+strconv.FormatInt(j.Limits.MemoryBytes, 10))
		}
		if j.Limits.CPUs > 0 {
			a = append(a, "--cgroup", fmt.Sprintf("cpu.max=%d 100000", j.Limits.CPUs*100000))
		}
		if j.Limits.Pids > 0 {
			a = append(a, "--cgroup", "pids.max="+strconv.Itoa(j.Limits.Pids))
		}
	}
	// The jailer passes --id itself; these go to Firecracker, whose paths
	// are inside the jail.
	return append(a, "--", "--api-sock", "/"+apiSockName)
}

// jailPaths are the kernel, initramfs and vsock socket paths as the jailed
// Firecracker sees them.
func jailPaths(spec backend.Spec) (kernel, initrd, vsock string) {
	if spec.Initrd != "" {
		initrd = "/" + jailInitrd
	}
	return "/" + jailKernel, initrd, "/" + vsockName
}

// stage prepares the jail before the jailer runs: a fresh root with the
// kernel, initramfs and disk in it (the disk hard-linked and owned by the
// VM's uid, mode 0600: it reads and writes it), and the host-side symlinks
// RunDir/fc.sock and RunDir/vsock.sock to the sockets Firecracker will
// create in the jail (see jailPaths for the in-jail names).
func (j *jail) stage(spec backend.Spec) error {
	os.RemoveAll(filepath.Join(j.Base, filepath.Base(j.Exec), j.ID)) // an earlier run's jail
	root := j.Root()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("firecracker: jail: %w", err)
	}
	if err := linkOrCopy(spec.Kernel, filepath.Join(root, jailKernel)); err != nil {
		return fmt.Errorf("firecracker: jail: kernel: %w", err)
	}
	if spec.Initrd != "" {
		if err := linkOrCopy(spec.Initrd, filepath.Join(root, jailInitrd)); err != nil {
			return fmt.Errorf("firecracker: jail: initrd: %w", err)
		}
	}
	if spec.Disk != "" {
		// The drive's path_on_host is "rootfs", relative to Firecracker's
		// working directory: the jail's root once jailed.
		dst := filepath.Join(root, driveLinkName)
		if err := os.Link(spec.Disk, dst); err != nil {
			return fmt.Errorf("firecracker: jail: disk (must be on the filesystem of %s): %w", j.Base, err)
		}
		if err := os.Chown(dst, j.UID, j.GID); err != nil {
			return fmt.Errorf("firecracker: jail: %w", err)
		}
		if err := os.Chmod(dst, 0o600); err != nil {
			return fmt.Errorf("firecracker: jail: %w", err)
		}
	}
	for _, name := range []string{apiSockName, vsockName} {
		link := filepath.Join(spec.RunDir, name)
		os.Remove(link)
		if err := os.Symlink(filepath.Join(root, name), link); err != nil {
			return fmt.Errorf("firecracker: jail: %w", err)
		}
	}
	return nil
}

// linkOrCopy hard-links src to dst, or copies it when they are on
// different filesystems.
func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// errJailedSnapshot refuses snapshots and restores of jailed VMs.
var errJailedSnapshot = fmt.Errorf("snapshots of Firecracker VMs started through the jailer are not implemented: %w", backend.ErrUnsupported)

// isJailedFirecrackerOf reports whether cmdline and uid are those of spec's
// jailed Firecracker: its arguments have in-jail paths (the jail's own
// mount namespace also hides its root from /proc/PID/root), so it is known
// by its instance id, its in-jail API socket and the VM's uid.
func isJailedFirecrackerOf(cmdline []byte, uid int, spec backend.Spec) bool {
	return spec.RunAsUID > 0 && uid == spec.RunAsUID &&
		bytes.Contains(cmdline, []byte("\x00--id="+instanceID(spec.ID)+"\x00")) &&
		bytes.Contains(cmdline, []byte("\x00--api-sock\x00/"+apiSockName+"\x00"))
}

// procUID returns the real uid of process pid, or -1.
func procUID(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				if n, err := strconv.Atoi(f[0]); err == nil {
					return n
				}
			}
		}
	}
	return -1
}
