// Package fakebackend is a backend for tests that runs no VMM: each machine
// is the real guest agent server (agent.Server.ServeConn) in this process,
// reached over net.Pipe. It lets the SDK's rules (restore-once, rollback,
// fork failures, the delete rule, locking) be tested in milliseconds; the
// same tests run against QEMU for the proof on the real thing.
//
// The model: a machine's root file system is a private directory (the
// per-VM disk, Spec.Disk, or Spec.Dir/fake-root without a disk) that is
// the agent's HOME and the working directory of every command it runs;
// its "run" subdirectory is the machine's memory (emptied by Start and
// Stop, saved by full and diff snapshots). Commands the agent runs are
// real processes on the host, as the user running the tests, with no
// isolation: use the fake only with commands the test itself chooses,
// and relative paths. The agent's system operations are hooks (clock:
// ignored; identity: recorded; power off: stops the machine), so nothing
// of the host changes: no hostname, mount or network.
//
// Machines live in a Host (the stand-in for the host's VMM processes): two
// Managers in one test process see the same machines, as two processes see
// the same VMMs. Faults injected into the Host (Fail) make a named
// operation fail, to reach the callers' error paths.
package fakebackend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/agent"
	"github.com/smolvm-go/smolvm/internal/backend"
)

// Name is the backend's registry name.
const Name = "fake"

// Artifact file names (declared in its Registration.Artifacts).
const (
	StateFile  = "state.json"
	MemoryFile = "memory.tar"
	DiskFile   = "disk.tar"
)

// memDir is the subdirectory of a machine's root that models its memory.
const memDir = "run"

func init() {
	backend.Register(backend.Registration{
		Name:      Name,
		New:       func(backend.Options) (backend.Backend, error) { return Default.Backend(), nil },
		Usable:    func() string { return "the fake backend is for tests; choose it by name" },
		AutoRank:  -1,
		Artifacts: map[string]string{"state": StateFile, "memory": MemoryFile, "disk": DiskFile},
	})
}

// Op names an operation a fault can be injected into.
type Op string

const (
	OpPrepare  Op = "prepare"
	OpStart    Op = "start"    // Start fails before the machine exists
	OpSnapshot Op = "snapshot" // Snapshot fails before writing anything
	OpRestore  Op = "restore"  // Restore fails before the new machine has any file
	// OpLoadMemory fails a Restore after the new machine's files are in
	// place (the VMM started and could not load the saved state); the
	// backend removes what it made, as a VMM process that exits would.
	OpLoadMemory Op = "load-memory"
	// OpAgent makes the guest die before its agent answers: DialAgent
	// fails and the machine stops, as a VMM whose guest crashed.
	OpAgent  Op = "agent"
	OpPause  Op = "pause"
	OpResume Op = "resume"
	OpStop   Op = "stop"
)

// ErrInjected is wrapped by every error a fault injects.
var ErrInjected = errors.New("fakebackend: injected fault")

type fault struct {
	op    Op
	id    string // machine id; "" matches any
	times int    // how many more times; < 0: always
}

// Host is a set of machines and the faults injected into them.
type Host struct {
	mu       sync.Mutex
	machines map[string]*machine // by RunDir
	faults   []*fault
	describe func(*backend.Host) // SetHostInfo: changes what DescribeHost reports
}

// Default is the Host the registered "fake" backend uses.
var Default = NewHost()

// NewHost returns an empty Host.
func NewHost() *Host { return &Host{machines: map[string]*machine{}} }

// Backend returns a backend on h.
func (h *Host) Backend() backend.Backend { return &Backend{h: h} }

// Fail makes op fail for the machine id ("" = any) the next times times
// (times < 1: every time) and returns a function that removes the fault.
func (h *Host) Fail(op Op, id string, times int) (remove func()) {
	if times < 1 {
		times = -1
	}
	f := &fault{op: op, id: id, times: times}
	h.mu.Lock()
	h.faults = append(h.faults, f)
	h.mu.Unlock()
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		for i, g := range h.faults {
			if g == f {
				h.faults = append(h.faults[:i], h.faults[i+1:]...)
				return
			}
		}
	}
}

// fail returns an injected error when a fault matches op on id.
func (h *Host) fail(op Op, id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, f := range h.faults {
		if f.op != op || (f.id != "" && f.id != id) {
			continue
		}
		if f.times > 0 {
			f.times--
			if f.times == 0 {
				h.faults = append(h.faults[:i], h.faults[i+1:]...)
			}
		}
		return fmt.Errorf("%s of %s: %w", op, id, ErrInjected)
	}
	return nil
}

// Machines returns the ids of the machines that exist (running or paused),
// sorted: what a test checks instead of VMM processes.
func (h *Host) Machines() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var ids []string
	for _, m := range h.machines {
		ids = append(ids, m.spec.ID)
	}
	sort.Strings(ids)
	return ids
}

