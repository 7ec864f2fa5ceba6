package agent

import (
	"strings"
	"testing"
	"unicode"
)

// FuzzParseCmdline: no command line panics the parser (it runs as PID 1,
// where a panic is a kernel panic), and whatever it returns is usable: a
// valid IPv4 prefix, gateway and DNS servers, non-empty names without
// whitespace, each value the last one given or the default.
func FuzzParseCmdline(f *testing.F) {
	f.Add("console=ttyS0 quiet")
	f.Add("console=ttyS0 smol.root=/dev/vda smol.net=1 smol.hostname=box smol.port=p1 smol.ip=10.1.2.3/16 smol.gw=10.1.0.1 smol.dns=1.1.1.1,8.8.8.8")
	f.Add("smol.ip=::1/64 smol.gw=fe80::1 smol.dns=1.1.1.1,,x smol.dns= smol.hostname= smol.port=")
	f.Add("smol.ip=10.0.2.15/33 smol.ip smol.gw smol.dns=1.1.1.1%eth0 smol.rootfstype=")
	f.Add("\x00smol.root=\xff\xfe smol.net=yes\tsmol.hostname=a\u00a0b")
	f.Fuzz(func(t *testing.T, cmdline string) {
		c, errs := ParseCmdline(cmdline)
		again, errs2 := ParseCmdline(cmdline)
		if len(errs) != len(errs2) || c.Hostname != again.Hostname || c.IP != again.IP {
			t.Fatal("not deterministic")
		}
		if !c.IP.IsValid() || !c.IP.Addr().Is4() || c.IP.Bits() < 0 || c.IP.Bits() > 32 {
			t.Fatalf("ip %v", c.IP)
		}
		if !c.Gateway.IsValid() || !c.Gateway.Is4() {
			t.Fatalf("gateway %v", c.Gateway)
		}
		if len(c.DNS) == 0 {
			t.Fatal("no dns servers")
		}
		for _, a := range c.DNS {
			if !a.IsValid() {
				t.Fatalf("dns %v", c.DNS)
			}
		}
		for name, v := range map[string]string{"hostname": c.Hostname, "port": c.Port, "rootfstype": c.RootFSType} {
			if v == "" {
				t.Fatalf("empty %s", name)
			}
		}
		for name, v := range map[string]string{"hostname": c.Hostname, "port": c.Port, "rootfstype": c.RootFSType, "root": c.Root} {
			if strings.ContainsFunc(v, unicode.IsSpace) {
				t.Fatalf("%s %q holds whitespace", name, v)
			}
			if v != "" && !strings.Contains(cmdline, v) && v != "smolvm" && v != "ext4" && !strings.HasPrefix(v, "org.smolvm") {
				t.Fatalf("%s %q comes from nowhere", name, v)
			}
		}
	})
}
