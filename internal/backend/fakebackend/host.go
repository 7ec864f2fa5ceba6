package fakebackend

import (
	"context"

	"github.com/smolvm-go/smolvm/internal/backend"
)

var _ backend.HostDescriber = (*Backend)(nil)

// SetHostInfo makes DescribeHost report what edit makes of the fake host's
// description (a test moves the "host" under a snapshot: another
// accelerator, VMM version, CPU) and returns a function that undoes it.
func (h *Host) SetHostInfo(edit func(*backend.Host)) (restore func()) {
	h.mu.Lock()
	h.describe = edit
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		h.describe = nil
		h.mu.Unlock()
	}
}

// DescribeHost implements backend.HostDescriber: a fixed description
// ("fake" 1.0.0, machine "fake", a FakeVendor CPU with flags under KVM),
// changed by SetHostInfo.
func (b *Backend) DescribeHost(ctx context.Context, accel backend.Accel) (backend.Host, error) {
	if accel != backend.AccelKVM {
		accel = backend.AccelTCG
	}
	h := backend.Host{Accel: accel, VMM: Name, VMMVersion: "1.0.0", MachineType: "fake", CPUModelArg: "max",
		CPUVendor: "FakeVendor", CPUModel: "Fake CPU 1"}
	if accel == backend.AccelKVM {
		h.CPUFlags = []string{"fpu", "sse2", "avx2"}
	}
	b.h.mu.Lock()
	edit := b.h.describe
	b.h.mu.Unlock()
	if edit != nil {
		edit(&h)
	}
	return h, h.Validate()
}