// Hostname returns the hostname the agent of machine id was last given
// (set_identity), or "" (none given, or no such machine).
func (h *Host) Hostname(id string) string {
	h.mu.Lock()
	var m *machine
	for _, x := range h.machines {
		if x.spec.ID == id {
			m = x
		}
	}
	h.mu.Unlock()
	if m == nil {
		return ""
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.hostname
}

func (h *Host) lookup(mach backend.Machine) *machine {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.machines[mach.RunDir]
}

// machine is one running or paused fake VM.
type machine struct {
	spec      backend.Spec
	root      string
	ephemeral bool // root is removed on Stop (no disk)
	srv       *agent.Server
	ctx       context.Context
	cancel    context.CancelFunc

	mu       sync.Mutex
	cond     *sync.Cond // signalled when paused changes
	paused   bool
	conns    map[net.Conn]bool
	hostname string
}

func (m *machine) setPaused(p bool) {
	m.mu.Lock()
	m.paused = p
	m.mu.Unlock()
	m.cond.Broadcast()
}

// waitRunning blocks while the machine is paused (its vCPUs stopped), or
// until it stops.
func (m *machine) waitRunning() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for m.paused && m.ctx.Err() == nil {
		m.cond.Wait()
	}
	return m.ctx.Err()
}

// gatedConn is the guest's end of an agent connection: while the machine
// is paused the agent reads and writes nothing, as a paused guest.
type gatedConn struct {
	net.Conn
	m *machine
}

func (c *gatedConn) Read(p []byte) (int, error) {
	if err := c.m.waitRunning(); err != nil {
		return 0, net.ErrClosed
	}
	n, err := c.Conn.Read(p)
	if err2 := c.m.waitRunning(); err2 != nil && err == nil {
		return 0, net.ErrClosed
	}
	return n, err
}

func (c *gatedConn) Write(p []byte) (int, error) {
	if err := c.m.waitRunning(); err != nil {
		return 0, net.ErrClosed
	}
	return c.Conn.Write(p)
}

// Backend is the fake backend.
type Backend struct{ h *Host }

var _ backend.Backend = (*Backend)(nil)

// Name implements backend.Backend.
func (b *Backend) Name() string { return Name }

// Capabilities implements backend.Backend: pause, memory and disk
// snapshots; no network, no port forwards, self-contained disks.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{Pause: true, MemorySnapshot: true, DiskSnapshot: true,
		KernelFormat: backend.KernelBzImage, DiskFormat: backend.DiskRaw}
}

// Prepare creates the per-VM disk: an empty directory (the base image's
// content is not modelled; it must exist).
func (b *Backend) Prepare(ctx context.Context, spec backend.Spec) error {
	if err := b.h.fail(OpPrepare, spec.ID); err != nil {
		return err
	}
	if spec.BaseDisk != "" {
		if _, err := os.Stat(spec.BaseDisk); err != nil {
			return fmt.Errorf("%w: %v", backend.ErrBackingMissing, err)
		}
	}
	if spec.Disk == "" {
		return nil
	}
	return os.MkdirAll(spec.Disk, 0o700)
}

// checkKernel refuses a kernel that is missing or not a bzImage (the
// "HdrS" boot protocol magic at 0x202), as a VMM would.
func checkKernel(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return &backend.VMMError{Op: "start", Message: err.Error()}
	}
	defer f.Close()
	var magic [4]byte
	if _, err := f.ReadAt(magic[:], 0x202); err != nil || string(magic[:]) != "HdrS" {
		return &backend.VMMError{Op: "start", Message: path + " is not a bzImage kernel"}
	}
	return nil
}

// Start boots the machine: a fresh memory directory and an agent server.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Machine, error) {
	if err := spec.Validate(); err != nil {
		return backend.Machine{}, err
	}
	if err := b.h.fail(OpStart, spec.ID); err != nil {
		return backend.Machine{}, err
	}
	if err := checkKernel(spec.Kernel); err != nil {
		return backend.Machine{}, err
	}
	if spec.Initrd != "" {
		if _, err := os.Stat(spec.Initrd); err != nil {
			return backend.Machine{}, &backend.VMMError{Op: "start", Message: err.Error()}
		}
	}
	root, ephemeral := rootOf(spec)
	if !ephemeral {
		if st, err := os.Stat(root); err != nil || !st.IsDir() {
			return backend.Machine{}, &backend.VMMError{Op: "start", Message: "disk " + root + " is missing (Prepare makes it)"}
		}
	}
	os.RemoveAll(filepath.Join(root, memDir))
	if err := os.MkdirAll(filepath.Join(root, memDir), 0o700); err != nil {
		return backend.Machine{}, err
	}
	return b.launch(spec, root, ephemeral, false)
}

