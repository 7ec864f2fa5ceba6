package agentclient

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gocmp "github.com/google/go-cmp/cmp"

	"github.com/smolvm-go/smolvm/internal/agent"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// testAgent is a real agent server on a unix socket that behaves like the
// virtio-serial chardev (one long-lived session, hosts come and go).
type testAgent struct {
	sock    string
	dir     string // scratch dir for env files
	srv     *agent.Server
	envFile string
	profile string
}

func startAgent(t *testing.T, opts agent.Options) *testAgent {
	t.Helper()
	// unix socket paths must be short.
	sd, err := os.MkdirTemp("", "sa")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sd) })
	ta := &testAgent{sock: filepath.Join(sd, "a.sock"), dir: t.TempDir()}
	ta.envFile = filepath.Join(ta.dir, "etc/smolvm/env")
	ta.profile = filepath.Join(ta.dir, "etc/profile.d/smolvm_env.sh")
	if opts.EnvFile == "" {
		opts.EnvFile = ta.envFile
	}
	if opts.ProfileFile == "" {
		opts.ProfileFile = ta.profile
	}
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	p, err := agent.ListenChardev(ta.sock)
	if err != nil {
		t.Fatal(err)
	}
	ta.srv = agent.NewServer(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ta.srv.ServePort(ctx, p)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		ta.srv.Close()
	})
	return ta
}

func (ta *testAgent) dialer() Dialer {
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", ta.sock)
	}
}

func (ta *testAgent) connect(t *testing.T) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, ta.dialer())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// syncBuffer is a bytes.Buffer safe for the reader goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func run(t *testing.T, c *Client, req agentproto.ExecRequest) (agentproto.ExecResult, string, string) {
	t.Helper()
	var out, errb syncBuffer
	res, err := c.Exec(ctxT(t, 20*time.Second), req, &out, &errb)
	if err != nil {
		t.Fatalf("exec %+v: %v", req, err)
	}
	return res, out.String(), errb.String()
}

func TestPingInfoHello(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	if c.Hello().ProtocolVersion != agentproto.ProtocolVersion || c.Hello().AgentVersion == "" {
		t.Errorf("hello = %+v", c.Hello())
	}
	rtt, err := c.Ping(ctxT(t, 5*time.Second))
	if err != nil || rtt <= 0 {
		t.Fatalf("ping: %v %v", rtt, err)
	}
	inf, err := c.Info(ctxT(t, 5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if inf.Hostname != host || inf.KernelRelease == "" || inf.PID != os.Getpid() || inf.UptimeMS <= 0 || inf.System {
		t.Errorf("info = %+v", inf)
	}
	// Hello leaves the boot id unread (reading fixes it: a template's
	// restores would share it); info reads it.
	if c.Hello().BootID != "" || inf.BootID == "" {
		t.Errorf("boot id %q, hello's %q (want one only in info)", inf.BootID, c.Hello().BootID)
	}
}

func TestExecExitCodes(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	notExec := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(notExec, []byte("x"), 0o644)
	tests := []struct {
		name    string
		req     agentproto.ExecRequest
		code    int
		signal  string
		errText string // substring of Error
	}{
		{"true", agentproto.ExecRequest{Argv: []string{"true"}}, 0, "", ""},
		{"exit3", agentproto.ExecRequest{Shell: "exit 3"}, 3, "", ""},
		{"argv", agentproto.ExecRequest{Argv: []string{"sh", "-c", "exit 42"}}, 42, "", ""},
		{"signal", agentproto.ExecRequest{Shell: "kill -9 $$"}, 137, "SIGKILL", ""},
		{"notfound", agentproto.ExecRequest{Argv: []string{"no-such-command-xyz"}}, 127, "", "not found"},
		{"notfoundabs", agentproto.ExecRequest{Argv: []string{"/no/such/file"}}, 127, "", "no such file"},
		{"notexec", agentproto.ExecRequest{Argv: []string{notExec}}, 126, "", "permission denied"},
		{"badcwd", agentproto.ExecRequest{Argv: []string{"true"}, Cwd: "/no/such/dir"}, 127, "", "cwd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, _, stderr := run(t, c, tt.req)
			if res.ExitCode != tt.code || res.Signal != tt.signal {
				t.Errorf("result %+v, want code %d signal %q", res, tt.code, tt.signal)
			}
			if !strings.Contains(res.Error, tt.errText) || (tt.errText == "") != (res.Error == "") {
				t.Errorf("error %q, want it to contain %q", res.Error, tt.errText)
			}
			if tt.errText != "" && !strings.Contains(stderr, tt.errText) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tt.errText)
			}
		})
	}
	// Protocol-level errors: invalid requests.
	for _, req := range []agentproto.ExecRequest{{}, {Argv: []string{"true"}, Shell: "true"}, {Shell: "true", Env: map[string]string{"A=B": "x"}}} {
		_, err := c.Exec(ctxT(t, 5*time.Second), req, nil, nil)
		var pe *agentproto.Error
		if !errors.As(err, &pe) || pe.Code != agentproto.CodeInvalid {
			t.Errorf("exec %+v: err %v, want an invalid *agentproto.Error", req, err)
		}
	}
}

