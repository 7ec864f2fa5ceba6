package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/consolelog"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/qmp"
	"github.com/smolvm-go/smolvm/internal/retry"
)

// maxSocketPath is the usable length of sun_path (108 bytes with the NUL).
const maxSocketPath = 107

// launch starts QEMU with (spec, l) and waits until QMP answers
// query-status. On any failure the process is killed and its files removed.
func (b *Backend) launch(ctx context.Context, spec backend.Spec, l launch) (backend.Machine, error) {
	if err := validateSpec(spec); err != nil {
		return backend.Machine{}, err
	}
	bin, err := b.qemuBinary()
	if err != nil {
		return backend.Machine{}, err
	}
	// Private (0700, ours, checked): the VM dir, the run dir and the run
	// dir's parent (smolvm's base run dir, e.g. /tmp/smolvm-UID, which
	// another local user could otherwise pre-create and plant sockets in).
	for _, d := range []string{spec.Dir, filepath.Dir(spec.RunDir), spec.RunDir} {
		if err := fsutil.PrivateDir(d); err != nil {
			return backend.Machine{}, fmt.Errorf("qemu: start: %w", err)
		}
	}
	// Refuse to start over a live VMM of the same VM (its sockets would be
	// removed under it).
	if b, err := os.ReadFile(pidFile(spec.Dir)); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil &&
			processAlive(backend.Machine{Spec: spec, PID: pid}) {
			return backend.Machine{}, fmt.Errorf("qemu: start %s: already running (pid %d)", spec.ID, pid)
		}
	}
	// Leftovers of an earlier run of this VM.
	removeQuiet(qmpSocket(spec.RunDir), agentSocket(spec.RunDir), pidFile(spec.Dir))
	if l.MemoryShared {
		if l.MemoryFile, err = prepareMemoryFile(l.MemoryFile, spec.RunDir); err != nil {
			return backend.Machine{}, err
		}
		removeQuiet(l.MemoryFile) // a fresh boot or a stream restore starts from zeroed RAM
		// QEMU would create it 0644: made here, empty and 0600, QEMU
		// opens it as found and sizes it.
		if err := ensurePrivateFile(l.MemoryFile); err != nil {
			return backend.Machine{}, fmt.Errorf("qemu: start: guest RAM file: %w", err)
		}
	}
	// The console log: QEMU appends to it as found (else creates it 0644).
	if err := ensurePrivateFile(consoleLog(spec.Dir)); err != nil {
		return backend.Machine{}, fmt.Errorf("qemu: start: %w", err)
	}

	m := backend.Machine{
		Spec:         spec,
		Backend:      b.Name(),
		Accel:        l.Accel,
		MemoryFile:   l.MemoryFile,
		MemoryShared: l.MemoryShared,
	}
	if err := confine(spec, &l); err != nil {
		return backend.Machine{}, err
	}
	var extra []*os.File // fds QEMU inherits (3, 4, ...)
	var sidecar *netSidecar
	if spec.Network && !b.slirp {
		if sidecar, err = b.startNet(ctx, spec, l.DieWithParent); err != nil {
			return backend.Machine{}, err
		}
		defer sidecar.qemuEnd.Close() // QEMU has its copy, or failed: the sidecar sees EOF and exits
		l.NetFD = 3 + len(extra)
		extra = append(extra, sidecar.qemuEnd)
		m.NetPID = sidecar.pid
	}
	args, err := buildArgs(spec, l)
	if err != nil {
		return backend.Machine{}, err
	}
	logf, err := os.OpenFile(qemuLog(spec.Dir), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|syscall.O_NOFOLLOW, 0o600)
	if err == nil {
		err = logf.Chmod(0o600) // a log from an earlier run may be 0644
	}
	if err != nil {
		return backend.Machine{}, fmt.Errorf("qemu: start: %w", err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = spec.Dir
	cmd.Stdin = nil // /dev/null
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.ExtraFiles = extra
	// Own session: no controlling terminal, not signalled with our process
	// group, and it outlives us (no Pdeathsig).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if l.DieWithParent {
		// The kernel clears it when QEMU drops its uid (-run-with user=);
		// sweepHelperRunDirs then kills an orphaned helper.
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	closeGroup, err := b.placeInGroup(spec, l, cmd.SysProcAttr)
	if err != nil {
		logf.Close()
		return backend.Machine{}, err
	}
	defer closeGroup()
	b.log.Debug("starting qemu", "id", spec.ID, "argv", strings.Join(append([]string{bin}, args...), " "))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		b.removeGroup(spec.ID)
		return backend.Machine{}, fmt.Errorf("qemu: start %s: %w", bin, err)
	}
	logf.Close()
	m.PID = cmd.Process.Pid
	exited := make(chan struct{})
	go func() { // reap: we are the parent
		cmd.Wait()
		close(exited)
	}()

	fail := func(op string, err error) (backend.Machine, error) {
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		b.cleanup(m)
		var ve *backend.VMMError
		if errors.As(err, &ve) {
			if ve.Log == "" {
				ve.Log = logTail(qemuLog(spec.Dir))
			}
			return backend.Machine{}, ve
		}
		return backend.Machine{}, &backend.VMMError{Op: op, Message: err.Error(), Log: logTail(qemuLog(spec.Dir))}
	}

	dctx, cancel := withTimeout(ctx, backend.DefaultTimeout)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-dctx.Done():
		}
	}()
	// exitedErr reports a QEMU that died during start (it closes QMP first
	// and is reaped a moment later).
	exitedErr := func() error {
		select {
		case <-exited:
		case <-time.After(time.Second):
			return nil
		}
		return fmt.Errorf("qemu exited during start (%s)", cmd.ProcessState)
	}
	c, err := dialNewQMP(dctx, qmpSocket(spec.RunDir))
	if err != nil {
		if e := exitedErr(); e != nil {
			err = e
		}
		return fail("start", err)
	}
	defer c.Close()
	var st qmpStatus
	if err := execQMP(dctx, c, "query-status", nil, &st); err != nil {
		if e := exitedErr(); e != nil {
			err = e
		}
		return fail("start", err)
	}
	if sidecar != nil {
		if err := sidecar.wait(dctx); err != nil {
			return fail("network", err)
		}
	}
	b.log.Debug("qemu up", "id", spec.ID, "pid", m.PID, "status", st.Status, "elapsed", time.Since(start))
	return m, nil
}

