package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fcapi"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/retry"
)

// proc is a firecracker process this process started.
type proc struct {
	pid    int
	exited chan struct{} // closed once the process is reaped
	state  *os.ProcessState
}

func (p *proc) machine(spec backend.Spec) backend.Machine {
	return backend.Machine{Spec: spec, Backend: Name, PID: p.pid, Accel: backend.AccelKVM}
}

// kill ends the process at once and waits (bounded) for the reaper.
func (p *proc) kill() {
	_ = syscall.Kill(p.pid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
}

// fail ends a launch that went wrong: it kills the process, removes what
// the launch created, and returns err explained (see explain).
func (p *proc) fail(op string, err error, spec backend.Spec) error {
	err = p.explain(op, err, spec)
	p.kill()
	cleanup(spec)
	return err
}

// explain returns the error of request op as a *backend.VMMError with the
// log tail. A transport error from a VMM that died mid-request is reported
// as the VMM exiting.
func (p *proc) explain(op string, err error, spec backend.Spec) error {
	var fe *fcapi.Error
	if !errors.As(err, &fe) {
		select {
		case <-p.exited:
			err = &backend.VMMError{Op: op, Message: fmt.Sprintf("firecracker exited (%v) during the request: %v", p.state, err), Log: logTail(spec.Dir)}
		case <-time.After(time.Second):
		}
	}
	return vmmError(op, err, spec.Dir)
}

// launch starts `firecracker --api-sock RUNDIR/fc.sock --id ID` detached
// (own session, stdin /dev/null, output appended to DIR/firecracker.log,
// working directory RUNDIR), writes the pid file, links RUNDIR/rootfs to
// spec.Disk (when there is a disk), and returns once the API answers. On error nothing is left.
func (b *Backend) launch(ctx context.Context, spec backend.Spec) (*proc, error) {
	for _, d := range []string{spec.Dir, spec.RunDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("firecracker: %w", err)
		}
	}
	// Never take over a RunDir whose VMM still answers.
	if c, err := net.DialTimeout("unix", apiSock(spec), 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("firecracker: %s is in use by a running VMM", apiSock(spec))
	}
	// Firecracker refuses to start on an existing API socket; a stale vsock
	// socket would make the vsock device fail.
	cleanup(spec)
	if spec.Disk != "" {
		disk, err := filepath.Abs(spec.Disk)
		if err != nil {
			return nil, err
		}
		if err := os.Symlink(disk, driveLink(spec)); err != nil {
			return nil, fmt.Errorf("firecracker: drive link: %w", err)
		}
	}
	if j := b.jailFor(spec); j != nil {
		if err := j.stage(spec); err != nil {
			cleanup(spec)
			return nil, err
		}
	}
	// DIR/console.log is where tools look for a VM's serial console
	// (QEMU writes it); here it is the VMM's combined output.
	if _, err := os.Lstat(filepath.Join(spec.Dir, consoleName)); errors.Is(err, fs.ErrNotExist) {
		_ = os.Symlink(logName, filepath.Join(spec.Dir, consoleName))
	}
	logf, err := os.OpenFile(filepath.Join(spec.Dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		cleanup(spec)
		return nil, fmt.Errorf("firecracker: %w", err)
	}
	fmt.Fprintf(logf, "smolvm: %s starting %s for %s\n", time.Now().UTC().Format(time.RFC3339), b.bin, spec.ID)

	cmd := exec.Command(b.bin, "--api-sock", apiSock(spec), "--id", instanceID(spec.ID))
	if j := b.jailFor(spec); j != nil {
		cmd = exec.Command(j.Jailer, j.Argv()...)
	}
	cmd.Dir = spec.RunDir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// A new session: the VM outlives the caller and its terminal signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		cleanup(spec)
		return nil, fmt.Errorf("firecracker: start %s: %w", b.bin, err)
	}
	p := &proc{pid: cmd.Process.Pid, exited: make(chan struct{})}
	// Reap the child when it exits so it never lingers as a zombie in this
	// process; a process that outlives us is reparented as usual.
	go func() {
		_ = cmd.Wait()
		p.state = cmd.ProcessState
		close(p.exited)
	}()
	if err := os.WriteFile(filepath.Join(spec.Dir, pidName), []byte(strconv.Itoa(p.pid)+"\n"), 0o600); err != nil {
		p.kill()
		cleanup(spec)
		return nil, fmt.Errorf("firecracker: pid file: %w", err)
	}
	if err := waitAPI(ctx, p, spec); err != nil {
		p.kill()
		cleanup(spec)
		return nil, err
	}
	return p, nil
}

