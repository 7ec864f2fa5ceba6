package smolvm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
)

// APISocketPath is where `smolvm serve` listens for the data dir of opts:
// <RunDir>/api-<12 hex of sha256(DataDir + "\x00api")>.sock, in the
// private run dir (Options.RunDir's default rules). $SMOLVM_API_SOCKET,
// when set, overrides it (for clients and the daemon alike).
func APISocketPath(opts Options) string {
	if p := os.Getenv("SMOLVM_API_SOCKET"); p != "" {
		return p
	}
	opts = opts.withDefaults()
	dataDir, err := filepath.Abs(opts.DataDir)
	if err != nil {
		dataDir = opts.DataDir
	}
	runDir, err := filepath.Abs(opts.RunDir)
	if err != nil {
		runDir = opts.RunDir
	}
	sum := sha256.Sum256([]byte(dataDir + "\x00api"))
	return filepath.Join(runDir, "api-"+hex.EncodeToString(sum[:])[:12]+".sock")
}

// RunDir is the Manager's private run dir (unix sockets).
func (m *Manager) RunDir() string { return m.opts.RunDir }

// Reconcile brings the state in line with what runs, as a long-lived
// process (the API daemon) does when it starts: every VM record is
// reconciled with its VMM (a VMM that died while nobody watched is
// recorded stopped), and what interrupted snapshot creates and deletes
// left (pending rows of dead processes, unlisted directories) is removed.
// It returns how many VMs it looked at and how many leftovers it removed.
func (m *Manager) Reconcile(ctx context.Context) (vms, removed int, err error) {
	removed, err = m.cleanupSnapshots(ctx)
	if err != nil {
		return 0, removed, err
	}
	infos, err := m.List(ctx)
	return len(infos), removed, err
}
