package smolvm_test

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRunOutputUnderLoad checks that a command's output is never lost when
// many execs run at once in one guest. The agent once stopped waiting for
// a command's output 200 ms after the command exited and dropped what its
// reader had not sent yet; `smolvm bench api` found execs that returned
// exit 0 with empty stdout. Here 32 callers each run a command printing
// 109 kB at once: the guest's link to the host is the bottleneck, so the
// agent's readers are that late, and with the old agent some 20 of 32
// execs came back cut short (the unit test TestExecOutputOutlivesDrainGrace
// in internal/agent shows the same without a VM).
func TestRunOutputUnderLoad(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	const workers, lines = 32, 20000
	var b strings.Builder
	for i := 1; i <= lines; i++ {
		fmt.Fprintln(&b, i)
	}
	seq := b.String()
	budget := time.Now().Add(3 * time.Second) // wall time: stop starting execs then
	var runs, bad atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first []string
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(budget); i++ {
				want := fmt.Sprintf("line %d.%d", w, i)
				res, err := vm.Run(ctx, "seq 1 "+strconv.Itoa(lines)+" && echo '"+want+"' && echo 'err "+want+"' >&2")
				runs.Add(1)
				if err == nil && res.OK() && res.Stdout == seq+want+"\n" && res.Stderr == "err "+want+"\n" {
					continue
				}
				bad.Add(1)
				mu.Lock()
				if len(first) < 5 {
					if err != nil {
						first = append(first, err.Error())
					} else {
						first = append(first, fmt.Sprintf("exit %d, %d of %d bytes of stdout (a prefix: %v), stderr %q",
							res.ExitCode, len(res.Stdout), len(seq+want)+1, strings.HasPrefix(seq+want+"\n", res.Stdout), res.Stderr))
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("%d execs by %d concurrent callers, %d bad", runs.Load(), workers, bad.Load())
	if bad.Load() > 0 {
		t.Errorf("%d of %d execs lost output or failed; first: %q", bad.Load(), runs.Load(), first)
	}
	if runs.Load() < workers {
		t.Errorf("only %d execs ran", runs.Load())
	}
}
