package fcapi_test

// PROTOCOL TEST — NOT A FIRECRACKER TEST.
//
// fctest.Server is a stand-in written from the API documentation
// (testdata/firecracker-api.yaml and the snapshot-support doc): 204 for
// accepted PUT/PATCH, 400 with a fault_message for rejected ones, GET /
// reporting the state machine "Not started" -> "Running" <-> "Paused", and
// snapshot/load only on a fresh process; the firecracker backend's fake VMM
// runs the same one. These tests check that our client drives
// the documented sequence with the documented bodies; it says nothing about
// how a real Firecracker behaves. Real Firecracker runs only in the backend's
// real test, which skips when no firecracker binary is on PATH.

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/fcapi"
	"github.com/smolvm-go/smolvm/internal/fcapi/fctest"
)

func wantState(t *testing.T, c *fcapi.Client, want string) {
	t.Helper()
	info, err := c.InstanceInfo(context.Background())
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	if info.State != want {
		t.Fatalf("state = %q, want %q", info.State, want)
	}
}

func wantFault(t *testing.T, err error, op, contains string) {
	t.Helper()
	var fe *fcapi.Error
	if !errors.As(err, &fe) {
		t.Fatalf("want *fcapi.Error for %s, got %v", op, err)
	}
	if fe.Status != 400 || fe.Op != op || !strings.Contains(fe.FaultMessage, contains) {
		t.Fatalf("got %+v, want 400 on %s with fault containing %q", fe, op, contains)
	}
}

// TestProtocolBootPauseSnapshotLoad drives boot -> pause -> snapshot/create
// on one protocol server and snapshot/load on a fresh one, and checks the
// exact request sequence and bodies.
func TestProtocolBootPauseSnapshotLoad(t *testing.T) {
	ctx := context.Background()
	rec := &fctest.Recorder{Next: fctest.New("proto-vm", "1.16.0")}
	c := fcapi.New(fctest.UnixServer(t, rec))
	defer c.Close()

	if v, err := c.Version(ctx); err != nil || v != "1.16.0" {
		t.Fatalf("version %q, %v", v, err)
	}
	wantState(t, c, fcapi.StateNotStarted)
	// Starting without a kernel is a 400 with a fault_message.
	wantFault(t, c.StartInstance(ctx), "PUT /actions", "without kernel configuration")

	steps := []error{
		c.PutBootSource(ctx, fcapi.BootSource{KernelImagePath: "/img/vmlinux", InitrdPath: "/img/initrd", BootArgs: "console=ttyS0 reboot=k panic=1 pci=off smol.root=/dev/vda"}),
		c.PutMachineConfig(ctx, fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 256}),
		c.PutDrive(ctx, fcapi.Drive{DriveID: "rootfs", PathOnHost: "rootfs"}),
		c.PutVsock(ctx, fcapi.Vsock{GuestCID: 3, UDSPath: "/run/a/vsock.sock"}),
		c.StartInstance(ctx),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("boot step %d: %v", i, err)
		}
	}
	wantState(t, c, fcapi.StateRunning)
	// Pre-boot-only calls are refused once started.
	wantFault(t, c.PutMachineConfig(ctx, fcapi.MachineConfig{VCPUCount: 2, MemSizeMiB: 256}), "PUT /machine-config", "after starting")
	// A snapshot needs a paused VM.
	snap := fcapi.SnapshotCreate{SnapshotType: fcapi.SnapshotFull, SnapshotPath: "/snap/vmstate", MemFilePath: "/snap/memory"}
	wantFault(t, c.CreateSnapshot(ctx, snap), "PUT /snapshot/create", "not paused")
	if err := c.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	wantState(t, c, fcapi.StatePaused)
	if err := c.CreateSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	// Loading into an already configured process is refused.
	load := fcapi.SnapshotLoad{
		SnapshotPath:  "/snap/vmstate",
		MemBackend:    &fcapi.MemoryBackend{BackendType: fcapi.MemBackendFile, BackendPath: "/snap/memory"},
		ResumeVM:      true,
		VsockOverride: &fcapi.VsockOverride{UDSPath: "/run/b/vsock.sock"},
	}
	wantFault(t, c.LoadSnapshot(ctx, load), "PUT /snapshot/load", "not allowed after configuring")

	// A fresh process loads it.
	rec2 := &fctest.Recorder{Next: fctest.New("proto-vm", "1.16.0")}
	c2 := fcapi.New(fctest.UnixServer(t, rec2))
	defer c2.Close()
	wantState(t, c2, fcapi.StateNotStarted)
	if err := c2.LoadSnapshot(ctx, load); err != nil {
		t.Fatal(err)
	}
	wantState(t, c2, fcapi.StateRunning)

	type exch struct{ req, body string }
	check := func(name string, got []fctest.Recorded, want []exch) {
		t.Helper()
		if len(got) != len(want) {
			var g []string
			for _, r := range got {
				g = append(g, r.String())
			}
			t.Fatalf("%s: %d requests, want %d:\n%s", name, len(got), len(want), strings.Join(g, "\n"))
		}
		for i, w := range want {
			if got[i].String() != w.req || strings.TrimSpace(string(got[i].Body)) != w.body {
				t.Errorf("%s request %d: got %s %s\nwant %s %s", name, i, got[i], got[i].Body, w.req, w.body)
			}
		}
	}
	snapBody := `{"snapshot_type":"Full","snapshot_path":"/snap/vmstate","mem_file_path":"/snap/memory"}`
	loadBody := `{"snapshot_path":"/snap/vmstate","mem_backend":{"backend_type":"File","backend_path":"/snap/memory"},"resume_vm":true,"vsock_override":{"uds_path":"/run/b/vsock.sock"}}`
	check("first process", rec.All(), []exch{
		{"GET /version", ""},
		{"GET /", ""},
		{"PUT /actions", `{"action_type":"InstanceStart"}`},
		{"PUT /boot-source", `{"kernel_image_path":"/img/vmlinux","boot_args":"console=ttyS0 reboot=k panic=1 pci=off smol.root=/dev/vda","initrd_path":"/img/initrd"}`},
		{"PUT /machine-config", `{"vcpu_count":1,"mem_size_mib":256,"track_dirty_pages":false}`},
		{"PUT /drives/rootfs", `{"drive_id":"rootfs","path_on_host":"rootfs","is_root_device":false,"is_read_only":false}`},
		{"PUT /vsock", `{"guest_cid":3,"uds_path":"/run/a/vsock.sock"}`},
		{"PUT /actions", `{"action_type":"InstanceStart"}`},
		{"GET /", ""},
		{"PUT /machine-config", `{"vcpu_count":2,"mem_size_mib":256,"track_dirty_pages":false}`},
		{"PUT /snapshot/create", snapBody},
		{"PATCH /vm", `{"state":"Paused"}`},
		{"GET /", ""},
		{"PUT /snapshot/create", snapBody},
		{"PUT /snapshot/load", loadBody},
	})
	check("second process", rec2.All(), []exch{
		{"GET /", ""},
		{"PUT /snapshot/load", loadBody},
		{"GET /", ""},
	})
}

