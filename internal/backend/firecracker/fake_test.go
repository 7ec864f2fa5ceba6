package firecracker

// FAKE VMM — NOT FIRECRACKER. When SMOLVM_FAKE_FIRECRACKER=1 the test binary
// (re-executed by the backend as its "firecracker") becomes this small
// stand-in, written from the documented API: it serves the API socket with
// the documented status codes and state machine, opens drive paths relative
// to its working directory as Firecracker does, writes "vmstate"/"memory"
// files that pin the drive path, vsock socket and TAP name, honours
// vsock_override/network_overrides on load, exits after a failed load, and
// answers the vsock CONNECT handshake with a tiny line "agent". It lets the
// backend's process, file and snapshot plumbing be tested on a machine
// without Firecracker; it proves nothing about Firecracker itself.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/fcapi"
)

const (
	fakeEnv      = "SMOLVM_FAKE_FIRECRACKER"
	fakeFaultEnv = "SMOLVM_FAKE_FC_FAULT" // "InstanceStart": refuse to boot; "LoadCrash": exit on load
	fakeVersion  = "v1.16.0-fake"
)

// fakeState is what the fake writes to snapshot_path.
type fakeState struct {
	ID        string `json:"id"`
	DrivePath string `json:"drive_path"`
	UDSPath   string `json:"uds_path"`
	TAP       string `json:"tap"`
	MemMiB    int    `json:"mem_mib"`
}

type fakeVMM struct {
	mu         sync.Mutex
	id         string
	state      string
	configured bool
	boot       *fcapi.BootSource
	mc         fcapi.MachineConfig
	drivePath  string
	drive      *os.File
	uds        string
	tap        string
	memory     string // first line of guest "memory": "fresh" or the loaded file's
	vsockL     net.Listener
}

func runFakeFirecracker(args []string) int {
	var sock, id string
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "--version":
			fmt.Printf("Firecracker %s\n\nSupported snapshot data format versions: v8.0.0\n", fakeVersion)
			return 0
		case "--api-sock":
			i++
			sock = args[i]
		case "--id":
			i++
			id = args[i]
		}
	}
	if sock == "" {
		fmt.Fprintln(os.Stderr, "fake firecracker: --api-sock required")
		return 2
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fake firecracker: Failed to open the API socket at %s: %v\n", sock, err)
		return 1
	}
	fmt.Printf("fake firecracker %s: API on %s\n", id, sock)
	v := &fakeVMM{id: id, state: fcapi.StateNotStarted, mc: fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 128}}
	exit := make(chan int, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { v.serve(w, r, exit) })}
	go srv.Serve(l)
	code := <-exit
	srv.Close()
	return code
}

func fakeFault(w http.ResponseWriter, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(400)
	json.NewEncoder(w).Encode(map[string]string{"fault_message": msg})
}

