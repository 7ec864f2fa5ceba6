package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

var errUnsupported = &agentproto.Error{Code: agentproto.CodeUnsupported,
	Message: "the agent does not manage this system (not running as init)"}

func (s *Server) info() agentproto.Info {
	inf := agentproto.Info{
		AgentVersion:    Version,
		ProtocolVersion: agentproto.ProtocolVersion,
		BootID:          bootID(),
		Arch:            runtime.GOARCH,
		PID:             os.Getpid(),
		System:          s.opts.System,
	}
	inf.Hostname, _ = os.Hostname()
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		inf.KernelRelease = unix.ByteSliceToString(uts.Release[:])
	}
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		inf.UptimeMS = time.Duration(ts.Nano()).Milliseconds()
	}
	return inf
}

func (s *Server) setTime(t time.Time) error {
	if s.opts.SetTime != nil {
		return s.opts.SetTime(t)
	}
	if !s.opts.System {
		return errUnsupported
	}
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("set_time: %w", err)
	}
	return nil
}

func (s *Server) setIdentity(req agentproto.SetIdentityRequest) error {
	if err := req.Validate(); err != nil {
		return invalid("set_identity: %v", err)
	}
	if s.opts.SetIdentity != nil {
		return s.opts.SetIdentity(req.Hostname, req.Seed)
	}
	if !s.opts.System {
		return errUnsupported
	}
	// Entropy first: whatever is drawn from here on differs between VMs
	// restored from one memory image. Clones of one snapshot share the
	// CRNG state: reseed it now from the (now different) input pool
	// rather than at the next interval.
	if len(req.Seed) > 0 {
		if err := addEntropy(req.Seed); err != nil {
			return fmt.Errorf("set_identity: seed: %w", err)
		}
	}
	if req.Hostname != "" {
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("set_identity: sethostname: %w", err)
		}
	}
	binds, err := writeIdentityFiles("/", req.Hostname, req.MachineID, s.logf)
	if err != nil {
		return fmt.Errorf("set_identity: %w", err)
	}
	for _, name := range binds {
		if err := bindFromRun(name); err != nil {
			return fmt.Errorf("set_identity: /etc/%s: %w", name, err)
		}
	}
	if req.MAC != "" {
		if err := setMAC("eth0", req.MAC); err != nil {
			return fmt.Errorf("set_identity: mac: %w", err)
		}
	}
	return nil
}

// writeIdentityFiles keeps the files that name the machine in step with
// its identity, under root ("/" in the guest): /etc/hostname and, when it
// is the agent's own, /etc/hosts; /etc/machine-id, and dbus's copy when it
// is a file of its own. A file already holding the value is not written
// again (a VM restarted or resumed keeps its identity at no cost).
//
// The values live on the agent's tmpfs, in /run/smolvm-identity, and
// /etc/NAME is a symlink to its file there (putIdentityFile), as a
// container runtime mounts these files from outside the image: they are
// derived from the host's record and rewritten at every boot and restore
// before any command runs, so nothing of them needs to persist. A new
// value replaces its file there atomically (temp, rename). The point is
// speed: under TCG the first creates and renames after a restore are slow
// (the kernel's code is translated anew in each VMM process); in one
// paired run of template creates the identity files took 84-132 ms on the
// root's ext4 and 24-32 ms on tmpfs (40-85 ms in later, busier runs).
//
// When /etc refuses the symlink (a read-only root), binds names the
// files of /etc that exist and must be covered by their /run copy (as
// systemd does for machine-id), so that no file keeps the name or id of
// the VM a snapshot was taken of.
func writeIdentityFiles(root, hostname, machineID string, logf func(string, ...any)) (binds []string, err error) {
	put := func(name, content string) error {
		bind, err := putIdentityFile(root, name, content)
		if bind {
			binds = append(binds, name)
		}
		return err
	}
	if hostname != "" {
		if err := put("hostname", hostname+"\n"); err != nil {
			logf("set_identity: %v", err) // the kernel's hostname is set
		}
		writeHosts(root, hostname)
	}
	if machineID == "" {
		return binds, nil
	}
	content := machineID + "\n"
	if err := put("machine-id", content); err != nil {
		return binds, err
	}
	// dbus reads its own copy when it is a file (not the usual symlink to
	// /etc/machine-id); a stale one would be shared by clones.
	dbus := filepath.Join(root, "var", "lib", "dbus", "machine-id")
	if st, err := os.Lstat(dbus); err == nil && st.Mode().IsRegular() {
		if err := replaceIfChanged(dbus, content, 0o444); err != nil {
			logf("set_identity: %s: %v", dbus, err)
		}
	}
	return binds, nil
}

