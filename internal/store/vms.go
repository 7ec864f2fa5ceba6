package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// VMStatus is the recorded state of a VM (backend.Status; the strings are
// what the vms table holds).
type VMStatus = backend.Status

// The recorded states, by their store names.
const (
	VMCreated = backend.StatusCreated // prepared, never started
	VMRunning = backend.StatusRunning
	VMPaused  = backend.StatusPaused
	VMStopped = backend.StatusStopped
	VMError   = backend.StatusError // see VM.LastError
)

// VM is one row of the vms table.
type VM struct {
	ID      string
	Backend string
	Status  VMStatus
	// Config is the SDK's configuration of the VM, as JSON. The store
	// only checks that it is valid JSON; nil is stored as NULL.
	Config  json.RawMessage
	Machine backend.Machine // stored as JSON
	PID     int             // VMM process id, 0 when none
	// CreatedAt and UpdatedAt are kept with nanosecond precision and
	// returned in UTC. CreateVM fills zero values with the current time;
	// UpdateVM always sets UpdatedAt to the current time, or one nanosecond
	// past the previous UpdatedAt when the clock has not moved past it.
	CreatedAt time.Time
	UpdatedAt time.Time
	// RestoredFrom is the id of the snapshot the VM was restored from,
	// "" when it was booted from an image.
	RestoredFrom string
	LastError    string
	// Template is the key of the template the VM was created from (""
	// when it was not); it stays when the template is deleted.
	Template string
}

const vmColumns = `id, backend, status, config, machine, pid, created_at, updated_at, restored_from, last_error, template`

// checkVM validates v and encodes its JSON columns.
func checkVM(v VM) (config sql.NullString, machine string, err error) {
	if err := ValidID(v.ID); err != nil {
		return config, "", fmt.Errorf("vm: %w", err)
	}
	if !v.Status.Valid() {
		return config, "", fmt.Errorf("vm %q: invalid status %q (want created, running, paused, stopped or error)", v.ID, v.Status)
	}
	if config, err = jsonText("config", v.Config); err != nil {
		return config, "", fmt.Errorf("vm %q: %w", v.ID, err)
	}
	m, err := json.Marshal(v.Machine)
	if err != nil {
		return config, "", fmt.Errorf("vm %q: encode machine: %w", v.ID, err)
	}
	return config, string(m), nil
}

func scanVM(sc scanner) (VM, error) {
	var (
		v                  VM
		status, machine    string
		config, restored   sql.NullString
		createdAt, updated int64
	)
	if err := sc.Scan(&v.ID, &v.Backend, &status, &config, &machine, &v.PID,
		&createdAt, &updated, &restored, &v.LastError, &v.Template); err != nil {
		return VM{}, err
	}
	v.Status = VMStatus(status)
	v.Config = rawJSON(config)
	if err := json.Unmarshal([]byte(machine), &v.Machine); err != nil {
		return VM{}, fmt.Errorf("store: vm %q: decode machine: %w", v.ID, err)
	}
	v.CreatedAt, v.UpdatedAt = fromNanos(createdAt), fromNanos(updated)
	v.RestoredFrom = restored.String
	return v, nil
}

// CreateVM inserts v. An existing VM with the same id gives an error
// wrapping ErrExists.
func (o ops) CreateVM(ctx context.Context, v VM) error {
	now := time.Now()
	if v.CreatedAt.IsZero() {
		v.CreatedAt = now
	}
	if v.UpdatedAt.IsZero() {
		v.UpdatedAt = v.CreatedAt
	}
	config, machine, err := checkVM(v)
	if err != nil {
		return fmt.Errorf("store: create %w", err)
	}
	res, err := o.q.ExecContext(ctx, `INSERT INTO vms (`+vmColumns+`)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
		v.ID, v.Backend, string(v.Status), config, machine, v.PID,
		toNanos(v.CreatedAt), toNanos(v.UpdatedAt), nullString(v.RestoredFrom), v.LastError, v.Template)
	if err != nil {
		return fmt.Errorf("store: create vm %q: %w", v.ID, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("vm %q %w", v.ID, ErrExists)
	}
	return nil
}

// GetVM returns the VM with the given id, or an error wrapping ErrNotFound.
func (o ops) GetVM(ctx context.Context, id string) (VM, error) {
	v, err := scanVM(o.q.QueryRowContext(ctx, `SELECT `+vmColumns+` FROM vms WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return VM{}, fmt.Errorf("vm %q %w", id, ErrNotFound)
	}
	if err != nil {
		return VM{}, fmt.Errorf("store: get vm %q: %w", id, err)
	}
	return v, nil
}

