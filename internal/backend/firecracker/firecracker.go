package firecracker

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fcapi"
)

// Name is the backend name recorded in Machine.Backend.
const Name = "firecracker"

// Guest-facing constants.
const (
	// AgentPort is the guest vsock port the agent listens on.
	AgentPort = 1024
	// GuestCID is the guest's vsock context id.
	GuestCID = 3
	// BaseKernelArgs start every guest command line.
	BaseKernelArgs = "console=ttyS0 reboot=k panic=1 pci=off"
	// DriveID is the Firecracker drive id of the per-VM disk (/dev/vda).
	DriveID = "rootfs"
	// IfaceID is the Firecracker id of the TAP-backed interface.
	IfaceID = "eth0"
)

// Files inside RunDir, Dir and snapshot dirs.
const (
	apiSockName   = "fc.sock"
	vsockName     = "vsock.sock"
	driveLinkName = "rootfs" // relative path_on_host, resolved in RunDir
	logName       = "firecracker.log"
	consoleName   = "console.log" // symlink to logName
	pidName       = "firecracker.pid"

	stateFile  = "vmstate"
	memoryFile = "memory"
	diskFile   = "disk"
	metaFile   = "firecracker.json"
)

// Options configure the backend.
type Options struct {
	// Binary is the firecracker executable: a path, or a name looked up on
	// PATH. Empty means "firecracker".
	Binary string
	// SnapshotTimeout bounds snapshot create/load and disk copies when the
	// caller's context has no deadline (default 5 minutes).
	SnapshotTimeout time.Duration
	// Jailer is the jailer binary used, as root, for VMs with their own
	// uid (see jailer.go): empty means "jailer" next to the firecracker
	// binary when it is there, "off" never.
	Jailer string
}

// Backend drives Firecracker. It holds only its options; every Machine is
// self-describing so any process can operate on it.
type Backend struct {
	bin     string
	snapTTL time.Duration
	jailer  string // "" = run unjailed
}

var _ backend.Backend = (*Backend)(nil)

// New finds the firecracker binary. The error wraps backend.ErrVMMNotFound
// when it is not there.
func New(opts Options) (*Backend, error) {
	name := opts.Binary
	if name == "" {
		name = "firecracker"
	}
	bin, err := exec.LookPath(name)
	if err != nil {
		return nil, fmt.Errorf("firecracker: %w: %q: %v (install Firecracker v1.16 or set its path)", backend.ErrVMMNotFound, name, err)
	}
	if abs, err := filepath.Abs(bin); err == nil {
		bin = abs
	}
	ttl := opts.SnapshotTimeout
	if ttl <= 0 {
		ttl = 5 * time.Minute
	}
	return &Backend{bin: bin, snapTTL: ttl, jailer: findJailer(opts.Jailer, bin)}, nil
}

// Binary is the resolved firecracker path.
func (b *Backend) Binary() string { return b.bin }

// Name implements backend.Backend.
func (b *Backend) Name() string { return Name }

// Capabilities implements backend.Backend. DiffDisk is false: a diff
// snapshot's disk is a reflink copy when the filesystem allows it, but it is
// always a self-contained file, never relative to the base image.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{
		Pause:          true,
		MemorySnapshot: true,
		DiskSnapshot:   true,
		DiffDisk:       false,
		MappedRestore:  true,
		PortForward:    false,
		UserNetworking: false,
		Detach:         false, // the disk is a self-contained copy
		KernelFormat:   backend.KernelVmlinux,
		DiskFormat:     backend.DiskRaw,
	}
}

// Version runs `firecracker --version` and returns the version, e.g. "v1.16.0".
func (b *Backend) Version(ctx context.Context) (string, error) {
	ctx, cancel := withDefaultTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.bin, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("firecracker --version: %w", err)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	f := strings.Fields(line)
	if len(f) == 0 {
		return "", fmt.Errorf("firecracker --version: empty output")
	}
	return f[len(f)-1], nil
}

// Prepare creates spec.Disk as a copy-on-write copy of spec.BaseDisk (a
// FICLONE reflink where supported, else a sparse copy).
func (b *Backend) Prepare(ctx context.Context, spec backend.Spec) error {
	if err := checkDiskFormat(spec); err != nil {
		return err
	}
	spec, err := absSpec(spec)
	if err != nil {
		return err
	}
	if spec.BaseDisk == "" || spec.Disk == "" {
		return errors.New("firecracker: prepare: spec needs BaseDisk and Disk")
	}
	if _, err := os.Stat(spec.BaseDisk); err != nil {
		return fmt.Errorf("firecracker: prepare: %w: %v", backend.ErrBackingMissing, err)
	}
	if err := os.MkdirAll(filepath.Dir(spec.Disk), 0o700); err != nil {
		return fmt.Errorf("firecracker: prepare: %w", err)
	}
	ctx, cancel := withDefaultTimeout(ctx, b.snapTTL)
	defer cancel()
	if _, err := copyDisk(ctx, spec.BaseDisk, spec.Disk); err != nil {
		return fmt.Errorf("firecracker: prepare: %w", err)
	}
	return nil
}