// identityDir holds the identity files, under the root: on the agent's
// tmpfs.
const identityDir = "run/smolvm-identity"

// identityFileMode is the mode of each identity file.
var identityFileMode = map[string]fs.FileMode{"hostname": 0o644, "machine-id": 0o444, "hosts": 0o644}

// putIdentityFile makes root/etc/NAME read content: the value goes to
// root/run/smolvm-identity/NAME (replaceIfChanged), and /etc/NAME becomes
// a relative symlink to it unless it is one already (a temp symlink renamed
// over it: a reader sees the old file or the new link, never neither).
// When /etc refuses the link and /etc/NAME is a regular file, bind says
// the caller must cover it with the /run file. The error is only that the
// value could not be written at all.
func putIdentityFile(root, name, content string) (bind bool, err error) {
	dir := filepath.Join(root, identityDir)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return false, fmt.Errorf("%s: %w", name, err)
	}
	if err := replaceIfChanged(filepath.Join(dir, name), content, identityFileMode[name]); err != nil {
		return false, fmt.Errorf("%s: %w", name, err)
	}
	etcPath := filepath.Join(root, "etc", name)
	target := "../" + identityDir + "/" + name
	if l, err := os.Readlink(etcPath); err == nil && l == target {
		return false, nil
	}
	tmp := etcPath + ".smolvm-link"
	_ = os.Remove(tmp)
	err = os.Symlink(target, tmp)
	if err == nil {
		if err = os.Rename(tmp, etcPath); err != nil {
			os.Remove(tmp)
		}
	}
	if err == nil {
		return false, nil
	}
	st, serr := os.Lstat(etcPath)
	return serr == nil && st.Mode().IsRegular(), nil
}

// persistIdentityFiles puts the identity files back on root's disk before
// a sync (the host syncs before a disk snapshot and a stop): each /etc link
// to /run/smolvm-identity becomes a regular file with its content (temp,
// rename). A boot from the disk alone (a disk snapshot restored, maybe
// paused before the host can speak) then finds the VM's name and
// machine-id as it did before they moved to tmpfs. The next set_identity
// that changes one makes it a link again.
func persistIdentityFiles(root string, logf func(string, ...any)) {
	for _, name := range []string{"hostname", "machine-id", "hosts"} {
		etcPath := filepath.Join(root, "etc", name)
		if l, err := os.Readlink(etcPath); err != nil || l != "../"+identityDir+"/"+name {
			continue
		}
		b, err := readSmallFile(filepath.Join(root, identityDir, name))
		if err != nil {
			continue // dangling: nothing to keep
		}
		if err := replaceIfChanged(etcPath, string(b), identityFileMode[name]); err != nil {
			logf("sync: keeping /etc/%s on disk: %v", name, err)
		}
	}
}

// readSmallFile reads an identity file (a few bytes; more is refused).
func readSmallFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4097))
	if err == nil && len(b) > 4096 {
		err = fmt.Errorf("%s: over 4096 bytes", path)
	}
	return b, err
}

