package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
	"github.com/smolvm-go/smolvm/internal/consolelog"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/qmp"
)

// Options configures a Backend. The zero value is usable.
type Options struct {
	// QEMUPath is the qemu-system-x86_64 binary (default: looked up in PATH).
	QEMUPath string
	// QEMUImgPath is the qemu-img binary (default: looked up in PATH).
	QEMUImgPath string
	// Logger receives debug logs and the accelerator notice (default: discard).
	Logger *slog.Logger
	// Machine is the QEMU machine type: "microvm" (default) or "q35".
	Machine string
	// MemoryDir is where guest RAM files are created, in a per-VM
	// subdirectory smolvm-<hash>. Default /dev/shm; Spec.RunDir when
	// MemoryDir is not writable.
	MemoryDir string
	// StopTimeout bounds the graceful "quit" in Stop before SIGKILL
	// (default 5s).
	StopTimeout time.Duration
}

// Backend drives QEMU. It is safe for concurrent use.
type Backend struct {
	opts Options
	log  *slog.Logger

	probeOnce   sync.Once
	probedAccel backend.Accel
	probeErr    error

	cgOnce sync.Once
	cg     cgroup.Support

	versionMu sync.Mutex // DescribeHost: qemu --version, asked once
	version   string

	overlays overlayCache // fresh restore overlays by backing file (createOverlay)
	infosMu  sync.Mutex
	infos    map[diskInfoKey]imageInfo // snapshotDiskInfo

	// slirp launches QEMU's built-in slirp instead of the sidecar: no
	// network policy. Only the tests' throughput comparison sets it.
	slirp bool
}

var _ backend.Backend = (*Backend)(nil)

// New returns a QEMU backend.
func New(opts Options) *Backend {
	if opts.Machine == "" {
		opts.Machine = MachineMicrovm
	}
	if opts.MemoryDir == "" {
		opts.MemoryDir = "/dev/shm"
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = 5 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{opts: opts, log: log.With("backend", "qemu")}
}

// Name returns "qemu".
func (b *Backend) Name() string { return "qemu" }

// Capabilities reports everything: QEMU supports all operations.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{
		Pause:          true,
		MemorySnapshot: true,
		DiskSnapshot:   true,
		DiffDisk:       true,
		MappedRestore:  true,
		PortForward:    true,
		UserNetworking: true,
		NetworkPolicy:  true,
		Detach:         true,
		KernelFormat:   backend.KernelBzImage,
		DiskFormat:     backend.DiskQcow2,
	}
}

// ResolveAccel resolves req like ProbeAccel. The auto probe runs once per
// Backend and its notice is logged once (Info) through Options.Logger.
func (b *Backend) ResolveAccel(req backend.Accel) (backend.Accel, error) {
	if req != backend.AccelAuto && req != "" {
		a, notice, err := ProbeAccel(req)
		if notice != "" {
			b.log.Warn(notice)
		}
		return a, err
	}
	b.probeOnce.Do(func() {
		var notice string
		b.probedAccel, notice, b.probeErr = ProbeAccel(backend.AccelAuto)
		if notice != "" {
			b.log.Info(notice)
		}
	})
	return b.probedAccel, b.probeErr
}

func (b *Backend) qemuBinary() (string, error) {
	return lookBinary(b.opts.QEMUPath, "qemu-system-x86_64")
}

func (b *Backend) qemuImgBinary() (string, error) {
	return lookBinary(b.opts.QEMUImgPath, "qemu-img")
}

func lookBinary(override, name string) (string, error) {
	p := override
	if p == "" {
		p = name
	}
	found, err := exec.LookPath(p)
	if err != nil {
		return "", fmt.Errorf("qemu: %s: %w (install QEMU: run scripts/setup)", p, backend.ErrVMMNotFound)
	}
	return found, nil
}

// Prepare creates spec.Disk: a qcow2 overlay over the read-only base image
// (DiskFormat "qcow2" or ""), or a sparse copy of it (DiskFormat "raw").
// It refuses to overwrite an existing disk.
func (b *Backend) Prepare(ctx context.Context, spec backend.Spec) error {
	if spec.Dir != "" {
		if err := fsutil.PrivateDir(spec.Dir); err != nil {
			return fmt.Errorf("qemu: prepare: %w", err)
		}
	}
	if spec.BaseDisk == "" {
		return nil // initramfs-only VM
	}
	if spec.Disk == "" {
		return errors.New("qemu: prepare: spec.Disk is empty")
	}
	base, err := filepath.Abs(spec.BaseDisk)
	if err != nil {
		return fmt.Errorf("qemu: prepare: %w", err)
	}
	if _, err := os.Stat(base); err != nil {
		return fmt.Errorf("qemu: prepare: base disk: %w", err)
	}
	if _, err := os.Lstat(spec.Disk); err == nil {
		return fmt.Errorf("qemu: prepare: disk %s: %w", spec.Disk, fs.ErrExist)
	}
	switch spec.DiskFormat {
	case "", "qcow2":
		if err := b.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, spec.Disk); err != nil {
			return err
		}
		return private(spec.Disk)
	case "raw":
		if _, err := sparseCopy(spec.Disk, base); err != nil {
			return fmt.Errorf("qemu: prepare: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("qemu: prepare: disk format %q: %w", spec.DiskFormat, backend.ErrUnsupported)
	}
}

// Start launches QEMU for a fresh boot of spec and returns once QMP answers.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Machine, error) {
	l, err := b.freshLaunch(spec)
	if err != nil {
		return backend.Machine{}, err
	}
	return b.launch(ctx, spec, l)
}

