package backend

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// Capabilities declares what a backend can do. Callers check them before
// asking for an operation, and backends return ErrUnsupported (wrapped) for
// anything they declare false.
type Capabilities struct {
	Pause          bool // pause/resume a running VM
	MemorySnapshot bool // full and diff snapshots (memory + device state)
	DiskSnapshot   bool // disk-only snapshots restored by cold boot
	DiffDisk       bool // diff snapshots store the disk relative to the base image
	MappedRestore  bool // restore maps the snapshot's memory file privately (copy-on-write)
	PortForward    bool // ExposePort on a running VM
	UserNetworking bool // NAT networking without root
	NetworkPolicy  bool // Spec.NetPolicy is enforced (user-mode network sidecar)
	Detach         bool // implements Detacher: a restored VM's disk may depend on the snapshot's files

	// KernelFormat is the kernel image the backend boots (KernelBzImage or
	// KernelVmlinux); DiskFormat the per-VM disk it creates in Prepare
	// (DiskQcow2: an overlay on the base image; DiskRaw: a copy).
	KernelFormat string
	DiskFormat   string
}

// Kernel and disk formats (Capabilities.KernelFormat, DiskFormat).
const (
	KernelBzImage = "bzImage"
	KernelVmlinux = "vmlinux"
	DiskQcow2     = "qcow2"
	DiskRaw       = "raw"
)

// Memory formats (SnapshotResult.MemoryFormat).
const (
	MemoryRaw    = "raw"    // a mappable image of guest RAM (the memory artifact)
	MemoryStream = "stream" // RAM inside the migration state file
)

// Accel is a hardware accelerator choice.
type Accel string

