package backend

import (
	"slices"
	"strings"
	"testing"
)

func kvmHost() Host {
	return Host{Accel: AccelKVM, VMM: "qemu", VMMVersion: "10.0.2", MachineType: "microvm", CPUModelArg: "host",
		CPUVendor: "GenuineIntel", CPUModel: "Xeon A", CPUFlags: []string{"fpu", "sse4_2", "avx2"}}
}

// TestCompareHost: each unsafe difference is reported as unsafe (saying
// what differs); harmless ones only as harmless.
func TestCompareHost(t *testing.T) {
	cases := []struct {
		name           string
		mod            func(*Host)
		unsafe, benign string // a substring of the one difference expected ("" = none)
	}{
		{"same", func(*Host) {}, "", ""},
		{"accel", func(h *Host) { h.Accel, h.CPUFlags = AccelTCG, nil }, "accelerator kvm, this host uses tcg", ""},
		{"major", func(h *Host) { h.VMMVersion = "9.2.0" }, "qemu 10.0.2, this host has 9.2.0", ""},
		{"minor", func(h *Host) { h.VMMVersion = "10.1.0" }, "", "qemu 10.0.2, this host has 10.1.0"},
		{"patch", func(h *Host) { h.VMMVersion = "10.0.3" }, "", "this host has 10.0.3"},
		{"machine", func(h *Host) { h.MachineType = "q35" }, "machine type microvm, this host uses q35", ""},
		{"vmm", func(h *Host) { h.VMM = "other" }, "vmm qemu, this host runs other", ""},
		{"vendor", func(h *Host) { h.CPUVendor = "AuthenticAMD" }, "cpu vendor GenuineIntel, this host has AuthenticAMD", ""},
		{"missing flag", func(h *Host) { h.CPUFlags = []string{"fpu", "sse4_2"} }, "this cpu lacks: avx2", ""},
		{"extra flag", func(h *Host) { h.CPUFlags = append(slices.Clone(h.CPUFlags), "avx512f") }, "", ""},
		{"model", func(h *Host) { h.CPUModel = "Xeon B" }, "", `cpu model "Xeon A"`},
		{"cpu arg", func(h *Host) { h.CPUModelArg = "host,-arch-capabilities" }, "", "guest cpu model"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cur := kvmHost()
			tc.mod(&cur)
			unsafe, harmless := CompareHost(kvmHost(), cur)
			check := func(kind string, got []string, want string) {
				if want == "" && len(got) > 0 || want != "" && (len(got) != 1 || !strings.Contains(got[0], want)) {
					t.Errorf("%s = %q, want one containing %q", kind, got, want)
				}
			}
			check("unsafe", unsafe, tc.unsafe)
			check("harmless", harmless, tc.benign)
		})
	}
	// Under TCG the host CPU does not reach the guest: vendor and flags
	// do not matter.
	rec, cur := kvmHost(), kvmHost()
	rec.Accel, cur.Accel, cur.CPUVendor, cur.CPUFlags = AccelTCG, AccelTCG, "AuthenticAMD", nil
	if unsafe, _ := CompareHost(rec, cur); len(unsafe) > 0 {
		t.Fatalf("tcg: unsafe %q", unsafe)
	}
}

func TestHostValidate(t *testing.T) {
	if err := kvmHost().Validate(); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"", "10", "10.x", "10.0.2.1", "010.0", "-1.0"} {
		h := kvmHost()
		h.VMMVersion = v
		if h.Validate() == nil {
			t.Errorf("version %q accepted", v)
		}
	}
}

func TestHostTemplateKey(t *testing.T) {
	base := Host{Accel: AccelKVM, VMM: "qemu", VMMVersion: "10.0.2", MachineType: "microvm",
		CPUVendor: "AuthenticAMD", CPUModel: "AMD EPYC", CPUFlags: []string{"sse4_2", "avx2"}}
	same := []func(*Host){
		func(h *Host) { h.VMMVersion = "10.1.0" },                 // minor/patch: the state loads
		func(h *Host) { h.CPUModel = "AMD EPYC 9004" },            // model name only
		func(h *Host) { h.CPUFlags = []string{"avx2", "sse4_2"} }, // order
	}
	differ := []func(*Host){
		func(h *Host) { h.VMMVersion = "9.2.0" },
		func(h *Host) { h.Accel = AccelTCG },
		func(h *Host) { h.MachineType = "q35" },
		func(h *Host) { h.VMM = "firecracker" },
		func(h *Host) { h.CPUVendor = "GenuineIntel" },
		func(h *Host) { h.CPUFlags = []string{"sse4_2"} },
	}
	for i, edit := range same {
		h := base
		edit(&h)
		if h.TemplateKey() != base.TemplateKey() {
			t.Errorf("same %d: %q != %q", i, h.TemplateKey(), base.TemplateKey())
		}
	}
	for i, edit := range differ {
		h := base
		edit(&h)
		if h.TemplateKey() == base.TemplateKey() {
			t.Errorf("differ %d: both %q", i, h.TemplateKey())
		}
	}
	// Under TCG the host CPU does not reach the guest: not in the key.
	tcg, other := base, base
	tcg.Accel, other.Accel = AccelTCG, AccelTCG
	other.CPUVendor, other.CPUFlags = "GenuineIntel", nil
	if tcg.TemplateKey() != other.TemplateKey() {
		t.Errorf("tcg keys differ by host cpu: %q %q", tcg.TemplateKey(), other.TemplateKey())
	}
}
