package firecracker

// FAKE VMM — NOT FIRECRACKER. When SMOLVM_FAKE_FIRECRACKER=1 the test binary
// (re-executed by the backend as its "firecracker") becomes this small
// stand-in, written from the documented API: it serves the API socket with
// fctest.Server (the documented status codes and state machine, shared with
// the fcapi protocol tests) and, through its hooks, opens drive paths relative
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
	"github.com/smolvm-go/smolvm/internal/fcapi/fctest"
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
	mu        sync.Mutex // guards the fields the vsock agent reads
	id        string
	drivePath string
	drive     *os.File
	uds       string
	tap       string
	memory    string // first line of guest "memory": "fresh" or the loaded file's
	vsockL    net.Listener
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
	v := &fakeVMM{id: id}
	exit := make(chan int, 1)
	api := fctest.New(id, fakeVersion)
	api.Hooks = v.hooks(exit)
	srv := &http.Server{Handler: api}
	go srv.Serve(l)
	code := <-exit
	srv.Close()
	return code
}

// hooks are the fake's side effects behind the shared API state machine.
func (v *fakeVMM) hooks(exit chan<- int) fctest.Hooks {
	return fctest.Hooks{
		Drive: func(d fcapi.Drive) error {
			f, err := os.OpenFile(d.PathOnHost, os.O_RDWR, 0) // relative to our cwd, like Firecracker
			if err != nil {
				return fmt.Errorf("Unable to create the block device: %v", err)
			}
			v.mu.Lock()
			v.drivePath, v.drive = d.PathOnHost, f
			v.mu.Unlock()
			return nil
		},
		NetworkInterface: func(n fcapi.NetworkInterface) error {
			v.mu.Lock()
			v.tap = n.HostDevName
			v.mu.Unlock()
			return nil
		},
		Vsock: func(vs fcapi.Vsock) error {
			v.mu.Lock()
			v.uds = vs.UDSPath
			v.mu.Unlock()
			return nil
		},
		Action: func(a fcapi.InstanceActionInfo) error {
			if os.Getenv(fakeFaultEnv) == a.ActionType {
				return fmt.Errorf("fault injected by the test: %s", a.ActionType)
			}
			return nil
		},
		Start: func(boot fcapi.BootSource) error {
			for _, f := range []string{boot.KernelImagePath, boot.InitrdPath} {
				if _, err := os.Stat(f); f != "" && err != nil {
					return fmt.Errorf("Cannot load kernel due to invalid memory configuration or invalid kernel image: %v", err)
				}
			}
			v.mu.Lock()
			defer v.mu.Unlock()
			v.memory = "fresh"
			if err := v.listenVsock(); err != nil {
				return err
			}
			fmt.Println("SMOLVM-AGENT READY")
			return nil
		},
		SnapshotCreate: func(c fcapi.SnapshotCreate, mc fcapi.MachineConfig) error {
			v.mu.Lock()
			defer v.mu.Unlock()
			st, _ := json.Marshal(fakeState{ID: v.id, DrivePath: v.drivePath, UDSPath: v.uds, TAP: v.tap, MemMiB: mc.MemSizeMiB})
			if err := os.WriteFile(c.SnapshotPath, st, 0o644); err != nil {
				return err
			}
			mem := v.memory
			if mem == "fresh" {
				mem = "guest-memory-of " + v.id
			}
			if err := os.WriteFile(c.MemFilePath, []byte(mem+"\n"), 0o644); err != nil {
				return err
			}
			os.Truncate(c.MemFilePath, int64(mc.MemSizeMiB)<<20)
			return nil
		},
		SnapshotLoad: func(l fcapi.SnapshotLoad, mc *fcapi.MachineConfig) error {
			if os.Getenv(fakeFaultEnv) == "LoadCrash" {
				os.Exit(3) // die without answering
			}
			v.mu.Lock()
			defer v.mu.Unlock()
			if err := v.load(l, mc); err != nil {
				// Firecracker ends the process after a failed load (the
				// fault is flushed first).
				go func() { time.Sleep(20 * time.Millisecond); exit <- 1 }()
				return fmt.Errorf("Load snapshot error: %v", err)
			}
			return nil
		},
	}
}

// load applies snapshot l; v.mu is held.
func (v *fakeVMM) load(l fcapi.SnapshotLoad, mc *fcapi.MachineConfig) error {
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
	mc.MemSizeMiB = st.MemMiB
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