func fakeDecode(r *http.Request, v any) error {
	d := json.NewDecoder(r.Body)
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func (v *fakeVMM) serve(w http.ResponseWriter, r *http.Request, exit chan<- int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	key := r.Method + " " + r.URL.Path
	preBoot := func(body any) bool {
		if v.state != fcapi.StateNotStarted {
			fakeFault(w, "The requested operation is not supported after starting the microVM.")
			return false
		}
		if err := fakeDecode(r, body); err != nil {
			fakeFault(w, "An error occurred when deserializing the json body of a request: "+err.Error())
			return false
		}
		v.configured = true
		return true
	}
	ok := func() { w.WriteHeader(204) }
	switch {
	case key == "GET /":
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(fcapi.InstanceInfo{AppName: "Firecracker", ID: v.id, State: v.state, VMMVersion: fakeVersion})
	case key == "GET /version":
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(fcapi.FirecrackerVersion{FirecrackerVersion: fakeVersion})
	case key == "PUT /boot-source":
		var b fcapi.BootSource
		if preBoot(&b) {
			v.boot = &b
			ok()
		}
	case key == "PUT /machine-config":
		if preBoot(&v.mc) {
			ok()
		}
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/drives/"):
		var d fcapi.Drive
		if !preBoot(&d) {
			return
		}
		f, err := os.OpenFile(d.PathOnHost, os.O_RDWR, 0) // relative to our cwd, like Firecracker
		if err != nil {
			fakeFault(w, "Unable to create the block device: "+err.Error())
			return
		}
		v.drivePath, v.drive = d.PathOnHost, f
		ok()
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/network-interfaces/"):
		var n fcapi.NetworkInterface
		if preBoot(&n) {
			v.tap = n.HostDevName
			ok()
		}
	case key == "PUT /vsock":
		var vs fcapi.Vsock
		if preBoot(&vs) {
			v.uds = vs.UDSPath
			ok()
		}
	case key == "PUT /actions":
		var a fcapi.InstanceActionInfo
		if err := fakeDecode(r, &a); err != nil {
			fakeFault(w, err.Error())
			return
		}
		if os.Getenv(fakeFaultEnv) == a.ActionType {
			fakeFault(w, "fault injected by the test: "+a.ActionType)
			return
		}
		if a.ActionType != fcapi.ActionInstanceStart || v.state != fcapi.StateNotStarted {
			fakeFault(w, "The requested operation is not supported after starting the microVM.")
			return
		}
		if v.boot == nil {
			fakeFault(w, "Cannot start microvm without kernel configuration.")
			return
		}
		for _, f := range []string{v.boot.KernelImagePath, v.boot.InitrdPath} {
			if _, err := os.Stat(f); f != "" && err != nil {
				fakeFault(w, "Cannot load kernel due to invalid memory configuration or invalid kernel image: "+err.Error())
				return
			}
		}
		v.memory = "fresh"
		if err := v.listenVsock(); err != nil {
			fakeFault(w, err.Error())
			return
		}
		v.state = fcapi.StateRunning
		fmt.Println("SMOLVM-AGENT READY")
		ok()
	case key == "PATCH /vm":
		var s fcapi.VM
		if err := fakeDecode(r, &s); err != nil {
			fakeFault(w, err.Error())
			return
		}
		if v.state == fcapi.StateNotStarted {
			fakeFault(w, "The requested operation is not supported before starting the microVM.")
			return
		}
		if s.State == fcapi.VMPaused {
			v.state = fcapi.StatePaused
		} else {
			v.state = fcapi.StateRunning
		}
		ok()
	case key == "PUT /snapshot/create":
		var c fcapi.SnapshotCreate
		if err := fakeDecode(r, &c); err != nil {
			fakeFault(w, err.Error())
			return
		}
		if v.state != fcapi.StatePaused {
			fakeFault(w, "Cannot create snapshot: the microVM is not paused.")
			return
		}
		st, _ := json.Marshal(fakeState{ID: v.id, DrivePath: v.drivePath, UDSPath: v.uds, TAP: v.tap, MemMiB: v.mc.MemSizeMiB})
		if err := os.WriteFile(c.SnapshotPath, st, 0o644); err != nil {
			fakeFault(w, err.Error())
			return
		}
		mem := v.memory
		if mem == "fresh" {
			mem = "guest-memory-of " + v.id
		}
		if err := os.WriteFile(c.MemFilePath, []byte(mem+"\n"), 0o644); err != nil {
			fakeFault(w, err.Error())
			return
		}
		os.Truncate(c.MemFilePath, int64(v.mc.MemSizeMiB)<<20)
		ok()
	case key == "PUT /snapshot/load":
		var l fcapi.SnapshotLoad
		if err := fakeDecode(r, &l); err != nil {
			fakeFault(w, err.Error())
			return
		}
		if v.configured || v.state != fcapi.StateNotStarted {
			fakeFault(w, "Loading a microVM snapshot not allowed after configuring boot-specific resources.")
			return
		}
		if os.Getenv(fakeFaultEnv) == "LoadCrash" {
			os.Exit(3) // die without answering
		}
		if err := v.load(l); err != nil {
			// Firecracker ends the process after a failed load.
			fakeFault(w, "Load snapshot error: "+err.Error())
			w.(http.Flusher).Flush()
			go func() { time.Sleep(20 * time.Millisecond); exit <- 1 }()
			return
		}
		ok()
	default:
		fakeFault(w, "Invalid request method and/or path: "+key)
	}
}

func (v *fakeVMM) load(l fcapi.SnapshotLoad) error {
	data, err := os.ReadFile(l.SnapshotPath)
	if err != nil {
		return err
	}
	var st fakeState
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("bad vmstate: %w", err)
	}
	if l.MemBackend == nil || l.MemBackend.BackendType != fcapi.MemBackendFile {
		return fmt.Errorf("only the File memory backend is faked")
	}
	mf, err := os.Open(l.MemBackend.BackendPath)
	if err != nil {
		return err
	}
	defer mf.Close()
	if fi, _ := mf.Stat(); fi.Size() != int64(st.MemMiB)<<20 {
		return fmt.Errorf("memory file is %d bytes, want %d", fi.Size(), int64(st.MemMiB)<<20)
	}
	line, _ := bufio.NewReader(mf).ReadString('\n')
	if st.DrivePath != "" {
		f, err := os.OpenFile(st.DrivePath, os.O_RDWR, 0) // the pinned path, relative to our cwd
		if err != nil {
			return err
		}
		v.drivePath, v.drive = st.DrivePath, f
	}
	v.configured = true
	v.mc.MemSizeMiB = st.MemMiB
	v.memory = strings.TrimSpace(line)
	v.uds = st.UDSPath
	if l.VsockOverride != nil {
		v.uds = l.VsockOverride.UDSPath
	}
	v.tap = st.TAP
	for _, o := range l.NetworkOverrides {
		v.tap = o.HostDevName
	}
	if err := v.listenVsock(); err != nil {
		return err
	}
	v.state = fcapi.StatePaused
	if l.ResumeVM {
		v.state = fcapi.StateRunning
	}
	return nil
}

// listenVsock serves host-initiated connections: CONNECT 1024 reaches the
// line agent; other ports have no listener (the connection is closed). The
// OK line and the agent's greeting go out in one write.
func (v *fakeVMM) listenVsock() error {
	os.Remove(v.uds)
	l, err := net.Listen("unix", v.uds)
	if err != nil {
		return err
	}
	v.vsockL = l
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go v.agent(c)
		}
	}()
	return nil
}

func (v *fakeVMM) agent(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || line != fmt.Sprintf("CONNECT %d\n", AgentPort) {
		return
	}
	if _, err := c.Write([]byte("OK 1073741824\nHELLO\n")); err != nil {
		return
	}
	for {
		cmd, err := br.ReadString('\n')
		if err != nil {
			return
		}
		v.mu.Lock()
		var reply string
		switch strings.TrimSpace(cmd) {
		case "PING":
			reply = "PONG"
		case "DISK":
			if v.drive == nil {
				reply = "no-disk"
				break
			}
			buf := make([]byte, 64)
			n, _ := v.drive.ReadAt(buf, 0)
			reply, _, _ = strings.Cut(string(buf[:n]), "\n")
		case "MEM":
			reply = v.memory
		case "TAP":
			reply = v.tap
		default:
			reply = "?"
		}
		v.mu.Unlock()
		fmt.Fprintln(c, reply)
	}
}
