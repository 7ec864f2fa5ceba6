package smolvm

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/store"
)

// raceWrites is how many read-modify-writes the child makes.
const raceWrites = 400

// TestConcurrentUpdatesKeepEachOthersFields runs two processes on one VM row:
// the child, holding the VM's lock as every operation does, bumps a counter
// in the config and marks the VM running (as Start does) raceWrites times;
// meanwhile this process reconciles the row (record, as status, list and
// info do, without the lock), which finds no VMM and writes "stopped". A
// reconciliation that wrote back the row it read would put an old counter
// back and the child's later increments would build on it: the final
// counter must be exactly raceWrites.
func TestConcurrentUpdatesKeepEachOthersFields(t *testing.T) {
	if os.Getenv("SMOLVM_TEST_CHILD") == "race-writer" {
		raceWriter(os.Getenv("CHILD_DATA_DIR"))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("/tmp", "smvrace")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	dataDir := filepath.Join(dir, "data")
	m, err := NewManager(ctx, Options{DataDir: dataDir, RunDir: filepath.Join(dir, "run"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const id = "race"
	spec := backend.Spec{ID: id, Dir: filepath.Join(dataDir, "vms", id), RunDir: filepath.Join(dir, "run", "r")}
	if err := m.store.CreateVM(ctx, store.VM{ID: id, Backend: DefaultBackend, Status: store.VMRunning,
		Config: json.RawMessage(`{"counter":0}`), Machine: backend.Machine{Spec: spec, Backend: DefaultBackend}}); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestConcurrentUpdatesKeepEachOthersFields$")
	cmd.Env = append(os.Environ(), "SMOLVM_TEST_CHILD=race-writer", "CHILD_DATA_DIR="+dataDir)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	reconciled := 0
	var childErr error
loop:
	for {
		select {
		case childErr = <-done:
			break loop
		default:
		}
		rec, err := m.record(ctx, id)
		if err != nil {
			t.Fatalf("record: %v", err)
		}
		if rec.Status == store.VMStopped {
			reconciled++
		}
	}
	if childErr != nil || !strings.Contains(out.String(), "CHILD DONE") {
		t.Fatalf("child: %v\n%s", childErr, out.String())
	}
	rec, err := m.store.GetVM(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct{ Counter int }
	json.Unmarshal(rec.Config, &cfg)
	t.Logf("%d reconciliations to stopped while the child wrote", reconciled)
	if reconciled < 10 {
		t.Fatalf("only %d reconciliations overlapped the child's writes: the test did not race", reconciled)
	}
	if cfg.Counter != raceWrites {
		t.Errorf("counter %d after %d increments: a reconciliation wrote back a stale row", cfg.Counter, raceWrites)
	}
}

// raceWriter is the child of TestConcurrentUpdatesKeepEachOthersFields.
func raceWriter(dataDir string) {
	ctx := context.Background()
	st, err := store.Open(ctx, dataDir)
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	defer st.Close()
	for range raceWrites {
		unlock, err := store.LockVM(ctx, dataDir, "race")
		if err != nil {
			fmt.Println("ERR", err)
			return
		}
		rec, err := st.GetVM(ctx, "race")
		if err != nil {
			unlock()
			fmt.Println("ERR", err)
			return
		}
		var cfg struct{ Counter int }
		json.Unmarshal(rec.Config, &cfg)
		rec.Config = json.RawMessage(fmt.Sprintf(`{"counter":%d}`, cfg.Counter+1))
		rec.Status, rec.LastError = store.VMRunning, ""
		err = st.UpdateVM(ctx, rec)
		unlock()
		if err != nil {
			fmt.Println("ERR", err)
			return
		}
	}
	fmt.Println("CHILD DONE")
}
