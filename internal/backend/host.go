package backend

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Host is what a memory snapshot's state depends on in the host that took
// it: the backend describes it (HostDescriber) when a snapshot is taken,
// the SDK records it in the manifest and compares it with this host's
// (CompareHost) before a restore.
type Host struct {
	Accel       Accel  `json:"accel"`        // the accelerator the VM ran under
	VMM         string `json:"vmm"`          // the VMM's name ("qemu", ...)
	VMMVersion  string `json:"vmm_version"`  // MAJOR.MINOR.PATCH
	MachineType string `json:"machine_type"` // the VMM's machine model ("microvm", ...)
	CPUModelArg string `json:"cpu_model_arg,omitempty"`
	CPUVendor   string `json:"cpu_vendor"` // /proc/cpuinfo vendor_id
	CPUModel    string `json:"cpu_model"`  // /proc/cpuinfo model name
	// CPUFlags are the host CPU flags the guest saw: recorded under
	// hardware acceleration only (under TCG the guest's CPU is the VMM's
	// model, fixed by VMM version and machine type).
	CPUFlags []string `json:"cpu_flags,omitempty"`
}

// TemplateKey is the part of h a memory image made on this host depends
// on, as a string for a template's key: what CompareHost refuses when it
// differs (accelerator, VMM, its major version, machine type; under KVM the
// CPU vendor and flags). A host that changes any of it gets new templates
// instead of refused restores.
func (h Host) TemplateKey() string {
	v, _ := versionParts(h.VMMVersion)
	key := fmt.Sprintf("%s %s %d %s", h.Accel, h.VMM, v[0], h.MachineType)
	if h.Accel == AccelKVM {
		flags := slices.Clone(h.CPUFlags)
		slices.Sort(flags)
		key += " " + h.CPUVendor + " " + strings.Join(flags, ",")
	}
	return key
}

// HostDescriber is implemented by backends whose memory snapshots depend
// on the host: DescribeHost says what a VM run under accel on this host
// depends on. A backend without it records no Host and is never refused.
type HostDescriber interface {
	DescribeHost(ctx context.Context, accel Accel) (Host, error)
}

// Bounds of a Host read from a manifest.
const (
	MaxHostString = 256
	MaxHostFlags  = 1024
	maxFlagLen    = 64
)

// Validate checks a Host read from outside: bounded printable strings,
// a known accelerator, flags made of [a-z0-9_.] only.
func (h Host) Validate() error {
	switch h.Accel {
	case AccelKVM, AccelTCG:
	default:
		return fmt.Errorf("host accelerator %q is not kvm or tcg", h.Accel)
	}
	for _, f := range []struct{ name, v string }{{"vmm", h.VMM}, {"vmm_version", h.VMMVersion},
		{"machine_type", h.MachineType}, {"cpu_model_arg", h.CPUModelArg}, {"cpu_vendor", h.CPUVendor}, {"cpu_model", h.CPUModel}} {
		if len(f.v) > MaxHostString {
			return fmt.Errorf("host %s is %d bytes; at most %d", f.name, len(f.v), MaxHostString)
		}
		for _, r := range f.v {
			if r < 0x20 || r == 0x7f || r > 0x7e {
				return fmt.Errorf("host %s has a non-printable character", f.name)
			}
		}
	}
	if h.VMM == "" || h.MachineType == "" {
		return fmt.Errorf("host names no vmm or machine type")
	}
	if _, ok := versionParts(h.VMMVersion); !ok {
		return fmt.Errorf("host vmm_version %q is not MAJOR.MINOR[.PATCH]", h.VMMVersion)
	}
	if len(h.CPUFlags) > MaxHostFlags {
		return fmt.Errorf("host lists %d cpu flags; at most %d", len(h.CPUFlags), MaxHostFlags)
	}
	for _, f := range h.CPUFlags {
		if f == "" || len(f) > maxFlagLen || strings.IndexFunc(f, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '.')
		}) >= 0 {
			return fmt.Errorf("host cpu flag %q is malformed", f)
		}
	}
	return nil
}

// versionParts parses MAJOR.MINOR[.PATCH].
func versionParts(v string) ([3]int, bool) {
	var out [3]int
	parts := strings.Split(v, ".")
	if len(parts) < 2 || len(parts) > 3 {
		return out, false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 1<<20 || strconv.Itoa(n) != p {
			return out, false
		}
		out[i] = n
	}
	return out, true
}

// CompareHost compares the host a snapshot was taken on (rec) with this
// one (cur) and returns the differences that make loading its state unsafe
// (another accelerator, VMM, VMM major version or machine type; under KVM
// another CPU vendor or CPU flags the guest saw that this CPU lacks) and
// the harmless ones (another minor or patch version, another CPU model of
// the same vendor with every flag, another -cpu argument: the restore
// launches the recorded one).
func CompareHost(rec, cur Host) (unsafe, harmless []string) {
	if rec.Accel != cur.Accel {
		unsafe = append(unsafe, fmt.Sprintf("accelerator %s, this host uses %s", rec.Accel, cur.Accel))
	}
	if rec.VMM != cur.VMM {
		unsafe = append(unsafe, fmt.Sprintf("vmm %s, this host runs %s", rec.VMM, cur.VMM))
	}
	rv, _ := versionParts(rec.VMMVersion)
	cv, _ := versionParts(cur.VMMVersion)
	switch {
	case rv[0] != cv[0]:
		unsafe = append(unsafe, fmt.Sprintf("%s %s, this host has %s (another major version cannot load the state)", rec.VMM, rec.VMMVersion, cur.VMMVersion))
	case rec.VMMVersion != cur.VMMVersion:
		harmless = append(harmless, fmt.Sprintf("%s %s, this host has %s", rec.VMM, rec.VMMVersion, cur.VMMVersion))
	}
	if rec.MachineType != cur.MachineType {
		unsafe = append(unsafe, fmt.Sprintf("machine type %s, this host uses %s", rec.MachineType, cur.MachineType))
	}
	if rec.CPUModelArg != cur.CPUModelArg { // the restore launches the recorded model
		harmless = append(harmless, fmt.Sprintf("guest cpu model %q, this host launches %q", rec.CPUModelArg, cur.CPUModelArg))
	}
	if rec.Accel == AccelKVM && cur.Accel == AccelKVM {
		if rec.CPUVendor != cur.CPUVendor {
			unsafe = append(unsafe, fmt.Sprintf("cpu vendor %s, this host has %s", rec.CPUVendor, cur.CPUVendor))
		}
		have := make(map[string]bool, len(cur.CPUFlags))
		for _, f := range cur.CPUFlags {
			have[f] = true
		}
		var missing []string
		for _, f := range rec.CPUFlags {
			if !have[f] {
				missing = append(missing, f)
			}
		}
		if len(missing) > 0 {
			if len(missing) > 16 {
				missing = append(missing[:16], fmt.Sprintf("and %d more", len(missing)-16))
			}
			unsafe = append(unsafe, "cpu flags the guest saw that this cpu lacks: "+strings.Join(missing, " "))
		}
	}
	if rec.CPUModel != cur.CPUModel && len(unsafe) == 0 {
		harmless = append(harmless, fmt.Sprintf("cpu model %q, this host has %q", rec.CPUModel, cur.CPUModel))
	}
	return unsafe, harmless
}
