package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/ptyutil"
)

// procTable starts processes and collects their exit statuses.
//
// With reapAll the agent is PID 1 (or a subreaper): one goroutine reaps
// every child on SIGCHLD with wait4(-1) and hands statuses of registered
// pids to their waiters; orphans are reaped and forgotten. Fork and
// registration happen under the same lock the reaper holds while it
// reaps, so a child that exits at once cannot be reaped before its waiter
// is registered. Without reapAll each child is waited for by pid.
type procTable struct {
	reapAll bool

	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus

	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

func newProcTable(reapAll bool) *procTable {
	t := &procTable{reapAll: reapAll, waiters: map[int]chan syscall.WaitStatus{},
		stop: make(chan struct{}), done: make(chan struct{})}
	if reapAll {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGCHLD)
		go t.reapLoop(sigs)
	} else {
		close(t.done)
	}
	return t
}

func (t *procTable) close() {
	t.stopOnce.Do(func() { close(t.stop) })
	<-t.done
}

func (t *procTable) reapLoop(sigs chan os.Signal) {
	defer close(t.done)
	defer signal.Stop(sigs)
	// The ticker is a safety net; SIGCHLD drives reaping.
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-sigs:
		case <-tick.C:
		case <-t.stop:
			return
		}
		t.reap()
	}
}

func (t *procTable) reap() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ch, ok := t.waiters[pid]; ok {
			delete(t.waiters, pid)
			ch <- ws
		}
	}
}

// start forks and execs; the returned channel receives the exit status.
func (t *procTable) start(path string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	ch := make(chan syscall.WaitStatus, 1)
	if t.reapAll {
		t.mu.Lock()
		defer t.mu.Unlock()
		pid, err := syscall.ForkExec(path, argv, attr)
		if err != nil {
			return 0, nil, err
		}
		t.waiters[pid] = ch
		return pid, ch, nil
	}
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	go func() {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(pid, &ws, 0, nil)
			if err != syscall.EINTR {
				break
			}
		}
		ch <- ws
	}()
	return pid, ch, nil
}

// drainGrace is how long output is still collected after the process
// exited, for pipes held open by its background children.
const drainGrace = 200 * time.Millisecond

func (ss *session) startExec(id uint64, req agentproto.ExecRequest) {
	ctx, cancel := context.WithCancel(ss.ctx)
	ss.mu.Lock()
	if old := ss.cancels[id]; old != nil {
		ss.mu.Unlock()
		cancel()
		ss.sendError(id, invalid("request id %d is already running", id))
		return
	}
	var ip *interactive
	if req.Interactive || req.TTY != nil {
		var err error
		if ip, err = ss.srv.newInteractive(id, req, ss.send); err != nil {
			ss.mu.Unlock()
			cancel()
			ss.sendError(id, err)
			return
		}
		ss.interactive[id] = ip
	}
	ss.cancels[id] = cancel
	ss.mu.Unlock()
	ss.wg.Add(1)
	go func() {
		defer ss.wg.Done()
		defer func() {
			ss.mu.Lock()
			delete(ss.cancels, id)
			if ip != nil {
				delete(ss.interactive, id)
				ip.release()
			}
			ss.mu.Unlock()
			cancel()
		}()
		defer ss.recoverPanic(id)
		res, err := ss.srv.execute(ctx, req, func(stream string, data []byte) {
			ss.send(id, agentproto.TypeOutput, agentproto.Output{Stream: stream, Data: data})
		}, ip)
		if err != nil {
			ss.sendError(id, err)
			return
		}
		ss.send(id, agentproto.TypeExit, res)
	}()
}

