package backend

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// Limits a Spec must respect. They are wider than the SDK's (a backend
// also runs test and benchmark VMs), and exist so that a Spec read back
// from the store or a snapshot manifest cannot ask a VMM for nonsense.
const (
	MinMemoryMiB   = 16
	MaxMemoryMiB   = 1 << 20 // 1 TiB
	MaxCPUs        = 255
	MaxKernelArgs  = 4096 // bytes; Linux's COMMAND_LINE_SIZE on x86 is 2048+
	maxPathLen     = 4096
	defaultHostFwd = "127.0.0.1"
)

// ErrInvalidSpec is wrapped by every validation error of this file.
var ErrInvalidSpec = errors.New("invalid vm spec")

func invalid(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidSpec, fmt.Sprintf(format, a...))
}

// ValidateID checks a VM id: 1–64 characters of lowercase letters, digits,
// '-' and '_', starting and ending with a letter or digit (the SDK's rule).
// Such an id is a plain token: never a path outside its directory, never
// a QEMU option separator.
func ValidateID(id string) error {
	ok := len(id) >= 1 && len(id) <= 64
	for i := 0; ok && i < len(id); i++ {
		c := id[i]
		alnum := (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
		if !alnum && c != '-' && c != '_' {
			ok = false
		}
		if (i == 0 || i == len(id)-1) && !alnum {
			ok = false
		}
	}
	if !ok {
		return invalid("id %q: ids are 1-64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit", id)
	}
	return nil
}

// ParseMAC parses a guest MAC address: six bytes, unicast (the group bit of
// the first octet clear). It accepts only what net.ParseMAC accepts, so
// "52:54:00:12:34:56,romfile=/etc/shadow" is refused.
func ParseMAC(s string) (net.HardwareAddr, error) {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return nil, invalid("mac %q: %v", s, err)
	}
	if len(hw) != 6 {
		return nil, invalid("mac %q: want 6 bytes (aa:bb:cc:dd:ee:ff), got %d", s, len(hw))
	}
	if hw[0]&1 != 0 {
		return nil, invalid("mac %q: a multicast address cannot be a NIC's address", s)
	}
	return hw, nil
}

// Addr is the host address the forward binds: HostAddr parsed as an IP
// literal (no zone), 127.0.0.1 when empty.
func (pf PortForward) Addr() (netip.Addr, error) {
	s := pf.HostAddr
	if s == "" {
		s = defaultHostFwd
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, invalid("port forward host address %q: want an IP address such as 127.0.0.1 or ::1", pf.HostAddr)
	}
	if a.Zone() != "" {
		return netip.Addr{}, invalid("port forward host address %q: zones are not supported", pf.HostAddr)
	}
	return a.Unmap(), nil
}

// Validate checks a forward: ports 1-65535 and an IP literal host address.
func (pf PortForward) Validate() error {
	if pf.HostPort < 1 || pf.HostPort > 65535 || pf.GuestPort < 1 || pf.GuestPort > 65535 {
		return invalid("port forward %d:%d: ports must be between 1 and 65535", pf.HostPort, pf.GuestPort)
	}
	_, err := pf.Addr()
	return err
}

// ValidatePath checks that a path the VMM receives is absolute and clean,
// with no NUL or control characters. Empty is accepted when !required.
func ValidatePath(field, p string, required bool) error {
	if p == "" {
		if required {
			return invalid("%s is empty", field)
		}
		return nil
	}
	if len(p) > maxPathLen {
		return invalid("%s is longer than %d bytes", field, maxPathLen)
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return invalid("%s %q must be an absolute, clean path", field, p)
	}
	if hasControl(p) {
		return invalid("%s %q contains control characters", field, p)
	}
	return nil
}

func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// Validate checks every field of a Spec that reaches a VMM argument or a
// host path: the id, directories and files (absolute, clean), resources in
// range, disk format and accelerator from their known sets, the MAC, the
// port forwards and the kernel arguments (printable, bounded). Backends call
// it before they launch, so a Spec read back from the store or from a
// snapshot manifest cannot inject options either.
func (s Spec) Validate() error {
	if err := ValidateID(s.ID); err != nil {
		return err
	}
	for _, f := range []struct {
		name, p  string
		required bool
	}{
		{"dir", s.Dir, true}, {"run dir", s.RunDir, true},
		{"kernel", s.Kernel, false}, {"initrd", s.Initrd, false},
		{"base disk", s.BaseDisk, false}, {"disk", s.Disk, false},
	} {
		if err := ValidatePath(f.name, f.p, f.required); err != nil {
			return err
		}
	}
	switch s.DiskFormat {
	case "", "qcow2", "raw":
	default:
		return invalid("disk format %q: want qcow2 or raw", s.DiskFormat)
	}
	if s.MemoryMiB < MinMemoryMiB || s.MemoryMiB > MaxMemoryMiB {
		return invalid("memory %d MiB: want %d to %d MiB", s.MemoryMiB, MinMemoryMiB, MaxMemoryMiB)
	}
	if s.CPUs < 0 || s.CPUs > MaxCPUs { // 0 means 1
		return invalid("cpus %d: want 1 to %d", s.CPUs, MaxCPUs)
	}
	switch s.Accel {
	case "", AccelAuto, AccelKVM, AccelTCG:
	default:
		return invalid("accelerator %q: want auto, kvm or tcg", s.Accel)
	}
	if s.MAC != "" {
		if _, err := ParseMAC(s.MAC); err != nil {
			return err
		}
	}
	if s.MachineID != "" && !agentproto.ValidMachineID(s.MachineID) {
		return invalid("machine-id %q: want 32 lowercase hex digits, not all zero", s.MachineID)
	}
	for _, pf := range s.PortForwards {
		if err := pf.Validate(); err != nil {
			return err
		}
	}
	if len(s.KernelArgs) > MaxKernelArgs {
		return invalid("kernel arguments are %d bytes; at most %d", len(s.KernelArgs), MaxKernelArgs)
	}
	if hasControl(s.KernelArgs) {
		return invalid("kernel arguments contain control characters")
	}
	return nil
}