// newQMPPoll is how often launch tries QMP's socket while a new QEMU
// starts: it appears 20-40 ms after the exec (TCG, busybox guest), and
// qmp.Dial's backoff (5, 10, 20, 40 ms pauses) found it up to 40 ms late,
// 15 ms on most restores, on the path of every restore and template
// create. A connect to a missing socket is a cheap failing system call.
const newQMPPoll = time.Millisecond

// dialNewQMP connects to the QMP socket of a QEMU that is starting (see
// newQMPPoll) and runs the handshake; ctx bounds both.
func dialNewQMP(ctx context.Context, path string) (*qmp.Client, error) {
	var d net.Dialer
	conn, err := retry.Do(ctx, retry.Policy{First: newQMPPoll, Max: newQMPPoll},
		func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "unix", path) })
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	return qmp.NewClient(ctx, conn)
}

// validateSpec checks a spec before anything is created for it: every
// field by type (backend.Spec.Validate), what QEMU's user networking can
// bind (see hostfwd), socket path lengths, and that the files exist.
func validateSpec(spec backend.Spec) error {
	if err := checkSpec(spec); err != nil {
		return err
	}
	switch {
	case len(agentSocket(spec.RunDir)) > maxSocketPath || len(qmpSocket(spec.RunDir)) > maxSocketPath:
		return fmt.Errorf("qemu: RunDir %q is too long for unix sockets (keep it under ~90 bytes)", spec.RunDir)
	case spec.Kernel == "":
		return errors.New("qemu: spec.Kernel is empty")
	}
	for _, p := range []string{spec.Kernel, spec.Initrd} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("qemu: %w", err)
		}
	}
	if spec.Disk != "" {
		if _, err := os.Stat(spec.Disk); err != nil {
			return fmt.Errorf("qemu: disk: %w (Prepare creates it)", err)
		}
	}
	return nil
}

