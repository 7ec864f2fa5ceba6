package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/store"
)

// refusingBackend runs (Status says so) but refuses port forwards with the
// backend's own sentinel, as a backend without PortForward does. Any other
// method panics (nil embedded interface): the test must not reach them.
type refusingBackend struct{ backend.Backend }

func (refusingBackend) Name() string                       { return "refusing" }
func (refusingBackend) Capabilities() backend.Capabilities { return backend.Capabilities{} }
func (refusingBackend) Status(context.Context, backend.Machine) (backend.Status, error) {
	return backend.StatusRunning, nil
}
func (refusingBackend) ExposePort(_ context.Context, m backend.Machine, _ backend.PortForward) error {
	return fmt.Errorf("refusing: expose on %s: %w", m.ID, backend.ErrUnsupported)
}

// TestBackendSentinelsMapToSDK: a backend's ErrUnsupported reaches the
// caller as smolvm.ErrUnsupported (errors.Is and the CLI's code), its text
// unchanged, and the backend sentinel is still there.
func TestBackendSentinelsMapToSDK(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	m, err := NewManager(ctx, Options{DataDir: filepath.Join(dir, "data"), RunDir: filepath.Join(dir, "run"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.backends["refusing"] = refusingBackend{}
	const id = "refuser"
	spec := backend.Spec{ID: id, Dir: filepath.Join(m.opts.DataDir, "vms", id), RunDir: m.runDir(id), Network: true}
	if err := m.store.CreateVM(ctx, store.VM{ID: id, Backend: "refusing", Status: store.VMRunning,
		Config: json.RawMessage(`{}`), Machine: backend.Machine{Spec: spec, Backend: "refusing", PID: os.Getpid()}}); err != nil {
		t.Fatal(err)
	}
	vm, err := m.Open(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	err = vm.ExposePort(ctx, 18080, 80)
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("ExposePort error %v does not match smolvm.ErrUnsupported", err)
	}
	if !errors.Is(err, backend.ErrUnsupported) || ErrorCode(err) != "unsupported" {
		t.Fatalf("ExposePort error %v: backend sentinel kept %v, code %q", err, errors.Is(err, backend.ErrUnsupported), ErrorCode(err))
	}
	if want := "refusing: expose on refuser: " + backend.ErrUnsupported.Error(); err.Error() != want {
		t.Fatalf("text %q, want %q", err.Error(), want)
	}
}

func TestFromBackendTable(t *testing.T) {
	if fromBackend(nil) != nil {
		t.Fatal("nil became an error")
	}
	plain := errors.New("plain")
	if fromBackend(plain) != plain {
		t.Fatal("an error without a backend sentinel was changed")
	}
	for _, s := range backendSentinels {
		err := fromBackend(fmt.Errorf("x: %w", s.from))
		if !errors.Is(err, s.to) || !errors.Is(err, s.from) {
			t.Errorf("%v: mapped error %v does not match %v and %v", s.from, err, s.to, s.from)
		}
	}
}
