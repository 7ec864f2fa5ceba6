package lifetime

import (
	"context"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestLifetimeRealVM runs the reaper (Run, real clock) over a real QEMU VM
// whose lifetime runs out with the pause action: the VM is snapshotted and
// stopped (its stats say stopped, no CPU or memory); Resume restores it
// into the same id, where a process started before the pause still runs
// and a file on a tmpfs (memory only) is still there.
func TestLifetimeRealVM(t *testing.T) {
	testutil.RequireQEMU(t)
	e := newEnv(t, string(smolvm.BackendQEMU))
	k := e.k
	k.now, k.tick = time.Now, 100*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	vm := e.boot(t, ctx, "life")
	pid := run(t, ctx, vm, `mkdir -p /mnt/mem && mount -t tmpfs tmpfs /mnt/mem && echo kept-in-ram > /mnt/mem/f && `+
		`setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!`)

	// Stats of a paused VM (the SDK's pause): its VMM still holds memory.
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := vm.Stats(ctx)
	if err != nil || st.Status != smolvm.StatusPaused || st.CPU.VMMSeconds <= 0 || st.Memory.RSSBytes <= 0 || st.UptimeSeconds <= 0 {
		t.Fatalf("stats of a paused vm: %+v, %v", st, err)
	}
	if err := vm.Resume(ctx); err != nil {
		t.Fatal(err)
	}

	expired := make(chan outcome, 4)
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- k.Run(rctx, func(id string, a Action, err error) { expired <- outcome{id, a, err} })
	}()
	defer stop()
	if err := k.Set(ctx, "life", time.Second, ActionPause, 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case o := <-expired:
		if o.id != "life" || o.a != ActionPause || o.err != nil {
			t.Fatalf("expired: %+v", o)
		}
	case <-ctx.Done():
		t.Fatal("the lifetime never ran out")
	}
	t.Logf("expired and paused to a snapshot %v after Set", time.Since(start).Round(time.Millisecond))
	l, _ := k.Get("life")
	if !l.Paused || l.Snapshot == "" {
		t.Fatalf("after expiry: %+v", l)
	}
	st, err = vm.Stats(ctx)
	if err != nil || st.Status != smolvm.StatusStopped || st.CPU.Seconds != 0 || st.Memory.RSSBytes != 0 || st.Disk.AllocatedBytes <= 0 {
		t.Fatalf("stats of the paused sandbox: %+v, %v", st, err)
	}
	stop()
	if err := <-done; err != context.Canceled {
		t.Errorf("Run = %v", err)
	}

	start = time.Now()
	rvm, err := k.Resume(ctx, "life")
	if err != nil {
		t.Fatal(err)
	}
	defer rvm.Close()
	t.Logf("resumed in %v", time.Since(start).Round(time.Millisecond))
	if got := run(t, ctx, rvm, `cat /mnt/mem/f; kill -0 `+pid+` && cat /proc/`+pid+`/cmdline | tr '\0' ' '`); got != "kept-in-ram\nsleep 100000" {
		t.Errorf("after resume: %q, want the tmpfs file and the sleep process", got)
	}
	info, err := rvm.Info(ctx)
	if err != nil || info.ID != "life" || info.Status != smolvm.StatusRunning || info.RestoredFrom != l.Snapshot {
		t.Errorf("resumed: %+v, %v", info, err)
	}
}
