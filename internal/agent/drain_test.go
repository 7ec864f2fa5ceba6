package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// TestExecOutputOutlivesDrainGrace checks that output a command wrote
// before it exited is sent even when sending takes longer than drainGrace
// (a busy host, a loaded guest): the agent once stopped sending drainGrace
// after the exit and dropped the rest, so a few execs in a hundred under
// load returned exit 0 with their output cut short. The first output
// message here blocks until the command exited and the grace passed
// twice over; the second line is written after that message was read, so
// it is still in the pipe then. With a background child holding the pipe
// open the exec still ends after the grace, its output complete.
func TestExecOutputOutlivesDrainGrace(t *testing.T) {
	for _, tc := range []struct {
		name string
		tty  bool
		bg   string
	}{
		{name: "pipes"},
		{name: "pipes/background", bg: "sleep 5 & "},
		{name: "tty", tty: true},
		{name: "tty/background", tty: true, bg: "sleep 5 & "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			goFile, doneFile := filepath.Join(dir, "go"), filepath.Join(dir, "done")
			var mu sync.Mutex
			var got strings.Builder
			first := true
			out := func(stream string, data []byte) {
				mu.Lock()
				wait := first
				first = false
				got.Write(data)
				mu.Unlock()
				if wait { // a host that takes its time over this message
					os.WriteFile(goFile, nil, 0o600)
					waitForFile(t, doneFile)
					time.Sleep(2 * drainGrace)
				}
			}
			req := agentproto.ExecRequest{Shell: "echo first; while [ ! -e " + goFile + " ]; do sleep 0.01; done; " +
				"echo second; echo third >&2; " + tc.bg + "touch " + doneFile}
			srv := NewServer(Options{Logf: t.Logf})
			defer srv.Close()
			var ip *interactive // a terminal comes with interactive input
			if tc.tty {
				req.TTY = &agentproto.TTY{Rows: 24, Cols: 80}
				var err error
				if ip, err = srv.newInteractive(1, req, func(uint64, string, any) {}); err != nil {
					t.Fatal(err)
				}
				defer ip.release()
			}
			start := time.Now()
			res, err := srv.execute(context.Background(), req, out, ip)
			if err != nil || res.ExitCode != 0 {
				t.Fatalf("execute: %+v, %v", res, err)
			}
			if el := time.Since(start); el > 4*time.Second {
				t.Errorf("the exec took %v: it waited for its background child", el)
			}
			mu.Lock()
			defer mu.Unlock()
			s := strings.ReplaceAll(got.String(), "\r\n", "\n")
			for _, line := range []string{"first\n", "second\n", "third\n"} {
				if !strings.Contains(s, line) {
					t.Errorf("output %q lacks %q", s, line)
				}
			}
		})
	}
}

func waitForFile(t *testing.T, name string) {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(name); err == nil {
			return
		}
	}
	t.Errorf("%s never appeared", name)
}
