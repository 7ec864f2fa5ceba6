package qemu

import (
	"log/slog"
	"os"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/backendtest"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// testLogger logs backend debug output when SMOLVM_TEST_DEBUG is set.
func testLogger() *slog.Logger {
	if os.Getenv("SMOLVM_TEST_DEBUG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

// TestConformance runs the backend conformance suite on real QEMU VMs
// (TCG on this host) with the busybox image.
func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	backendtest.Run(t, func(t *testing.T) (backend.Backend, backend.Spec) {
		b := New(Options{Logger: testLogger()})
		return b, testutil.BaseSpec(img, testutil.SpecOptions{})
	})
}
