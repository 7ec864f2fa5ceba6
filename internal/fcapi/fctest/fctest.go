// Package fctest is a stand-in for Firecracker's HTTP API for unit tests —
// NOT FIRECRACKER. It is written from the API documentation
// (fcapi/testdata/firecracker-api.yaml and the snapshot-support doc): 204
// for an accepted PUT/PATCH, 400 with a fault_message for a rejected one,
// strict JSON bodies, GET / reporting the state machine "Not started" ->
// "Running" <-> "Paused", pre-boot resources refused after start, and
// snapshot/load only on a fresh process. Hooks add the side effects a test
// needs (opening a drive, writing snapshot files, a vsock listener).
//
// The fcapi protocol tests use it bare; the firecracker backend's fake VMM
// runs it behind its API socket with hooks. It proves that our client and
// backend speak the documented protocol; it says nothing about how a real
// Firecracker behaves, which only the backend's real test shows.
package fctest

import (
	"encoding/json"
	"net/http"
	"strings"
	"sync"

	"github.com/smolvm-go/smolvm/internal/fcapi"
)

// Hooks are called with the request already validated against the state
// machine, under the server's lock. A hook's error is answered as a 400
// fault whose fault_message is the error's text. Nil hooks do nothing.
type Hooks struct {
	Drive            func(d fcapi.Drive) error
	NetworkInterface func(n fcapi.NetworkInterface) error
	Vsock            func(v fcapi.Vsock) error
	// Action sees every decoded action before any check (fault injection).
	Action func(a fcapi.InstanceActionInfo) error
	// Start runs on InstanceStart, after the boot source was checked.
	Start func(boot fcapi.BootSource) error
	// SnapshotCreate runs on a paused VM with its machine config.
	SnapshotCreate func(c fcapi.SnapshotCreate, mc fcapi.MachineConfig) error
	// SnapshotLoad runs on a fresh process; it may set the machine config
	// the snapshot restores.
	SnapshotLoad func(l fcapi.SnapshotLoad, mc *fcapi.MachineConfig) error
}

// Server is the stand-in; it is an http.Handler.
type Server struct {
	ID      string // instance id reported by GET /
	Version string // reported by GET / and GET /version
	Hooks   Hooks

	mu         sync.Mutex
	state      string
	configured bool // something other than logger/metrics was configured
	boot       *fcapi.BootSource
	mc         fcapi.MachineConfig
}

// New returns a server in state "Not started" with Firecracker's default
// machine config (1 vCPU, 128 MiB).
func New(id, version string) *Server {
	return &Server{ID: id, Version: version, state: fcapi.StateNotStarted,
		mc: fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 128}}
}

// State is the instance state GET / would report.
func (s *Server) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// WriteJSON answers status with v as a JSON body.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// WriteFault answers status with {"fault_message": msg}, flushed at once
// (the fake VMM may exit right after a failed snapshot load).
func WriteFault(w http.ResponseWriter, status int, msg string) {
	WriteJSON(w, status, map[string]string{"fault_message": msg})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
}

func decodeStrict(r *http.Request, v any) error {
	d := json.NewDecoder(r.Body)
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fault := func(msg string) { WriteFault(w, 400, msg) }
	ok := func() { w.WriteHeader(204) }
	// hook answers a hook's error as a fault; it reports whether to go on.
	hook := func(err error) bool {
		if err != nil {
			fault(err.Error())
			return false
		}
		return true
	}
	preBoot := func(v any) bool {
		if s.state != fcapi.StateNotStarted {
			fault("The requested operation is not supported after starting the microVM.")
			return false
		}
		if err := decodeStrict(r, v); err != nil {
			fault("An error occurred when deserializing the json body of a request: " + err.Error())
			return false
		}
		s.configured = true
		return true
	}
	key := r.Method + " " + r.URL.Path
	switch {
	case key == "GET /":
		WriteJSON(w, 200, fcapi.InstanceInfo{AppName: "Firecracker", ID: s.ID, State: s.state, VMMVersion: s.Version})
	case key == "GET /version":
		WriteJSON(w, 200, fcapi.FirecrackerVersion{FirecrackerVersion: s.Version})
	case key == "PUT /boot-source":
		var b fcapi.BootSource
		if preBoot(&b) {
			s.boot = &b
			ok()
		}
	case key == "PUT /machine-config":
		if preBoot(&s.mc) {
			ok()
		}
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/drives/"):
		var d fcapi.Drive
		if !preBoot(&d) {
			return
		}
		if d.DriveID != strings.TrimPrefix(r.URL.Path, "/drives/") {
			fault("The id from the path does not match the id from the body!")
			return
		}
		if s.Hooks.Drive == nil || hook(s.Hooks.Drive(d)) {
			ok()
		}
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/network-interfaces/"):
		var n fcapi.NetworkInterface
		if preBoot(&n) && (s.Hooks.NetworkInterface == nil || hook(s.Hooks.NetworkInterface(n))) {
			ok()
		}
	case key == "PUT /vsock":
		var v fcapi.Vsock
		if preBoot(&v) && (s.Hooks.Vsock == nil || hook(s.Hooks.Vsock(v))) {
			ok()
		}
	case key == "PUT /actions":
		var a fcapi.InstanceActionInfo
		if err := decodeStrict(r, &a); err != nil {
			fault(err.Error())
			return
		}
		if s.Hooks.Action != nil && !hook(s.Hooks.Action(a)) {
			return
		}
		switch {
		case a.ActionType != fcapi.ActionInstanceStart:
			fault("unsupported action in this stand-in: " + a.ActionType)
		case s.state != fcapi.StateNotStarted:
			fault("The requested operation is not supported after starting the microVM.")
		case s.boot == nil:
			fault("Cannot start microvm without kernel configuration.")
		default:
			if s.Hooks.Start != nil && !hook(s.Hooks.Start(*s.boot)) {
				return
			}
			s.state = fcapi.StateRunning
			ok()
		}
	case key == "PATCH /vm":
		var v fcapi.VM
		if err := decodeStrict(r, &v); err != nil {
			fault(err.Error())
			return
		}
		if s.state == fcapi.StateNotStarted {
			fault("The requested operation is not supported before starting the microVM.")
			return
		}
		switch v.State {
		case fcapi.VMPaused:
			s.state = fcapi.StatePaused
		case fcapi.VMResumed:
			s.state = fcapi.StateRunning
		default:
			fault("unknown variant " + v.State)
			return
		}
		ok()
	case key == "PUT /snapshot/create":
		var c fcapi.SnapshotCreate
		if err := decodeStrict(r, &c); err != nil {
			fault(err.Error())
			return
		}
		if s.state != fcapi.StatePaused {
			fault("Cannot create snapshot: the microVM is not paused.")
			return
		}
		if s.Hooks.SnapshotCreate == nil || hook(s.Hooks.SnapshotCreate(c, s.mc)) {
			ok()
		}
	case key == "PUT /snapshot/load":
		var l fcapi.SnapshotLoad
		if err := decodeStrict(r, &l); err != nil {
			fault(err.Error())
			return
		}
		if s.configured || s.state != fcapi.StateNotStarted {
			fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
			return
		}
		if l.MemBackend == nil {
			fault("missing memory backend")
			return
		}
		if s.Hooks.SnapshotLoad != nil && !hook(s.Hooks.SnapshotLoad(l, &s.mc)) {
			return
		}
		s.configured = true
		s.state = fcapi.StatePaused
		if l.ResumeVM {
			s.state = fcapi.StateRunning
		}
		ok()
	default:
		fault("Invalid request method and/or path: " + key)
	}
}
