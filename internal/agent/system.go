package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
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
	if req.Hostname != "" && (len(req.Hostname) > 64 || !validHostname(req.Hostname)) {
		return invalid("set_identity: invalid hostname %q", req.Hostname)
	}
	if s.opts.SetIdentity != nil {
		return s.opts.SetIdentity(req.Hostname, req.Seed)
	}
	if !s.opts.System {
		return errUnsupported
	}
	if req.Hostname != "" {
		if err := setHostname(req.Hostname); err != nil {
			return err
		}
	}
	if len(req.Seed) > 0 {
		if err := addEntropy(req.Seed); err != nil {
			return fmt.Errorf("set_identity: seed: %w", err)
		}
		// Clones of one snapshot share the CRNG state: reseed it now from
		// the (now different) input pool rather than at the next interval.
		reseedCRNG()
	}
	if req.MAC != "" {
		if err := setMAC("eth0", req.MAC); err != nil {
			return fmt.Errorf("set_identity: mac: %w", err)
		}
	}
	return nil
}

func reseedCRNG() {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer f.Close()
	if conn, err := f.SyscallConn(); err == nil {
		conn.Control(func(fd uintptr) {
			unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDRESEEDCRNG, 0)
		})
	}
}

// setMAC sets an interface's hardware address (SIOCSIFHWADDR).
func setMAC(ifname, mac string) error {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return invalid("invalid mac %q", mac)
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

func validHostname(h string) bool {
	for _, c := range h {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.':
		default:
			return false
		}
	}
	return true
}

// setHostname sets the kernel hostname and keeps /etc/hostname in step
// when the root filesystem is writable.
func setHostname(name string) error {
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	_ = os.WriteFile("/etc/hostname", []byte(name+"\n"), 0o644)
	return nil
}

// addEntropy mixes seed into the kernel pool: written to /dev/urandom (not
// credited) and, where permitted, added with RNDADDENTROPY (credited).
func addEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(seed); err != nil {
		return err
	}
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	n := min(len(seed), 512)
	buf := make([]byte, 8+(n+3)/4*4)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(n * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(n)
	copy(buf[8:], seed[:n])
	conn, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	var ioErr error
	_ = conn.Control(func(fd uintptr) {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0])))
		if e != 0 {
			ioErr = e
		}
	})
	runtime.KeepAlive(buf)
	if ioErr != nil && !errors.Is(ioErr, syscall.EPERM) {
		return ioErr
	}
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
