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

// drainGrace is how long output is still awaited after the process
// exited, for pipes held open by its background children. What is in the
// pipes then is still collected (see pump.run).
const drainGrace = 200 * time.Millisecond

// drainMax bounds what is collected from a pipe after drainGrace: the most
// a pipe holds by default (fs.pipe-max-size), so nothing the process wrote
// before it exited is lost unless it grew its pipe past that.
const drainMax = 1 << 20

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
	ss.srv.beginRequest()
	go func() {
		defer ss.wg.Done()
		defer ss.srv.endRequest()
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
	pumps := []*pump{startPump(p.outR, agentproto.StreamStdout, out)}
	if p.errR != nil {
		pumps = append(pumps, startPump(p.errR, agentproto.StreamStderr, out))
	}
	res, ws := waitExit(ctx, pid, wait, req.TimeoutMS, p.signal)
	ip.exited() // its pid may be reused from now on: no more signals
	if !p.tty {
		closeFile(p.stdinW) // unblock a writer stuck on a process that stopped reading
	}
	drainOutput(pumps...)
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

// pump sends what a command's output pipe (or terminal) yields to out.
type pump struct {
	r       *os.File
	stream  string
	out     func(stream string, data []byte)
	drained chan struct{} // closed once it sends no more
	// detached is set when drainOutput stopped waiting for a reader
	// without a deadline: its later output is dropped.
	detached atomic.Bool
}

// startPump sends what r yields to out as stream until the output is
// drained (see pump.run); it closes r at its end.
func startPump(r *os.File, stream string, out func(stream string, data []byte)) *pump {
	pp := &pump{r: r, stream: stream, out: out, drained: make(chan struct{})}
	go pp.run()
	return pp
}

// run reads until the end of the output: EOF, which comes once the
// process and every child holding the pipe exited, or the read deadline
// drainOutput sets when the process exited. At that deadline background
// children still hold the pipe: what the pipe holds then is sent (read
// without waiting, at most drainMax bytes), and later output is read and
// dropped until EOF, so that those children never block on a full pipe.
// Nothing is sent after drained is closed.
func (pp *pump) run() {
	defer pp.r.Close()
	buf := make([]byte, agentproto.MaxOutputChunk)
	drained := false
	for {
		n, err := pp.r.Read(buf)
		if n > 0 && !drained && !pp.detached.Load() {
			pp.out(pp.stream, append([]byte(nil), buf[:n]...))
		}
		if err == nil {
			continue
		}
		if drained || !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		pp.sendBuffered(buf)
		drained = true
		close(pp.drained)
	}
	if !drained {
		close(pp.drained)
	}
}

// sendBuffered sends what the pipe holds now without waiting for more
// (at most drainMax bytes: a background child may keep writing), and
// clears the read deadline.
func (pp *pump) sendBuffered(buf []byte) {
	if pp.r.SetReadDeadline(time.Time{}) != nil {
		return
	}
	rc, err := pp.r.SyscallConn()
	if err != nil {
		return
	}
	var avail int
	if rc.Control(func(fd uintptr) { avail, err = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }) != nil || err != nil {
		return
	}
	for left := min(avail, drainMax); left > 0; {
		var n int
		// One non-blocking read (the descriptor is non-blocking: the
		// runtime polls it): returning true never waits.
		if rc.Read(func(fd uintptr) bool {
			n, err = unix.Read(int(fd), buf[:min(left, len(buf))])
			return true
		}) != nil || err != nil || n <= 0 {
			return
		}
		pp.out(pp.stream, append([]byte(nil), buf[:n]...))
		left -= n
	}
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

// drainOutput waits until the pumps sent the process's output: to EOF,
// or when background processes hold the pipes open, what the pipes hold
// drainGrace after now. The pipes and the terminal master are in the
// runtime's poller, so their read deadlines end a waiting read; should
// one not take a deadline (a descriptor outside the poller), drainOutput
// stops waiting for it after drainGrace and its later output is dropped.
func drainOutput(pumps ...*pump) {
	deadline := time.Now().Add(drainGrace)
	var grace <-chan time.Time
	for _, pp := range pumps {
		// A pump at EOF closed its reader already; only a descriptor
		// outside the poller takes no deadline.
		if err := pp.r.SetReadDeadline(deadline); errors.Is(err, os.ErrNoDeadline) && grace == nil {
			t := time.NewTimer(drainGrace)
			defer t.Stop()
			grace = t.C
		}
	}
	for _, pp := range pumps {
		select {
		case <-pp.drained:
		case <-grace:
			for _, pp := range pumps {
				pp.detached.Store(true)
			}
			return
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
