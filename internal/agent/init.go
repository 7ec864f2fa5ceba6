package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// BootConfig is what the agent reads from the kernel command line.
type BootConfig struct {
	Root       string // smol.root: block device to switch into ("" = stay in initramfs)
	RootFSType string // smol.rootfstype (default ext4)
	Hostname   string // smol.hostname (default "smolvm"; legacy: new VMs get theirs from set_identity)
	// HostnameGiven says smol.hostname was on the command line.
	HostnameGiven bool
	Port          string       // smol.port (default agentproto.DefaultPortName)
	Net           bool         // smol.net=1
	IP            netip.Prefix // smol.ip (default 10.0.2.15/24)
	Gateway       netip.Addr   // smol.gw (default 10.0.2.2)
	DNS           []netip.Addr // smol.dns, comma separated (default 10.0.2.3)
}

// ParseCmdline parses a kernel command line. Malformed smol.* values are
// reported and replaced by defaults.
func ParseCmdline(cmdline string) (BootConfig, []error) {
	c := BootConfig{
		RootFSType: "ext4",
		Hostname:   "smolvm",
		Port:       agentproto.DefaultPortName,
		IP:         netip.MustParsePrefix("10.0.2.15/24"),
		Gateway:    netip.MustParseAddr("10.0.2.2"),
		DNS:        []netip.Addr{netip.MustParseAddr("10.0.2.3")},
	}
	var errs []error
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "smol.root":
			c.Root = v
		case "smol.rootfstype":
			if v != "" {
				c.RootFSType = v
			}
		case "smol.hostname":
			if v != "" {
				c.Hostname, c.HostnameGiven = v, true
			}
		case "smol.port":
			if v != "" {
				c.Port = v
			}
		case "smol.net":
			c.Net = v == "1" || v == "on" || v == "true" || v == "yes"
		case "smol.ip":
			p, err := netip.ParsePrefix(v)
			if err != nil || !p.Addr().Is4() {
				errs = append(errs, fmt.Errorf("smol.ip=%q: want A.B.C.D/N", v))
				continue
			}
			c.IP = p
		case "smol.gw":
			a, err := netip.ParseAddr(v)
			if err != nil || !a.Is4() {
				errs = append(errs, fmt.Errorf("smol.gw=%q: want an IPv4 address", v))
				continue
			}
			c.Gateway = a
		case "smol.dns":
			var dns []netip.Addr
			for _, s := range strings.Split(v, ",") {
				a, err := netip.ParseAddr(s)
				if err != nil {
					errs = append(errs, fmt.Errorf("smol.dns=%q: %v", v, err))
					dns = nil
					break
				}
				dns = append(dns, a)
			}
			if dns != nil {
				c.DNS = dns
			}
		}
	}
	return c, errs
}

// console is where init logs; it is /dev/console once /dev is mounted.
var console io.Writer = os.Stderr

func initLogf(format string, args ...any) {
	fmt.Fprintf(console, "smolvm-agent: "+format+"\n", args...)
}

// RunInit performs the init duties and serves forever. It never returns:
// PID 1 exiting panics the kernel, so fatal errors are printed on the
// console and the agent sleeps.
func RunInit() {
	defer func() {
		if r := recover(); r != nil {
			initLogf("FATAL: panic: %v", r)
			sleepForever()
		}
	}()
	ignoreSignals()
	limitMemory()
	cfg, err := initSystem()
	if err != nil {
		initLogf("FATAL: %v", err)
		sleepForever()
	}
	srv := NewServer(Options{System: true, Reap: true, Logf: initLogf})
	for {
		err := serveHost(context.Background(), srv, cfg.Port)
		initLogf("serve: %v; retrying", err)
		time.Sleep(time.Second)
	}
}

// limitMemory makes the Go GC keep the agent small in a small VM: a soft
// limit of a quarter of RAM (a large file transfer may exceed it briefly).
func limitMemory() {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return
	}
	total := uint64(si.Totalram) * uint64(si.Unit)
	if total > 0 {
		debug.SetMemoryLimit(int64(total / 4))
	}
}

func sleepForever() {
	for {
		time.Sleep(time.Hour)
	}
}

// ignoreSignals keeps the Go runtime from exiting on signals aimed at
// PID 1. Handlers (not SIG_IGN) are used so children get default
// dispositions after exec.
func ignoreSignals() {
	ch := make(chan os.Signal, 8)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE, syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU)
	go func() {
		for range ch {
		}
	}()
}

// initSystem does everything PID 1 must do before serving.
func initSystem() (BootConfig, error) {
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	} {
		if err := mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			return BootConfig{}, err
		}
	}
	setupConsole()
	log.SetOutput(console)
	log.SetFlags(0)

	loadModules("/lib/modules")

	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		initLogf("read /proc/cmdline: %v", err)
	}
	cfg, errs := ParseCmdline(string(b))
	for _, e := range errs {
		initLogf("cmdline: %v", e)
	}

	if cfg.Root != "" {
		if err := switchRoot(cfg.Root, cfg.RootFSType); err != nil {
			initLogf("root %s: %v; staying in the initramfs", cfg.Root, err)
		}
	}
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "ptmxmode=0666,mode=0620"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	} {
		if err := mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			initLogf("%v", err)
		}
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		_ = os.Symlink(target, link)
	}
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}

	cfg.Hostname = bootHostname(cfg, "/etc/hostname")
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		initLogf("sethostname: %v", err)
	}
	writeHosts("/", cfg.Hostname)
	if cfg.Net {
		if err := configureNetwork(cfg, "/etc/resolv.conf"); err != nil {
			initLogf("network: %v", err)
		}
	}
	os.Clearenv()
	for _, kv := range DefaultEnv {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	_ = os.Chdir("/")
	return cfg, nil
}

