package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// configureNetwork brings up lo and the first ethernet interface with a
// static address, a default route and resolv.conf.
func configureNetwork(cfg BootConfig, resolvConf string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := linkUp(fd, "lo"); err != nil {
		initLogf("lo: %v", err)
	}
	ifname, err := waitInterface("eth0", 2*time.Second)
	if err != nil {
		return err
	}
	if err := setIPv4(fd, ifname, cfg.IP); err != nil {
		return err
	}
	if err := linkUp(fd, ifname); err != nil {
		return err
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return err
	}
	if cfg.Gateway.IsValid() {
		if err := addDefaultRoute(cfg.Gateway, ifi.Index); err != nil {
			return fmt.Errorf("default route via %s: %w", cfg.Gateway, err)
		}
	}
	return writeResolvConf(resolvConf, cfg.DNS)
}

// waitInterface waits for name to appear (its driver may still be probing).
// When it does not appear, any other non-loopback interface will do.
func waitInterface(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat("/sys/class/net/" + name); err == nil {
			return name, nil
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	ifs, _ := net.Interfaces()
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 {
			return i.Name, nil
		}
	}
	return "", fmt.Errorf("no interface %s after %v", name, timeout)
}

func linkUp(fd int, name string) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: get flags: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: set flags: %w", name, err)
	}
	return nil
}

func setIPv4(fd int, name string, p netip.Prefix) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	a := p.Addr().As4()
	if err := ifr.SetInet4Addr(a[:]); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFADDR, ifr); err != nil {
		return fmt.Errorf("%s: set address %s: %w", name, p, err)
	}
	mask := net.CIDRMask(p.Bits(), 32)
	ifr, _ = unix.NewIfreq(name)
	if err := ifr.SetInet4Addr(mask); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFNETMASK, ifr); err != nil {
		return fmt.Errorf("%s: set netmask /%d: %w", name, p.Bits(), err)
	}
	return nil
}

// routeMessage builds an RTM_NEWROUTE request for a default IPv4 route.
func routeMessage(seq uint32, gw netip.Addr, ifindex int) []byte {
	attr := func(typ uint16, data []byte) []byte {
		l := unix.SizeofRtAttr + len(data)
		b := make([]byte, (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1))
		binary.NativeEndian.PutUint16(b[0:2], uint16(l))
		binary.NativeEndian.PutUint16(b[2:4], typ)
		copy(b[unix.SizeofRtAttr:], data)
		return b
	}
	g := gw.As4()
	oif := make([]byte, 4)
	binary.NativeEndian.PutUint32(oif, uint32(ifindex))
	body := []byte{
		unix.AF_INET,           // rtm_family
		0,                      // rtm_dst_len: default route
		0,                      // rtm_src_len
		0,                      // rtm_tos
		unix.RT_TABLE_MAIN,     // rtm_table
		unix.RTPROT_BOOT,       // rtm_protocol
		unix.RT_SCOPE_UNIVERSE, // rtm_scope
		unix.RTN_UNICAST,       // rtm_type
		0, 0, 0, 0,             // rtm_flags
	}
	body = append(body, attr(unix.RTA_GATEWAY, g[:])...)
	body = append(body, attr(unix.RTA_OIF, oif)...)
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:4], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:6], unix.RTM_NEWROUTE)
	binary.NativeEndian.PutUint16(msg[6:8], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_REPLACE)
	binary.NativeEndian.PutUint32(msg[8:12], seq)
	return append(msg, body...)
}

// addDefaultRoute installs "default via gw dev ifindex" over rtnetlink.
func addDefaultRoute(gw netip.Addr, ifindex int) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	const seq = 1
	if err := unix.Sendto(fd, routeMessage(seq, gw, ifindex), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Seq != seq || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(m.Data) < 4 {
				return errors.New("short netlink ack")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data[:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}

func writeResolvConf(path string, dns []netip.Addr) error {
	var b strings.Builder
	b.WriteString("# written by smolvm-agent\n")
	for _, a := range dns {
		b.WriteString("nameserver " + a.String() + "\n")
	}
	// A symlink (to systemd-resolved's file, say) would point nowhere here.
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSymlink != 0 {
		os.Remove(path)
	}
	return atomicWrite(path, []byte(b.String()), 0o644, true)
}
