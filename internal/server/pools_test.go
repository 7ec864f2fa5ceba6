package server

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestRefillPoolsSettles: concurrent RefillPools calls (creates racing)
// run one refill at a time and leave none running (no VM: a data dir
// without pools; the refill itself is checked on real VMs by hand, see
// docs/api.md, as this package's tests run with SMOLVM_COLD_BOOT=1).
func TestRefillPoolsSettles(t *testing.T) {
	t.Parallel()
	s, err := New(context.Background(), Config{Options: smolvm.Options{DataDir: t.TempDir(), Logger: quietLogger()},
		Socket: filepath.Join(testutil.ShortDir(t), "api.sock")})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(s.RefillPools)
	}
	wg.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for s.filling.Load() || s.refillAgain.Load() {
		if time.Now().After(deadline) {
			t.Fatalf("a refill still runs 10 s later (filling %v, again %v)", s.filling.Load(), s.refillAgain.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