// ListVMs returns all VMs, oldest first.
func (o ops) ListVMs(ctx context.Context) ([]VM, error) {
	return o.listVMs(ctx, "list vms", `SELECT `+vmColumns+` FROM vms ORDER BY created_at, id`)
}

// VMsRestoredFrom returns the VMs restored from the given snapshot, oldest
// first.
func (o ops) VMsRestoredFrom(ctx context.Context, snapshotID string) ([]VM, error) {
	return o.listVMs(ctx, fmt.Sprintf("list vms restored from %q", snapshotID),
		`SELECT `+vmColumns+` FROM vms WHERE restored_from = ? ORDER BY created_at, id`, snapshotID)
}

func (o ops) listVMs(ctx context.Context, what, query string, args ...any) ([]VM, error) {
	rows, err := o.q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	defer rows.Close()
	var vms []VM
	for rows.Next() {
		v, err := scanVM(rows)
		if err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, err)
		}
		vms = append(vms, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	return vms, nil
}

// UpdateVM replaces every field of the VM with v's id except CreatedAt,
// and sets UpdatedAt to the current time (always later than the row's
// previous UpdatedAt, so it versions the row). A missing VM gives an error
// wrapping ErrNotFound.
//
// The caller holds the VM's lock (LockVM) and read v under it: writers
// that hold it exclude each other. A writer without the lock (a status
// reconciliation) uses UpdateVMIfUnchanged instead, so it never writes
// back a row that a lock holder changed meanwhile.
func (o ops) UpdateVM(ctx context.Context, v VM) error {
	return o.updateVM(ctx, v, false)
}

// UpdateVMIfUnchanged is UpdateVM as a compare-and-set: it writes v only
// if the row's UpdatedAt still equals v.UpdatedAt (the version v was read
// at), else it changes nothing and returns an error wrapping ErrConflict
// (re-read the row and decide again).
func (o ops) UpdateVMIfUnchanged(ctx context.Context, v VM) error {
	return o.updateVM(ctx, v, true)
}

func (o ops) updateVM(ctx context.Context, v VM, cas bool) error {
	seen := toNanos(v.UpdatedAt)
	v.UpdatedAt = time.Now()
	config, machine, err := checkVM(v)
	if err != nil {
		return fmt.Errorf("store: update %w", err)
	}
	query := `UPDATE vms SET backend = ?, status = ?, config = ?, machine = ?, pid = ?,
		updated_at = MAX(?, updated_at + 1), restored_from = ?, last_error = ?, template = ? WHERE id = ?`
	args := []any{v.Backend, string(v.Status), config, machine, v.PID,
		toNanos(v.UpdatedAt), nullString(v.RestoredFrom), v.LastError, v.Template, v.ID}
	if cas {
		query += ` AND updated_at = ?`
		args = append(args, seen)
	}
	res, err := o.q.ExecContext(ctx, query, args...)
	if err != nil {
		return fmt.Errorf("store: update vm %q: %w", v.ID, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		if _, err := o.GetVM(ctx, v.ID); cas && err == nil {
			return fmt.Errorf("store: update vm %q: %w since it was read", v.ID, ErrConflict)
		}
		return fmt.Errorf("vm %q %w", v.ID, ErrNotFound)
	}
	return nil
}

// DeleteVM deletes the VM with the given id, or returns an error wrapping
// ErrNotFound.
func (o ops) DeleteVM(ctx context.Context, id string) error {
	res, err := o.q.ExecContext(ctx, `DELETE FROM vms WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("store: delete vm %q: %w", id, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("vm %q %w", id, ErrNotFound)
	}
	return nil
}