// replaceIfChanged atomically replaces path with content unless it holds
// exactly that already: a temp file in the same directory, renamed over
// path, so a reader sees the old content or the new, never a part.
//
// Unlike atomicWrite it does not fsync: these files are derived from the
// host's record and rewritten by set_identity at every boot and restore
// before any command runs, so a crash that loses them loses nothing (and
// most live on tmpfs, see writeIdentityFiles).
func replaceIfChanged(path, content string, mode fs.FileMode) error {
	if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() && st.Size() == int64(len(content)) {
		if b, err := os.ReadFile(path); err == nil && string(b) == content && st.Mode().Perm() == mode {
			return nil
		}
	}
	dir, base := filepath.Split(path)
	f, err := os.CreateTemp(dir, "."+base+".smolvm-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.WriteString(content)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// bindFromRun covers /etc/NAME, on a root that cannot be written, with
// /run/smolvm-identity/NAME (a new bind each time: an old one would show
// the file that the rename in /run replaced).
func bindFromRun(name string) error {
	etc := "/etc/" + name
	_ = unix.Unmount(etc, unix.MNT_DETACH)
	return unix.Mount("/"+identityDir+"/"+name, etc, "", unix.MS_BIND, "")
}

// setMAC sets an interface's hardware address (SIOCSIFHWADDR).
func setMAC(ifname, mac string) error {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return invalid("invalid mac %q", mac)
	}
	// No such interface (a VM without network): nothing to set. Checked
	// in sysfs first, because the ioctl on a missing name makes the kernel
	// exec modprobe for it (netdev-NAME), about 100 ms of a template
	// create under TCG; and net.InterfaceByName dumps every link.
	if _, err := os.Stat("/sys/class/net"); err == nil {
		if _, err := os.Stat("/sys/class/net/" + ifname); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	if ifi, err := net.InterfaceByName(ifname); err == nil && bytes.Equal(ifi.HardwareAddr, hw) {
		return nil // already (a cold boot: the VMM gave it)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// struct ifreq { char name[16]; struct sockaddr hwaddr; } (+ padding)
	var ifr [40]byte
	copy(ifr[:15], ifname)
	*(*uint16)(unsafe.Pointer(&ifr[16])) = unix.ARPHRD_ETHER
	copy(ifr[18:24], hw)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCSIFHWADDR, uintptr(unsafe.Pointer(&ifr[0]))); e != 0 {
		if e == unix.ENODEV {
			return nil // no network device: nothing to rename
		}
		return e
	}
	return nil
}

// addEntropy mixes seed into the kernel pool: written to /dev/urandom (not
// credited) and, where permitted, added with RNDADDENTROPY (credited);
// then it reseeds the CRNG (RNDRESEEDCRNG, best effort). Raw system calls
// on one descriptor: under TCG every call after a restore is slow, and
// this runs on the path from restore to first command.
func addEntropy(seed []byte) error {
	fd, err := unix.Open("/dev/urandom", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: "/dev/urandom", Err: err}
	}
	defer unix.Close(fd)
	if _, err := unix.Write(fd, seed); err != nil {
		return &fs.PathError{Op: "write", Path: "/dev/urandom", Err: err}
	}
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	n := min(len(seed), 512)
	buf := make([]byte, 8+(n+3)/4*4)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(n * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(n)
	copy(buf[8:], seed[:n])
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	if e != 0 && e != unix.EPERM {
		return e
	}
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDRESEEDCRNG, 0)
	return nil
}

// shutdown answers, then syncs and powers off (or reboots).
func (ss *session) shutdown(id uint64, reboot bool) {
	s := ss.srv
	off := s.opts.PowerOff
	if off == nil {
		if !s.opts.System {
			ss.sendError(id, errUnsupported)
			return
		}
		off = powerOff
	}
	syscall.Sync()
	ss.send(id, agentproto.TypeOK, nil)
	// Let the reply leave the guest before the machine stops.
	time.Sleep(50 * time.Millisecond)
	if err := off(reboot); err != nil {
		s.logf("shutdown: %v", err)
	}
}

// powerOff stops every process, remounts the root read-only, syncs and
// powers off or reboots. It returns only on failure.
func powerOff(reboot bool) error {
	_ = syscall.Kill(-1, syscall.SIGTERM)
	time.Sleep(100 * time.Millisecond)
	_ = syscall.Kill(-1, syscall.SIGKILL)
	syscall.Sync()
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	syscall.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	return unix.Reboot(cmd)
}