// freshLaunch is the launch config for a normal boot of spec.
func (b *Backend) freshLaunch(spec backend.Spec) (launch, error) {
	accel, err := b.ResolveAccel(spec.Accel)
	if err != nil {
		return launch{}, err
	}
	l := launch{
		Machine:    b.opts.Machine,
		Accel:      accel,
		CPU:        cpuModel(accel),
		Disk:       spec.Disk,
		DiskFormat: spec.DiskFormat,
	}
	if spec.BaseDisk == "" && spec.Disk == "" {
		l.Disk = ""
	}
	if l.Machine != MachineMicrovm && l.Machine != MachineQ35 {
		return launch{}, fmt.Errorf("qemu: machine type %q: %w (want microvm or q35)", l.Machine, backend.ErrUnsupported)
	}
	if l.Machine == MachineMicrovm && accel == backend.AccelTCG {
		l.TSCkHz = hostTSCkHz(defaultHost.CPUInfo)
	}
	l.MemoryFile, err = b.memoryFile(spec)
	if err != nil {
		return launch{}, err
	}
	l.MemoryShared = true
	return l, nil
}

func cpuModel(a backend.Accel) string {
	if a == backend.AccelKVM {
		if isPVM(defaultHost) {
			// PVM rejects MSR 0x10a (IA32_ARCH_CAPABILITIES) for -cpu host.
			return "host,-arch-capabilities"
		}
		return "host"
	}
	return "max"
}

// memoryFile names the shared RAM file for a VM:
// MemoryDir/smolvm-<hash of ID and Dir>/ram. launch creates the directory
// (falling back to RunDir when MemoryDir is unusable).
func (b *Backend) memoryFile(spec backend.Spec) (string, error) {
	key := spec.ID + "\x00" + spec.Dir
	if abs, err := filepath.Abs(spec.Dir); err == nil {
		key = spec.ID + "\x00" + abs
	}
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(b.opts.MemoryDir, "smolvm-"+hex.EncodeToString(sum[:8]), "ram"), nil
}

// prepareMemoryFile creates the RAM file's directory (private: 0700, ours,
// checked), or moves the file into RunDir when MemoryDir is unusable. A RAM
// dir that exists but is not private (another user may have pre-created it
// to read the guest's memory) is refused. It returns the path to use.
func prepareMemoryFile(path, runDir string) (string, error) {
	err := fsutil.PrivateDir(filepath.Dir(path))
	if err == nil {
		return path, nil
	}
	if errors.Is(err, fsutil.ErrUnsafe) {
		return "", fmt.Errorf("qemu: guest RAM dir: %w", err)
	}
	if runDir == "" {
		return "", errors.New("qemu: no usable directory for the guest RAM file")
	}
	return filepath.Join(runDir, "ram"), nil
}

