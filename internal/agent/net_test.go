package agent

import (
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestConfigureNetwork runs the real network setup in a private network
// namespace, on a tun device named eth0. It needs root.
func TestConfigureNetwork(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespace)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	type result struct {
		routes, addr string
		err          error
		skip         string
	}
	ch := make(chan result, 1)
	go func() {
		// The namespace belongs to this thread, which is never unlocked:
		// it exits with the goroutine and takes the namespace along.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{skip: "unshare: " + err.Error()}
			return
		}
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{skip: "tun: " + err.Error()}
			return
		}
		defer unix.Close(fd)
		ifr, _ := unix.NewIfreq("eth0")
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			ch <- result{skip: "TUNSETIFF: " + err.Error()}
			return
		}
		cfg, _ := ParseCmdline("smol.net=1 smol.ip=10.0.2.15/24 smol.gw=10.0.2.2 smol.dns=10.0.2.3,1.1.1.1")
		err = configureNetwork(cfg, resolv)
		routes, _ := os.ReadFile("/proc/thread-self/net/route")
		var addr string
		if s, e := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0); e == nil {
			r, _ := unix.NewIfreq("eth0")
			if unix.IoctlIfreq(s, unix.SIOCGIFADDR, r) == nil {
				a, _ := r.Inet4Addr()
				addr = netip.AddrFrom4([4]byte(a)).String()
			}
			unix.Close(s)
		}
		ch <- result{routes: string(routes), addr: addr, err: err}
	}()
	r := <-ch
	if r.skip != "" {
		t.Skip(r.skip)
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.addr != "10.0.2.15" {
		t.Errorf("eth0 address %q", r.addr)
	}
	// /proc/net/route: Iface Destination Gateway ... in host-order hex.
	gw := netip.MustParseAddr("10.0.2.2").As4()
	wantGW := strings.ToUpper(hexLE(gw))
	found := false
	for _, l := range strings.Split(r.routes, "\n") {
		f := strings.Fields(l)
		if len(f) > 7 && f[0] == "eth0" && f[1] == "00000000" && f[2] == wantGW && f[7] == "00000000" {
			found = true
		}
	}
	if !found {
		t.Errorf("no default route via 10.0.2.2 on eth0:\n%s", r.routes)
	}
	b, _ := os.ReadFile(resolv)
	if !strings.Contains(string(b), "nameserver 10.0.2.3\nnameserver 1.1.1.1\n") {
		t.Errorf("resolv.conf:\n%s", b)
	}
}

// hexLE renders an IPv4 address the way /proc/net/route does (the 32-bit
// value in native byte order, as hex).
func hexLE(a [4]byte) string {
	v := *(*uint32)(unsafe.Pointer(&a[0]))
	const digits = "0123456789ABCDEF"
	out := make([]byte, 8)
	for i := 7; i >= 0; i-- {
		out[i] = digits[v&0xf]
		v >>= 4
	}
	return string(out)
}
