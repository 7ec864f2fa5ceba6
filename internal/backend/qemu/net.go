package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/netstack"
)

// The guest network: QEMU's virtio-net talks to a per-VM sidecar process
// (cmd/smolvm-net) over a socketpair (-netdev stream with an inherited
// fd); the sidecar terminates every guest flow in a user-space TCP/IP stack
// and applies the VM's network policy. See docs/adr/0003-guest-network.md.

const (
	netSocketName = "net.sock" // control channel, in the private RunDir
	netLogName    = "net.log"
	// NetHelperEnv names the sidecar binary, overriding the search.
	NetHelperEnv  = "SMOLVM_NET_HELPER"
	netHelperName = "smolvm-net"
	netReadyWait  = 10 * time.Second
)

// ErrNetHelperMissing means the network sidecar binary was not found.
var ErrNetHelperMissing = errors.New("network sidecar smolvm-net not found")

func netSocket(runDir string) string { return filepath.Join(runDir, netSocketName) }

// NetHelper finds the sidecar: $SMOLVM_NET_HELPER, then smolvm-net next
// to the running executable, then PATH.
func NetHelper() (string, error) {
	if p := os.Getenv(NetHelperEnv); p != "" {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
		return "", fmt.Errorf("qemu: $%s=%q is not an executable file: %w (run scripts/setup, or unset it)", NetHelperEnv, p, ErrNetHelperMissing)
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), netHelperName)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath(netHelperName); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("qemu: %w (it must sit next to the smolvm binary, be on PATH, or be named by $%s; scripts/setup builds it into bin/, or: go build -o bin/smolvm-net ./cmd/smolvm-net)", ErrNetHelperMissing, NetHelperEnv)
}

// netSidecar is a started sidecar: qemuEnd goes to QEMU (and must be
// closed by the caller once QEMU has it); wait returns once the sidecar is
// ready (its port forwards bound), or why it is not.
type netSidecar struct {
	qemuEnd *os.File
	pid     int
	wait    func(context.Context) error
}

// startNet starts the network sidecar for spec. QEMU can start at once
// (frames queue in the socketpair); the caller then waits for readiness,
// in parallel with QEMU's own start. The sidecar exits by itself when
// QEMU's end of the stream closes.
func (b *Backend) startNet(ctx context.Context, spec backend.Spec, dieWithParent bool) (*netSidecar, error) {
	helper, err := NetHelper()
	if err != nil {
		return nil, err
	}
	cfg := netstack.Config{Policy: spec.NetPolicy}
	for _, pf := range spec.PortForwards {
		cfg.Forwards = append(cfg.Forwards, netstack.Forward(pf))
	}
	for _, f := range cfg.Forwards {
		if err := f.Validate(); err != nil {
			return nil, fmt.Errorf("qemu: %w", err)
		}
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	conf, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: network socketpair: %w", err)
	}
	qemuEnd := os.NewFile(uintptr(fds[0]), "qemu-net")
	netEnd := os.NewFile(uintptr(fds[1]), "sidecar-net")
	defer netEnd.Close()
	ok := false
	defer func() {
		if !ok {
			qemuEnd.Close()
		}
	}()

	sock := netSocket(spec.RunDir)
	os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("qemu: network control socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	defer ln.Close()
	if err := os.Chmod(sock, 0o600); err != nil {
		return nil, fmt.Errorf("qemu: network control socket: %w", err)
	}
	lnFile, err := ln.File()
	if err != nil {
		return nil, fmt.Errorf("qemu: network control socket: %w", err)
	}
	defer lnFile.Close()

	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(spec.Dir, netLogName), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		readyR.Close()
		readyW.Close()
		return nil, fmt.Errorf("qemu: network sidecar log: %w", err)
	}
	defer logf.Close()

	cmd := exec.Command(helper)
	cmd.Stdin = strings.NewReader(string(conf))
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{netEnd, lnFile, readyW} // fds 3, 4, 5
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if dieWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	err = cmd.Start()
	readyW.Close()
	if err != nil {
		readyR.Close()
		return nil, fmt.Errorf("qemu: start network sidecar %s: %w", helper, err)
	}
	go cmd.Wait() // reap (stdin copy ends with it)

	line := make(chan string, 1)
	go func() {
		defer readyR.Close()
		s, _ := bufio.NewReader(io.LimitReader(readyR, 4096)).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	ok = true
	logPath := filepath.Join(spec.Dir, netLogName)
	return &netSidecar{qemuEnd: qemuEnd, pid: cmd.Process.Pid, wait: func(ctx context.Context) error {
		wctx, cancel := context.WithTimeout(ctx, netReadyWait)
		defer cancel()
		select {
		case s := <-line:
			if s == "ok" {
				return nil
			}
			cmd.Process.Kill()
			if s == "" {
				s = "exited during start: " + logTail(logPath)
			}
			return &backend.VMMError{Op: "network", Message: strings.TrimPrefix(s, "error: ")}
		case <-wctx.Done():
			cmd.Process.Kill()
			return &backend.VMMError{Op: "network", Message: "the network sidecar did not become ready in " + netReadyWait.String()}
		}
	}}, nil
}

// netdevArg is QEMU's -netdev for a sidecar connected on fd.
func netdevArg(fd int) string {
	return "stream,id=" + netdevID + ",server=off,addr.type=fd,addr.str=" + strconv.Itoa(fd)
}

// exposeNet asks a running VM's sidecar for a new port forward.
func exposeNet(ctx context.Context, m backend.Machine, pf backend.PortForward) error {
	f := netstack.Forward(pf)
	if err := f.Validate(); err != nil {
		return fmt.Errorf("qemu: expose port: %w", err)
	}
	_, err := netstack.Call(ctx, netSocket(m.RunDir), netstack.Request{Op: "expose", Forward: &f})
	if err != nil {
		return fmt.Errorf("qemu: expose port: %w", err)
	}
	return nil
}

// NetStats returns the network policy counters of a running VM (refused
// connections and their last reasons).
func (b *Backend) NetStats(ctx context.Context, m backend.Machine) (netpolicy.Stats, error) {
	if !m.Network {
		return netpolicy.Stats{}, fmt.Errorf("qemu: network stats: the VM has no network: %w", backend.ErrUnsupported)
	}
	if !processAlive(m) {
		return netpolicy.Stats{}, fmt.Errorf("qemu: network stats: %w", backend.ErrNotRunning)
	}
	rep, err := netstack.Call(ctx, netSocket(m.RunDir), netstack.Request{Op: "stats"})
	if err != nil {
		return netpolicy.Stats{}, fmt.Errorf("qemu: %w", err)
	}
	if rep.Stats == nil {
		return netpolicy.Stats{}, errors.New("qemu: network sidecar sent no stats")
	}
	return *rep.Stats, nil
}

// waitNetGone waits briefly for a VM's sidecar to exit after QEMU did (it
// sees the stream close), and kills it if it lingers.
func waitNetGone(pid int) {
	if pid <= 0 {
		return
	}
	isNet := func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil || len(b) == 0 {
			return false
		}
		return filepath.Base(strings.TrimRight(strings.SplitN(string(b), "\x00", 2)[0], "\x00")) == netHelperName
	}
	for i := 0; i < 100 && isNet(); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if isNet() {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}