func TestExecStreams(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	res, out, errOut := run(t, c, agentproto.ExecRequest{Shell: "echo out1; echo err1 >&2; echo out2; echo err2 >&2"})
	if res.ExitCode != 0 {
		t.Fatalf("%+v", res)
	}
	if diff := gocmp.Diff("out1\nout2\n", out); diff != "" {
		t.Errorf("stdout (-want +got):\n%s", diff)
	}
	if diff := gocmp.Diff("err1\nerr2\n", errOut); diff != "" {
		t.Errorf("stderr (-want +got):\n%s", diff)
	}

	// Order within a stream across many chunks, and the chunk size cap.
	var chunks []int
	var mu sync.Mutex
	var got bytes.Buffer
	w := writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		chunks = append(chunks, len(p))
		return got.Write(p)
	})
	res, err := c.Exec(ctxT(t, 20*time.Second), agentproto.ExecRequest{Shell: "i=0; while [ $i -lt 30000 ]; do echo line$i; i=$((i+1)); done"}, w, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%+v %v", res, err)
	}
	var want strings.Builder
	for i := range 30000 {
		fmt.Fprintf(&want, "line%d\n", i)
	}
	if got.String() != want.String() {
		t.Errorf("stdout of %d bytes differs from the %d expected", got.Len(), want.Len())
	}
	for _, n := range chunks {
		if n > agentproto.MaxOutputChunk {
			t.Errorf("chunk of %d bytes > %d", n, agentproto.MaxOutputChunk)
		}
	}
}

type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// Output must reach the host while the process runs: the process below
// only finishes once the host has seen its first line.
func TestExecStreamsWhileRunning(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	flag := filepath.Join(t.TempDir(), "seen")
	var once sync.Once
	w := writerFunc(func(p []byte) (int, error) {
		if bytes.Contains(p, []byte("first")) {
			once.Do(func() { os.WriteFile(flag, nil, 0o644) })
		}
		return len(p), nil
	})
	res, err := c.Exec(ctxT(t, 10*time.Second), agentproto.ExecRequest{
		Shell: `echo first; n=0; while [ ! -e "$F" ]; do sleep 0.01; n=$((n+1)); [ $n -gt 500 ] && exit 9; done; echo second`,
		Env:   map[string]string{"F": flag},
	}, w, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("result %+v err %v (exit 9: output was not streamed)", res, err)
	}
}

func TestExecEnvCwdStdin(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	_, out, _ := run(t, c, agentproto.ExecRequest{Shell: `echo "$PATH|$HOME|$LANG|$FOO"`, Env: map[string]string{"FOO": "bar baz", "LANG": "C"}})
	if diff := gocmp.Diff("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|C|bar baz\n", out); diff != "" {
		t.Errorf("env (-want +got):\n%s", diff)
	}
	dir := t.TempDir()
	_, out, _ = run(t, c, agentproto.ExecRequest{Argv: []string{"pwd"}, Cwd: dir})
	if strings.TrimSpace(out) != dir {
		t.Errorf("pwd = %q, want %q", out, dir)
	}
	_, out, _ = run(t, c, agentproto.ExecRequest{Argv: []string{"cat"}, Stdin: []byte("hello\nstdin")})
	if out != "hello\nstdin" {
		t.Errorf("cat = %q", out)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB, more than a pipe holds
	_, out, _ = run(t, c, agentproto.ExecRequest{Shell: "wc -c", Stdin: big})
	if strings.TrimSpace(out) != strconv.Itoa(len(big)) {
		t.Errorf("wc -c = %q", out)
	}
	// A process that ignores its stdin must not hang the exec.
	res, _, _ := run(t, c, agentproto.ExecRequest{Argv: []string{"true"}, Stdin: big})
	if res.ExitCode != 0 {
		t.Errorf("%+v", res)
	}
	// No stdin: EOF at once.
	_, out, _ = run(t, c, agentproto.ExecRequest{Shell: "cat; echo done"})
	if out != "done\n" {
		t.Errorf("cat with no stdin = %q", out)
	}
}

// processGone waits until pid no longer runs (gone or a zombie).
func processGone(t *testing.T, pid int, within time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		if f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

func TestExecTimeoutKillsGroup(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	start := time.Now()
	res, out, _ := run(t, c, agentproto.ExecRequest{Shell: "sleep 100 & echo $!; sleep 100", TimeoutMS: 300})
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("took %v", el)
	}
	if !res.TimedOut || res.ExitCode != 137 || res.Signal != "SIGKILL" || res.Canceled {
		t.Errorf("result %+v", res)
	}
	bg, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("background pid %q", out)
	}
	if !processGone(t, bg, 3*time.Second) {
		syscall.Kill(bg, syscall.SIGKILL)
		t.Errorf("background process %d of the group survived the timeout", bg)
	}
}

