package smolvm

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/remote"
	"github.com/smolvm-go/smolvm/internal/store"
)

// Manager owns a data directory: it creates, opens and lists VMs and
// snapshots there. It is safe for concurrent use; several processes may use
// one data directory at once (state is in SQLite, per-VM work is serialized
// with file locks).
type Manager struct {
	opts  Options
	log   *slog.Logger
	store *store.Store

	mu       sync.Mutex
	backends map[string]backend.Backend

	// memAvailable reports the host's available memory in MiB (Fork's
	// check); nil reads /proc/meminfo. Tests set it to reach the refusal.
	memAvailable func() (int64, bool)
	// statfs reports the free bytes on the filesystem of a path (import's
	// and a flattened export's check); nil asks statfs(2). Tests set it.
	statfs func(path string) (int64, error)

	// openStore opens a remote's object store; nil opens S3 (remote.NewS3).
	// Tests set it to a fake behind remote.Store.
	openStore func(context.Context, Remote) (remote.Store, error)
}

// NewManager opens (creating if needed) the data directory in opts.
func NewManager(ctx context.Context, opts Options) (*Manager, error) {
	opts = opts.withDefaults()
	// Absolute paths: they reach VMM arguments, which must be absolute
	// and clean (backend.Spec.Validate).
	for _, p := range []*string{&opts.DataDir, &opts.ImageDir, &opts.RunDir} {
		a, err := filepath.Abs(*p)
		if err != nil {
			return nil, &Error{Op: "open", Message: fmt.Sprintf("cannot resolve %s: %v", *p, err), Fix: newFix(FixEditOption, ArgOption, "Options", ArgHint, "use absolute paths in Options"), Err: err}
		}
		*p = a
	}
	st, err := store.Open(ctx, opts.DataDir)
	if err != nil {
		return nil, &Error{Op: "open", Message: fmt.Sprintf("cannot open state in %s: %v", opts.DataDir, err),
			Fix: newFix(FixSetEnv, ArgEnv, "SMOLVM_DATA_DIR", ArgPath, opts.DataDir, ArgHint, "check permissions of the data dir or set SMOLVM_DATA_DIR"), Err: err}
	}
	return &Manager{opts: opts, log: opts.Logger, store: st,
		backends: map[string]backend.Backend{}}, nil
}

// Close releases the state database. VMs keep running.
func (m *Manager) Close() error { return m.store.Close() }

// DataDir returns the manager's data directory.
func (m *Manager) DataDir() string { return m.opts.DataDir }

// ImageDir returns the image cache directory.
func (m *Manager) ImageDir() string { return m.opts.ImageDir }

func (m *Manager) vmDir(id string) string { return filepath.Join(m.opts.DataDir, "vms", id) }

// runDir is a short per-VM directory for unix sockets (paths are limited to
// 108 bytes): a hash of the data dir and the id.
func (m *Manager) runDir(id string) string {
	h := sha256.Sum256([]byte(m.opts.DataDir + "\x00" + id))
	return filepath.Join(m.opts.RunDir, hex.EncodeToString(h[:6]))
}

// backend returns the named backend from the registry ("auto": the one
// backend.Choose picks on this host). Its errors match the SDK's sentinels
// (fromBackend).
func (m *Manager) backend(name string) (backend.Backend, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if name == backend.Auto {
		chosen, err := backend.Choose()
		if err != nil {
			return nil, &Error{Op: "backend", Message: err.Error(), Fix: newFix(FixRunSetup), Err: fromBackend(err)}
		}
		name = chosen
	}
	if b, ok := m.backends[name]; ok {
		return mappedBackend{b}, nil
	}
	reg, ok := backend.Lookup(name)
	if !ok {
		return nil, newErr("backend", ErrInvalidConfig, newFix(FixSetOption, ArgOption, "Backend", ArgValue, DefaultBackend), fmt.Sprintf("unknown backend %q", name))
	}
	b, err := reg.New(backend.Options{Logger: m.log})
	if err != nil {
		return nil, &Error{Op: "backend", Message: fmt.Sprintf("the %s backend is not available: %v", name, err),
			Fix: newFix(FixInstallBackend, ArgBackend, name, ArgDefault, DefaultBackend), Err: errors.Join(ErrUnsupported, err)}
	}
	m.backends[name] = b
	return mappedBackend{b}, nil
}

func (m *Manager) openImage(name string) (image.Image, error) {
	img, err := image.Open(m.opts.ImageDir, name)
	if err != nil {
		if errors.Is(err, image.ErrUnknownImage) {
			return img, &Error{Op: "create", Message: fmt.Sprintf("unknown image %q (known: busybox, debian)", name),
				Fix: newFix(FixSetOption, ArgOption, "Image", ArgValue, "debian"), Err: errors.Join(ErrInvalidConfig, err)}
		}
		return img, &Error{Op: "create", Message: fmt.Sprintf("image %q is not built in %s", name, m.opts.ImageDir),
			Fix: newFix(FixBuildImage, ArgImage, name), Err: errors.Join(ErrImageNotBuilt, err)}
	}
	return img, nil
}

// uniqueName generates an unused VM id.
func (m *Manager) uniqueName(ctx context.Context) (string, error) {
	for range 16 {
		var b [4]byte
		rand.Read(b[:])
		id := "sbx-" + hex.EncodeToString(b[:])
		if _, err := m.store.GetVM(ctx, id); errors.Is(err, store.ErrNotFound) {
			return id, nil
		}
	}
	return "", errors.New("could not generate a unique vm name")
}

// macFor derives a stable locally administered MAC from an id.
func macFor(id string) string {
	h := sha256.Sum256([]byte("mac\x00" + id))
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", h[0], h[1], h[2])
}

// Package-level helpers use a Manager built from the environment
// (SMOLVM_DATA_DIR, SMOLVM_IMAGE_DIR) for the duration of the call.

// New creates a VM with the default Options. See Manager.New.
func New(ctx context.Context, cfg Config) (*VM, error) {
	m, err := NewManager(ctx, Options{})
	if err != nil {
		return nil, err
	}
	vm, err := m.New(ctx, cfg)
	if err != nil {
		m.Close()
		return nil, err
	}
	ownManager(m, vm)
	return vm, nil
}

// Open reconnects to an existing VM with the default Options.
func Open(ctx context.Context, id string) (*VM, error) {
	m, err := NewManager(ctx, Options{})
	if err != nil {
		return nil, err
	}
	vm, err := m.Open(ctx, id)
	if err != nil {
		m.Close()
		return nil, err
	}
	ownManager(m, vm)
	return vm, nil
}

func removeAll(paths ...string) {
	for _, p := range paths {
		if p != "" {
			os.RemoveAll(p)
		}
	}
}
