package smolvm

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestDoctorRunsEachBackendsChecks: the SDK reports what every registered
// backend declares (the default backend first), the SDK's own host checks
// after them, and settles OK from Status (an unset status is a failure).
func TestDoctorRunsEachBackendsChecks(t *testing.T) {
	checks := func(cs ...backend.Check) func(context.Context) []backend.Check {
		return func(context.Context) []backend.Check { return cs }
	}
	regs := []backend.Registration{
		{Name: "aa-other", HostChecks: checks(
			backend.Check{Name: "other vmm", Status: backend.CheckFail, Detail: "missing", Fix: "install it"},
			backend.Check{Name: "other unset", Detail: "no status"})},
		{Name: "bb-silent"},
		{Name: DefaultBackend, HostChecks: checks(backend.Check{Name: "default vmm", Status: backend.CheckWarn, Detail: "slow", Fix: "get KVM"})},
	}
	dir := t.TempDir()
	opts := Options{DataDir: filepath.Join(dir, "data"), ImageDir: filepath.Join(dir, "images"), RunDir: filepath.Join(dir, "run")}
	got := settle(hostChecks(context.Background(), opts, regs))

	var names []string
	for _, c := range got {
		names = append(names, c.Name)
	}
	want := []string{"default vmm", "other vmm", "other unset", "image busybox", "image debian", "disk (data)", "disk (images)", "uid drop", "cgroup limits", "run dir"}
	if !slices.Equal(names, want) {
		t.Fatalf("checks %q\nwant %q", names, want)
	}
	if c := got[0]; c.Status != CheckWarn || !c.OK || c.Fix.Arg(ArgHint) != "get KVM" {
		t.Errorf("warn: %+v", c)
	}
	if c := got[1]; c.Status != CheckFail || c.OK || c.Detail != "missing" || c.Fix.Arg(ArgHint) != "install it" {
		t.Errorf("fail: %+v", c)
	}
	if c := got[2]; c.Status != CheckFail || c.OK {
		t.Errorf("unset status: %+v", c)
	}
	// The image dir is empty: both images fail, each naming how to build it.
	if c := got[3]; c.Status != CheckFail || !strings.Contains(c.Detail, opts.ImageDir) || c.Fix.Action != FixBuildImage || c.Fix.Arg(ArgImage) != "busybox" {
		t.Errorf("image: %+v", c)
	}
	// The data dir does not exist yet: measured at its parent.
	if c := got[5]; c.Status == CheckFail && c.Fix.IsZero() || !strings.Contains(c.Detail, "free under "+dir) {
		t.Errorf("disk: %+v", c)
	}
}

// TestDoctorWithoutDataDir: the package-level Doctor reports the host even
// when the data dir cannot be opened, which is one failed "state" check.
func TestDoctorWithoutDataDir(t *testing.T) {
	dir := t.TempDir()
	opts := Options{DataDir: "/proc/self/no-such/data", ImageDir: filepath.Join(dir, "images"), RunDir: filepath.Join(dir, "run"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	got := Doctor(context.Background(), opts)
	last := got[len(got)-1]
	if last.Name != "state" || last.OK || last.Status != CheckFail || !strings.Contains(last.Detail, opts.DataDir) || last.Fix.IsZero() {
		t.Errorf("state check %+v", last)
	}
	names := map[string]bool{}
	for _, c := range got {
		names[c.Name] = true
		if c.OK != (c.Status != CheckFail) {
			t.Errorf("OK and Status disagree: %+v", c)
		}
	}
	for _, r := range backend.Registrations() {
		if r.HostChecks == nil {
			continue
		}
		for _, c := range r.HostChecks(context.Background()) {
			if !names[c.Name] {
				t.Errorf("backend %s's check %q missing from Doctor", r.Name, c.Name)
			}
		}
	}
	if !names["run dir"] || names["vms"] {
		t.Errorf("checks %v: want the host checks and no state checks", names)
	}
}
