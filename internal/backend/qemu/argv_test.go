package qemu

import (
	"errors"
	"fmt"
	"net"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// The injection of issue 9: a host address that closes the hostfwd rule
// and adds a guestfwd whose cmd: runs on the host.
const injectionAddr = "127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-cmd:touch pwned,hostfwd=tcp:127.0.0.1"

func mustArgs(t *testing.T, spec backend.Spec, l launch) []string {
	t.Helper()
	args, err := buildArgs(spec, l)
	if err != nil {
		t.Fatalf("buildArgs: %v", err)
	}
	if err := checkArgv(spec, args); err != nil {
		t.Fatalf("argv: %v\n%q", err, args)
	}
	return args
}

func testLaunch() launch {
	return launch{Machine: MachineMicrovm, Accel: backend.AccelTCG, CPU: "max",
		MemoryFile: "/dev/shm/smolvm-x/ram", MemoryShared: true, Disk: "/var/lib/smolvm/vms/vm1/disk.qcow2", DiskFormat: "qcow2"}
}

// TestBuildArgsRefusesHostileValues: each value below, placed in one field
// of an otherwise valid spec or launch, is refused with ErrInvalidSpec (or
// ErrUnsupported) and no argv is produced.
func TestBuildArgsRefusesHostileValues(t *testing.T) {
	cases := []struct {
		name string
		mod  func(*backend.Spec, *launch)
		want error
	}{
		{"hostfwd injection", func(s *backend.Spec, _ *launch) {
			s.PortForwards = []backend.PortForward{{HostAddr: injectionAddr, HostPort: 2222, GuestPort: 22}}
		}, backend.ErrInvalidSpec},
		{"host name", func(s *backend.Spec, _ *launch) {
			s.PortForwards = []backend.PortForward{{HostAddr: "localhost", HostPort: 2222, GuestPort: 22}}
		}, backend.ErrInvalidSpec},
		{"host port 0", func(s *backend.Spec, _ *launch) { s.PortForwards = []backend.PortForward{{HostPort: 0, GuestPort: 22}} }, backend.ErrInvalidSpec},
		{"guest port 65536", func(s *backend.Spec, _ *launch) {
			s.PortForwards = []backend.PortForward{{HostPort: 1, GuestPort: 65536}}
		}, backend.ErrInvalidSpec},
		{"ipv6 forward (slirp binds IPv4 only)", func(s *backend.Spec, _ *launch) {
			s.PortForwards = []backend.PortForward{{HostAddr: "::1", HostPort: 8080, GuestPort: 80}}
		}, backend.ErrUnsupported},
		{"zone", func(s *backend.Spec, _ *launch) {
			s.PortForwards = []backend.PortForward{{HostAddr: "fe80::1%eth0", HostPort: 8080, GuestPort: 80}}
		}, backend.ErrInvalidSpec},
		{"mac injection", func(s *backend.Spec, _ *launch) { s.MAC = "52:54:00:12:34:56,romfile=/etc/shadow" }, backend.ErrInvalidSpec},
		{"mac 8 bytes", func(s *backend.Spec, _ *launch) { s.MAC = "52:54:00:12:34:56:78:9a" }, backend.ErrInvalidSpec},
		{"mac multicast", func(s *backend.Spec, _ *launch) { s.MAC = "01:00:5e:00:00:01" }, backend.ErrInvalidSpec},
		{"id with comma", func(s *backend.Spec, _ *launch) { s.ID = "vm1,x=y" }, backend.ErrInvalidSpec},
		{"id traversal", func(s *backend.Spec, _ *launch) { s.ID = "../vm" }, backend.ErrInvalidSpec},
		{"relative dir", func(s *backend.Spec, _ *launch) { s.Dir = "vms/vm1" }, backend.ErrInvalidSpec},
		{"unclean dir", func(s *backend.Spec, _ *launch) { s.Dir = "/var/lib/../../etc" }, backend.ErrInvalidSpec},
		{"kernel with newline", func(s *backend.Spec, _ *launch) { s.Kernel = "/img/bz\nImage" }, backend.ErrInvalidSpec},
		{"memory 0", func(s *backend.Spec, _ *launch) { s.MemoryMiB = 0 }, backend.ErrInvalidSpec},
		{"memory huge", func(s *backend.Spec, _ *launch) { s.MemoryMiB = 1 << 30 }, backend.ErrInvalidSpec},
		{"cpus -1", func(s *backend.Spec, _ *launch) { s.CPUs = -1 }, backend.ErrInvalidSpec},
		{"cpus 1000", func(s *backend.Spec, _ *launch) { s.CPUs = 1000 }, backend.ErrInvalidSpec},
		{"disk format", func(s *backend.Spec, _ *launch) { s.DiskFormat = "qcow2,file.filename=/etc/shadow" }, backend.ErrInvalidSpec},
		{"accel", func(s *backend.Spec, _ *launch) { s.Accel = "kvm,x=1" }, backend.ErrInvalidSpec},
		{"kernel args control char", func(s *backend.Spec, _ *launch) { s.KernelArgs = "quiet\x00x" }, backend.ErrInvalidSpec},
		{"machine from snapshot config", func(_ *backend.Spec, l *launch) { l.Machine = "microvm,x-option-rom=/etc/shadow" }, backend.ErrInvalidSpec},
		{"cpu from snapshot config", func(_ *backend.Spec, l *launch) { l.CPU = "max,x=1" }, backend.ErrInvalidSpec},
		{"cpu with space", func(_ *backend.Spec, l *launch) { l.CPU = "max -device x" }, backend.ErrInvalidSpec},
		{"launch accel", func(_ *backend.Spec, l *launch) { l.Accel = "tcg,thread=multi" }, backend.ErrInvalidSpec},
		{"launch disk format", func(_ *backend.Spec, l *launch) { l.DiskFormat = "raw,x=y" }, backend.ErrInvalidSpec},
		{"relative memory file", func(_ *backend.Spec, l *launch) { l.MemoryFile = "ram" }, backend.ErrInvalidSpec},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			spec, l := testSpec(), testLaunch()
			c.mod(&spec, &l)
			args, err := buildArgs(spec, l)
			if !errors.Is(err, c.want) || args != nil {
				t.Fatalf("buildArgs = %q, %v; want no argv and %v", args, err, c.want)
			}
			// A hostile spec is also refused where the SDK checks it at
			// create time, before any file or process exists.
			if !reflect.DeepEqual(spec, testSpec()) {
				if err := (&Backend{}).ValidateSpec(spec); !errors.Is(err, c.want) {
					t.Errorf("ValidateSpec = %v, want %v", err, c.want)
				}
			}
		})
	}
}

