package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/consolelog"
)

// Machine types.
const (
	MachineMicrovm = "microvm"
	MachineQ35     = "q35"
)

// Fixed names inside Spec.RunDir and Spec.Dir.
const (
	qmpSocketName   = "qmp.sock"
	agentSocketName = "agent.sock"
	consoleLogName  = "console.log"
	qemuLogName     = "qemu.log"
	pidFileName     = "qemu.pid"

	// AgentPortName is the virtio-serial port the guest agent serves on.
	AgentPortName = "org.smolvm.agent"
	netdevID      = "net0"
)

// launch is everything about one QEMU invocation that is not in the Spec.
// Restores must rebuild the exact same device configuration as the VM that
// was snapshotted, so all of it is derived from here deterministically.
type launch struct {
	Machine string // MachineMicrovm or MachineQ35
	Accel   backend.Accel
	CPU     string // -cpu model
	TSCkHz  int    // >0: add tsc_early_khz= to the kernel command line

	MemoryFile     string // memory-backend-file mem-path
	MemoryShared   bool   // share=on (writes land in the file)
	MemoryReadonly bool   // open the file read-only (private restore of a snapshot image)

	Disk       string // attached writable disk ("" = none)
	DiskFormat string // qcow2 or raw

	Incoming    bool // -incoming defer
	StartPaused bool // -S

	// NoKernel leaves out -kernel, -initrd and -append: a restore loads a
	// guest that has booted already, and QEMU would keep a copy of the
	// kernel and initramfs in its own memory (fw_cfg) for every clone.
	// With it, -no-reboot: a guest reboot has nothing to boot, so QEMU
	// exits and the VM is stopped (Start then boots it cold).
	NoKernel bool

	// DieWithParent kills QEMU when the thread that launched it exits
	// (Pdeathsig): for helper VMs that must not outlive their operation.
	DieWithParent bool

	// RunAsUID/RunAsGID > 0: QEMU drops to them after start-up, chrooted
	// into Chroot (see confine.go).
	RunAsUID, RunAsGID int
	Chroot             string

	// NetFD is QEMU's fd of the socketpair to the network sidecar
	// (-netdev stream); 0 with spec.Network is the legacy slirp netdev,
	// used only by the throughput comparison in the tests.
	NetFD int
}

func qmpSocket(runDir string) string { return filepath.Join(runDir, qmpSocketName) }

// QMPSocket is the QMP socket of the VM whose sockets are in runDir (its
// Spec.RunDir), for a caller driving a running VM's QEMU by hand (the
// benchmarks' internal-snapshot baseline).
func QMPSocket(runDir string) string   { return qmpSocket(runDir) }
func agentSocket(runDir string) string { return filepath.Join(runDir, agentSocketName) }

// AgentPorts is how many agent channels a VM has: QEMU's socket chardev
// serves one client at a time, so each concurrent host connection (another
// process, a second handle) takes a port of its own.
const AgentPorts = 4

// agentPortSocket is the socket of agent port k (0 is agent.sock).
func agentPortSocket(runDir string, k int) string {
	if k == 0 {
		return agentSocket(runDir)
	}
	return filepath.Join(runDir, fmt.Sprintf("agent.%d.sock", k))
}

// agentPortName is the guest-visible name of agent port k.
func agentPortName(k int) string {
	if k == 0 {
		return AgentPortName
	}
	return fmt.Sprintf("%s.%d", AgentPortName, k)
}
func consoleLog(dir string) string { return filepath.Join(dir, consoleLogName) }
func qemuLog(dir string) string    { return filepath.Join(dir, qemuLogName) }
func pidFile(dir string) string    { return filepath.Join(dir, pidFileName) }