const (
	AccelAuto Accel = "auto" // probe: KVM when usable, TCG otherwise
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// PortForward forwards HostAddr:HostPort on the host to GuestPort in the guest (TCP).
type PortForward struct {
	HostAddr  string `json:"host_addr,omitempty"` // default 127.0.0.1
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// Spec is everything a backend needs to launch one VM. It is persisted (as
// JSON) with the VM record so that another process can operate on the VM.
type Spec struct {
	ID         string `json:"id"`
	Dir        string `json:"dir"`         // per-VM state dir: disk overlay, console log, pid file (any length)
	RunDir     string `json:"run_dir"`     // short dir for unix sockets (< 80 bytes), created by the caller
	Kernel     string `json:"kernel"`      // kernel image (bzImage for QEMU, vmlinux for Firecracker)
	Initrd     string `json:"initrd"`      // initramfs with the agent as /init
	BaseDisk   string `json:"base_disk"`   // read-only base root filesystem (raw ext4)
	Disk       string `json:"disk"`        // per-VM writable disk: qcow2 overlay on BaseDisk (QEMU) or a copy (Firecracker); the backend creates it in Prepare
	DiskFormat string `json:"disk_format"` // "qcow2" or "raw"

	MemoryMiB int   `json:"memory_mib"`
	CPUs      int   `json:"cpus"`
	Accel     Accel `json:"accel"` // requested; the resolved one is in Machine.Accel

	Network bool   `json:"network"`
	MAC     string `json:"mac,omitempty"`
	// MachineID is the guest's /etc/machine-id (32 lowercase hex digits),
	// drawn by the SDK for each VM and given to the guest with its
	// hostname and MAC (set_identity). Backends do not use it.
	MachineID    string        `json:"machine_id,omitempty"`
	PortForwards []PortForward `json:"port_forwards,omitempty"`
	// NetPolicy is what the guest may reach when Network is on (the zero
	// value is the default mode: public internet only).
	NetPolicy netpolicy.Policy `json:"net_policy"`

	// KernelArgs are appended to the backend's own command line
	// (console, root device, quiet, ...).
	KernelArgs string `json:"kernel_args,omitempty"`

	// RunAsUID and RunAsGID are the VM's own unprivileged identity: when
	// both are set and the backend runs as root, the VMM drops to them
	// (QEMU -run-with user=, the Firecracker jailer). 0 = no drop.
	RunAsUID int `json:"run_as_uid,omitempty"`
	RunAsGID int `json:"run_as_gid,omitempty"`
}

// Machine is a launched VM: its spec plus what the launch produced. It is
// persisted with the VM record.
type Machine struct {
	Spec
	Backend string `json:"backend"`
	PID     int    `json:"pid"`
	Accel   Accel  `json:"resolved_accel"` // the accelerator actually used
	// MemoryFile is the file that backs guest RAM, when the backend maps RAM
	// from a file (QEMU memory-backend-file). Empty when RAM is anonymous.
	MemoryFile string `json:"memory_file,omitempty"`
	// MemoryShared reports whether MemoryFile is mapped shared (writes land in
	// the file) or private (copy-on-write over a snapshot's memory image).
	MemoryShared bool `json:"memory_shared,omitempty"`
	// NetPID is the network sidecar's pid (0: none).
	NetPID int `json:"net_pid,omitempty"`
}

// Status is the lifecycle state of a VM: the one type for what a VMM
// reports (Backend.Status: running, paused, stopped or error), what the
// store records (the strings are persisted) and what the SDK returns
// (smolvm.Status and store.VMStatus are aliases of it).
type Status string

const (
	StatusCreated Status = "created" // prepared, never started (recorded; no VMM reports it)
	StatusRunning Status = "running"
	StatusPaused  Status = "paused"
	StatusStopped Status = "stopped" // process gone
	StatusError   Status = "error"   // process alive but the VM cannot run (e.g. KVM internal-error)
)

// Valid reports whether s is one of the Status constants.
func (s Status) Valid() bool {
	switch s {
	case StatusCreated, StatusRunning, StatusPaused, StatusStopped, StatusError:
		return true
	}
	return false
}

// SnapshotKind is the kind of snapshot to take (smolvm.SnapshotType is an
// alias of it; the strings are in manifests and the store).
type SnapshotKind string

const (
	SnapshotFull SnapshotKind = "full" // memory + device state + self-contained disk
	SnapshotDiff SnapshotKind = "diff" // memory + device state + disk relative to the base image
	SnapshotDisk SnapshotKind = "disk" // disk only; restore is a cold boot
)

// Artifact is one file a snapshot wrote, relative to the snapshot dir.
type Artifact struct {
	Role string `json:"role"` // "memory", "state", "disk"
	Name string `json:"name"` // file name inside the snapshot dir
}

// SnapshotResult describes what Snapshot wrote into the destination dir.
type SnapshotResult struct {
	Artifacts []Artifact `json:"artifacts"`
	// BaseImage is the absolute path the disk artifact depends on (diff
	// snapshots only); empty when the snapshot is self-contained.
	BaseImage string `json:"base_image,omitempty"`
	// MemoryFormat tells Restore how memory is stored: "raw" (a mappable
	// image of guest RAM, the memory artifact), "stream" (RAM inside the
	// migration state file), or "" (no memory: disk snapshot).
	MemoryFormat string `json:"memory_format,omitempty"`
}

// RestoreRequest asks a backend to bring a snapshot back as a new machine.
type RestoreRequest struct {
	Spec        Spec           // the new machine (ID, Dir, RunDir, resources must match the snapshot)
	SnapshotDir string         // where the artifacts are
	Kind        SnapshotKind   //
	Result      SnapshotResult // what Snapshot returned
	Resume      bool           // run the VM after loading; otherwise it stays paused
}

// ConsoleDrainer is implemented by backends whose VMM keeps the guest
// console in a bounded buffer: DrainConsole moves it into DIR/console.log
// (bounded too, keeping the tail). Stop drains it as well.
type ConsoleDrainer interface {
	DrainConsole(ctx context.Context, m Machine) error
}

// Backend is a VMM driver. Every method that does I/O takes a context and
// must honour its deadline. Implementations hold no process-wide state.
//
// Callers serialize the operations on one machine (the SDK holds the VM's
// lock across processes). A backend may therefore treat work it finds in
// flight on a machine, such as a migration that a killed process started,
// as orphaned, and end it before it acts.
type Backend interface {
	Name() string
	Capabilities() Capabilities

	// Prepare creates the per-VM writable disk (spec.Disk) from spec.BaseDisk.
	Prepare(ctx context.Context, spec Spec) error
	// Start launches the VMM detached from the calling process (the VM
	// outlives it) and returns once the VMM accepts control requests.
	// On error nothing is left running.
	Start(ctx context.Context, spec Spec) (Machine, error)
	// DialAgent connects to the guest agent's stream (virtio-serial socket
	// for QEMU, vsock CONNECT for Firecracker). The agent may not be up yet.
	DialAgent(ctx context.Context, m Machine) (net.Conn, error)
	Status(ctx context.Context, m Machine) (Status, error)
	Pause(ctx context.Context, m Machine) error
	Resume(ctx context.Context, m Machine) error
	// Stop ends the VMM process (graceful quit, then kill) and waits until it is gone.
	Stop(ctx context.Context, m Machine) error
	ExposePort(ctx context.Context, m Machine, pf PortForward) error

	// Snapshot writes the snapshot's artifacts into dir (which exists and is
	// empty). The VM is paused first and left paused. Artifacts need not be
	// fsynced: the caller makes every one durable (snapshot.Describe flushes
	// them while it hashes them) before the snapshot is published.
	Snapshot(ctx context.Context, m Machine, kind SnapshotKind, dir string) (SnapshotResult, error)
	// Restore starts a new VMM process from a snapshot.
	Restore(ctx context.Context, req RestoreRequest) (Machine, error)
}

// SpecValidator is implemented by backends that can check a Spec without
// launching anything: what the backend itself would refuse (beyond
// Spec.Validate). The SDK calls it when a VM is created.
type SpecValidator interface {
	ValidateSpec(spec Spec) error
}

// AccelResolver is implemented by backends that choose the accelerator at
// launch (AccelAuto): ResolveAccel says which one a launch on this host
// would use, without launching anything. The SDK keys templates by it (a
// memory snapshot taken under one accelerator is not restored under
// another). A backend without it uses the accelerator requested.
type AccelResolver interface {
	ResolveAccel(req Accel) (Accel, error)
}

// Sentinel errors. Backends wrap them with %w.
var (
	ErrUnsupported    = errors.New("not supported by this backend")
	ErrNotRunning     = errors.New("vm process is not running")
	ErrVMMNotFound    = errors.New("vmm binary not found")
	ErrBackingMissing = errors.New("backing image missing")
)

// VMMError is a failure reported by the VMM itself (QMP error class,
// Firecracker fault_message, a process that exited during boot...).
type VMMError struct {
	Op      string // what we asked: "migrate", "snapshot/create", "start"...
	Class   string // QMP class or HTTP status
	Message string
	Log     string // tail of the VMM's log, when useful
}

func (e *VMMError) Error() string {
	s := fmt.Sprintf("%s: %s", e.Op, e.Message)
	if e.Class != "" {
		s = fmt.Sprintf("%s: %s (%s)", e.Op, e.Message, e.Class)
	}
	if e.Log != "" {
		s += "\n--- vmm log ---\n" + e.Log
	}
	return s
}

// DefaultTimeout bounds a single control request (QMP command, Firecracker API call).
const DefaultTimeout = 30 * time.Second
