package fcapi

// Request and response bodies. Field names follow the definitions in the
// Firecracker swagger file; only the fields SmolVM may send are modelled,
// and every optional one is omitempty so that an older Firecracker (which
// rejects unknown fields) never sees a field we did not set.

// BootSource is the body of PUT /boot-source (definition BootSource).
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

// Huge page settings (MachineConfig.HugePages, SnapshotLoad.HugePages).
const (
	HugePagesNone        = "None"
	HugePagesTransparent = "Transparent"
	HugePages2M          = "2M"
	HugePagesSnapshot    = "Snapshot" // SnapshotLoad only
)

// MachineConfig is the body of PUT /machine-config and the answer of
// GET /machine-config (definition MachineConfiguration).
type MachineConfig struct {
	VCPUCount  int `json:"vcpu_count"`
	MemSizeMiB int `json:"mem_size_mib"`
	// TrackDirtyPages is always sent (false is the documented default) so
	// the request states whether diff snapshots can be dirty-page based.
	TrackDirtyPages bool   `json:"track_dirty_pages"`
	SMT             bool   `json:"smt,omitempty"`
	CPUTemplate     string `json:"cpu_template,omitempty"` // deprecated upstream; leave empty
	HugePages       string `json:"huge_pages,omitempty"`
}

// TokenBucket is one bucket of a RateLimiter (definition TokenBucket).
type TokenBucket struct {
	Size         int64  `json:"size"`
	OneTimeBurst *int64 `json:"one_time_burst,omitempty"`
	RefillTime   int64  `json:"refill_time"` // milliseconds
}

// RateLimiter limits a device's I/O (definition RateLimiter).
type RateLimiter struct {
	Bandwidth *TokenBucket `json:"bandwidth,omitempty"` // bytes
	Ops       *TokenBucket `json:"ops,omitempty"`       // operations
}

// Drive cache types and I/O engines.
const (
	CacheUnsafe    = "Unsafe"
	CacheWriteback = "Writeback"
	IOEngineSync   = "Sync"
	IOEngineAsync  = "Async"
)

// Drive is the body of PUT /drives/{drive_id} (definition Drive, virtio-block
// flavour: path_on_host and is_read_only are always sent).
type Drive struct {
	DriveID      string       `json:"drive_id"`
	PathOnHost   string       `json:"path_on_host"`
	IsRootDevice bool         `json:"is_root_device"`
	IsReadOnly   bool         `json:"is_read_only"`
	PartUUID     string       `json:"partuuid,omitempty"`
	CacheType    string       `json:"cache_type,omitempty"`
	IOEngine     string       `json:"io_engine,omitempty"`
	RateLimiter  *RateLimiter `json:"rate_limiter,omitempty"`
}

// PartialDrive is the body of PATCH /drives/{drive_id} (definition
// PartialDrive): after boot (or after a snapshot load) it points a drive at
// another backing file or changes its rate limiter.
type PartialDrive struct {
	DriveID     string       `json:"drive_id"`
	PathOnHost  string       `json:"path_on_host,omitempty"`
	RateLimiter *RateLimiter `json:"rate_limiter,omitempty"`
}

// NetworkInterface is the body of PUT /network-interfaces/{iface_id}
// (definition NetworkInterface).
type NetworkInterface struct {
	IfaceID       string       `json:"iface_id"`
	HostDevName   string       `json:"host_dev_name"`
	GuestMAC      string       `json:"guest_mac,omitempty"`
	MTU           int          `json:"mtu,omitempty"`
	RxRateLimiter *RateLimiter `json:"rx_rate_limiter,omitempty"`
	TxRateLimiter *RateLimiter `json:"tx_rate_limiter,omitempty"`
}

// Vsock is the body of PUT /vsock (definition Vsock). The deprecated
// vsock_id is not modelled.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"` // >= 3
	UDSPath  string `json:"uds_path"`
}

// Logger levels.
const (
	LogError   = "Error"
	LogWarning = "Warning"
	LogInfo    = "Info"
	LogDebug   = "Debug"
	LogTrace   = "Trace"
	LogOff     = "Off"
)