func TestExecContextCancel(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pidCh := make(chan int, 1)
	w := writerFunc(func(p []byte) (int, error) {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(p))); err == nil {
			pidCh <- pid
			cancel()
		}
		return len(p), nil
	})
	start := time.Now()
	_, err := c.Exec(ctx, agentproto.ExecRequest{Shell: "echo $$; exec sleep 100"}, w, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("took %v", time.Since(start))
	}
	pid := <-pidCh
	if !processGone(t, pid, 3*time.Second) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Errorf("process %d survived the cancel", pid)
	}
	// The client still works.
	if _, err := c.Ping(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentExecs(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	const n = 20
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out syncBuffer
			res, err := c.Exec(ctxT(t, 20*time.Second), agentproto.ExecRequest{Shell: fmt.Sprintf("sleep 0.3; echo %d; exit %d", i, i)}, &out, nil)
			if err != nil {
				errs <- err
				return
			}
			if res.ExitCode != i || out.String() != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("exec %d: %+v %q", i, res, out.String())
			}
		}()
		// Pings interleave with the execs.
		if _, err := c.Ping(ctxT(t, 5*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if el := time.Since(start); el > n*300*time.Millisecond/2 {
		t.Errorf("%d concurrent 0.3 s execs took %v: not concurrent", n, el)
	}
}

func TestFiles(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx := ctxT(t, 20*time.Second)
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		data []byte
		mode fs.FileMode
		want fs.FileMode
	}{
		{"a.txt", []byte("hello"), 0o600, 0o600},
		{"sub/dir/b.sh", []byte("#!/bin/sh\necho hi\n"), 0o755, 0o755},
		{"default", []byte{}, 0, 0o644},
		{"suid", []byte("x"), 0o755 | fs.ModeSetuid, 0o755 | fs.ModeSetuid},
		{"bin", bytes.Repeat([]byte{0, 1, 2, 255, '\n'}, 100000), 0o640, 0o640},
	} {
		p := filepath.Join(dir, tc.name)
		if err := c.WriteFile(ctx, p, tc.data, tc.mode); err != nil {
			t.Fatalf("write %s: %v", tc.name, err)
		}
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky); got != tc.want {
			t.Errorf("%s: mode on disk %v, want %v", tc.name, got, tc.want)
		}
		data, mode, err := c.ReadFile(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, tc.data) || mode != tc.want {
			t.Errorf("%s: read back %d bytes mode %v, want %d bytes mode %v", tc.name, len(data), mode, len(tc.data), tc.want)
		}
	}
	// Overwrite keeps no temporary files around.
	p := filepath.Join(dir, "a.txt")
	if err := c.WriteFile(ctx, p, []byte("second"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "second" {
		t.Errorf("after overwrite: %q", b)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if diff := gocmp.Diff([]string{"a.txt", "bin", "default", "sub", "suid"}, names); diff != "" {
		t.Errorf("dir entries (-want +got):\n%s", diff)
	}

	// Errors are typed.
	for _, tc := range []struct {
		name string
		err  error
		code string
	}{
		{"missing", func() error { _, _, err := c.ReadFile(ctx, filepath.Join(dir, "nope")); return err }(), agentproto.CodeNotFound},
		{"dir", func() error { _, _, err := c.ReadFile(ctx, dir); return err }(), agentproto.CodeIsDir},
		{"relative", c.WriteFile(ctx, "rel/path", nil, 0), agentproto.CodeInvalid},
		{"onto dir", c.WriteFile(ctx, dir, nil, 0), agentproto.CodeIsDir},
	} {
		var pe *agentproto.Error
		if !errors.As(tc.err, &pe) || pe.Code != tc.code {
			t.Errorf("%s: err %v, want code %s", tc.name, tc.err, tc.code)
		}
	}
	if err := c.WriteFile(ctx, filepath.Join(dir, "huge"), make([]byte, agentproto.MaxFileSize+1), 0); !errors.Is(err, agentproto.ErrTooLarge) {
		t.Errorf("huge write: %v", err)
	}
}

// Readers never see a partially written file.
func TestWriteFileAtomic(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx := ctxT(t, 30*time.Second)
	p := filepath.Join(t.TempDir(), "f")
	a := bytes.Repeat([]byte("A"), 256<<10)
	b := bytes.Repeat([]byte("B"), 300<<10)
	if err := c.WriteFile(ctx, p, a, 0o644); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	bad := make(chan string, 1)
	go func() {
		for {
			select {
			case <-stop:
				close(bad)
				return
			default:
			}
			got, err := os.ReadFile(p)
			if err != nil || !(bytes.Equal(got, a) || bytes.Equal(got, b)) {
				select {
				case bad <- fmt.Sprintf("read %d bytes, err %v", len(got), err):
				default:
				}
			}
		}
	}()
	for i := range 40 {
		data := a
		if i%2 == 0 {
			data = b
		}
		if err := c.WriteFile(ctx, p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if msg, ok := <-bad; ok {
		t.Errorf("torn read: %s", msg)
	}
}

func TestSetEnvPersists(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx := ctxT(t, 10*time.Second)
	if err := c.SetEnv(ctx, map[string]string{"A": "1", "B": "it's \"quoted\" $x", "C": "3"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.SetEnv(ctx, map[string]string{"D": "4"}, []string{"C", "NOT_SET"}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"A": "1", "B": "it's \"quoted\" $x", "D": "4"}
	got, err := c.GetEnv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := gocmp.Diff(want, got); diff != "" {
		t.Errorf("get_env (-want +got):\n%s", diff)
	}
	// Exec sees it, below the request's own env.
	_, out, _ := run(t, c, agentproto.ExecRequest{Shell: `echo "$A|$B|${C-unset}|$D"`, Env: map[string]string{"D": "override"}})
	if diff := gocmp.Diff("1|it's \"quoted\" $x|unset|override\n", out); diff != "" {
		t.Errorf("exec env (-want +got):\n%s", diff)
	}
	// The file is JSON; the profile script, sourced by sh, gives the same values.
	var onDisk map[string]string
	b, err := os.ReadFile(ta.envFile)
	if err != nil || json.Unmarshal(b, &onDisk) != nil {
		t.Fatalf("env file: %v %q", err, b)
	}
	if diff := gocmp.Diff(want, onDisk); diff != "" {
		t.Errorf("env file (-want +got):\n%s", diff)
	}
	_, out, _ = run(t, c, agentproto.ExecRequest{Shell: `env -i sh -c '. "$1"; echo "$A|$B|${C-unset}|$D"' sh ` + ta.profile})
	if diff := gocmp.Diff("1|it's \"quoted\" $x|unset|4\n", out); diff != "" {
		t.Errorf("profile script (-want +got):\n%s", diff)
	}
	// A new agent (reboot of a restored disk) loads it.
	srv2 := agent.NewServer(agent.Options{EnvFile: ta.envFile, ProfileFile: ta.profile})
	defer srv2.Close()
	sock := filepath.Join(filepath.Dir(ta.sock), "b.sock")
	p, err := agent.ListenChardev(sock)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv2.ServePort(sctx, p)
	c2, err := Connect(ctx, func(ctx context.Context) (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, "unix", sock) })
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	got, err = c2.GetEnv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := gocmp.Diff(want, got); diff != "" {
		t.Errorf("after restart (-want +got):\n%s", diff)
	}
	// Invalid names are refused.
	var pe *agentproto.Error
	if err := c.SetEnv(ctx, map[string]string{"BAD-NAME": "x"}, nil); !errors.As(err, &pe) || pe.Code != agentproto.CodeInvalid {
		t.Errorf("bad name: %v", err)
	}
}

func TestSystemOps(t *testing.T) {
	// Without System and hooks, nothing touches this machine.
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx := ctxT(t, 10*time.Second)
	for name, err := range map[string]error{
		"set_time":     c.SetTime(ctx, time.Now()),
		"set_identity": c.SetIdentity(ctx, "x", []byte("seed")),
		"shutdown":     c.Shutdown(ctx),
	} {
		var pe *agentproto.Error
		if !errors.As(err, &pe) || pe.Code != agentproto.CodeUnsupported {
			t.Errorf("%s: %v, want unsupported", name, err)
		}
	}
	if err := c.Sync(ctx); err != nil {
		t.Errorf("sync: %v", err)
	}

	var mu sync.Mutex
	var gotTime time.Time
	var gotHost string
	var gotSeed []byte
	var offs []bool
	ta2 := startAgent(t, agent.Options{
		SetTime:     func(tm time.Time) error { mu.Lock(); defer mu.Unlock(); gotTime = tm; return nil },
		SetIdentity: func(h string, s []byte) error { mu.Lock(); defer mu.Unlock(); gotHost, gotSeed = h, s; return nil },
		PowerOff:    func(reboot bool) error { mu.Lock(); defer mu.Unlock(); offs = append(offs, reboot); return nil },
	})
	c2 := ta2.connect(t)
	when := time.Unix(1700000000, 123456789)
	if err := c2.SetTime(ctx, when); err != nil {
		t.Fatal(err)
	}
	if err := c2.SetIdentity(ctx, "clone-1", []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	var pe *agentproto.Error
	if err := c2.SetIdentity(ctx, "bad host!", nil); !errors.As(err, &pe) || pe.Code != agentproto.CodeInvalid {
		t.Errorf("bad hostname: %v", err)
	}
	if err := c2.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c2.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // power off runs after the reply
	mu.Lock()
	defer mu.Unlock()
	if !gotTime.Equal(when) || gotHost != "clone-1" || !bytes.Equal(gotSeed, []byte{1, 2, 3}) {
		t.Errorf("hooks got %v %q %v", gotTime, gotHost, gotSeed)
	}
	slices.SortFunc(offs, func(a, b bool) int { return cmp.Compare(b2i(a), b2i(b)) })
	if diff := gocmp.Diff([]bool{false, true}, offs); diff != "" {
		t.Errorf("power off calls (-want +got):\n%s", diff)
	}
}

// The host disconnects and reconnects many times while the agent keeps
// serving; a reply to a request in flight at disconnect reaches the new
// connection and must be dropped there, not taken for a new request.
func TestReconnect(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	for i := range 5 {
		c := ta.connect(t)
		_, out, _ := run(t, c, agentproto.ExecRequest{Shell: fmt.Sprintf("echo round%d", i)})
		if out != fmt.Sprintf("round%d\n", i) {
			t.Fatalf("round %d: %q", i, out)
		}
		c.Close()
	}

	c1 := ta.connect(t)
	started := make(chan struct{})
	oldDone := make(chan error, 1)
	go func() {
		var once sync.Once
		w := writerFunc(func(p []byte) (int, error) { once.Do(func() { close(started) }); return len(p), nil })
		_, err := c1.Exec(context.Background(), agentproto.ExecRequest{Shell: "echo started; sleep 0.5; echo late; exit 7"}, w, nil)
		oldDone <- err
	}()
	<-started
	c1.Close()
	if err := <-oldDone; !errors.Is(err, ErrDisconnected) || !errors.Is(err, ErrClosed) {
		t.Errorf("exec in flight at close: %v", err)
	}

	c2 := ta.connect(t)
	// Requests on the new connection, some long enough to be pending when
	// the late reply arrives.
	var wg sync.WaitGroup
	for i := range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out syncBuffer
			res, err := c2.Exec(ctxT(t, 10*time.Second), agentproto.ExecRequest{Shell: fmt.Sprintf("sleep 0.8; echo mine%d", i)}, &out, nil)
			if err != nil || res.ExitCode != 0 || out.String() != fmt.Sprintf("mine%d\n", i) {
				t.Errorf("exec %d on the new connection: %+v %q %v", i, res, out.String(), err)
			}
		}()
	}
	wg.Wait()
	if c2.dropped.Load() == 0 {
		t.Errorf("the late output/exit of the old request never reached the new connection (dropped = 0)")
	}
}

// A scripted guest: it answers what the test says, for checking the
// client's resync and demultiplexing against a misbehaving stream.
type scriptedGuest struct {
	conn net.Conn
	lr   *agentproto.LineReader
}

func newScripted(t *testing.T) (*scriptedGuest, Dialer) {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	used := false
	return &scriptedGuest{conn: a, lr: agentproto.NewLineReader(a, 0)}, func(ctx context.Context) (net.Conn, error) {
		if used {
			return nil, errors.New("already dialed")
		}
		used = true
		return b, nil
	}
}

func (g *scriptedGuest) next(t *testing.T) (agentproto.Header, []byte) {
	t.Helper()
	line, err := g.lr.ReadLine()
	if err != nil {
		t.Fatalf("guest read: %v", err)
	}
	h, err := agentproto.DecodeHeader(line)
	if err != nil {
		t.Fatalf("guest got %q: %v", line, err)
	}
	return h, append([]byte(nil), line...)
}

// answerHello reads the next message, a hello, and answers it.
func (g *scriptedGuest) answerHello(t *testing.T) {
	t.Helper()
	h, line := g.next(t)
	var hr agentproto.HelloRequest
	agentproto.DecodePayload(line, &hr)
	g.send(t, h.ID, agentproto.TypeHello, agentproto.Hello{Nonce: hr.Nonce, ProtocolVersion: agentproto.ProtocolVersion})
}

func (g *scriptedGuest) write(t *testing.T, s string) {
	t.Helper()
	if _, err := g.conn.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

func (g *scriptedGuest) send(t *testing.T, id uint64, typ string, payload any) {
	t.Helper()
	b, err := agentproto.Marshal(id, typ, payload)
	if err != nil {
		t.Fatal(err)
	}
	g.write(t, string(b))
}

func TestResyncDiscardsGarbageAndWrongNonces(t *testing.T) {
	g, dial := newScripted(t)
	type result struct {
		c   *Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := Connect(ctxT(t, 10*time.Second), dial)
		res <- result{c, err}
	}()
	// The client first terminates any partial line.
	buf := make([]byte, 1)
	if _, err := g.conn.Read(buf); err != nil || buf[0] != '\n' {
		t.Fatalf("first byte %q %v, want a newline", buf, err)
	}
	h, line := g.next(t)
	if h.Type != agentproto.TypeHello {
		t.Fatalf("got %s, want hello", h.Type)
	}
	var hr agentproto.HelloRequest
	agentproto.DecodePayload(line, &hr)
	// Junk from before a snapshot: a partial line, garbage, stale replies,
	// a hello with a nonce from another session.
	g.write(t, `"type":"exit","exit_code":0}`+"\n")
	g.write(t, "\x00\xffnot json at all\n")
	g.send(t, h.ID, agentproto.TypeExit, agentproto.ExecResult{ExitCode: 5})
	g.send(t, h.ID+1, agentproto.TypePong, nil)
	g.send(t, 99, agentproto.TypeHello, agentproto.Hello{Nonce: "stale-nonce", ProtocolVersion: agentproto.ProtocolVersion})
	select {
	case r := <-res:
		t.Fatalf("connected on a wrong nonce: %+v", r)
	case <-time.After(200 * time.Millisecond):
	}
	// The client keeps sending fresh hellos meanwhile; answer the first one.
	go func() {
		for {
			if _, err := g.lr.ReadLine(); err != nil {
				return
			}
		}
	}()
	g.send(t, h.ID, agentproto.TypeHello, agentproto.Hello{Nonce: hr.Nonce, ProtocolVersion: agentproto.ProtocolVersion, AgentVersion: "scripted"})
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()
	if r.c.Hello().Nonce != hr.Nonce || r.c.Hello().AgentVersion != "scripted" {
		t.Errorf("hello %+v", r.c.Hello())
	}
}

func TestStaleRepliesDropped(t *testing.T) {
	g, dial := newScripted(t)
	go func() {
		g.answerHello(t) // the first hello; the test takes over from there
	}()
	c, err := Connect(ctxT(t, 10*time.Second), dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type pr struct {
		inf agentproto.Info
		err error
	}
	res := make(chan pr, 1)
	go func() {
		inf, err := c.Info(ctxT(t, 10*time.Second))
		res <- pr{inf, err}
	}()
	var h agentproto.Header
	for h.Type != agentproto.TypeInfo {
		h, _ = g.next(t) // skip repeated hellos
	}
	// Replies for ids that are not pending, including the neighbours of
	// the real one, then the real answer.
	g.send(t, h.ID-1, agentproto.TypeInfo, agentproto.Info{Hostname: "stale-before"})
	g.send(t, h.ID+1, agentproto.TypeInfo, agentproto.Info{Hostname: "stale-after"})
	g.send(t, 0, agentproto.TypeInfo, agentproto.Info{Hostname: "zero"})
	g.send(t, h.ID, agentproto.TypeInfo, agentproto.Info{Hostname: "right"})
	r := <-res
	if r.err != nil || r.inf.Hostname != "right" {
		t.Errorf("info = %+v, %v", r.inf, r.err)
	}
	if n := c.dropped.Load(); n != 3 {
		t.Errorf("dropped %d, want 3", n)
	}
}

// The agent holds a partial line from before (as after a snapshot); the
// newline the client writes first ends it, so the very first hello works.
func TestResyncAfterPartialLineInGuest(t *testing.T) {
	srv := agent.NewServer(agent.Options{EnvFile: filepath.Join(t.TempDir(), "env"), Logf: t.Logf})
	defer srv.Close()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	gf, hf := os.NewFile(uintptr(fds[0]), "guest"), os.NewFile(uintptr(fds[1]), "host")
	guestConn, err := net.FileConn(gf)
	if err != nil {
		t.Fatal(err)
	}
	hostConn, err := net.FileConn(hf)
	if err != nil {
		t.Fatal(err)
	}
	gf.Close() // FileConn holds duplicates
	hf.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.ServeConn(ctx, guestConn) }()
	if _, err := hostConn.Write([]byte(`{"id":5,"type":"exec","shell":"echo partial`)); err != nil {
		t.Fatal(err)
	}
	c, err := Connect(ctxT(t, 10*time.Second), func(context.Context) (net.Conn, error) { return hostConn, nil })
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(c.Hello().Nonce, "-0") {
		t.Errorf("synced on hello %q, want the first one", c.Hello().Nonce)
	}
	_, out, _ := run(t, c, agentproto.ExecRequest{Shell: "echo ok"})
	if out != "ok\n" {
		t.Errorf("exec = %q", out)
	}
	// The stream breaks on the guest side while an exec runs: pending calls
	// fail with ErrDisconnected. (Stopping the server instead would kill
	// the exec, and its exit reply could win the race with the close.)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), agentproto.ExecRequest{Shell: "sleep 5"}, nil, nil)
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond)
	guestConn.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrDisconnected) || errors.Is(err, ErrClosed) {
			t.Errorf("pending exec: %v, want ErrDisconnected", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending exec did not fail on disconnect")
	}
	<-c.Done()
	if _, err := c.Ping(context.Background()); !errors.Is(err, ErrDisconnected) {
		t.Errorf("ping after disconnect: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	<-served
}

func TestCallsHonourContext(t *testing.T) {
	g, dial := newScripted(t)
	go func() {
		g.answerHello(t)
		for { // never answer anything else
			if _, err := g.lr.ReadLine(); err != nil {
				return
			}
		}
	}()
	c, err := Connect(ctxT(t, 10*time.Second), dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	if _, err := c.Ping(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ping: %v", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("took %v", time.Since(start))
	}
	c.Close()
	if _, err := c.Ping(context.Background()); !errors.Is(err, ErrClosed) || !errors.Is(err, ErrDisconnected) {
		t.Errorf("after close: %v", err)
	}
}

func TestConnectRetriesDial(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	var n int
	dial := func(ctx context.Context) (net.Conn, error) {
		n++
		if n < 3 {
			return nil, syscall.ECONNREFUSED
		}
		return ta.dialer()(ctx)
	}
	c, err := Connect(ctxT(t, 10*time.Second), dial)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Nothing listening: Connect gives up with ctx and says why.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = Connect(ctx, func(ctx context.Context) (net.Conn, error) { return nil, syscall.ECONNREFUSED })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("connect: %v", err)
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestFilesInChunks: files larger than one chunk (and than one message)
// travel in chunks through a temporary file that nobody sees, and come back
// whole; failures leave nothing behind.
func TestFilesInChunks(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	ctx := ctxT(t, time.Minute)
	dir := t.TempDir()
	entries := func() []string {
		ents, _ := os.ReadDir(dir)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return names
	}
	// MaxFileSize+1: a file larger than one message may carry travels in
	// chunks both ways (the root package's TestLargeFiles moves 17 MiB
	// through a real guest; this is the proof past the old 64 MiB cap).
	for _, size := range []int{agentproto.ChunkSize, agentproto.ChunkSize + 1, 2*agentproto.ChunkSize + 12345, agentproto.MaxFileSize + 1} {
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(i*131 + i>>13)
		}
		p := filepath.Join(dir, "sub", "big")
		if err := c.WriteFileFrom(ctx, p, bytes.NewReader(data), int64(size), 0o640); err != nil {
			t.Fatalf("write %d bytes: %v", size, err)
		}
		got, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%d bytes written, %d on disk (%v)", size, len(got), err)
		}
		if st, _ := os.Stat(p); st.Mode().Perm() != 0o640 {
			t.Errorf("mode %v, want 0640", st.Mode())
		}
		var back bytes.Buffer
		mode, n, err := c.ReadFileTo(ctx, p, &back)
		if err != nil || n != int64(size) || mode != 0o640 || !bytes.Equal(back.Bytes(), data) {
			t.Fatalf("read back: %d bytes, mode %v, equal %v, err %v", n, mode, bytes.Equal(back.Bytes(), data), err)
		}
		if names, _ := os.ReadDir(filepath.Join(dir, "sub")); len(names) != 1 {
			t.Errorf("after %d bytes the dir holds %d entries, want only the file", size, len(names))
		}
	}

	// The temporary files of uploads to the same target whose host died
	// mid-way are removed once stale; one still being written is not.
	stale, live := filepath.Join(dir, "sub", ".big.smolvm-stale"), filepath.Join(dir, "sub", ".big.smolvm-live")
	os.WriteFile(stale, []byte("partial"), 0o600)
	os.WriteFile(live, []byte("partial"), 0o600)
	old := time.Now().Add(-time.Hour)
	os.Chtimes(stale, old, old)
	big := make([]byte, agentproto.ChunkSize+1)
	if err := c.WriteFileFrom(ctx, filepath.Join(dir, "sub", "big"), bytes.NewReader(big), int64(len(big)), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temporary file: %v, want removed", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("recent temporary file: %v, want kept", err)
	}
	os.Remove(live)

	// Files that report no size (procfs) are read whole, small or over
	// one chunk.
	for _, proc := range []string{"/proc/self/status", "/proc/kallsyms"} {
		want, err := os.ReadFile(proc)
		if err != nil {
			t.Logf("%s: %v (not checked)", proc, err)
			continue
		}
		var b bytes.Buffer
		if _, n, err := c.ReadFileTo(ctx, proc, &b); err != nil || n == 0 || (proc == "/proc/kallsyms" && !bytes.Equal(b.Bytes(), want)) {
			t.Errorf("%s: %d bytes (os.ReadFile: %d), %v", proc, n, len(want), err)
		}
	}

	// A source shorter than announced: no target, no temporary file.
	short := io.LimitReader(bytes.NewReader(make([]byte, 3*agentproto.ChunkSize)), agentproto.ChunkSize+10)
	if err := c.WriteFileFrom(ctx, filepath.Join(dir, "short"), short, 2*agentproto.ChunkSize, 0); err == nil {
		t.Error("a short source was accepted")
	}
	if diff := gocmp.Diff([]string{"sub"}, entries()); diff != "" {
		t.Errorf("after a failed write (-want +got):\n%s", diff)
	}

	// A file that changes between chunks is refused, not mixed.
	p := filepath.Join(dir, "sub", "big")
	first := true
	_, _, err := c.ReadFileTo(ctx, p, writerFunc(func(b []byte) (int, error) {
		if first {
			first = false
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return 0, err
			}
			f.Write([]byte("more"))
			f.Close()
		}
		return len(b), nil
	}))
	if !errors.Is(err, ErrFileChanged) {
		t.Errorf("read of a file that grew: %v, want ErrFileChanged", err)
	}

	// The requests check what they are given.
	os.WriteFile(filepath.Join(dir, "tmp"), []byte("abc"), 0o600)
	for _, tc := range []struct {
		name string
		typ  string
		req  any
		code string
	}{
		{"commit of a wrong size", agentproto.TypeCommitFile, agentproto.CommitFileRequest{Temp: filepath.Join(dir, "tmp"), Path: filepath.Join(dir, "x"), Size: 4}, agentproto.CodeInvalid},
		{"commit across dirs", agentproto.TypeCommitFile, agentproto.CommitFileRequest{Temp: filepath.Join(dir, "tmp"), Path: filepath.Join(dir, "sub", "x"), Size: 3}, agentproto.CodeInvalid},
		{"commit onto a dir", agentproto.TypeCommitFile, agentproto.CommitFileRequest{Temp: filepath.Join(dir, "tmp"), Path: filepath.Join(dir, "sub"), Size: 3}, agentproto.CodeIsDir},
		{"relative chunk", agentproto.TypeWriteChunk, agentproto.WriteChunkRequest{Path: "rel", Data: []byte("x")}, agentproto.CodeInvalid},
		{"negative offset", agentproto.TypeWriteChunk, agentproto.WriteChunkRequest{Path: filepath.Join(dir, "tmp"), Offset: -1}, agentproto.CodeInvalid},
		{"remove a dir", agentproto.TypeRemoveFile, agentproto.RemoveFileRequest{Path: filepath.Join(dir, "sub")}, agentproto.CodeIsDir},
		{"read too much", agentproto.TypeReadChunk, agentproto.ReadChunkRequest{Path: p, Length: agentproto.ChunkSize + 1}, agentproto.CodeInvalid},
		{"read a dir", agentproto.TypeReadChunk, agentproto.ReadChunkRequest{Path: dir, Length: 1}, agentproto.CodeIsDir},
		{"read a missing file", agentproto.TypeReadChunk, agentproto.ReadChunkRequest{Path: filepath.Join(dir, "nope"), Length: 1}, agentproto.CodeNotFound},
	} {
		err := c.roundTrip(ctx, tc.typ, tc.req, agentproto.TypeOK, nil)
		var pe *agentproto.Error
		if !errors.As(err, &pe) || pe.Code != tc.code {
			t.Errorf("%s: %v, want code %s", tc.name, err, tc.code)
		}
	}
	if err := c.roundTrip(ctx, agentproto.TypeRemoveFile, agentproto.RemoveFileRequest{Path: filepath.Join(dir, "nope")}, agentproto.TypeOK, nil); err != nil {
		t.Errorf("remove of a missing file: %v", err)
	}
}

// TestFilesWithAnOldAgent: an agent that predates chunks (it answers
// unknown_type) still gets files up to MaxFileSize in one message, and a
// larger one fails with ErrTooLarge and a hint.
func TestFilesWithAnOldAgent(t *testing.T) {
	g, dial := newScripted(t)
	go func() {
		g.answerHello(t)
	}()
	c, err := Connect(ctxT(t, 10*time.Second), dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := ctxT(t, time.Minute)
	// next skips repeated hellos; old answers the new requests as an old
	// agent does.
	next := func() (agentproto.Header, []byte) {
		for {
			h, line := g.next(t)
			switch h.Type {
			case agentproto.TypeHello:
				continue
			case agentproto.TypeWriteChunk, agentproto.TypeReadChunk, agentproto.TypeCommitFile, agentproto.TypeRemoveFile:
				g.send(t, h.ID, agentproto.TypeError, agentproto.Error{Code: agentproto.CodeUnknownType, Message: "unknown request type " + h.Type})
				continue
			}
			return h, line
		}
	}
	data := bytes.Repeat([]byte("0123456789abcdef"), (agentproto.ChunkSize+100)/16)
	done := make(chan error, 1)
	go func() { done <- c.WriteFileFrom(ctx, "/f", bytes.NewReader(data), int64(len(data)), 0o600) }()
	h, line := next()
	var wf agentproto.WriteFileRequest
	if err := agentproto.DecodePayload(line, &wf); err != nil || h.Type != agentproto.TypeWriteFile || !bytes.Equal(wf.Data, data) || wf.Mode != 0o600 {
		t.Fatalf("old agent got %s with %d bytes (%v), want write_file with all %d", h.Type, len(wf.Data), err, len(data))
	}
	g.send(t, h.ID, agentproto.TypeOK, nil)
	if err := <-done; err != nil {
		t.Fatalf("write through an old agent: %v", err)
	}

	type rd struct {
		data []byte
		mode fs.FileMode
		err  error
	}
	res := make(chan rd, 1)
	go func() {
		var b bytes.Buffer
		mode, _, err := c.ReadFileTo(ctx, "/f", &b)
		res <- rd{b.Bytes(), mode, err}
	}()
	if h, _ = next(); h.Type != agentproto.TypeReadFile {
		t.Fatalf("old agent got %s, want read_file", h.Type)
	}
	g.send(t, h.ID, agentproto.TypeFile, agentproto.FileData{Data: data, Mode: 0o600})
	if r := <-res; r.err != nil || !bytes.Equal(r.data, data) || r.mode != 0o600 {
		t.Fatalf("read through an old agent: %d bytes, mode %v, %v", len(r.data), r.mode, r.err)
	}

	// Over MaxFileSize: refused once the agent shows it is old.
	go func() {
		done <- c.WriteFileFrom(ctx, "/huge", io.LimitReader(zeros{}, agentproto.MaxFileSize+1), agentproto.MaxFileSize+1, 0)
	}()
	for {
		h, _ := g.next(t)
		if h.Type == agentproto.TypeHello {
			continue
		}
		if h.Type != agentproto.TypeWriteChunk {
			t.Fatalf("old agent got %s, want write_chunk", h.Type)
		}
		g.send(t, h.ID, agentproto.TypeError, agentproto.Error{Code: agentproto.CodeUnknownType, Message: "unknown request type " + h.Type})
		break
	}
	if err := <-done; !errors.Is(err, agentproto.ErrTooLarge) || !strings.Contains(err.Error(), "newer agent") {
		t.Errorf("huge write through an old agent: %v", err)
	}
}

type zeros struct{}

func (zeros) Read(b []byte) (int, error) { clear(b); return len(b), nil }
