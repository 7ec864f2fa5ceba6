package qemu

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestQEMUTimings measures boot, snapshot and restore latencies on this
// host. It only runs with SMOLVM_TIMINGS=1 (IMAGE=busybox|debian, N runs).
func TestQEMUTimings(t *testing.T) {
	if os.Getenv("SMOLVM_TIMINGS") == "" {
		t.Skip("set SMOLVM_TIMINGS=1")
	}
	name := os.Getenv("IMAGE")
	if name == "" {
		name = "busybox"
	}
	n := 3
	fmt.Sscan(os.Getenv("N"), &n)
	img := testutil.Image(t, name)
	b := New(Options{})
	root := testutil.ShortDir(t)
	spec := testutil.SpecIn(root, img, "t", testutil.SpecOptions{MemoryMiB: 512})

	t0 := time.Now()
	m := testutil.Boot(t, b, spec)
	tQMP := time.Since(t0)
	c := testutil.Agent(t, b, m)
	tAgent := time.Since(t0)
	testutil.Run(t, c, "true")
	t.Logf("cold boot: QMP ready %v, agent answering %v, first exec %v", tQMP, tAgent, time.Since(t0))
	testutil.Run(t, c, "dd if=/dev/urandom of=/run/blob bs=1M count=64 2>/dev/null; sha256sum /run/blob > /run/blob.sum")

	var snapT, restVMM, restAgent, restExec []time.Duration
	kinds := []backend.SnapshotKind{backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk}
	for _, kind := range kinds {
		snapT, restVMM, restAgent, restExec = nil, nil, nil, nil
		for i := range n {
			dir := filepath.Join(root, fmt.Sprintf("s-%s-%d", kind, i))
			os.Mkdir(dir, 0o755)
			if kind == backend.SnapshotDisk {
				c.Sync(ctxFor(t, time.Minute))
			}
			t1 := time.Now()
			res, err := b.Snapshot(ctxFor(t, time.Minute), m, kind, dir)
			if err != nil {
				t.Fatal(err)
			}
			snapT = append(snapT, time.Since(t1))
			if err := b.Resume(ctxFor(t, time.Minute), m); err != nil {
				t.Fatal(err)
			}
			rs := testutil.SpecIn(root, img, fmt.Sprintf("r-%s-%d", kind, i), testutil.SpecOptions{MemoryMiB: 512})
			t2 := time.Now()
			r, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: rs, SnapshotDir: dir, Kind: kind, Result: res, Resume: true})
			if err != nil {
				t.Fatal(err)
			}
			restVMM = append(restVMM, time.Since(t2))
			testutil.StopOnCleanup(t, b, r)
			rc := testutil.Agent(t, b, r)
			restAgent = append(restAgent, time.Since(t2))
			if kind != backend.SnapshotDisk {
				testutil.Run(t, rc, "sha256sum -c /run/blob.sum >/dev/null")
			} else {
				testutil.Run(t, rc, "true")
			}
			restExec = append(restExec, time.Since(t2))
			rc.Close()
			b.Stop(ctxFor(t, time.Minute), r)
			var sz string
			for _, a := range res.Artifacts {
				p := filepath.Join(dir, a.Name)
				st, _ := os.Stat(p)
				sz += fmt.Sprintf(" %s=%.1f/%.1fMiB", a.Role, float64(st.Size())/(1<<20), float64(allocatedBytes(p))/(1<<20))
			}
			if i == 0 {
				t.Logf("%s artifacts (apparent/allocated):%s", kind, sz)
			}
		}
		t.Logf("%s (min/median of %d): snapshot %s; restore VMM ready %s; agent answering %s; first exec done %s",
			kind, n, mm(snapT), mm(restVMM), mm(restAgent), mm(restExec))
	}
	t3 := time.Now()
	b.Stop(ctxFor(t, time.Minute), m)
	t.Logf("stop: %v", time.Since(t3))
}

func mm(d []time.Duration) string {
	s := slices.Clone(d)
	slices.Sort(s)
	return fmt.Sprintf("%v / %v", s[0].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond))
}
