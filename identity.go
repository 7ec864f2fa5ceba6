package smolvm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
)

// A VM's identity is its id (the hostname), its MAC and its machine-id, all
// in its launch spec, plus fresh randomness and the host's clock. None of it
// is on the kernel command line: a memory image (a snapshot, a template)
// would keep that command line, and every VM restored from it would show
// another VM's name in /proc/cmdline and dmesg. Instead every path that
// brings a guest up gives it its identity through the agent, right after
// the agent answers: a cold boot (Start, afterBoot), a restore
// (FromSnapshot), each fork clone, and a VM restored from a template.

// identityTimeout bounds applyIdentity when the caller's context allows
// longer: the guest is up and answering, so this is two small requests.
const identityTimeout = 20 * time.Second

// seedSize is how many random bytes each identity change mixes into the
// guest's entropy pool.
const seedSize = 64

// newMachineID draws a machine-id for a new VM: 128 random bits as 32
// lowercase hex digits (machine-id(5)).
func newMachineID() string {
	for {
		b := make([]byte, 16)
		rand.Read(b)
		if id := hex.EncodeToString(b); agentproto.ValidMachineID(id) {
			return id
		}
	}
}

// identityFor is the identity the guest of spec must have.
func identityFor(spec backend.Spec) agentproto.SetIdentityRequest {
	return agentproto.SetIdentityRequest{Hostname: hostnameFor(spec.ID), MAC: spec.MAC, MachineID: spec.MachineID}
}

// applyIdentity makes the guest behind c the VM that spec describes: the
// host's clock, its hostname (its id), eth0's MAC, its machine-id, and a
// fresh seed mixed into the kernel's pool with the CRNG reseeded from it.
// Every path that brings a guest up calls it once its agent answers (cold
// boot, restore, fork clone, template restore), so a VM restored from a
// memory image is told the same things a cold-booted one is. Values the
// guest already holds cost nothing (the agent compares first).
func (vm *VM) applyIdentity(ctx context.Context, c *agentclient.Client, spec backend.Spec) error {
	return vm.setClockAndIdentity(ctx, c, identityFor(spec))
}

// setClockAndIdentity sends set_time without waiting (the agent applies
// it before it reads the next request), then set_identity with req and a
// new seed, then collects both replies: one round trip for both, which
// counts when many clones share few cores.
func (vm *VM) setClockAndIdentity(ctx context.Context, c *agentclient.Client, req agentproto.SetIdentityRequest) error {
	ctx, cancel := context.WithTimeout(ctx, identityTimeout)
	defer cancel()
	req.Seed = make([]byte, seedSize)
	rand.Read(req.Seed)
	if err := req.Validate(); err != nil {
		return fmt.Errorf("the identity of vm %s: %w", vm.id, err)
	}
	waitTime, err := c.SendSetTime(ctx, time.Now())
	if err != nil {
		return fmt.Errorf("setting the guest clock: %w", err)
	}
	idErr := c.SetIdentityRequest(ctx, req)
	if err := waitTime(ctx); err != nil {
		return fmt.Errorf("setting the guest clock: %w", err)
	}
	if idErr != nil {
		return fmt.Errorf("setting the guest identity: %w", idErr)
	}
	return nil
}

// refreshGuest is what a resumed guest gets: the host's clock (it stood
// still while paused) and fresh randomness (a VM restored paused from a
// snapshot shares its CRNG state with every other restore of it). Names
// are left alone: a paused VM kept its own. Best effort: a guest that is
// still booting (a paused disk restore) sets its clock from the RTC and
// its name from its disk.
func (vm *VM) refreshGuest(ctx context.Context, c *agentclient.Client) {
	if err := vm.setClockAndIdentity(ctx, c, agentproto.SetIdentityRequest{}); err != nil && !errors.Is(err, agentclient.ErrDisconnected) {
		vm.m.log.Debug("refreshing a resumed guest", "vm", vm.id, "err", err)
	}
}