// TestHostfwdRendersTypedValues: forwards are printed from the parsed
// address and integer ports; an explicit 0.0.0.0 binds every interface
// (the caller's opt-in), an empty address binds loopback.
func TestHostfwdRendersTypedValues(t *testing.T) {
	for _, c := range []struct {
		pf   backend.PortForward
		want string
	}{
		{backend.PortForward{HostPort: 8022, GuestPort: 22}, "tcp:127.0.0.1:8022-:22"},
		{backend.PortForward{HostAddr: "0.0.0.0", HostPort: 8080, GuestPort: 80}, "tcp:0.0.0.0:8080-:80"},
		{backend.PortForward{HostAddr: "::ffff:127.0.0.1", HostPort: 1, GuestPort: 65535}, "tcp:127.0.0.1:1-:65535"},
		{backend.PortForward{HostAddr: "192.168.001.2", HostPort: 1, GuestPort: 2}, ""}, // leading zeros: refused by netip
	} {
		got, err := hostfwd(c.pf)
		if c.want == "" {
			if err == nil {
				t.Errorf("hostfwd(%+v) = %q, want an error", c.pf, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("hostfwd(%+v) = %q, %v; want %q", c.pf, got, err, c.want)
		}
	}
	_, err := hostfwd(backend.PortForward{HostAddr: "::1", HostPort: 8080, GuestPort: 80})
	if !errors.Is(err, backend.ErrUnsupported) || !strings.Contains(err.Error(), "use 127.0.0.1") {
		t.Errorf("::1: %v; want ErrUnsupported saying to use 127.0.0.1", err)
	}
}

// --- a checker for QEMU's option syntax ---

// splitOpts splits a QEMU option string at single commas (",," is a
// literal comma), as QemuOpts and keyval do.
func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

// parseOpts returns the implied type (a first element without '=', as in
// "-device virtio-rng-device") and the key=value pairs. A bare word after
// the first is a key too (QemuOpts reads "flag" as flag=on).
func parseOpts(s string, implied bool) (typ string, kv [][2]string) {
	for i, p := range splitOpts(s) {
		k, v, ok := strings.Cut(p, "=")
		if !ok && i == 0 && implied {
			typ = p
			continue
		}
		kv = append(kv, [2]string{k, v})
	}
	return typ, kv
}

var (
	hostfwdRE = regexp.MustCompile(`^tcp:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}-:\d{1,5}$`)
	macRE     = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)
)

// optionKeys are the keys each option value may carry, by type.
var optionKeys = map[string]map[string][]string{
	"-machine": {"microvm": {"memory-backend"}, "q35": {"memory-backend"}},
	"-object":  {"memory-backend-file": {"id", "size", "mem-path", "share", "readonly", "rom"}},
	"-chardev": {"ringbuf": {"id", "size"}, "socket": {"id", "server", "wait", "path"}},
	"-netdev":  {"user": {"id", "hostfwd"}, "stream": {"id", "server", "addr.type", "addr.str"}},
	"-device": {
		"virtio-serial-device": {"id"}, "virtio-serial-pci": {"id"},
		"virtserialport":    {"bus", "chardev", "name"},
		"virtio-blk-device": {"drive"}, "virtio-blk-pci": {"drive"},
		"virtio-net-device": {"netdev", "mac"}, "virtio-net-pci": {"netdev", "mac"},
		"virtio-rng-device": {}, "virtio-rng-pci": {},
		"virtio-balloon-device": {"free-page-reporting"}, "virtio-balloon-pci": {"free-page-reporting"},
	},
	"-blockdev": {"": {"driver", "node-name", "file.driver", "file.filename"}},
	"-mon":      {"": {"chardev", "mode"}},
	"-run-with": {"": {"user", "chroot"}},
}

// argvFlags are the options buildArgs may emit, with whether they take a value.
var argvFlags = map[string]bool{
	"-nodefaults": false, "-no-user-config": false, "-nographic": false, "-no-reboot": false, "-S": false,
	"-machine": true, "-accel": true, "-cpu": true, "-m": true, "-smp": true, "-object": true, "-bios": true,
	"-kernel": true, "-initrd": true, "-append": true, "-chardev": true, "-serial": true, "-mon": true,
	"-pidfile": true, "-device": true, "-blockdev": true, "-netdev": true, "-incoming": true,
	"-sandbox": true, "-run-with": true,
}

// checkArgv checks an argv built for spec: only known options, each option
// string with only the keys its type allows (no guestfwd, no cmd:), one
// hostfwd per forward in the exact rendered form, the MAC as parsed.
func checkArgv(spec backend.Spec, args []string) error {
	hostfwds, streams := 0, 0
	for i := 0; i < len(args); i++ {
		flag := args[i]
		takes, ok := argvFlags[flag]
		if !ok {
			return fmt.Errorf("unexpected argv element %q at %d", flag, i)
		}
		if !takes {
			continue
		}
		if i+1 >= len(args) {
			return fmt.Errorf("%s without a value", flag)
		}
		i++
		v := args[i]
		switch flag {
		case "-accel":
			if v != "kvm" && v != "tcg" {
				return fmt.Errorf("-accel %q", v)
			}
			continue
		case "-cpu":
			if !cpuModelRE.MatchString(v) {
				return fmt.Errorf("-cpu %q", v)
			}
			continue
		case "-sandbox":
			if v != sandboxDeny && v != sandboxDrop {
				return fmt.Errorf("-sandbox %q", v)
			}
			continue
		case "-kernel", "-initrd", "-append", "-pidfile", "-bios", "-m", "-smp", "-serial", "-incoming":
			continue // whole values, not option strings
		}
		types := optionKeys[flag]
		_, implied := types[""]
		typ, kv := parseOpts(v, !implied)
		allowed, ok := types[typ]
		if !ok {
			return fmt.Errorf("%s %q: type %q not expected", flag, v, typ)
		}
		if flag == "-netdev" && typ == "stream" {
			streams++
			if want := []string{"id=net0", "server=off", "addr.type=fd"}; !strings.HasPrefix(v, "stream,"+strings.Join(want, ",")+",addr.str=") {
				return fmt.Errorf("-netdev %q: not the sidecar's fd stream", v)
			}
		}
		seen := map[string]bool{}
		for _, p := range kv {
			k, val := p[0], p[1]
			if !slices.Contains(allowed, k) {
				return fmt.Errorf("%s %q: key %q not allowed for %q", flag, v, k, typ)
			}
			if seen[k] && k != "hostfwd" {
				return fmt.Errorf("%s %q: key %q twice", flag, v, k)
			}
			seen[k] = true
			switch k {
			case "hostfwd":
				hostfwds++
				if !hostfwdRE.MatchString(val) {
					return fmt.Errorf("hostfwd %q is not tcp:A.B.C.D:P-:P", val)
				}
			case "mac":
				hw, err := net.ParseMAC(spec.MAC)
				if err != nil || val != hw.String() || !macRE.MatchString(val) {
					return fmt.Errorf("mac %q, spec %q", val, spec.MAC)
				}
			}
			if strings.Contains(val, "guestfwd") || strings.Contains(val, "cmd:") {
				return fmt.Errorf("%s %q: value %q", flag, v, val)
			}
		}
	}
	if spec.Network && streams > 0 {
		// The sidecar serves the forwards: none in QEMU's argv.
		if hostfwds != 0 || streams != 1 {
			return fmt.Errorf("%d hostfwd rules and %d stream netdevs", hostfwds, streams)
		}
		return nil
	}
	if spec.Network && hostfwds != len(spec.PortForwards) {
		return fmt.Errorf("%d hostfwd rules for %d forwards", hostfwds, len(spec.PortForwards))
	}
	return nil
}

func TestCheckArgvCatchesInjection(t *testing.T) {
	// The checker itself must fail on what the old argv produced.
	spec := testSpec()
	old := []string{"-netdev", "user,id=net0,hostfwd=tcp:" + injectionAddr + ":2222-:22"}
	if err := checkArgv(spec, old); err == nil {
		t.Fatal("checkArgv accepted the injected -netdev")
	}
	if err := checkArgv(spec, []string{"-device", "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56,romfile=/etc/shadow"}); err == nil {
		t.Fatal("checkArgv accepted an injected mac")
	}
	spec.Network = false
	if err := checkArgv(spec, []string{"-chardev", "socket,id=qmp,server=on,wait=off,path=/a,,b"}); err != nil {
		t.Fatalf("escaped comma: %v", err)
	}
}

// FuzzBuildArgs: for any spec and launch that pass validation, the argv
// has only the expected options and keys (see checkArgv).
func FuzzBuildArgs(f *testing.F) {
	s, l := testSpec(), testLaunch()
	f.Add(s.ID, s.Dir, s.RunDir, s.Kernel, s.Disk, s.MAC, "127.0.0.1", 8022, 22, s.KernelArgs, l.CPU, l.Machine, l.MemoryFile, 512, 2, true, "qcow2", "tcg", "")
	f.Add("vm1", "/d,x", "/r,,y", "/k", "", "", injectionAddr, 2222, 22, "", "host,-arch-capabilities", "q35", "/m,", 128, 1, false, "raw", "kvm", "1.2.3.4")
	f.Add("a", "/d", "/r", "/k", "/d/disk", "52:54:00:12:34:56,romfile=/etc/shadow", "0.0.0.0", 1, 65535, "x", "max", "microvm", "/m", 16, 0, true, "qcow2,x=y", "tcg,x", "::1")
	f.Fuzz(func(t *testing.T, id, dir, runDir, kernel, disk, mac, hostAddr string, hostPort, guestPort int,
		kargs, cpu, machine, memFile string, mem, cpus int, readonly bool, diskFormat, accel, hostAddr2 string) {
		spec := backend.Spec{ID: id, Dir: dir, RunDir: runDir, Kernel: kernel, Disk: disk, DiskFormat: diskFormat,
			MemoryMiB: mem, CPUs: cpus, Network: true, MAC: mac, KernelArgs: kargs,
			PortForwards: []backend.PortForward{{HostAddr: hostAddr, HostPort: hostPort, GuestPort: guestPort}, {HostAddr: hostAddr2, HostPort: 9000, GuestPort: 90}}}
		l := launch{Machine: machine, Accel: backend.Accel(accel), CPU: cpu, MemoryFile: memFile, MemoryShared: !readonly,
			MemoryReadonly: readonly, Disk: disk, DiskFormat: diskFormat}
		args, err := buildArgs(spec, l)
		if err != nil {
			if args != nil {
				t.Fatal("argv with an error")
			}
			return
		}
		if err := checkArgv(spec, args); err != nil {
			t.Fatalf("%v\n%q", err, args)
		}
		// The sidecar's netdev (an inherited fd) carries no forward.
		ls := l
		ls.NetFD = 3
		sargs, err := buildArgs(spec, ls)
		if err != nil {
			t.Fatalf("slirp argv built but the stream one failed: %v", err)
		}
		if err := checkArgv(spec, sargs); err != nil {
			t.Fatalf("stream: %v\n%q", err, sargs)
		}
		// Paths come back whole from every option string that holds one.
		want := map[string]string{"mem-path": memFile, "file.filename": disk}
		for i := 0; i+1 < len(args); i++ {
			if args[i] != "-object" && args[i] != "-blockdev" {
				continue
			}
			_, kv := parseOpts(args[i+1], args[i] == "-object")
			for _, p := range kv {
				if w, ok := want[p[0]]; ok && p[1] != w {
					t.Fatalf("%s = %q, want %q", p[0], p[1], w)
				}
			}
		}
	})
}
