package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestHostChecks: without Firecracker the one line says it is optional
// (ok); with it, its version is reported, and the jailer next to it
// decides the "fc jailer" line.
func TestHostChecks(t *testing.T) {
	if r, _ := backend.Lookup(Name); r.HostChecks == nil {
		t.Fatal("the registration declares no host checks")
	}
	dir := t.TempDir()
	t.Setenv("PATH", dir)
	cs := hostChecks(context.Background())
	if len(cs) != 1 || cs[0].Name != "firecracker" || cs[0].Status != backend.CheckOK || !strings.Contains(cs[0].Detail, "not installed") {
		t.Fatalf("without firecracker: %+v", cs)
	}

	fc := filepath.Join(dir, "firecracker")
	if err := os.WriteFile(fc, []byte("#!/bin/sh\necho 'Firecracker v1.16.0'\necho\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	cs = hostChecks(context.Background())
	if len(cs) != 2 || cs[0].Status == backend.CheckFail || !strings.HasPrefix(cs[0].Detail, "Firecracker v1.16.0") {
		t.Fatalf("with firecracker: %+v", cs)
	}
	if why := usable(); (why == "") != (cs[0].Status == backend.CheckOK) {
		t.Errorf("usable() = %q but status %s", why, cs[0].Status)
	}
	if j := cs[1]; j.Name != "fc jailer" || j.Status != backend.CheckWarn || !strings.Contains(j.Detail, "no jailer") {
		t.Errorf("without a jailer: %+v", j)
	}

	os.WriteFile(filepath.Join(dir, "jailer"), []byte("#!/bin/sh\n"), 0o700)
	j := hostChecks(context.Background())[1]
	if os.Geteuid() == 0 && (j.Status != backend.CheckOK || !strings.HasPrefix(j.Detail, "on:")) ||
		os.Geteuid() != 0 && (j.Status != backend.CheckWarn || !strings.Contains(j.Detail, "needs root")) {
		t.Errorf("with a jailer (euid %d): %+v", os.Geteuid(), j)
	}

	os.WriteFile(fc, []byte("#!/bin/sh\nexit 1\n"), 0o700)
	if c := hostChecks(context.Background())[0]; c.Status != backend.CheckFail || c.Fix == "" {
		t.Errorf("a firecracker that does not run: %+v", c)
	}
}