// execute runs req. Output chunks go to out as they arrive (never
// concurrently for one stream). It returns an error only for invalid
// requests; failures to start are reported in the result. ip is the
// interactive state of an interactive exec (nil otherwise): it is told
// when the process started (or failed to) and feeds its standard input.
func (s *Server) execute(ctx context.Context, req agentproto.ExecRequest, out func(stream string, data []byte), ip *interactive) (agentproto.ExecResult, error) {
	start := time.Now()
	argv, err := execArgv(req)
	if err != nil {
		return agentproto.ExecResult{}, err
	}
	env, err := s.childEnv(req.Env)
	if err != nil {
		return agentproto.ExecResult{}, err
	}
	if req.TTY != nil {
		env = ttyEnv(env, req)
	}
	failed := func(code int, err error) (agentproto.ExecResult, error) {
		ip.started(0)
		return startFailed(out, start, code, err), nil
	}
	dir, err := execDir(req.Cwd, env)
	if err != nil {
		return failed(127, err)
	}
	path, err := lookPath(argv[0], envValue(env, "PATH"), dir)
	if err != nil {
		return failed(exitCodeFor(err), err)
	}
	var p *execPipes
	if req.TTY != nil {
		p, err = openTTY(*req.TTY)
	} else {
		p, err = openPipes(len(req.Stdin) > 0 || ip != nil)
	}
	if err != nil {
		return failed(126, err)
	}
	pid, wait, err := s.procs.start(path, argv, p.procAttr(dir, env))
	p.closeChildEnds()
	if err != nil {
		p.closeParentEnds()
		return failed(exitCodeFor(err), fmt.Errorf("exec %s: %w", argv[0], err))
	}
	if ip != nil {
		ip.run(pid, p)
	} else {
		p.feedStdin(req.Stdin)
	}
	var detached atomic.Bool // set once the exit was reported: drop later output
	dones := []chan struct{}{pumpOutput(p.outR, agentproto.StreamStdout, out, &detached)}
	if p.errR != nil {
		dones = append(dones, pumpOutput(p.errR, agentproto.StreamStderr, out, &detached))
	}
	res, ws := waitExit(ctx, pid, wait, req.TimeoutMS, p.signal)
	ip.exited() // its pid may be reused from now on: no more signals
	if !p.tty {
		closeFile(p.stdinW) // unblock a writer stuck on a process that stopped reading
	}
	drainOutput(dones...)
	detached.Store(true)
	if p.tty {
		closeFile(p.outR) // the terminal's master: its last holders get a hangup
	}
	res.ExitCode, res.Signal = exitCode(ws)
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// execArgv is the command line of req: its argv, or its shell command run
// by /bin/sh -c.
// It also refuses a negative timeout.
func execArgv(req agentproto.ExecRequest) ([]string, error) {
	var argv []string
	switch {
	case len(req.Argv) > 0 && req.Shell != "":
		return nil, invalid("exec: argv and shell are exclusive")
	case len(req.Argv) > 0:
		argv = req.Argv
	case req.Shell != "":
		argv = []string{"/bin/sh", "-c", req.Shell}
	default:
		return nil, invalid("exec: neither argv nor shell given")
	}
	if req.TimeoutMS < 0 {
		return nil, invalid("exec: negative timeout")
	}
	if (req.Interactive || req.TTY != nil) && len(req.Stdin) > 0 {
		return nil, invalid("exec: an interactive exec takes its stdin in stdin messages")
	}
	if req.TTY != nil {
		if err := req.TTY.Validate(); err != nil {
			return nil, invalid("exec: tty: %v", err)
		}
	}
	return argv, nil
}

// startFailed reports a command that could not start: the message on its
// stderr and in the result, with the shell's exit code for it.
func startFailed(out func(stream string, data []byte), start time.Time, code int, err error) agentproto.ExecResult {
	msg := fmt.Sprintf("smolvm-agent: %v", err)
	out(agentproto.StreamStderr, []byte(msg+"\n"))
	return agentproto.ExecResult{ExitCode: code, Error: msg, DurationMS: time.Since(start).Milliseconds()}
}

// execDir is the working directory of a command: cwd, which must be a
// directory, or when empty the child's HOME when it is one, else "/".
func execDir(cwd string, env []string) (string, error) {
	if cwd == "" {
		if home := envValue(env, "HOME"); home != "" {
			if st, err := os.Stat(home); err == nil && st.IsDir() {
				return home, nil
			}
		}
		return "/", nil
	}
	st, err := os.Stat(cwd)
	if err != nil {
		return "", fmt.Errorf("cwd: %w", err)
	}
	if !st.IsDir() {
		return "", fmt.Errorf("cwd %s: not a directory", cwd)
	}
	return cwd, nil
}

// execPipes are a command's standard streams. The child's ends are closed
// once it has started; stdinW is nil when there is no stdin data (the
// child reads /dev/null).
type execPipes struct {
	// tty: the command runs on a pseudo terminal: stdin, outW and errW
	// are its one slave file, outR and stdinW its one master file, errR
	// is nil (output comes merged as stdout).
	tty           bool
	stdin, stdinW *os.File
	outR, outW    *os.File
	errR, errW    *os.File
}

func openPipes(withStdin bool) (*execPipes, error) {
	p := &execPipes{}
	var err error
	if withStdin {
		p.stdin, p.stdinW, err = os.Pipe()
	} else {
		p.stdin, err = os.Open(os.DevNull)
	}
	if err == nil {
		p.outR, p.outW, err = os.Pipe()
	}
	if err == nil {
		p.errR, p.errW, err = os.Pipe()
	}
	if err != nil {
		p.closeChildEnds()
		p.closeParentEnds()
		return nil, err
	}
	return p, nil
}

func (p *execPipes) procAttr(dir string, env []string) *syscall.ProcAttr {
	return &syscall.ProcAttr{
		Dir:   dir,
		Env:   env,
		Files: []uintptr{p.stdin.Fd(), p.outW.Fd(), p.errW.Fd()},
		Sys:   p.sysProcAttr(),
	}
}

// sysProcAttr puts the command in its own process group; on a terminal,
// in a new session whose controlling terminal it is (its fd 0), which
// makes it the leader of the terminal's foreground process group.
func (p *execPipes) sysProcAttr() *syscall.SysProcAttr {
	if p.tty {
		return &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}
	return &syscall.SysProcAttr{Setpgid: true}
}

// signal sends sig to the command's process group and, on a terminal, to
// the terminal's foreground process group (a shell's job).
func (p *execPipes) signal(pid int, sig syscall.Signal) {
	if p.tty {
		if pg, err := ptyutil.ForegroundGroup(p.outR); err == nil && pg > 1 && pg != pid {
			_ = syscall.Kill(-pg, sig)
		}
	}
	_ = syscall.Kill(-pid, sig)
}

func (p *execPipes) closeChildEnds() {
	closeFile(p.stdin)
	closeFile(p.outW)
	closeFile(p.errW)
}

func (p *execPipes) closeParentEnds() {
	closeFile(p.stdinW)
	closeFile(p.outR)
	closeFile(p.errR)
}

// feedStdin writes data to the child's stdin in the background and closes
// it.
func (p *execPipes) feedStdin(data []byte) {
	if p.stdinW == nil {
		return
	}
	go func() {
		_, _ = p.stdinW.Write(data) // EPIPE when the process does not read it all
		p.stdinW.Close()
	}()
}

// pumpOutput sends what r yields to out as stream until r ends, dropping it
// once detached is set; it closes r. The channel is closed when it is done.
func pumpOutput(r *os.File, stream string, out func(stream string, data []byte), detached *atomic.Bool) chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer r.Close()
		buf := make([]byte, agentproto.MaxOutputChunk)
		for {
			n, err := r.Read(buf)
			if n > 0 && !detached.Load() {
				out(stream, append([]byte(nil), buf[:n]...))
			}
			if err != nil {
				return
			}
		}
	}()
	return done
}