// checkSpec is validateSpec without the file system: the fields by type,
// and port forwards QEMU's user networking can bind.
func checkSpec(spec backend.Spec) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	for _, pf := range spec.PortForwards {
		if _, err := hostfwd(pf); err != nil {
			return err
		}
	}
	return nil
}

// ValidateSpec implements backend.SpecValidator: the SDK calls it when it
// creates a VM, so a spec QEMU would refuse (or that would inject options)
// fails before any file or process exists.
func (b *Backend) ValidateSpec(spec backend.Spec) error { return checkSpec(spec) }

// processAlive reports whether m.PID is a live QEMU for this VM: its
// cmdline must name the VM's QMP socket (guards against PID reuse; a zombie
// has an empty cmdline and counts as gone).
func processAlive(m backend.Machine) bool {
	m = withPID(m)
	if m.PID <= 0 || m.RunDir == "" {
		return false
	}
	return isQEMUOf(m.PID, m.RunDir)
}

// isQEMUOf reports whether process pid's command line names the QMP socket
// in runDir.
func isQEMUOf(pid int, runDir string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || len(b) == 0 {
		return false
	}
	want := []byte("path=" + optVal(qmpSocket(runDir)))
	for arg := range bytes.SplitSeq(b, []byte{0}) {
		if bytes.HasSuffix(arg, want) || bytes.Contains(arg, append(append([]byte{}, want...), ',')) {
			return true
		}
	}
	return false
}

// findQEMU looks through /proc for the QEMU of the VM whose sockets are in
// runDir, and returns its pid or 0. It finds a QEMU whose launcher died
// before QEMU wrote its pid file.
func findQEMU(runDir string) int {
	if runDir == "" {
		return 0
	}
	for _, pid := range procfs.Others() {
		if isQEMUOf(pid, runDir) {
			return pid
		}
	}
	return 0
}

// withPID fills in m.PID from the pid file QEMU writes at start when the
// record lacks it (the process that launched QEMU died before saving it),
// so such a VM can still be found, stopped and cleaned up.
func withPID(m backend.Machine) backend.Machine {
	if m.PID > 0 || m.Dir == "" {
		return m
	}
	if b, err := os.ReadFile(pidFile(m.Dir)); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			m.PID = pid
		}
	}
	return m
}

// processCmdline returns the argv of a live VM process.
func processCmdline(m backend.Machine) ([]string, bool) {
	if !processAlive(m) {
		return nil, false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(m.PID) + "/cmdline")
	if err != nil {
		return nil, false
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00"), true
}

// watchProcess calls onExit when m's process disappears before ctx ends.
func watchProcess(ctx context.Context, m backend.Machine, onExit func()) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if !processAlive(m) {
					onExit()
					return
				}
			}
		}
	}()
	return cancel
}

