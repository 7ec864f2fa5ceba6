package fcapi

// PROTOCOL TEST — NOT A FIRECRACKER TEST.
//
// protoServer below is a stand-in written from the API documentation
// (testdata/firecracker-api.yaml and the snapshot-support doc): 204 for
// accepted PUT/PATCH, 400 with a fault_message for rejected ones, GET /
// reporting the state machine "Not started" -> "Running" <-> "Paused", and
// snapshot/load only on a fresh process. It checks that our client drives
// the documented sequence with the documented bodies; it says nothing about
// how a real Firecracker behaves. Real Firecracker runs only in the backend's
// real test, which skips when no firecracker binary is on PATH.

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

type protoServer struct {
	mu         sync.Mutex
	state      string
	configured bool // something other than logger/metrics was configured
	bootSource bool
}

func newProtoServer() *protoServer { return &protoServer{state: StateNotStarted} }

func decodeStrict(r *http.Request, v any) error {
	d := json.NewDecoder(r.Body)
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func (s *protoServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	preBoot := func(v any) bool {
		if s.state != StateNotStarted {
			writeFault(w, 400, "The requested operation is not supported after starting the microVM.")
			return false
		}
		if err := decodeStrict(r, v); err != nil {
			writeFault(w, 400, "An error occurred when deserializing the json body of a request: "+err.Error())
			return false
		}
		return true
	}
	key := r.Method + " " + r.URL.Path
	switch {
	case key == "GET /":
		writeJSON(w, 200, InstanceInfo{AppName: "Firecracker", ID: "proto-vm", State: s.state, VMMVersion: "1.16.0"})
	case key == "GET /version":
		writeJSON(w, 200, FirecrackerVersion{FirecrackerVersion: "1.16.0"})
	case key == "PUT /boot-source":
		var b BootSource
		if preBoot(&b) {
			s.configured, s.bootSource = true, true
			w.WriteHeader(204)
		}
	case key == "PUT /machine-config":
		var m MachineConfig
		if preBoot(&m) {
			s.configured = true
			w.WriteHeader(204)
		}
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/drives/"):
		var d Drive
		if preBoot(&d) {
			if d.DriveID != strings.TrimPrefix(r.URL.Path, "/drives/") {
				writeFault(w, 400, "The id from the path does not match the id from the body!")
				return
			}
			s.configured = true
			w.WriteHeader(204)
		}
	case key == "PUT /vsock":
		var v Vsock
		if preBoot(&v) {
			s.configured = true
			w.WriteHeader(204)
		}
	case key == "PUT /actions":
		var a InstanceActionInfo
		if err := decodeStrict(r, &a); err != nil {
			writeFault(w, 400, err.Error())
			return
		}
		switch {
		case a.ActionType != ActionInstanceStart:
			writeFault(w, 400, "unsupported action in this protocol test")
		case s.state != StateNotStarted:
			writeFault(w, 400, "The requested operation is not supported after starting the microVM.")
		case !s.bootSource:
			writeFault(w, 400, "Cannot start microvm without kernel configuration.")
		default:
			s.state = StateRunning
			w.WriteHeader(204)
		}
	case key == "PATCH /vm":
		var v VM
		if err := decodeStrict(r, &v); err != nil {
			writeFault(w, 400, err.Error())
			return
		}
		if s.state == StateNotStarted {
			writeFault(w, 400, "The requested operation is not supported before starting the microVM.")
			return
		}
		switch v.State {
		case VMPaused:
			s.state = StatePaused
		case VMResumed:
			s.state = StateRunning
		default:
			writeFault(w, 400, "unknown variant "+v.State)
			return
		}
		w.WriteHeader(204)
	case key == "PUT /snapshot/create":
		var c SnapshotCreate
		if err := decodeStrict(r, &c); err != nil {
			writeFault(w, 400, err.Error())
			return
		}
		if s.state != StatePaused {
			writeFault(w, 400, "Cannot create snapshot: the microVM is not paused.")
			return
		}
		w.WriteHeader(204)
	case key == "PUT /snapshot/load":
		var l SnapshotLoad
		if err := decodeStrict(r, &l); err != nil {
			writeFault(w, 400, err.Error())
			return
		}
		if s.configured || s.state != StateNotStarted {
			writeFault(w, 400, "Loading a microVM snapshot not allowed after configuring boot-specific resources.")
			return
		}
		if l.MemBackend == nil {
			writeFault(w, 400, "missing memory backend")
			return
		}
		s.configured = true
		s.state = StatePaused
		if l.ResumeVM {
			s.state = StateRunning
		}
		w.WriteHeader(204)
	default:
		writeFault(w, 400, "Invalid request method and/or path: "+key)
	}
}

func wantState(t *testing.T, c *Client, want string) {
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
	var fe *Error
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
	rec := &recorder{next: newProtoServer()}
	c := New(unixServer(t, rec))
	defer c.Close()

	if v, err := c.Version(ctx); err != nil || v != "1.16.0" {
		t.Fatalf("version %q, %v", v, err)
	}
	wantState(t, c, StateNotStarted)
	// Starting without a kernel is a 400 with a fault_message.
	wantFault(t, c.StartInstance(ctx), "PUT /actions", "without kernel configuration")

	steps := []error{
		c.PutBootSource(ctx, BootSource{KernelImagePath: "/img/vmlinux", InitrdPath: "/img/initrd", BootArgs: "console=ttyS0 reboot=k panic=1 pci=off smol.root=/dev/vda"}),
		c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 1, MemSizeMiB: 256}),
		c.PutDrive(ctx, Drive{DriveID: "rootfs", PathOnHost: "rootfs"}),
		c.PutVsock(ctx, Vsock{GuestCID: 3, UDSPath: "/run/a/vsock.sock"}),
		c.StartInstance(ctx),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("boot step %d: %v", i, err)
		}
	}
	wantState(t, c, StateRunning)
	// Pre-boot-only calls are refused once started.
	wantFault(t, c.PutMachineConfig(ctx, MachineConfig{VCPUCount: 2, MemSizeMiB: 256}), "PUT /machine-config", "after starting")
	// A snapshot needs a paused VM.
	snap := SnapshotCreate{SnapshotType: SnapshotFull, SnapshotPath: "/snap/vmstate", MemFilePath: "/snap/memory"}
	wantFault(t, c.CreateSnapshot(ctx, snap), "PUT /snapshot/create", "not paused")
	if err := c.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	wantState(t, c, StatePaused)
	if err := c.CreateSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	// Loading into an already configured process is refused.
	load := SnapshotLoad{
		SnapshotPath:  "/snap/vmstate",
		MemBackend:    &MemoryBackend{BackendType: MemBackendFile, BackendPath: "/snap/memory"},
		ResumeVM:      true,
		VsockOverride: &VsockOverride{UDSPath: "/run/b/vsock.sock"},
	}
	wantFault(t, c.LoadSnapshot(ctx, load), "PUT /snapshot/load", "not allowed after configuring")

	// A fresh process loads it.
	rec2 := &recorder{next: newProtoServer()}
	c2 := New(unixServer(t, rec2))
	defer c2.Close()
	wantState(t, c2, StateNotStarted)
	if err := c2.LoadSnapshot(ctx, load); err != nil {
		t.Fatal(err)
	}
	wantState(t, c2, StateRunning)

	type exch struct{ req, body string }
	check := func(name string, got []recorded, want []exch) {
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
	check("first process", rec.all(), []exch{
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
	check("second process", rec2.all(), []exch{
		{"GET /", ""},
		{"PUT /snapshot/load", loadBody},
		{"GET /", ""},
	})
}

func TestProtocolErrorBodies(t *testing.T) {
	ctx := context.Background()
	sock := unixServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/vm":
			writeFault(w, 400, "Invalid request method and/or path.")
		case "/version":
			w.WriteHeader(500)
			w.Write([]byte("plain text crash"))
		case "/":
			w.WriteHeader(200) // 200 without a body
		}
	}))
	c := New(sock)
	defer c.Close()
	err := c.Pause(ctx)
	wantFault(t, err, "PATCH /vm", "Invalid request method")
	if want := "firecracker PATCH /vm: 400: Invalid request method and/or path."; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err, want)
	}
	_, err = c.Version(ctx)
	var fe *Error
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
	sock := unixServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	c := New(sock)
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
	c3 := New(sock + ".missing")
	if err := c3.Pause(context.Background()); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("want ENOENT, got %v", err)
	}
}