func TestProtocolErrorBodies(t *testing.T) {
	ctx := context.Background()
	sock := fctest.UnixServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/vm":
			fctest.WriteFault(w, 400, "Invalid request method and/or path.")
		case "/version":
			w.WriteHeader(500)
			w.Write([]byte("plain text crash"))
		case "/":
			w.WriteHeader(200) // 200 without a body
		}
	}))
	c := fcapi.New(sock)
	defer c.Close()
	err := c.Pause(ctx)
	wantFault(t, err, "PATCH /vm", "Invalid request method")
	if want := "firecracker PATCH /vm: 400: Invalid request method and/or path."; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err, want)
	}
	_, err = c.Version(ctx)
	var fe *fcapi.Error
	if !errors.As(err, &fe) || fe.Status != 500 || fe.FaultMessage != "plain text crash" {
		t.Errorf("non-JSON error body: %v", err)
	}
	if _, err := c.InstanceInfo(ctx); err == nil || !strings.Contains(err.Error(), "empty response") {
		t.Errorf("empty 200 body: %v", err)
	}
}

func TestProtocolDeadlines(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	sock := fctest.UnixServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	c := fcapi.New(sock)
	defer c.Close()
	c.Timeout = 100 * time.Millisecond // applies because ctx has no deadline
	start := time.Now()
	err := c.Pause(context.Background())
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want DeadlineExceeded, got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("call took %v", d)
	}
	// A caller's deadline wins over the default.
	c.Timeout = time.Hour
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Resume(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want DeadlineExceeded, got %v", err)
	}
	// No socket: the dial error is reachable.
	c3 := fcapi.New(sock + ".missing")
	if err := c3.Pause(context.Background()); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("want ENOENT, got %v", err)
	}
}
