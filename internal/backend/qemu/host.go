package qemu

import (
	"context"
	"fmt"
	"regexp"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
)

var _ backend.HostDescriber = (*Backend)(nil)

// versionRE finds the version in "QEMU emulator version 10.0.2 (Debian ...)".
var versionRE = regexp.MustCompile(`^QEMU emulator version ([0-9]+\.[0-9]+(?:\.[0-9]+)?)\b`)

// parseVersion returns MAJOR.MINOR[.PATCH] from qemu --version's first line.
func parseVersion(line string) (string, error) {
	m := versionRE.FindStringSubmatch(line)
	if m == nil {
		return "", fmt.Errorf("qemu: cannot read the version from %q", line)
	}
	return m[1], nil
}

// qemuVersion is the QEMU version, asked once per Backend (a failure,
// such as a cancelled ctx, is not kept: the next call asks again).
func (b *Backend) qemuVersion(ctx context.Context) (string, error) {
	b.versionMu.Lock()
	defer b.versionMu.Unlock()
	if b.version != "" {
		return b.version, nil
	}
	p, err := b.qemuBinary()
	if err != nil {
		return "", err
	}
	line, err := hostprobe.Version(ctx, p)
	if err != nil {
		return "", err
	}
	v, err := parseVersion(line)
	if err == nil {
		b.version = v
	}
	return v, err
}

// DescribeHost implements backend.HostDescriber: the QEMU version (asked
// once per Backend), the machine type, the -cpu model a VM under accel
// gets, and the host CPU; the host CPU flags only under KVM (under TCG the
// guest sees QEMU's "max" model, fixed by the QEMU version).
func (b *Backend) DescribeHost(ctx context.Context, accel backend.Accel) (backend.Host, error) {
	version, err := b.qemuVersion(ctx)
	if err != nil {
		return backend.Host{}, err
	}
	cpu, err := hostprobe.ReadCPU(defaultHost)
	if err != nil {
		return backend.Host{}, fmt.Errorf("qemu: reading the host cpu: %w", err)
	}
	h := backend.Host{Accel: accel, VMM: "qemu", VMMVersion: version, MachineType: b.opts.Machine,
		CPUModelArg: cpuModel(accel), CPUVendor: cpu.Vendor, CPUModel: cpu.Model}
	if accel == backend.AccelKVM {
		h.CPUFlags = cpu.Flags
	}
	return h, h.Validate()
}
