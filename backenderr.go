package smolvm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// backendSentinels is the one place backend sentinel errors map to the
// SDK's: an error a backend returns that wraps the left one also matches
// the right one with errors.Is (its text is unchanged).
var backendSentinels = []struct{ from, to error }{
	{backend.ErrUnsupported, ErrUnsupported},
	{backend.ErrVMMNotFound, ErrUnsupported},
	{backend.ErrNotRunning, ErrVMNotRunning},
	{backend.ErrBackingMissing, ErrBackingImageMissing},
	{backend.ErrInvalidSpec, ErrInvalidConfig},
	{backend.ErrNoUsableBackend, ErrUnsupported},
}

// fromBackend returns err so that errors.Is also finds the SDK sentinel of
// every backend sentinel it wraps. nil stays nil; an error without one is
// returned as it is.
func fromBackend(err error) error {
	if err == nil {
		return nil
	}
	var add []error
	for _, s := range backendSentinels {
		if errors.Is(err, s.from) && !errors.Is(err, s.to) && !slices.Contains(add, s.to) {
			add = append(add, s.to)
		}
	}
	if len(add) == 0 {
		return err
	}
	return &backendError{err: err, sdk: add}
}

// backendError is a backend's error that also matches SDK sentinels.
type backendError struct {
	err error
	sdk []error
}

func (e *backendError) Error() string   { return e.err.Error() }
func (e *backendError) Unwrap() []error { return append([]error{e.err}, e.sdk...) }

// mappedBackend is what Manager.backend hands the SDK: the registered
// backend with every error passed through fromBackend. Optional interfaces
// are reached with backend.As (through Unwrap).
type mappedBackend struct{ b backend.Backend }

var _ backend.Backend = mappedBackend{}

func (m mappedBackend) Unwrap() backend.Backend { return m.b }

func (m mappedBackend) Name() string                       { return m.b.Name() }
func (m mappedBackend) Capabilities() backend.Capabilities { return m.b.Capabilities() }

func (m mappedBackend) Prepare(ctx context.Context, spec backend.Spec) error {
	return fromBackend(m.b.Prepare(ctx, spec))
}

func (m mappedBackend) Start(ctx context.Context, spec backend.Spec) (backend.Machine, error) {
	mc, err := m.b.Start(ctx, spec)
	return mc, fromBackend(err)
}

func (m mappedBackend) DialAgent(ctx context.Context, mc backend.Machine) (net.Conn, error) {
	c, err := m.b.DialAgent(ctx, mc)
	return c, fromBackend(err)
}

func (m mappedBackend) Status(ctx context.Context, mc backend.Machine) (backend.Status, error) {
	s, err := m.b.Status(ctx, mc)
	return s, fromBackend(err)
}

func (m mappedBackend) Pause(ctx context.Context, mc backend.Machine) error {
	return fromBackend(m.b.Pause(ctx, mc))
}

func (m mappedBackend) Resume(ctx context.Context, mc backend.Machine) error {
	return fromBackend(m.b.Resume(ctx, mc))
}

func (m mappedBackend) Stop(ctx context.Context, mc backend.Machine) error {
	return fromBackend(m.b.Stop(ctx, mc))
}

func (m mappedBackend) ExposePort(ctx context.Context, mc backend.Machine, pf backend.PortForward) error {
	return fromBackend(m.b.ExposePort(ctx, mc, pf))
}

func (m mappedBackend) Snapshot(ctx context.Context, mc backend.Machine, kind backend.SnapshotKind, dir string) (backend.SnapshotResult, error) {
	r, err := m.b.Snapshot(ctx, mc, kind, dir)
	return r, fromBackend(err)
}

func (m mappedBackend) Restore(ctx context.Context, req backend.RestoreRequest) (backend.Machine, error) {
	mc, err := m.b.Restore(ctx, req)
	return mc, fromBackend(err)
}

// detacher returns b's Detacher when its capabilities declare Detach (nil
// when they do not), found through wrappers with backend.As.
func detacher(b backend.Backend) (backend.Detacher, error) {
	if !b.Capabilities().Detach {
		return nil, nil
	}
	d, ok := backend.As[backend.Detacher](b)
	if !ok {
		return nil, fmt.Errorf("the %s backend declares Detach but does not implement backend.Detacher", b.Name())
	}
	return mappedDetacher{d}, nil
}

type mappedDetacher struct{ d backend.Detacher }

func (m mappedDetacher) Detach(ctx context.Context, mc backend.Machine) error {
	return fromBackend(m.d.Detach(ctx, mc))
}