// waitExit waits for the process pid to exit. When timeoutMS (if above 0)
// passes or ctx ends first, its process group is killed and the result
// says so.
func waitExit(ctx context.Context, pid int, wait <-chan syscall.WaitStatus, timeoutMS int64, signal func(pid int, sig syscall.Signal)) (agentproto.ExecResult, syscall.WaitStatus) {
	var res agentproto.ExecResult
	var timeout <-chan time.Time
	if timeoutMS > 0 {
		t := time.NewTimer(time.Duration(timeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	killGroup := func() { signal(pid, syscall.SIGKILL) }
	var ws syscall.WaitStatus
	select {
	case ws = <-wait:
		return res, ws
	case <-timeout:
		res.TimedOut = true
	case <-ctx.Done():
		res.Canceled = true
	}
	killGroup()
	ws = <-wait
	killGroup() // members forked while the first kill was delivered
	return res, ws
}

// drainOutput waits for the output pumps to collect what is still in the
// pipes. Background processes may hold them open: after drainGrace it stops
// waiting (they keep draining; the caller then drops their output).
func drainOutput(dones ...chan struct{}) {
	grace := time.NewTimer(drainGrace)
	defer grace.Stop()
	for _, d := range dones {
		select {
		case <-d:
		case <-grace.C:
			grace.Reset(0)
		}
	}
}

// exitCode is the shell's exit code for ws (128+N for signal N, with the
// signal's name).
func exitCode(ws syscall.WaitStatus) (code int, signal string) {
	switch {
	case ws.Exited():
		return ws.ExitStatus(), ""
	case ws.Signaled():
		return 128 + int(ws.Signal()), unix.SignalName(ws.Signal())
	}
	return -1, ""
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}

func exitCodeFor(err error) int {
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, errNotFoundInPath) {
		return 127
	}
	return 126
}

var errNotFoundInPath = errors.New("executable file not found in $PATH")

// lookPath resolves name like a shell would, using the child's PATH.
func lookPath(name, path, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("%s: %w", name, err)
		}
		return p, nil
	}
	if name == "" {
		return "", fmt.Errorf("empty command: %w", syscall.ENOENT)
	}
	var firstErr error
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, name)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		err := checkExecutable(p)
		if err == nil {
			return p, nil
		}
		if firstErr == nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ENOTDIR) {
			firstErr = err
		}
	}
	if firstErr != nil {
		return "", fmt.Errorf("%s: %w", name, firstErr)
	}
	return "", fmt.Errorf("%s: %w", name, errNotFoundInPath)
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return syscall.EACCES
	}
	if st.Mode()&0o111 == 0 {
		return syscall.EACCES
	}
	return nil
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}
