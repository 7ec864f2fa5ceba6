package smolvm

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/image"
)

// Defaults and limits for Config.
const (
	DefaultImage      = "debian"
	DefaultMemoryMiB  = 512
	DefaultCPUs       = 1
	MinMemoryMiB      = 128
	MaxMemoryMiB      = 16384
	MaxCPUs           = 32
	defaultBootTimout = 90 * time.Second
)

// Status is the lifecycle state of a VM (one type for the SDK, the store
// and the backends).
type Status = backend.Status

const (
	StatusCreated = backend.StatusCreated
	StatusRunning = backend.StatusRunning
	StatusPaused  = backend.StatusPaused
	StatusStopped = backend.StatusStopped
	StatusError   = backend.StatusError
)

// Accel is the accelerator a VM asks for (Config.Accel).
type Accel = backend.Accel

const (
	AccelAuto = backend.AccelAuto // KVM when usable, else TCG (software emulation)
	AccelKVM  = backend.AccelKVM
	AccelTCG  = backend.AccelTCG
)

// BackendName names a registered backend (Config.Backend): DefaultBackend,
// the other names in backends.go, or BackendAuto.
type BackendName string

// BackendAuto asks for the preferred backend usable on this host.
const BackendAuto BackendName = backend.Auto

// PortForward exposes GuestPort (TCP) on HostAddr:HostPort of the host.
type PortForward struct {
	// HostAddr is the host IP address the port binds, as an IP literal
	// ("127.0.0.1"); empty means 127.0.0.1, so only local processes reach
	// the guest. Binding any other address is an explicit opt-in: the
	// caller writes it ("0.0.0.0" exposes the port on every interface of
	// the host, as CLI `-p 0.0.0.0:8080:80` does). Host names are refused.
	// The QEMU backend (user networking) binds IPv4 addresses only.
	HostAddr  string `json:"host_addr,omitempty"`
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// Config describes a VM. The zero value is a working VM: the default image,
// 512 MiB, 1 vCPU, user-mode networking on.
type Config struct {
	// Name is the VM id: 1–64 characters of lowercase letters, digits, '-'
	// and '_', starting and ending with a letter or digit. Empty: generated.
	Name string `json:"name,omitempty"`
	// Image is the guest image ("debian", "busybox"); empty means DefaultImage.
	Image string `json:"image,omitempty"`
	// MemoryMiB is guest RAM (128–16384); 0 means DefaultMemoryMiB.
	MemoryMiB int `json:"memory_mib,omitempty"`
	// CPUs is the vCPU count (1–32); 0 means DefaultCPUs.
	CPUs int `json:"cpus,omitempty"`
	// NoNetwork turns guest networking off (it is on by default: NAT that
	// reaches the host and the outside, nothing reaches the guest unless a
	// port is exposed).
	NoNetwork bool `json:"no_network,omitempty"`
	// Network is what the guest may reach (see NetworkPolicy; the zero
	// value is NetworkDefault). NoNetwork is the same as Mode NetworkNone.
	Network NetworkPolicy `json:"network,omitzero"`
	// Backend names a registered backend (DefaultBackend when empty), or
	// "auto": the preferred one usable on this host.
	Backend BackendName `json:"backend,omitempty"`
	// Accel is AccelAuto (default: KVM when usable, else TCG), AccelKVM or
	// AccelTCG.
	Accel Accel `json:"accel,omitempty"`
	// Env is set in the guest for every command (persisted in the guest).
	Env map[string]string `json:"env,omitempty"`
	// PortForwards are exposed when the VM starts.
	PortForwards []PortForward `json:"port_forwards,omitempty"`
	// BootTimeout bounds Start; 0 means 90 s (software emulation is slow).
	BootTimeout time.Duration `json:"boot_timeout,omitempty"`
	// ColdBoot forces a real boot instead of restoring from a template.
	ColdBoot bool `json:"cold_boot,omitempty"`
}

// Options configure a Manager (and the package-level helpers).
type Options struct {
	// DataDir holds state, VM disks and snapshots. Default: $SMOLVM_DATA_DIR,
	// else $XDG_STATE_HOME/smolvm, else ~/.local/state/smolvm.
	DataDir string
	// ImageDir is the image cache. Default: $SMOLVM_IMAGE_DIR, else the
	// user's cache dir /smolvm/images.
	ImageDir string
	// RunDir holds unix sockets (short paths), one private (0700) directory
	// per VM; it must be a directory of ours with mode 0700 (created so when
	// missing, refused otherwise). Default: $SMOLVM_RUN_DIR, else
	// $XDG_RUNTIME_DIR/smolvm when XDG_RUNTIME_DIR is set, private and short
	// enough for socket paths, else /tmp/smolvm-<uid>.
	RunDir string
	// Logger receives progress and notices; nil means a text logger on
	// stderr at level Info.
	Logger *slog.Logger
	// OutputLimit bounds the bytes of each stream Run keeps in its Result
	// (default DefaultOutputLimit; WithOutputLimit overrides it per call).
	OutputLimit int
	// AgentCallTimeout is the host-side deadline of each guest agent
	// request other than a command (file, environment, sync...): default
	// 60 s, plus 1 s per MiB the request moves. A guest that does not
	// answer in time fails the call with ErrTimeout.
	AgentCallTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.DataDir == "" {
		o.DataDir = DefaultDataDir()
	}
	if o.ImageDir == "" {
		o.ImageDir = image.DefaultDir()
	}
	if o.RunDir == "" {
		o.RunDir = os.Getenv("SMOLVM_RUN_DIR")
		if o.RunDir == "" {
			o.RunDir = defaultRunDir()
		}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return o
}

// maxRunDir bounds a default run dir's length: RUNDIR/<12 hex>/agent.N.sock
// must fit a unix socket path (108 bytes with the NUL).
const maxRunDir = 80

// defaultRunDir is $XDG_RUNTIME_DIR/smolvm when XDG_RUNTIME_DIR is an
// absolute, private directory of ours (as the XDG spec requires) and short
// enough, else /tmp/smolvm-<euid>.
func defaultRunDir() string {
	if x := os.Getenv("XDG_RUNTIME_DIR"); filepath.IsAbs(x) && len(x)+len("/smolvm") <= maxRunDir &&
		fsutil.CheckPrivateDir(x) == nil {
		return filepath.Join(x, "smolvm")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("smolvm-%d", os.Geteuid()))
}

// DefaultDataDir is where state lives when Options.DataDir is empty.
func DefaultDataDir() string {
	if d := os.Getenv("SMOLVM_DATA_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "smolvm")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "smolvm-state")
	}
	return filepath.Join(home, ".local", "state", "smolvm")
}

func (c Config) withDefaults() Config {
	if c.Image == "" {
		c.Image = DefaultImage
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = DefaultMemoryMiB
	}
	if c.CPUs == 0 {
		c.CPUs = DefaultCPUs
	}
	if c.Backend == "" {
		c.Backend = DefaultBackend
	}
	if c.Accel == "" {
		c.Accel = "auto"
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = defaultBootTimout
	}
	return c
}

// validate checks a defaulted config.
func (c Config) validate() error {
	if c.Name != "" {
		if err := ValidateID(c.Name); err != nil {
			return err
		}
	}
	bad := func(msg string, fix Fix) error { return newErr("create", ErrInvalidConfig, fix, msg) }
	if c.MemoryMiB < MinMemoryMiB || c.MemoryMiB > MaxMemoryMiB {
		return bad(fmt.Sprintf("memory %d MiB is out of range: it must be between %d and %d MiB", c.MemoryMiB, MinMemoryMiB, MaxMemoryMiB),
			newFix(FixSetOption, ArgOption, "MemoryMiB", ArgValue, strconv.Itoa(DefaultMemoryMiB)))
	}
	if c.CPUs < 1 || c.CPUs > MaxCPUs {
		return bad(fmt.Sprintf("cpus %d is out of range: it must be between 1 and %d", c.CPUs, MaxCPUs), newFix(FixSetOption, ArgOption, "CPUs", ArgValue, "1"))
	}
	if _, ok := backend.Lookup(string(c.Backend)); !ok && c.Backend != backend.Auto {
		return bad(fmt.Sprintf("unknown backend %q: use %s or %s", c.Backend, strings.Join(backend.Names(), ", "), backend.Auto),
			newFix(FixSetOption, ArgOption, "Backend", ArgValue, DefaultBackend))
	}
	switch c.Accel {
	case "auto", "kvm", "tcg":
	default:
		return bad(fmt.Sprintf("unknown accelerator %q: use auto, kvm or tcg", c.Accel), newFix(FixSetOption, ArgOption, "Accel", ArgValue, "auto"))
	}
	if err := c.validateEnv(); err != nil {
		return err
	}
	for _, pf := range c.PortForwards {
		if err := pf.validate(); err != nil {
			return err
		}
	}
	np, err := c.resolveNetwork()
	if err != nil {
		return err
	}
	if np.Mode == NetworkNone && len(c.PortForwards) > 0 {
		return bad("port forwards need networking, but the VM has networking off", newFix(FixUnsetOption, ArgOption, "NoNetwork"))
	}
	return nil
}

// validate checks the ports (1-65535) and that HostAddr is an IP literal
// (empty means 127.0.0.1): the same rule the backends apply, so a value
// that could reach QEMU's argv as anything but an address never passes.
func (pf PortForward) validate() error {
	if pf.HostPort < 1 || pf.HostPort > 65535 || pf.GuestPort < 1 || pf.GuestPort > 65535 {
		return newErr("port", ErrInvalidConfig, Fix{}, fmt.Sprintf("port forward %d:%d: ports must be between 1 and 65535", pf.HostPort, pf.GuestPort))
	}
	if _, err := backend.PortForward(pf).Addr(); err != nil {
		return newErr("port", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "PortForward.HostAddr", ArgHint, "write the host address as an IP address: 127.0.0.1 (the default, this host only) or 0.0.0.0 (every interface)"),
			fmt.Sprintf("port forward %d:%d: host address %q is not an IP address", pf.HostPort, pf.GuestPort, pf.HostAddr))
	}
	return nil
}

// validateEnv checks Env with the guest agent's own rule for persisted
// variables (agentproto.ValidEnvName), so a name the agent would refuse
// fails here and not at boot.
func (c Config) validateEnv() error {
	bad := func(msg string, fix Fix) error { return newErr("create", ErrInvalidConfig, fix, msg) }
	for k, v := range c.Env {
		if !agentproto.ValidEnvName(k) {
			return bad(fmt.Sprintf("invalid environment variable name %q: names are letters, digits and '_', not starting with a digit", k),
				newFix(FixRenameEnv, ArgEnv, k))
		}
		if strings.IndexByte(v, 0) >= 0 {
			return bad(fmt.Sprintf("the value of environment variable %s contains a NUL byte", k), newFix(FixEditOption, ArgOption, "Env", ArgHint, "remove the NUL byte from the value"))
		}
	}
	return nil
}

// ValidateID checks a VM or snapshot id: 1–64 characters of lowercase
// letters, digits, '-' and '_', starting and ending with a letter or digit.
// Such an id can never name a path outside its directory.
func ValidateID(id string) error {
	if backend.ValidateID(id) != nil { // one rule for the SDK and the backends
		return newErr("validate", ErrInvalidID, Fix{},
			fmt.Sprintf("invalid id %q: ids must be 1-64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit", id))
	}
	return nil
}