// Logger is the body of PUT /logger (definition Logger).
type Logger struct {
	LogPath       string `json:"log_path,omitempty"`
	Level         string `json:"level,omitempty"`
	ShowLevel     bool   `json:"show_level,omitempty"`
	ShowLogOrigin bool   `json:"show_log_origin,omitempty"`
	Module        string `json:"module,omitempty"`
}

// Metrics is the body of PUT /metrics (definition Metrics).
type Metrics struct {
	MetricsPath string `json:"metrics_path"`
}

// Action types for PUT /actions.
const (
	ActionInstanceStart  = "InstanceStart"
	ActionFlushMetrics   = "FlushMetrics"
	ActionSendCtrlAltDel = "SendCtrlAltDel" // x86 only, needs guest i8042 support
)

// InstanceActionInfo is the body of PUT /actions (definition InstanceActionInfo).
type InstanceActionInfo struct {
	ActionType string `json:"action_type"`
}

// VM states for PATCH /vm.
const (
	VMPaused  = "Paused"
	VMResumed = "Resumed"
)

// VM is the body of PATCH /vm (definition Vm).
type VM struct {
	State string `json:"state"`
}

// Snapshot types for PUT /snapshot/create.
const (
	SnapshotFull = "Full"
	SnapshotDiff = "Diff" // needs track_dirty_pages for a sparse memory diff
)

// SnapshotCreate is the body of PUT /snapshot/create (definition
// SnapshotCreateParams). Paths are as seen by the Firecracker process.
type SnapshotCreate struct {
	SnapshotType string `json:"snapshot_type,omitempty"`
	SnapshotPath string `json:"snapshot_path"`
	MemFilePath  string `json:"mem_file_path"`
}

// Memory backend types for SnapshotLoad.MemBackend.
const (
	MemBackendFile = "File" // Firecracker maps the memory file MAP_PRIVATE
	MemBackendUffd = "Uffd" // a userfaultfd handler process serves page faults
)

// MemoryBackend says where a loaded snapshot's guest memory comes from
// (definition MemoryBackend).
type MemoryBackend struct {
	BackendType string `json:"backend_type"`
	BackendPath string `json:"backend_path"`
}

// NetworkOverride points a snapshotted network interface at another TAP
// device on load (definition NetworkOverride).
type NetworkOverride struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
}

// VsockOverride points the snapshotted vsock device at another unix socket
// on load (definition VsockOverride).
type VsockOverride struct {
	UDSPath string `json:"uds_path"`
}

// SnapshotLoad is the body of PUT /snapshot/load (definition
// SnapshotLoadParams). The deprecated mem_file_path and
// enable_diff_snapshots are not modelled: MemBackend is the way.
type SnapshotLoad struct {
	SnapshotPath     string            `json:"snapshot_path"`
	MemBackend       *MemoryBackend    `json:"mem_backend,omitempty"`
	TrackDirtyPages  bool              `json:"track_dirty_pages,omitempty"`
	ResumeVM         bool              `json:"resume_vm"`
	NetworkOverrides []NetworkOverride `json:"network_overrides,omitempty"`
	VsockOverride    *VsockOverride    `json:"vsock_override,omitempty"`
	ClockRealtime    bool              `json:"clock_realtime,omitempty"`
	HugePages        string            `json:"huge_pages,omitempty"`
}

// Instance states reported by GET /.
const (
	StateNotStarted = "Not started"
	StateRunning    = "Running"
	StatePaused     = "Paused"
)

// InstanceInfo is the answer of GET / (definition InstanceInfo).
type InstanceInfo struct {
	AppName    string `json:"app_name"`
	ID         string `json:"id"`
	State      string `json:"state"`
	VMMVersion string `json:"vmm_version"`
}

// FirecrackerVersion is the answer of GET /version (definition
// FirecrackerVersion).
type FirecrackerVersion struct {
	FirecrackerVersion string `json:"firecracker_version"`
}

// faultBody is the error body (definition Error).
type faultBody struct {
	FaultMessage string `json:"fault_message"`
}