// DialAgent connects to a free agent channel. Each of the AgentPorts
// virtio-serial ports is taken with an exclusive flock on RUNDIR/agent.K.lock
// for as long as the connection is open (released by Close, or by the
// kernel when the process dies), so several processes and handles can talk
// to one VM at once. It waits while every port is busy.
func (b *Backend) DialAgent(ctx context.Context, m backend.Machine) (net.Conn, error) {
	for {
		for k := 0; k < AgentPorts; k++ {
			lock, err := fsutil.TryLock(filepath.Join(m.RunDir, fmt.Sprintf("agent.%d.lock", k)))
			if err != nil {
				if errors.Is(err, fsutil.ErrBusy) {
					continue
				}
				if !processAlive(m) {
					return nil, fmt.Errorf("qemu: dial agent: %w", backend.ErrNotRunning)
				}
				return nil, fmt.Errorf("qemu: dial agent: %w", err)
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", agentPortSocket(m.RunDir, k))
			if err != nil {
				lock.Close()
				if !processAlive(m) {
					return nil, fmt.Errorf("qemu: dial agent: %w", backend.ErrNotRunning)
				}
				return nil, fmt.Errorf("qemu: dial agent: %w", err)
			}
			return &lockedConn{Conn: c, lock: lock}, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu: dial agent: all %d agent channels are in use by other connections: %w", AgentPorts, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// lockedConn releases its agent port's lock when closed.
type lockedConn struct {
	net.Conn
	lock *os.File
	once sync.Once
}

func (c *lockedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.lock.Close() })
	return err
}

// withTimeout bounds ctx by backend.DefaultTimeout when it has no deadline.
func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// dialQMP connects to a running VM's QMP socket. It fails fast with
// ErrNotRunning when the process is gone.
func (b *Backend) dialQMP(ctx context.Context, m backend.Machine) (*qmp.Client, error) {
	if !processAlive(m) {
		return nil, fmt.Errorf("qemu: %w", backend.ErrNotRunning)
	}
	dctx, cancel := withTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	// Stop retrying at once if the process dies while we wait.
	stop := watchProcess(dctx, m, cancel)
	defer stop()
	c, err := qmp.Dial(dctx, qmpSocket(m.RunDir))
	if err != nil {
		if !processAlive(m) {
			return nil, fmt.Errorf("qemu: %w", backend.ErrNotRunning)
		}
		return nil, fmt.Errorf("qemu: connect to QMP: %w", err)
	}
	return c, nil
}

// DrainConsole moves what the VM's console ring buffer holds into
// DIR/console.log (kept at most consolelog.MaxSize bytes, the tail).
func (b *Backend) DrainConsole(ctx context.Context, m backend.Machine) error {
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		return err
	}
	defer c.Close()
	cctx, cancel := withTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	return consolelog.Drain(cctx, c, consoleLog(m.Dir))
}

// exec runs one QMP command with a per-command timeout, mapping QMP errors
// to *backend.VMMError.
func execQMP(ctx context.Context, c *qmp.Client, cmd string, args, result any) error {
	cctx, cancel := withTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	err := c.Execute(cctx, cmd, args, result)
	var qe *qmp.Error
	if errors.As(err, &qe) {
		return &backend.VMMError{Op: cmd, Class: qe.Class, Message: qe.Desc}
	}
	if err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	return nil
}

// qmpStatus is query-status's reply.
type qmpStatus struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func mapStatus(s qmpStatus) backend.Status {
	switch s.Status {
	case "running":
		return backend.StatusRunning
	case "internal-error", "guest-panicked", "shutdown", "io-error", "colo":
		return backend.StatusError
	default: // paused, postmigrate, prelaunch, inmigrate, finish-migrate, suspended, ...
		if s.Running {
			return backend.StatusRunning
		}
		return backend.StatusPaused
	}
}

// Status reports the VM state from QMP query-status and process liveness.
func (b *Backend) Status(ctx context.Context, m backend.Machine) (backend.Status, error) {
	if !processAlive(m) {
		return backend.StatusStopped, nil
	}
	c, err := b.dialQMP(ctx, m)
	if errors.Is(err, backend.ErrNotRunning) {
		return backend.StatusStopped, nil
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	var st qmpStatus
	if err := execQMP(ctx, c, "query-status", nil, &st); err != nil {
		if !processAlive(m) {
			return backend.StatusStopped, nil
		}
		return "", err
	}
	return mapStatus(st), nil
}

// Pause stops the vCPUs (QMP stop).
func (b *Backend) Pause(ctx context.Context, m backend.Machine) error {
	return b.simple(ctx, m, "stop")
}

// Resume restarts the vCPUs (QMP cont).
func (b *Backend) Resume(ctx context.Context, m backend.Machine) error {
	return b.simple(ctx, m, "cont")
}

func (b *Backend) simple(ctx context.Context, m backend.Machine, cmd string) error {
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		return err
	}
	defer c.Close()
	// A migration still running here was started by a snapshot whose
	// process died: left alone, it would stop the VM again when it
	// completes, moments after a cont.
	if err := b.endOrphanedMigration(ctx, c, m); err != nil {
		return err
	}
	if err := execQMP(ctx, c, cmd, nil, nil); err != nil {
		if !processAlive(m) {
			return fmt.Errorf("qemu: %s: %w", cmd, backend.ErrNotRunning)
		}
		return err
	}
	return nil
}

// ExposePort adds a host forward to a running VM: the network sidecar
// listens on it (HMP hostfwd_add for a VM running slirp).
func (b *Backend) ExposePort(ctx context.Context, m backend.Machine, pf backend.PortForward) error {
	if !m.Network {
		return fmt.Errorf("qemu: expose port: the VM has no network: %w", backend.ErrUnsupported)
	}
	if err := pf.Validate(); err != nil {
		return fmt.Errorf("qemu: expose port: %w", err)
	}
	if _, err := os.Stat(netSocket(m.RunDir)); err == nil || !processAlive(m) {
		if !processAlive(m) {
			return fmt.Errorf("qemu: expose port: %w", backend.ErrNotRunning)
		}
		return exposeNet(ctx, m, pf)
	}
	// A VM started with slirp (before the sidecar, or by the tests'
	// throughput comparison).
	rule, err := hostfwd(pf)
	if err != nil {
		return fmt.Errorf("qemu: expose port: %w", err)
	}
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		return err
	}
	defer c.Close()
	var out string
	err = execQMP(ctx, c, "human-monitor-command",
		map[string]string{"command-line": "hostfwd_add " + netdevID + " " + rule}, &out)
	if err != nil {
		return err
	}
	if out != "" {
		return &backend.VMMError{Op: "hostfwd_add", Message: trimSpace(out)}
	}
	return nil
}