// rootOf is the machine's root directory: its disk, or an ephemeral dir.
func rootOf(spec backend.Spec) (string, bool) {
	if spec.Disk != "" {
		return spec.Disk, false
	}
	return filepath.Join(spec.Dir, "fake-root"), true
}

// launch registers a machine whose root is ready.
func (b *Backend) launch(spec backend.Spec, root string, ephemeral, paused bool) (backend.Machine, error) {
	b.h.mu.Lock()
	defer b.h.mu.Unlock()
	if _, ok := b.h.machines[spec.RunDir]; ok {
		return backend.Machine{}, &backend.VMMError{Op: "start", Message: "a machine already runs in " + spec.RunDir}
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &machine{spec: spec, root: root, ephemeral: ephemeral, ctx: ctx, cancel: cancel,
		paused: paused, conns: map[net.Conn]bool{}}
	m.cond = sync.NewCond(&m.mu)
	m.srv = agent.NewServer(agent.Options{
		EnvFile:     filepath.Join(root, "etc/smolvm/env"),
		ProfileFile: filepath.Join(root, "etc/profile.d/smolvm_env.sh"),
		BaseEnv:     []string{"PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME=" + root, "LANG=C.UTF-8"},
		Logf:        func(string, ...any) {},
		SetTime:     func(time.Time) error { return nil },
		SetIdentity: func(hostname string, _ []byte) error {
			m.mu.Lock()
			m.hostname = hostname
			m.mu.Unlock()
			return nil
		},
		PowerOff: func(bool) error {
			go b.h.stop(spec.RunDir)
			return nil
		},
	})
	// Wake waiters (gated conns) when the machine stops. Under the lock:
	// a waiter checks ctx and starts waiting while it holds it.
	context.AfterFunc(ctx, func() {
		m.mu.Lock()
		m.cond.Broadcast()
		m.mu.Unlock()
	})
	b.h.machines[spec.RunDir] = m
	return backend.Machine{Spec: spec, Backend: Name, Accel: backend.AccelTCG}, nil
}

// DialAgent connects to the machine's agent over a new pipe.
func (b *Backend) DialAgent(ctx context.Context, mach backend.Machine) (net.Conn, error) {
	m := b.h.lookup(mach)
	if m == nil {
		return nil, fmt.Errorf("dial agent of %s: %w", mach.ID, backend.ErrNotRunning)
	}
	if err := b.h.fail(OpAgent, mach.ID); err != nil {
		b.h.stop(mach.RunDir)
		return nil, err
	}
	host, guest := net.Pipe()
	m.mu.Lock()
	if m.ctx.Err() != nil {
		m.mu.Unlock()
		host.Close()
		guest.Close()
		return nil, fmt.Errorf("dial agent of %s: %w", mach.ID, backend.ErrNotRunning)
	}
	m.conns[guest] = true
	m.mu.Unlock()
	go func() {
		m.srv.ServeConn(m.ctx, &gatedConn{Conn: guest, m: m})
		m.mu.Lock()
		delete(m.conns, guest)
		m.mu.Unlock()
	}()
	return host, nil
}

// Status reports running or paused for a machine that exists, stopped
// otherwise.
func (b *Backend) Status(ctx context.Context, mach backend.Machine) (backend.Status, error) {
	m := b.h.lookup(mach)
	if m == nil {
		return backend.StatusStopped, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.paused {
		return backend.StatusPaused, nil
	}
	return backend.StatusRunning, nil
}

// Pause stops the machine's agent from reading or writing.
func (b *Backend) Pause(ctx context.Context, mach backend.Machine) error {
	return b.setPaused(mach, OpPause, true)
}

// Resume lets the agent run again.
func (b *Backend) Resume(ctx context.Context, mach backend.Machine) error {
	return b.setPaused(mach, OpResume, false)
}

func (b *Backend) setPaused(mach backend.Machine, op Op, p bool) error {
	m := b.h.lookup(mach)
	if m == nil {
		return fmt.Errorf("%s %s: %w", op, mach.ID, backend.ErrNotRunning)
	}
	if err := b.h.fail(op, mach.ID); err != nil {
		return err
	}
	m.setPaused(p)
	return nil
}

// Stop ends the machine: its agent connections close, its memory is gone.
// Stopping a machine that does not exist does nothing.
func (b *Backend) Stop(ctx context.Context, mach backend.Machine) error {
	if err := b.h.fail(OpStop, mach.ID); err != nil {
		return err
	}
	b.h.stop(mach.RunDir)
	return nil
}

func (h *Host) stop(runDir string) {
	h.mu.Lock()
	m := h.machines[runDir]
	delete(h.machines, runDir)
	h.mu.Unlock()
	if m == nil {
		return
	}
	m.cancel()
	m.mu.Lock()
	for c := range m.conns {
		c.Close()
	}
	m.mu.Unlock()
	m.srv.Close()
	if m.ephemeral {
		os.RemoveAll(m.root)
	} else {
		os.RemoveAll(filepath.Join(m.root, memDir))
	}
}

// ExposePort is not supported: the fake has no network.
func (b *Backend) ExposePort(ctx context.Context, mach backend.Machine, pf backend.PortForward) error {
	return fmt.Errorf("expose port: %w", backend.ErrUnsupported)
}

// state is the fake's state artifact.
type state struct {
	Kind      backend.SnapshotKind `json:"kind"`
	ID        string               `json:"id"`
	Ephemeral bool                 `json:"ephemeral"`
}

// Snapshot pauses the machine and writes its memory (full and diff) and
// its disk as tar archives, with a small state file.
func (b *Backend) Snapshot(ctx context.Context, mach backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
	m := b.h.lookup(mach)
	if m == nil {
		return backend.SnapshotResult{}, fmt.Errorf("snapshot %s: %w", mach.ID, backend.ErrNotRunning)
	}
	if err := b.h.fail(OpSnapshot, mach.ID); err != nil {
		return backend.SnapshotResult{}, err
	}
	switch kind {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return backend.SnapshotResult{}, fmt.Errorf("snapshot kind %q: %w", kind, backend.ErrUnsupported)
	}
	m.setPaused(true)
	st, _ := json.Marshal(state{Kind: kind, ID: mach.ID, Ephemeral: m.ephemeral})
	if err := os.WriteFile(filepath.Join(dir, StateFile), st, 0o600); err != nil {
		return backend.SnapshotResult{}, err
	}
	res := backend.SnapshotResult{Artifacts: []backend.Artifact{{Role: "state", Name: StateFile}}}
	if kind != backend.SnapshotDisk {
		if err := writeTar(filepath.Join(dir, MemoryFile), filepath.Join(m.root, memDir), nil); err != nil {
			return backend.SnapshotResult{}, err
		}
		res.Artifacts = append(res.Artifacts, backend.Artifact{Role: "memory", Name: MemoryFile})
		res.MemoryFormat = backend.MemoryRaw
	}
	if !m.ephemeral {
		if err := writeTar(filepath.Join(dir, DiskFile), m.root, []string{memDir}); err != nil {
			return backend.SnapshotResult{}, err
		}
		res.Artifacts = append(res.Artifacts, backend.Artifact{Role: "disk", Name: DiskFile})
	}
	return res, nil
}

// Restore makes a new machine from a snapshot: its disk from the disk
// archive, its memory from the memory archive (none: a cold boot). On
// error nothing of the new machine is left.
func (b *Backend) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	spec := req.Spec
	if err := spec.Validate(); err != nil {
		return backend.Machine{}, err
	}
	if err := b.h.fail(OpRestore, spec.ID); err != nil {
		return backend.Machine{}, err
	}
	if b.h.lookup(backend.Machine{Spec: spec}) != nil {
		return backend.Machine{}, &backend.VMMError{Op: "restore", Message: "a machine already runs in " + spec.RunDir}
	}
	files := map[string]string{}
	for _, a := range req.Result.Artifacts {
		if !filepath.IsLocal(a.Name) || filepath.Base(a.Name) != a.Name {
			return backend.Machine{}, fmt.Errorf("restore: artifact name %q is not a plain file name", a.Name)
		}
		files[a.Role] = filepath.Join(req.SnapshotDir, a.Name)
	}
	if files["state"] == "" {
		return backend.Machine{}, errors.New("restore: the snapshot has no state artifact")
	}
	root, ephemeral := rootOf(spec)
	if _, err := os.Lstat(root); err == nil {
		return backend.Machine{}, &backend.VMMError{Op: "restore", Message: root + " already exists"}
	}
	fail := func(err error) (backend.Machine, error) {
		os.RemoveAll(root)
		return backend.Machine{}, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fail(err)
	}
	if p := files["disk"]; p != "" {
		if err := extractTar(p, root); err != nil {
			return fail(fmt.Errorf("restore: disk: %w", err))
		}
	}
	mem := filepath.Join(root, memDir)
	os.RemoveAll(mem)
	if err := os.MkdirAll(mem, 0o700); err != nil {
		return fail(err)
	}
	if p := files["memory"]; p != "" && req.Kind != backend.SnapshotDisk {
		if err := extractTar(p, mem); err != nil {
			return fail(fmt.Errorf("restore: memory: %w", err))
		}
	}
	if err := b.h.fail(OpLoadMemory, spec.ID); err != nil {
		return fail(errors.Join(&backend.VMMError{Op: "restore", Message: "loading the saved memory failed"}, err))
	}
	mach, err := b.launch(spec, root, ephemeral, !req.Resume)
	if err != nil {
		return fail(err)
	}
	return mach, nil
}
