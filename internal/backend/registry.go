package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// Options are what the SDK hands every backend's factory.
type Options struct {
	Logger *slog.Logger // never nil
}

// Registration describes one backend to the registry. Backends register
// themselves (from an init function); the SDK names none of them.
type Registration struct {
	Name string
	// New builds the backend. An error wraps ErrVMMNotFound when the
	// VMM is not installed.
	New func(Options) (Backend, error)
	// Usable reports why the backend cannot run VMs on this host ("" when
	// it can). The "auto" choice asks it; nil means always usable.
	Usable func() string
	// AutoRank orders the backends "auto" considers: the usable one with
	// the highest rank wins.
	AutoRank int
	// VMMComms are the process names (prefixes of /proc/PID/comm) of this
	// backend's VMM processes; the SDK's doctor looks for stray ones.
	VMMComms []string
	// HostChecks reports what this backend needs from the host, one Check
	// each (its VMM binary and version, helpers, accelerator, confinement),
	// for the SDK's Doctor. It must work when the backend's VMM is not
	// installed (saying so), so it hangs off the registration, not off a
	// built Backend; nil when the backend has nothing to check.
	HostChecks func(ctx context.Context) []Check
	// Artifacts maps each artifact role this backend's snapshots have to
	// the one file name it uses for it ("state" → "state.bin"). The
	// snapshot package refuses a manifest naming any other role or file
	// (a manifest is untrusted input). Nil: the backend takes no snapshots.
	Artifacts map[string]string
}

// CheckStatus is the outcome of one host check.
type CheckStatus string

// The outcomes: CheckWarn works but is degraded or optional (a fix is
// worth reading), CheckFail means VMs of this kind cannot run here.
const (
	CheckOK   CheckStatus = "ok"
	CheckWarn CheckStatus = "warn"
	CheckFail CheckStatus = "fail"
)

// Check is one line of a backend's host report.
type Check struct {
	Name   string
	Status CheckStatus
	Detail string
	Fix    string // what to do about a warn or fail; "" when nothing
}

// Auto is the backend name that asks the registry to choose.
const Auto = "auto"

var (
	regMu sync.RWMutex
	reg   = map[string]Registration{}
)

// Register adds a backend. It panics on an empty, reserved or duplicate
// name, or a missing factory (a programming error at init time).
func Register(r Registration) {
	regMu.Lock()
	defer regMu.Unlock()
	if r.Name == "" || r.Name == Auto || r.New == nil {
		panic(fmt.Sprintf("backend: bad registration %q", r.Name))
	}
	if _, dup := reg[r.Name]; dup {
		panic("backend: " + r.Name + " registered twice")
	}
	reg[r.Name] = r
}

// Lookup returns the registration of name.
func Lookup(name string) (Registration, bool) {
	regMu.RLock()
	defer regMu.RUnlock()
	r, ok := reg[name]
	return r, ok
}

// Names returns the registered backend names, sorted.
func Names() []string {
	regMu.RLock()
	defer regMu.RUnlock()
	names := make([]string, 0, len(reg))
	for n := range reg {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Registrations returns every registration, sorted by name.
func Registrations() []Registration {
	var out []Registration
	for _, n := range Names() {
		r, _ := Lookup(n)
		out = append(out, r)
	}
	return out
}

// ErrNoUsableBackend is returned by Choose when no registered backend can
// run VMs on this host.
var ErrNoUsableBackend = errors.New("no usable backend on this host")

// Choose picks the backend for "auto": the usable registration with the
// highest AutoRank (ties: the first name). The error lists why each was
// refused.
func Choose() (string, error) {
	regs := Registrations()
	slices.SortStableFunc(regs, func(a, b Registration) int { return b.AutoRank - a.AutoRank })
	var why []string
	for _, r := range regs {
		reason := ""
		if r.Usable != nil {
			reason = r.Usable()
		}
		if reason == "" {
			return r.Name, nil
		}
		why = append(why, r.Name+": "+reason)
	}
	return "", fmt.Errorf("%w (%s)", ErrNoUsableBackend, strings.Join(why, "; "))
}

// Detacher is implemented by backends whose per-VM disk can depend on a
// snapshot's files (Capabilities.Detach): Detach makes a stopped machine's
// disk self-contained so the snapshot can be deleted.
type Detacher interface {
	Detach(ctx context.Context, m Machine) error
}

// DiskFlattener is implemented by backends whose diff snapshots keep the
// disk as an overlay on the base image (SnapshotResult.BaseImage):
// FlattenDisk writes the snapshot disk src with its whole backing chain to
// dst, a new private file that depends on nothing (a self-contained
// export).
type DiskFlattener interface {
	FlattenDisk(ctx context.Context, src, dst string) error
}

// NetStatser is implemented by backends that filter guest traffic through a
// network sidecar: NetStats reports what the sidecar of a running machine
// let through and refused (backend.ErrNotRunning when it is not running).
type NetStatser interface {
	NetStats(ctx context.Context, m Machine) (netpolicy.Stats, error)
}

// Unwrapper is implemented by backends that wrap another (test fakes,
// error-mapping layers), so optional interfaces stay reachable through As.
type Unwrapper interface {
	Unwrap() Backend
}

// As finds an optional interface T on b or on any backend it wraps
// (through Unwrap), the way errors.As walks an error chain.
func As[T any](b Backend) (T, bool) {
	for b != nil {
		if t, ok := b.(T); ok {
			return t, true
		}
		u, ok := b.(Unwrapper)
		if !ok {
			break
		}
		b = u.Unwrap()
	}
	var zero T
	return zero, false
}