// Start implements backend.Backend: it launches firecracker, configures the
// boot source, machine, drive, vsock (and TAP network when root) and boots.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Machine, error) {
	spec, err := absSpec(spec)
	if err != nil {
		return backend.Machine{}, err
	}
	if err := checkSpec(spec, true); err != nil {
		return backend.Machine{}, err
	}
	if spec.Disk != "" {
		if _, err := os.Stat(spec.Disk); err != nil {
			return backend.Machine{}, fmt.Errorf("firecracker: start: disk %s: %w (Prepare creates it)", spec.Disk, err)
		}
	}
	for _, f := range []string{spec.Kernel, spec.Initrd} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return backend.Machine{}, fmt.Errorf("firecracker: start: %w", err)
		}
	}
	kernel, initrd := spec.Kernel, spec.Initrd
	ctx, cancel := withDefaultTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	vsockPath := vsockSock(spec)
	if b.jailFor(spec) != nil { // launch stages these into the jail
		kernel, initrd, vsockPath = jailPaths(spec)
	}

	p, err := b.launch(ctx, spec)
	if err != nil {
		return backend.Machine{}, err
	}
	m := p.machine(spec)
	fail := func(op string, err error) (backend.Machine, error) {
		return backend.Machine{}, p.fail(op, err, spec)
	}
	c := fcapi.New(apiSock(spec))
	defer c.Close()

	if err := c.PutBootSource(ctx, fcapi.BootSource{KernelImagePath: kernel, InitrdPath: initrd, BootArgs: bootArgs(spec)}); err != nil {
		return fail("boot-source", err)
	}
	if err := c.PutMachineConfig(ctx, fcapi.MachineConfig{VCPUCount: cmp.Or(spec.CPUs, 1), MemSizeMiB: cmp.Or(spec.MemoryMiB, 128)}); err != nil {
		return fail("machine-config", err)
	}
	if spec.Disk != "" {
		// Without an initramfs the disk itself must be the root device.
		drive := fcapi.Drive{DriveID: DriveID, PathOnHost: driveLinkName, IsRootDevice: initrd == ""}
		if err := c.PutDrive(ctx, drive); err != nil {
			return fail("drives", err)
		}
	}
	if spec.Network {
		tap, err := setupTAP(ctx, spec)
		if err != nil {
			return fail("network", err)
		}
		if tap != "" {
			if err := c.PutNetworkInterface(ctx, fcapi.NetworkInterface{IfaceID: IfaceID, HostDevName: tap, GuestMAC: guestMAC(spec)}); err != nil {
				return fail("network-interfaces", err)
			}
		}
	}
	if err := c.PutVsock(ctx, fcapi.Vsock{GuestCID: GuestCID, UDSPath: vsockPath}); err != nil {
		return fail("vsock", err)
	}
	if err := c.StartInstance(ctx); err != nil {
		return fail("start", err)
	}
	return m, nil
}

// bootArgs is the guest command line: BaseKernelArgs, smol.root=/dev/vda
// when there is a disk (unless KernelArgs names a root already), then
// KernelArgs.
func bootArgs(spec backend.Spec) string {
	args := []string{BaseKernelArgs}
	if spec.Disk != "" && spec.Initrd != "" && !strings.Contains(" "+spec.KernelArgs, " smol.root=") {
		args = append(args, "smol.root=/dev/vda")
	}
	if a := strings.TrimSpace(spec.KernelArgs); a != "" {
		args = append(args, a)
	}
	return strings.Join(args, " ")
}

// DialAgent connects to the agent's vsock port through Firecracker's vsock
// socket (CONNECT 1024), retrying until the agent listens or ctx ends.
func (b *Backend) DialAgent(ctx context.Context, m backend.Machine) (net.Conn, error) {
	if !alive(m) {
		return nil, fmt.Errorf("firecracker: dial agent: %w", backend.ErrNotRunning)
	}
	d := fcapi.VsockDialer{
		Path: vsockSock(m.Spec),
		Check: func() error {
			if !alive(m) {
				return fmt.Errorf("firecracker: dial agent: %w\n--- vmm log ---\n%s", backend.ErrNotRunning, logTail(m.Dir))
			}
			return nil
		},
	}
	conn, err := d.Dial(ctx, AgentPort)
	if err != nil {
		return nil, fmt.Errorf("firecracker: dial agent: %w", err)
	}
	return conn, nil
}

// Status implements backend.Backend.
func (b *Backend) Status(ctx context.Context, m backend.Machine) (backend.Status, error) {
	if !alive(m) {
		return backend.StatusStopped, nil
	}
	c := fcapi.New(apiSock(m.Spec))
	defer c.Close()
	info, err := c.InstanceInfo(ctx)
	if err != nil {
		if !alive(m) {
			return backend.StatusStopped, nil
		}
		return "", vmmError("status", err, m.Dir)
	}
	switch info.State {
	case fcapi.StateRunning:
		return backend.StatusRunning, nil
	case fcapi.StatePaused:
		return backend.StatusPaused, nil
	default: // "Not started" after Start/Restore returned: the VM cannot run
		return backend.StatusError, nil
	}
}