// mount creates dst and mounts; an already mounted target is fine.
func mount(src, dst, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("mount %s: %w", dst, err)
	}
	if err := unix.Mount(src, dst, fstype, flags, data); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount %s on %s: %w", fstype, dst, err)
	}
	return nil
}

// setupConsole points stdin/stdout/stderr at /dev/console (the kernel may
// not have opened it: the initramfs need not contain /dev/console).
func setupConsole() {
	f, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for fd := 0; fd <= 2; fd++ {
		_ = unix.Dup3(int(f.Fd()), fd, 0)
	}
	f.Close()
	console = os.Stderr
}

// loadModules loads the modules listed in dir/load.order, in order.
func loadModules(dir string) {
	f, err := os.Open(filepath.Join(dir, "load.order"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			initLogf("modules: %v", err)
		}
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		if err := loadModule(filepath.Join(dir, name)); err != nil {
			initLogf("module %s: %v", name, err)
		}
	}
}

func loadModule(path string) error {
	m, err := os.Open(path)
	if err != nil {
		return err
	}
	defer m.Close()
	flags := 0
	switch filepath.Ext(path) {
	case ".xz", ".zst", ".gz":
		flags |= unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = unix.FinitModule(int(m.Fd()), "", flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

// switchRoot mounts dev at /newroot, moves /dev, /proc and /sys into it
// and makes it the root. The agent keeps running from initramfs memory.
func switchRoot(dev, fstype string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(dev); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("device did not appear: %w", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	const nr = "/newroot"
	if err := os.MkdirAll(nr, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(dev, nr, fstype, 0, ""); err != nil {
		return fmt.Errorf("mount %s (%s): %w", dev, fstype, err)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		if err := os.MkdirAll(nr+d, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, nr+d, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
	}
	if err := unix.Chdir(nr); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// writeHosts writes root's /etc/hosts (putIdentityFile: on the agent's
// tmpfs) unless the image has its own (or it already says this).
func writeHosts(root, hostname string) {
	const marker = "# smolvm-agent"
	if b, err := os.ReadFile(filepath.Join(root, "etc", "hosts")); err == nil && !strings.HasPrefix(string(b), marker) {
		return
	}
	content := marker + "\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + hostname + "\n"
	_, _ = putIdentityFile(root, "hosts", content)
}

// bootHostname is the hostname set at boot: smol.hostname when the
// command line has it (VMs created before identity moved to set_identity,
// and their snapshots), else the root's /etc/hostname when it can be read
// (a root whose identity files are not yet on tmpfs: set_identity keeps
// them in /run, so after a reboot the link dangles until the host gives
// the name again, before any command runs), else "smolvm". Nothing VM-specific comes from the command line any
// more: a template's /proc/cmdline names no VM.
func bootHostname(cfg BootConfig, etcHostname string) string {
	if cfg.HostnameGiven {
		return cfg.Hostname
	}
	b, err := os.ReadFile(etcHostname)
	if err != nil || len(b) > 256 {
		return cfg.Hostname
	}
	if h := strings.TrimSpace(string(b)); agentproto.ValidHostname(h) {
		return h
	}
	return cfg.Hostname
}

// serveHost serves on the virtio-serial port named name, or on vsock when
// the machine has no virtio console device.
func serveHost(ctx context.Context, srv *Server, name string) error {
	path, err := waitVirtioPort(name)
	if err == nil {
		p, err := OpenVirtioPort(path)
		if err != nil {
			return err
		}
		// Extra ports NAME.1, NAME.2, ... let several host processes hold
		// a connection each (a QEMU socket chardev takes one client).
		for k := 1; k < agentproto.MaxPorts; k++ {
			xpath, err := FindVirtioPort(fmt.Sprintf("%s.%d", name, k))
			if err != nil {
				break
			}
			xp, err := OpenVirtioPort(xpath)
			if err != nil {
				fmt.Fprintf(console, "smolvm-agent: %v\n", err)
				continue
			}
			go srv.ServePort(ctx, xp)
		}
		fmt.Fprintln(console, agentproto.ReadyLine)
		return srv.ServePort(ctx, p)
	}
	ln, lerr := ListenVsock(agentproto.DefaultVsockPort)
	if lerr != nil {
		return fmt.Errorf("%v; %v", err, lerr)
	}
	fmt.Fprintln(console, agentproto.ReadyLine)
	return srv.ServeListener(ctx, ln)
}

// waitVirtioPort finds the named port. The port appears asynchronously
// after the virtio console driver binds, so it waits a little when the
// machine has a virtio console device.
func waitVirtioPort(name string) (string, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		path, err := FindVirtioPort(name)
		if err == nil {
			for time.Now().Before(deadline) {
				if _, err := os.Stat(path); err == nil {
					break
				}
				time.Sleep(2 * time.Millisecond)
			}
			return path, nil
		}
		if !hasVirtioDevice(3) || time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// hasVirtioDevice reports whether a virtio device of the given id (3 =
// console) exists.
func hasVirtioDevice(id int) bool {
	files, _ := filepath.Glob("/sys/bus/virtio/devices/*/device")
	want := fmt.Sprintf("0x%04x", id)
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == want {
			return true
		}
	}
	return false
}
