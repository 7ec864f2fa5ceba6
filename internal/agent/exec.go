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
	ss.cancels[id] = cancel
	ss.mu.Unlock()
	ss.wg.Add(1)
	go func() {
		defer ss.wg.Done()
		defer func() {
			ss.mu.Lock()
			delete(ss.cancels, id)
			ss.mu.Unlock()
			cancel()
		}()
		defer ss.recoverPanic(id)
		res, err := ss.srv.execute(ctx, req, func(stream string, data []byte) {
			ss.send(id, agentproto.TypeOutput, agentproto.Output{Stream: stream, Data: data})
		})
		if err != nil {
			ss.sendError(id, err)
			return
		}
		ss.send(id, agentproto.TypeExit, res)
	}()
}

// execute runs req. Output chunks go to out as they arrive (never
// concurrently for one stream). It returns an error only for invalid
// requests; failures to start are reported in the result.
func (s *Server) execute(ctx context.Context, req agentproto.ExecRequest, out func(stream string, data []byte)) (agentproto.ExecResult, error) {
	start := time.Now()
	var argv []string
	switch {
	case len(req.Argv) > 0 && req.Shell != "":
		return agentproto.ExecResult{}, invalid("exec: argv and shell are exclusive")
	case len(req.Argv) > 0:
		argv = req.Argv
	case req.Shell != "":
		argv = []string{"/bin/sh", "-c", req.Shell}
	default:
		return agentproto.ExecResult{}, invalid("exec: neither argv nor shell given")
	}
	if req.TimeoutMS < 0 {
		return agentproto.ExecResult{}, invalid("exec: negative timeout")
	}
	env, err := s.childEnv(req.Env)
	if err != nil {
		return agentproto.ExecResult{}, err
	}
	failed := func(code int, err error) (agentproto.ExecResult, error) {
		msg := fmt.Sprintf("smolvm-agent: %v", err)
		out(agentproto.StreamStderr, []byte(msg+"\n"))
		return agentproto.ExecResult{ExitCode: code, Error: msg,
			DurationMS: time.Since(start).Milliseconds()}, nil
	}
	dir := req.Cwd
	if dir == "" {
		dir = "/"
		if home := envValue(env, "HOME"); home != "" {
			if st, err := os.Stat(home); err == nil && st.IsDir() {
				dir = home
			}
		}
	} else if st, err := os.Stat(dir); err != nil {
		return failed(127, fmt.Errorf("cwd: %w", err))
	} else if !st.IsDir() {
		return failed(127, fmt.Errorf("cwd %s: not a directory", dir))
	}
	path, err := lookPath(argv[0], envValue(env, "PATH"), dir)
	if err != nil {
		return failed(exitCodeFor(err), err)
	}

	// Pipes: the child's ends are closed once it has started.
	var stdin *os.File
	var stdinW *os.File
	if len(req.Stdin) > 0 {
		stdin, stdinW, err = os.Pipe()
	} else {
		stdin, err = os.Open(os.DevNull)
	}
	if err != nil {
		return failed(126, err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		stdin.Close()
		closeFile(stdinW)
		return failed(126, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		stdin.Close()
		closeFile(stdinW)
		outR.Close()
		outW.Close()
		return failed(126, err)
	}
	attr := &syscall.ProcAttr{
		Dir:   dir,
		Env:   env,
		Files: []uintptr{stdin.Fd(), outW.Fd(), errW.Fd()},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	}
	pid, wait, err := s.procs.start(path, argv, attr)
	stdin.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		closeFile(stdinW)
		outR.Close()
		errR.Close()
		return failed(exitCodeFor(err), fmt.Errorf("exec %s: %w", argv[0], err))
	}

	if stdinW != nil {
		go func() {
			_, _ = stdinW.Write(req.Stdin) // EPIPE when the process does not read it all
			stdinW.Close()
		}()
	}
	var detached atomic.Bool // set once the exit was reported: drop later output
	pump := func(r *os.File, stream string) chan struct{} {
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
	outDone := pump(outR, agentproto.StreamStdout)
	errDone := pump(errR, agentproto.StreamStderr)

	var res agentproto.ExecResult
	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	killGroup := func() { _ = syscall.Kill(-pid, syscall.SIGKILL) }
	var ws syscall.WaitStatus
	select {
	case ws = <-wait:
	case <-timeout:
		res.TimedOut = true
		killGroup()
		ws = <-wait
	case <-ctx.Done():
		res.Canceled = true
		killGroup()
		ws = <-wait
	}
	if res.TimedOut || res.Canceled {
		killGroup() // members forked while the first kill was delivered
	}
	if stdinW != nil {
		stdinW.Close() // unblock a writer stuck on a process that stopped reading
	}
	// Collect the output still in the pipes. Background processes may hold
	// them open: after a grace period stop waiting (they keep draining, and
	// their output is dropped).
	grace := time.NewTimer(drainGrace)
	defer grace.Stop()
	for _, d := range []chan struct{}{outDone, errDone} {
		select {
		case <-d:
		case <-grace.C:
			grace.Reset(0)
		}
	}
	detached.Store(true)

	switch {
	case ws.Exited():
		res.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		res.ExitCode = 128 + int(ws.Signal())
		res.Signal = unix.SignalName(ws.Signal())
	default:
		res.ExitCode = -1
	}
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
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
