package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/consolelog"
	"github.com/smolvm-go/smolvm/internal/store"
)

// SetEnv sets environment variables for every later command (persisted in
// the guest, so they survive restarts and snapshots).
func (vm *VM) SetEnv(ctx context.Context, env map[string]string) error {
	if err := (Config{Env: env}).validateEnv(); err != nil {
		return err
	}
	c, err := vm.agent(ctx, "set environment variables")
	if err != nil {
		return err
	}
	return vm.agentErr("setenv", c.SetEnv(ctx, env, nil))
}

// ExposePort forwards hostPort on 127.0.0.1 to guestPort (TCP) now and on
// every later start.
func (vm *VM) ExposePort(ctx context.Context, hostPort, guestPort int) error {
	pf := PortForward{HostAddr: "127.0.0.1", HostPort: hostPort, GuestPort: guestPort}
	if err := pf.validate(); err != nil {
		return err
	}
	unlock, rec, b, err := vm.lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if !rec.Machine.Network {
		return newErr("port expose", ErrUnsupported, newFix(FixRecreateWithNetwork, ArgVM, vm.id), fmt.Sprintf("vm %s has networking off", vm.id))
	}
	if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
		if err := b.ExposePort(ctx, rec.Machine, backend.PortForward(pf)); err != nil {
			return err
		}
	}
	rec.Machine.PortForwards = append(rec.Machine.PortForwards, backend.PortForward(pf))
	return vm.m.store.UpdateVM(ctx, rec)
}

// Logs returns the guest console log: its last consolelog.MaxSize bytes
// (1 MiB; older output is dropped, so a guest flooding its console costs
// the host nothing).
func (vm *VM) Logs(ctx context.Context) ([]byte, error) {
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return nil, err
	}
	if rec.Status == store.VMRunning || rec.Status == store.VMPaused {
		if b, err := vm.m.backend(rec.Backend); err == nil {
			if d, ok := backend.As[backend.ConsoleDrainer](b); ok {
				if err := d.DrainConsole(ctx, rec.Machine); err != nil {
					vm.m.log.Debug("draining the console", "vm", vm.id, "err", err)
				}
			}
		}
	}
	data, err := consolelog.Tail(filepath.Join(rec.Machine.Dir, "console.log"), consolelog.MaxSize)
	if errors.Is(err, fs.ErrNotExist) {
		return []byte{}, nil
	}
	return data, err
}

// logTail returns the last n lines of the log at path, reading only its
// last 64 KiB.
func logTail(path string, n int) string {
	data, err := consolelog.Tail(path, 64<<10)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func clientAlive(c *agentclient.Client) bool {
	select {
	case <-c.Done():
		return false
	default:
		return true
	}
}
