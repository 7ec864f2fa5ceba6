package backend

import (
	"errors"
	"net/netip"
	"testing"
)

func validSpec() Spec {
	return Spec{ID: "vm1", Dir: "/data/vms/vm1", RunDir: "/tmp/smolvm-0/ab", Kernel: "/img/bzImage", Initrd: "/img/initrd",
		BaseDisk: "/img/rootfs.ext4", Disk: "/data/vms/vm1/disk.qcow2", DiskFormat: "qcow2", MemoryMiB: 512, CPUs: 2,
		Accel: AccelAuto, Network: true, MAC: "52:54:00:12:34:56", KernelArgs: "quiet smol.root=/dev/vda",
		MachineID:    "0123456789abcdef0123456789abcdef",
		PortForwards: []PortForward{{HostPort: 8080, GuestPort: 80}, {HostAddr: "0.0.0.0", HostPort: 1, GuestPort: 65535}}}
}

func TestSpecValidate(t *testing.T) {
	if err := validSpec().Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*Spec){
		"mac injection":        func(s *Spec) { s.MAC = "52:54:00:12:34:56,romfile=/etc/shadow" },
		"mac 20 bytes":         func(s *Spec) { s.MAC = "00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01" },
		"mac multicast":        func(s *Spec) { s.MAC = "33:33:00:00:00:01" },
		"machine-id not hex":   func(s *Spec) { s.MachineID = "0123456789abcdef0123456789abcdeg" },
		"machine-id uppercase": func(s *Spec) { s.MachineID = "0123456789ABCDEF0123456789abcdef" },
		"machine-id injection": func(s *Spec) { s.MachineID = "0123456789abcdef\n0123456789abcde" },
		"hostfwd injected": func(s *Spec) {
			s.PortForwards[0].HostAddr = "127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-cmd:touch pwned"
		},
		"host name":       func(s *Spec) { s.PortForwards[0].HostAddr = "localhost" },
		"port 0":          func(s *Spec) { s.PortForwards[0].HostPort = 0 },
		"port 65536":      func(s *Spec) { s.PortForwards[0].GuestPort = 65536 },
		"id":              func(s *Spec) { s.ID = "vm1,x" },
		"empty id":        func(s *Spec) { s.ID = "" },
		"relative kernel": func(s *Spec) { s.Kernel = "bzImage" },
		"unclean disk":    func(s *Spec) { s.Disk = "/data/vms/vm1/../vm2/disk.qcow2" },
		"empty dir":       func(s *Spec) { s.Dir = "" },
		"control in path": func(s *Spec) { s.RunDir = "/tmp/a\x1b" },
		"disk format":     func(s *Spec) { s.DiskFormat = "vmdk" },
		"memory":          func(s *Spec) { s.MemoryMiB = 8 },
		"cpus":            func(s *Spec) { s.CPUs = 256 },
		"accel":           func(s *Spec) { s.Accel = "hvf" },
		"kernel args":     func(s *Spec) { s.KernelArgs = "a\nb" },
	} {
		s := validSpec()
		mod(&s)
		if err := s.Validate(); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestPortForwardAddr(t *testing.T) {
	for in, want := range map[string]string{"": "127.0.0.1", "127.0.0.1": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::1": "::1", "::ffff:10.0.0.1": "10.0.0.1"} {
		a, err := PortForward{HostAddr: in, HostPort: 1, GuestPort: 1}.Addr()
		if err != nil || a != netip.MustParseAddr(want) {
			t.Errorf("Addr(%q) = %v, %v; want %s", in, a, err, want)
		}
	}
	for _, in := range []string{"localhost", "127.0.0.1:80", "[::1]", "fe80::1%eth0", "1.2.3", " 127.0.0.1"} {
		if _, err := (PortForward{HostAddr: in}).Addr(); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("Addr(%q): %v", in, err)
		}
	}
}
