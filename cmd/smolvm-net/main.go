// Command smolvm-net is a VM's network sidecar: a user-mode TCP/IP stack
// (gVisor's tcpip) between QEMU's stream netdev and the host, which checks
// every guest connection against the VM's network policy (see
// internal/netstack and internal/netpolicy). The SDK starts one per VM; it
// is not meant to be run by hand.
//
// Interface (set up by the launcher, internal/backend/qemu/net.go):
//   - stdin: the JSON netstack.Config (at most 1 MiB);
//   - fd 3: the sidecar's end of a socketpair whose other end is QEMU's
//     -netdev stream (4-byte big-endian length + one Ethernet frame);
//   - fd 4: a listening unix socket, the control channel;
//   - fd 5: the write end of a pipe: one line, "ok" once ready or
//     "error: ..." on failure, then closed.
//
// It exits when QEMU closes its end of the stream. Started as root, it drops
// to uid/gid 65534 (nobody) once its listeners exist; then it sets
// no_new_privs and a seccomp filter that denies exec, ptrace, mount,
// namespaces, module/BPF loading and the like.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/netstack"
)

const (
	fdLink    = 3
	fdControl = 4
	fdReady   = 5
	nobody    = 65534
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level()}))
	ready := os.NewFile(fdReady, "ready")
	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "smolvm-net: %v\n", err)
		if ready != nil {
			fmt.Fprintf(ready, "error: %v\n", err)
		}
		os.Exit(1)
	}
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "smolvm-net takes no arguments: it is started by smolvm with its configuration on stdin")
		os.Exit(2)
	}
	b, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err != nil {
		fail(err)
	}
	var cfg netstack.Config
	if err := json.Unmarshal(b, &cfg); err != nil {
		fail(fmt.Errorf("config: %w", err))
	}
	link := os.NewFile(fdLink, "link")
	ctl := os.NewFile(fdControl, "control")
	if link == nil || ctl == nil || ready == nil {
		fail(fmt.Errorf("fds 3-5 are not open: smolvm-net is started by smolvm"))
	}
	if err := checkStream(link); err != nil {
		fail(err)
	}
	ln, err := net.FileListener(ctl)
	if err != nil {
		fail(fmt.Errorf("control socket: %w", err))
	}
	ctl.Close()
	n, err := netstack.New(cfg, hostAddrs(), log)
	if err != nil {
		fail(err)
	}
	if err := dropPrivileges(); err != nil {
		fail(err)
	}
	go n.ServeControl(ln)
	fmt.Fprintln(ready, "ok")
	ready.Close()
	ready = nil
	if err := n.Run(link); err != nil {
		log.Warn("stream ended", "err", err)
	}
}

func level() slog.Level {
	if os.Getenv("SMOLVM_NET_DEBUG") != "" {
		return slog.LevelDebug
	}
	return slog.LevelWarn
}

// checkStream makes sure fd 3 is a stream socket (what QEMU's peer is).
func checkStream(f *os.File) error {
	t, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || t != unix.SOCK_STREAM {
		return fmt.Errorf("fd %d is not a stream socket", fdLink)
	}
	return nil
}

// hostAddrs lists the host's interface addresses (denied to the guest).
func hostAddrs() []netip.Addr {
	var out []netip.Addr
	as, _ := net.InterfaceAddrs()
	for _, a := range as {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out
}

// dropPrivileges: as root, become nobody (no supplementary groups); then
// forbid regaining privileges and deny the syscalls the sidecar never
// needs (seccomp, every thread).
//
// no_new_privs is per thread, and seccomp refuses (EACCES) a caller thread
// without it: both calls must run on one OS thread, or the Go scheduler may
// move the goroutine in between (a restart failed with "seccomp: permission
// denied" that way). TSYNC then gives every thread the filter and the flag.
func dropPrivileges() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if os.Geteuid() == 0 {
		if err := syscall.Setgroups(nil); err != nil {
			return fmt.Errorf("setgroups: %w", err)
		}
		if err := syscall.Setgid(nobody); err != nil {
			return fmt.Errorf("setgid: %w", err)
		}
		if err := syscall.Setuid(nobody); err != nil {
			return fmt.Errorf("setuid: %w", err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return installSeccomp()
}