// optVal escapes a value for QEMU's comma-separated option syntax.
func optVal(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// kernelCmdline is the command line the backend passes: its own settings
// first, then the caller's KernelArgs.
func kernelCmdline(spec backend.Spec, l launch) string {
	parts := []string{"console=ttyS0", "reboot=t", "panic=-1"}
	if l.TSCkHz > 0 {
		parts = append(parts, "tsc_early_khz="+strconv.Itoa(l.TSCkHz))
	}
	if a := strings.TrimSpace(spec.KernelArgs); a != "" {
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// buildArgs returns QEMU's argv (without the binary). The device set and
// order depend only on (spec, l) so that a restore reproduces them. It
// validates both first (see checkArgs): every value placed in a QEMU option
// string is then either a validated token or escaped with optVal.
func buildArgs(spec backend.Spec, l launch) ([]string, error) {
	if err := checkArgs(spec, l); err != nil {
		return nil, err
	}
	dev := func(base string) string {
		if l.Machine == MachineQ35 {
			return base + "-pci"
		}
		return base + "-device"
	}
	machine := l.Machine
	if machine == "" {
		machine = MachineMicrovm
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-nographic",
		"-machine", machine + ",memory-backend=mem0",
		"-accel", string(l.Accel),
		"-cpu", l.CPU,
		"-m", fmt.Sprintf("%dM", spec.MemoryMiB),
		"-smp", strconv.Itoa(max(spec.CPUs, 1)),
	}
	mem := fmt.Sprintf("memory-backend-file,id=mem0,size=%dM,mem-path=%s", spec.MemoryMiB, optVal(l.MemoryFile))
	if l.MemoryShared {
		mem += ",share=on"
	} else {
		mem += ",share=off"
	}
	if l.MemoryReadonly {
		// Open the image read-only but map it writable and private (CoW):
		// the snapshot file can never be modified or truncated.
		mem += ",readonly=on,rom=off"
	}
	args = append(args, "-object", mem)
	if machine == MachineMicrovm {
		if fw := MicrovmFirmware(); fw != "" {
			args = append(args, "-bios", fw)
		}
	}

	if l.NoKernel {
		args = append(args, "-no-reboot")
	} else {
		args = append(args, "-kernel", spec.Kernel)
		if spec.Initrd != "" {
			args = append(args, "-initrd", spec.Initrd)
		}
		args = append(args, "-append", kernelCmdline(spec, l))
	}

	// Console and control channels.
	args = append(args,
		// The console goes to a ring buffer in QEMU (bounded even when no
		// host process watches); consolelog.Drain moves it to console.log.
		"-chardev", "ringbuf,id="+consolelog.Device+",size="+strconv.Itoa(consolelog.RingSize),
		"-serial", "chardev:console",
		"-chardev", "socket,id=qmp,server=on,wait=off,path="+optVal(qmpSocket(spec.RunDir)),
		"-mon", "chardev=qmp,mode=control",
		"-pidfile", pidFile(spec.Dir),
	)

	// Devices, in a fixed order (restores depend on it).
	args = append(args,
		"-device", dev("virtio-serial")+",id=vser0",
	)
	for k := 0; k < AgentPorts; k++ {
		id := "agent"
		if k > 0 {
			id = fmt.Sprintf("agent%d", k)
		}
		args = append(args,
			"-chardev", "socket,id="+id+",server=on,wait=off,path="+optVal(agentPortSocket(spec.RunDir, k)),
			"-device", "virtserialport,bus=vser0.0,chardev="+id+",name="+agentPortName(k),
		)
	}
	if l.Disk != "" {
		format := l.DiskFormat
		if format == "" {
			format = "qcow2"
		}
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=%s,node-name=disk0,file.driver=file,file.filename=%s", format, optVal(l.Disk)),
			"-device", dev("virtio-blk")+",drive=disk0",
		)
	}
	if spec.Network {
		nd := netdevArg(l.NetFD)
		if l.NetFD == 0 {
			nd = "user,id=" + netdevID
			for _, pf := range spec.PortForwards {
				rule, err := hostfwd(pf)
				if err != nil {
					return nil, err
				}
				nd += ",hostfwd=" + rule
			}
		}
		nic := dev("virtio-net") + ",netdev=" + netdevID
		if spec.MAC != "" {
			mac, err := macOpt(spec.MAC)
			if err != nil {
				return nil, err
			}
			nic += ",mac=" + mac
		}
		args = append(args, "-netdev", nd, "-device", nic)
	}
	args = append(args, "-device", dev("virtio-rng"))
	// Free page reporting: the guest hands memory it frees back to the host
	// (QEMU punches it out of the RAM file), so an idle VM costs what it
	// uses, not its RAM size (init_on_free=1 touches every page at boot).
	args = append(args, "-device", dev("virtio-balloon")+",free-page-reporting=on")

	if l.Incoming {
		args = append(args, "-incoming", "defer")
	}
	if l.StartPaused {
		args = append(args, "-S")
	}
	return append(args, confineArgs(l)...), nil
}

// hostfwd renders a forward in slirp's hostfwd syntax, tcp:ADDR:HOST-:GUEST,
// from typed values only: the address is a parsed netip.Addr printed back
// (digits and dots), the ports are integers in range. QEMU's user
// networking binds IPv4 host addresses only (QEMU 10 refuses "[::1]" with
// "Bad host address"), so an IPv6 address is refused here, before QEMU
// starts, with an error that says what to use instead.
func hostfwd(pf backend.PortForward) (string, error) {
	if err := pf.Validate(); err != nil {
		return "", fmt.Errorf("qemu: %w", err)
	}
	addr, _ := pf.Addr()
	if !addr.Is4() {
		return "", fmt.Errorf("qemu: port forward on %s: QEMU user networking binds IPv4 host addresses only; use 127.0.0.1 (or 0.0.0.0 to expose it on every interface): %w",
			addr, backend.ErrUnsupported)
	}
	return fmt.Sprintf("tcp:%s:%d-:%d", addr, pf.HostPort, pf.GuestPort), nil
}

// macOpt renders a MAC for a -device option from its parsed bytes.
func macOpt(s string) (string, error) {
	hw, err := backend.ParseMAC(s)
	if err != nil {
		return "", fmt.Errorf("qemu: %w", err)
	}
	return hw.String(), nil
}

// cpuModelRE is a CPU model with optional +flag/-flag features, as
// cpuModel writes ("host,-arch-capabilities"): no key=value, nothing that
// could add a property.
var cpuModelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*(,[+-][A-Za-z0-9][A-Za-z0-9_.-]*)*$`)

// checkArgs validates what buildArgs places in QEMU's argv: the Spec (see
// backend.Spec.Validate) and the launch, whose machine type and CPU model
// may come from a snapshot's qemu.json.
func checkArgs(spec backend.Spec, l launch) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	bad := func(format string, a ...any) error {
		return fmt.Errorf("qemu: %w: %s", backend.ErrInvalidSpec, fmt.Sprintf(format, a...))
	}
	switch l.Machine {
	case "", MachineMicrovm, MachineQ35:
	default:
		return bad("machine type %q: want %s or %s", l.Machine, MachineMicrovm, MachineQ35)
	}
	switch l.Accel {
	case backend.AccelKVM, backend.AccelTCG:
	default:
		return bad("accelerator %q: want kvm or tcg", l.Accel)
	}
	if !cpuModelRE.MatchString(l.CPU) || len(l.CPU) > 256 {
		return bad("cpu model %q: want a model name with optional +feature/-feature flags", l.CPU)
	}
	if l.TSCkHz < 0 {
		return bad("tsc frequency %d kHz", l.TSCkHz)
	}
	if err := backend.ValidatePath("memory file", l.MemoryFile, true); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	if err := backend.ValidatePath("disk", l.Disk, false); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	switch l.DiskFormat {
	case "", "qcow2", "raw":
	default:
		return bad("disk format %q: want qcow2 or raw", l.DiskFormat)
	}
	if !l.NoKernel && spec.Kernel == "" {
		return bad("kernel is empty")
	}
	return nil
}

// MicrovmFirmware returns qboot's ROM when QEMU ships it. qboot only loads
// the kernel: it boots faster than the SeaBIOS build Debian uses as
// microvm's default firmware, and unlike it never drives virtio-blk itself
// (SeaBIOS's disk probe corrupts virtio rings with 2 GiB guests and the
// boot hangs at "Probing EDD").
func MicrovmFirmware() string {
	for _, p := range []string{"/usr/share/qemu/qboot.rom", "/usr/share/seabios/qboot.rom", "/usr/local/share/qemu/qboot.rom"} {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return ""
}