// waitAPI polls GET /version until the API answers, the process exits or
// ctx ends.
func waitAPI(ctx context.Context, p *proc, spec backend.Spec) error {
	c := fcapi.New(apiSock(spec))
	defer c.Close()
	_, err := retry.Do(ctx, retry.Policy{First: 2 * time.Millisecond, Max: 50 * time.Millisecond},
		func(ctx context.Context) (struct{}, error) {
			select {
			case <-p.exited:
				return struct{}{}, retry.Stop(&backend.VMMError{Op: "start", Message: fmt.Sprintf("firecracker exited before its API came up (%v)", p.state), Log: logTail(spec.Dir)})
			default:
			}
			actx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			_, err := c.Version(actx)
			return struct{}{}, err
		})
	if g, ok := errors.AsType[*retry.GiveUpError](err); ok {
		return &backend.VMMError{Op: "start", Message: fmt.Sprintf("firecracker API did not come up: %v", g), Log: logTail(spec.Dir)}
	}
	return err
}

// instanceID maps a VM id to what firecracker --id accepts: 1-64
// characters, alphanumeric or '-'.
func instanceID(id string) string {
	var sb strings.Builder
	for _, r := range id {
		if sb.Len() == 64 {
			break
		}
		if r < 128 && (r == '-' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			sb.WriteRune(r)
		} else {
			sb.WriteByte('-')
		}
	}
	if sb.Len() == 0 {
		return "smolvm"
	}
	return sb.String()
}

// alive reports whether m's firecracker process still runs. It checks the
// command line so that a recycled pid is not mistaken for the VMM, and
// treats a zombie as gone.
func alive(m backend.Machine) bool {
	if m.PID <= 0 {
		return false
	}
	return isFirecrackerOf(m.PID, m.Spec)
}

// isFirecrackerOf reports whether pid is a live (not zombie) Firecracker
// serving spec's API socket.
func isFirecrackerOf(pid int, spec backend.Spec) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// Field 3 follows the parenthesised comm, which may contain spaces.
	if i := bytes.LastIndexByte(stat, ')'); i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' || stat[i+2] == 'X' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	if spec.RunAsUID > 0 && isJailedFirecrackerOf(cmdline, procUID(pid), spec) {
		return true
	}
	return bytes.Contains(cmdline, []byte("\x00--api-sock\x00"+apiSock(spec)+"\x00"))
}

// findFirecracker looks through /proc for the Firecracker serving spec's
// API socket and returns its pid or 0: the VMM of a machine whose launcher
// died before recording it.
func findFirecracker(spec backend.Spec) int {
	for _, pid := range procfs.Others() {
		if isFirecrackerOf(pid, spec) {
			return pid
		}
	}
	return 0
}

// terminate sends SIGTERM, then SIGKILL after a grace period, and waits
// until the process is gone.
func terminate(ctx context.Context, m backend.Machine) error {
	_ = syscall.Kill(m.PID, syscall.SIGTERM)
	grace, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if waitGone(grace, m) {
		return nil
	}
	if err := syscall.Kill(m.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	if waitGone(ctx, m) {
		return nil
	}
	return fmt.Errorf("firecracker pid %d still running after SIGKILL: %w", m.PID, ctx.Err())
}

func waitGone(ctx context.Context, m backend.Machine) bool {
	wait := time.Millisecond
	for alive(m) {
		select {
		case <-ctx.Done():
			return !alive(m)
		case <-time.After(wait):
		}
		wait = min(wait*2, 20*time.Millisecond)
	}
	// The process is dead or dying (its cmdline empties before it becomes
	// a zombie); give it and its reaper (the goroutine of the process that
	// launched it, or init) a moment so that the pid is really gone when
	// Stop returns. Bounded, in case the pid is already recycled.
	reap, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	for pidExists(m.PID) {
		select {
		case <-reap.Done():
			return true
		case <-time.After(2 * time.Millisecond):
		}
	}
	return true
}

func pidExists(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// cleanup removes what a VM leaves in RunDir and Dir: sockets (including
// guest-initiated vsock sockets RUNDIR/vsock.sock_PORT), the drive link,
// the pid file, and its TAP.
func cleanup(spec backend.Spec) {
	if spec.RunDir != "" {
		_ = os.Remove(apiSock(spec))
		_ = os.Remove(vsockSock(spec))
		_ = os.Remove(driveLink(spec))
		if extra, _ := filepath.Glob(vsockSock(spec) + "_*"); len(extra) > 0 {
			for _, f := range extra {
				_ = os.Remove(f)
			}
		}
	}
	if spec.Dir != "" {
		_ = os.Remove(filepath.Join(spec.Dir, pidName))
		_ = os.RemoveAll(filepath.Join(spec.Dir, jailDirName))
	}
	if spec.Network {
		removeTAP(spec)
	}
}

// logTail returns the end of DIR/firecracker.log for error reports.
func logTail(dir string) string {
	f, err := os.Open(filepath.Join(dir, logName))
	if err != nil {
		return ""
	}
	defer f.Close()
	const n = 4096
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(-n, io.SeekEnd)
	}
	b, _ := io.ReadAll(io.LimitReader(f, n)) // the log may grow meanwhile
	return strings.TrimSpace(string(b))
}