// waitGone polls until the process is gone or d passes.
func waitGone(ctx context.Context, m backend.Machine, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if !processAlive(m) {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop asks QEMU to quit, waits for the process to exit (SIGKILL after
// Options.StopTimeout), and removes the sockets and the shared RAM file. It
// succeeds when the VM is already gone.
func (b *Backend) Stop(ctx context.Context, m backend.Machine) error {
	return b.stop(ctx, m, true)
}

// stop is Stop; without graceful it kills QEMU at once (a restore's
// rollback: the guest never ran, and a QEMU whose incoming migration
// failed does not act on quit).
func (b *Backend) stop(ctx context.Context, m backend.Machine, graceful bool) error {
	m = withPID(m)
	if m.PID <= 0 {
		// Launched by a process that died before QEMU wrote its pid file.
		m.PID = findQEMU(m.RunDir)
	}
	if processAlive(m) {
		wait := time.Duration(0)
		if graceful {
			wait = b.opts.StopTimeout
			qctx, cancel := context.WithTimeout(ctx, min(wait, 2*time.Second))
			if c, err := qmp.Dial(qctx, qmpSocket(m.RunDir)); err == nil {
				if err := consolelog.Drain(qctx, c, consoleLog(m.Dir)); err != nil {
					b.log.Debug("draining the console", "id", m.ID, "err", err)
				}
				err := c.Execute(qctx, "quit", nil, nil)
				c.Close()
				if err != nil && !errors.Is(err, qmp.ErrClosed) {
					b.log.Debug("quit failed", "id", m.ID, "err", err)
				}
			}
			cancel()
		}
		if !waitGone(ctx, m, wait) {
			b.log.Debug("qemu did not quit; killing", "id", m.ID, "pid", m.PID)
			if processAlive(m) {
				syscall.Kill(m.PID, syscall.SIGKILL)
			}
			// SIGKILL is prompt; do not let a spent ctx cut this short.
			if !waitGone(context.Background(), m, 10*time.Second) {
				return fmt.Errorf("qemu: pid %d did not exit after SIGKILL", m.PID)
			}
		}
	}
	waitNetGone(m.NetPID)
	b.cleanup(m)
	return nil
}

// cleanup removes what a stopped VM leaves behind: sockets, pid file and its
// own shared RAM file (never a snapshot image it mapped privately).
func (b *Backend) cleanup(m backend.Machine) {
	// Nothing is removed through a run dir or RAM dir that is not ours
	// (launch refused to start in it; it may point anywhere).
	if m.RunDir != "" && fsutil.CheckPrivateDir(m.RunDir) == nil {
		removeQuiet(qmpSocket(m.RunDir), netSocket(m.RunDir), filepath.Join(m.RunDir, chrootDirName))
		for k := 0; k < AgentPorts; k++ {
			removeQuiet(agentPortSocket(m.RunDir, k), filepath.Join(m.RunDir, fmt.Sprintf("agent.%d.lock", k)))
		}
	}
	if m.Dir != "" {
		removeQuiet(pidFile(m.Dir))
	}
	b.removeGroup(m.ID)
	if d := filepath.Base(m.Dir); m.Dir != "" && d != m.ID {
		// Launched under another id (a warm pool member that a VM
		// claimed): its group is named after the id its dir has.
		b.removeGroup(d)
	}
	if m.MemoryFile == "" && m.ID != "" && m.Dir != "" {
		// Launched by a process that died before recording the machine:
		// the shared RAM file is at its derived path.
		if p, err := b.memoryFile(m.Spec); err == nil {
			m.MemoryFile, m.MemoryShared = p, true
		}
	}
	if m.MemoryShared && m.MemoryFile != "" && fsutil.CheckPrivateDir(filepath.Dir(m.MemoryFile)) == nil {
		removeQuiet(m.MemoryFile)
		if d := filepath.Dir(m.MemoryFile); strings.HasPrefix(filepath.Base(d), "smolvm-") {
			os.Remove(d) // only if empty
		}
	}
}

// ensurePrivateFile makes path an existing regular file with mode 0600 (created
// empty when missing; a file from an earlier run keeps its content), without
// following a symlink at path.
func ensurePrivateFile(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return err
	} else if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file (%v); remove it", path, st.Mode().Type())
	}
	return f.Chmod(0o600)
}

func removeQuiet(paths ...string) {
	for _, p := range paths {
		if p != "" {
			os.Remove(p)
		}
	}
}

// logTail returns the last lines of a log file (at most ~4 KiB).
func logTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 4096
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := st.Size() - max
	if off < 0 {
		off = 0
	}
	buf := make([]byte, st.Size()-off)
	n, _ := f.ReadAt(buf, off)
	s := string(buf[:n])
	if off > 0 {
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			s = s[i+1:]
		}
	}
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}

func trimSpace(s string) string { return strings.TrimSpace(s) }