// Pause implements backend.Backend (PATCH /vm Paused).
func (b *Backend) Pause(ctx context.Context, m backend.Machine) error {
	return b.patchVM(ctx, m, "pause", fcapi.VMPaused)
}

// Resume implements backend.Backend (PATCH /vm Resumed).
func (b *Backend) Resume(ctx context.Context, m backend.Machine) error {
	return b.patchVM(ctx, m, "resume", fcapi.VMResumed)
}

func (b *Backend) patchVM(ctx context.Context, m backend.Machine, op, state string) error {
	if !alive(m) {
		return fmt.Errorf("firecracker: %s: %w", op, backend.ErrNotRunning)
	}
	c := fcapi.New(apiSock(m.Spec))
	defer c.Close()
	if err := c.PatchVM(ctx, state); err != nil {
		if !alive(m) {
			return fmt.Errorf("firecracker: %s: %w", op, backend.ErrNotRunning)
		}
		return vmmError(op, err, m.Dir)
	}
	return nil
}

// Stop implements backend.Backend. SendCtrlAltDel is x86-only and depends
// on the guest, so the process gets SIGTERM, then SIGKILL after a grace
// period; Stop waits until it is gone and removes the sockets, the drive
// link, the pid file and the TAP. Stopping a stopped machine succeeds.
func (b *Backend) Stop(ctx context.Context, m backend.Machine) error {
	ctx, cancel := withDefaultTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	if m.PID <= 0 {
		m.PID = findFirecracker(m.Spec) // launched by a process that died before recording it
	}
	if alive(m) {
		if err := terminate(ctx, m); err != nil {
			return fmt.Errorf("firecracker: stop: %w", err)
		}
	}
	cleanup(m.Spec)
	return nil
}

// ExposePort is not supported: Firecracker has no user-mode networking.
func (b *Backend) ExposePort(ctx context.Context, m backend.Machine, pf backend.PortForward) error {
	return fmt.Errorf("firecracker: expose port: %w (no user-mode networking; use a TAP and host routing)", backend.ErrUnsupported)
}

func checkDiskFormat(spec backend.Spec) error {
	if spec.DiskFormat != "" && spec.DiskFormat != "raw" {
		return fmt.Errorf("firecracker: disk format %q: %w (Firecracker attaches raw images only)", spec.DiskFormat, backend.ErrUnsupported)
	}
	return nil
}

// checkSpec validates what every launch needs; a cold boot also needs a
// kernel.
func checkSpec(spec backend.Spec, boot bool) error {
	if err := checkDiskFormat(spec); err != nil {
		return err
	}
	if spec.Accel == backend.AccelTCG {
		return fmt.Errorf("firecracker: accel %q: %w (Firecracker needs KVM)", spec.Accel, backend.ErrUnsupported)
	}
	if spec.ID == "" || spec.Dir == "" || spec.RunDir == "" {
		return errors.New("firecracker: spec needs ID, Dir and RunDir")
	}
	// Every field by type (the MAC, id and paths reach the API and argv;
	// a spec may come back from the store or a snapshot manifest).
	typed := spec
	typed.MemoryMiB = cmp.Or(typed.MemoryMiB, 128) // Start's default
	if err := typed.Validate(); err != nil {
		return fmt.Errorf("firecracker: %w", err)
	}
	if boot && spec.Kernel == "" {
		return errors.New("firecracker: spec needs Kernel (an uncompressed vmlinux)")
	}
	// sun_path is 108 bytes including the NUL.
	if n := len(vsockSock(spec)); n > 107 {
		return fmt.Errorf("firecracker: RunDir %q is too long for unix sockets (%d bytes)", spec.RunDir, n)
	}
	return nil
}

// absSpec makes the spec's paths absolute: the VMM runs in RunDir, and
// alive() matches the exact --api-sock argument.
func absSpec(spec backend.Spec) (backend.Spec, error) {
	for _, p := range []*string{&spec.Dir, &spec.RunDir, &spec.Kernel, &spec.Initrd, &spec.BaseDisk, &spec.Disk} {
		if *p == "" {
			continue
		}
		a, err := filepath.Abs(*p)
		if err != nil {
			return spec, fmt.Errorf("firecracker: %w", err)
		}
		*p = a
	}
	return spec, nil
}

func apiSock(s backend.Spec) string   { return filepath.Join(s.RunDir, apiSockName) }
func vsockSock(s backend.Spec) string { return filepath.Join(s.RunDir, vsockName) }
func driveLink(s backend.Spec) string { return filepath.Join(s.RunDir, driveLinkName) }

// vmmError turns an fcapi error into a *backend.VMMError carrying the tail
// of the VMM log; other errors are wrapped as they are.
func vmmError(op string, err error, dir string) error {
	var fe *fcapi.Error
	if errors.As(err, &fe) {
		return &backend.VMMError{Op: op, Class: fmt.Sprintf("HTTP %d", fe.Status), Message: fe.FaultMessage, Log: logTail(dir)}
	}
	var ve *backend.VMMError
	if errors.As(err, &ve) {
		return err
	}
	return fmt.Errorf("firecracker: %s: %w", op, err)
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}
