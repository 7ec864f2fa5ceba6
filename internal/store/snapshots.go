package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// SnapshotState says whether a snapshot row is complete.
type SnapshotState string

const (
	// SnapshotPending: the snapshot is being written (or its creator died).
	// The row only reserves the id.
	SnapshotPending SnapshotState = "pending"
	// SnapshotReady: the artifacts are complete and the snapshot usable.
	SnapshotReady SnapshotState = "ready"
)

// Snapshot is one row of the snapshots table.
type Snapshot struct {
	ID        string
	VMID      string // the VM it was taken from (which may since be deleted)
	Backend   string
	Type      backend.SnapshotKind
	CreatedAt time.Time // nanosecond precision, returned in UTC
	SizeBytes int64
	// Restored reports whether the snapshot was ever restored;
	// RestoredVMID is the latest VM restored from it ("" for none) and
	// RestoreCount how many times it was restored.
	Restored     bool
	RestoredVMID string
	RestoreCount int
	ParentImage  string // base image a diff snapshot's disk depends on
	// Manifest is the SDK's snapshot manifest, as JSON; nil is stored as
	// NULL.
	Manifest json.RawMessage
	// TemplateKey is the key of the template this snapshot is ("" for a
	// user's snapshot: only those are listed by ListSnapshots), and
	// Template what the SDK recorded about it (JSON). Both are written by
	// ReserveSnapshot and CommitSnapshot and never changed after.
	TemplateKey string
	Template    json.RawMessage

	// State and CreatorPID are maintained by the store: ReserveSnapshot
	// writes a pending row with the creator's pid (os.Getpid() when
	// CreatorPID is 0) and CommitSnapshot makes it ready.
	State      SnapshotState
	CreatorPID int
}

const snapshotColumns = `id, state, creator_pid, vm_id, backend, type, created_at, size_bytes,
	restored, restored_vm_id, restore_count, parent_image, manifest, template_key, template`

// checkSnapshot validates s and encodes its manifest and template.
func checkSnapshot(s Snapshot) (manifest, template sql.NullString, err error) {
	if err := ValidID(s.ID); err != nil {
		return manifest, template, fmt.Errorf("snapshot: %w", err)
	}
	if manifest, err = jsonText("manifest", s.Manifest); err != nil {
		return manifest, template, fmt.Errorf("snapshot %q: %w", s.ID, err)
	}
	if template, err = jsonText("template", s.Template); err != nil {
		return manifest, template, fmt.Errorf("snapshot %q: %w", s.ID, err)
	}
	return manifest, template, nil
}

func scanSnapshot(sc scanner) (Snapshot, error) {
	var (
		s                    Snapshot
		state, typ           string
		createdAt            int64
		restoredVM, manifest sql.NullString
		template             sql.NullString
	)
	if err := sc.Scan(&s.ID, &state, &s.CreatorPID, &s.VMID, &s.Backend, &typ,
		&createdAt, &s.SizeBytes, &s.Restored, &restoredVM, &s.RestoreCount,
		&s.ParentImage, &manifest, &s.TemplateKey, &template); err != nil {
		return Snapshot{}, err
	}
	s.State, s.Type = SnapshotState(state), backend.SnapshotKind(typ)
	s.CreatedAt = fromNanos(createdAt)
	s.RestoredVMID = restoredVM.String
	s.Manifest = rawJSON(manifest)
	s.Template = rawJSON(template)
	return s, nil
}

// ReserveSnapshot claims s.ID by inserting a pending row with s's fields.
// If any row with that id exists, pending or ready, written by this process
// or another, it returns an error wrapping ErrExists. CreatedAt defaults to
// now and CreatorPID to this process's pid.
func (o ops) ReserveSnapshot(ctx context.Context, s Snapshot) error {
	s.State = SnapshotPending
	if s.CreatorPID == 0 {
		s.CreatorPID = os.Getpid()
	}
	if s.CreatedAt.IsZero() {
		s.CreatedAt = time.Now()
	}
	manifest, template, err := checkSnapshot(s)
	if err != nil {
		return fmt.Errorf("store: reserve %w", err)
	}
	res, err := o.q.ExecContext(ctx, `INSERT INTO snapshots (`+snapshotColumns+`)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
		s.ID, string(s.State), s.CreatorPID, s.VMID, s.Backend, string(s.Type),
		toNanos(s.CreatedAt), s.SizeBytes, s.Restored, nullString(s.RestoredVMID),
		s.RestoreCount, s.ParentImage, manifest, s.TemplateKey, template)
	if err != nil {
		return fmt.Errorf("store: reserve snapshot %q: %w", s.ID, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("snapshot %q %w", s.ID, ErrExists)
	}
	return nil
}

// CommitSnapshot turns the pending snapshot id into a ready one with the
// fields of final (final.ID must be id or empty). A zero final.CreatedAt
// keeps the reservation's time; the creator pid is kept. Without a pending
// row of that id it returns an error wrapping ErrNotFound.
func (o ops) CommitSnapshot(ctx context.Context, id string, final Snapshot) error {
	if final.ID == "" {
		final.ID = id
	}
	if final.ID != id {
		return fmt.Errorf("store: commit snapshot %q: final record has id %q", id, final.ID)
	}
	manifest, template, err := checkSnapshot(final)
	if err != nil {
		return fmt.Errorf("store: commit %w", err)
	}
	var created any // NULL: COALESCE keeps the reservation's time
	if !final.CreatedAt.IsZero() {
		created = toNanos(final.CreatedAt)
	}
	res, err := o.q.ExecContext(ctx, `UPDATE snapshots SET state = 'ready', vm_id = ?, backend = ?, type = ?,
		created_at = COALESCE(?, created_at), size_bytes = ?, restored = ?, restored_vm_id = ?,
		restore_count = ?, parent_image = ?, manifest = ?, template_key = ?, template = ?
		WHERE id = ? AND state = 'pending'`,
		final.VMID, final.Backend, string(final.Type), created, final.SizeBytes, final.Restored,
		nullString(final.RestoredVMID), final.RestoreCount, final.ParentImage, manifest,
		final.TemplateKey, template, id)
	if err != nil {
		return fmt.Errorf("store: commit snapshot %q: %w", id, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("pending snapshot %q %w", id, ErrNotFound)
	}
	return nil
}

// AbortSnapshot deletes the pending row of id, releasing the id. Without a
// pending row of that id (a ready snapshot is left alone) it returns an
// error wrapping ErrNotFound.
func (o ops) AbortSnapshot(ctx context.Context, id string) error {
	res, err := o.q.ExecContext(ctx, `DELETE FROM snapshots WHERE id = ? AND state = 'pending'`, id)
	if err != nil {
		return fmt.Errorf("store: abort snapshot %q: %w", id, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("pending snapshot %q %w", id, ErrNotFound)
	}
	return nil
}

// GetSnapshot returns the ready snapshot id, or an error wrapping
// ErrNotFound (also while the snapshot is pending).
func (o ops) GetSnapshot(ctx context.Context, id string) (Snapshot, error) {
	s, err := scanSnapshot(o.q.QueryRowContext(ctx,
		`SELECT `+snapshotColumns+` FROM snapshots WHERE id = ? AND state = 'ready'`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, fmt.Errorf("snapshot %q %w", id, ErrNotFound)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("store: get snapshot %q: %w", id, err)
	}
	return s, nil
}

// ListSnapshots returns the ready user snapshots (not templates) taken
// from vmID, or all of them when vmID is "", oldest first.
func (o ops) ListSnapshots(ctx context.Context, vmID string) ([]Snapshot, error) {
	return o.listSnapshots(ctx, "list snapshots", `SELECT `+snapshotColumns+` FROM snapshots
		WHERE state = 'ready' AND template_key = '' AND (?1 = '' OR vm_id = ?1) ORDER BY created_at, id`, vmID)
}

// ListTemplates returns the ready templates (snapshots with a template
// key), oldest first.
func (o ops) ListTemplates(ctx context.Context) ([]Snapshot, error) {
	return o.listSnapshots(ctx, "list templates", `SELECT `+snapshotColumns+` FROM snapshots
		WHERE state = 'ready' AND template_key != '' ORDER BY created_at, id`)
}

// GetTemplate returns the ready template with the key, or an error
// wrapping ErrNotFound.
func (o ops) GetTemplate(ctx context.Context, key string) (Snapshot, error) {
	s, err := scanSnapshot(o.q.QueryRowContext(ctx,
		`SELECT `+snapshotColumns+` FROM snapshots WHERE template_key = ? AND template_key != '' AND state = 'ready'`, key))
	if errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, fmt.Errorf("template %q %w", key, ErrNotFound)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("store: get template %q: %w", key, err)
	}
	return s, nil
}

// ListPendingSnapshots returns the pending snapshots, oldest first. A
// pending row whose CreatorPID is no longer alive (or is old enough) was
// left by a creator that died; cleanup removes its directory and calls
// AbortSnapshot.
func (o ops) ListPendingSnapshots(ctx context.Context) ([]Snapshot, error) {
	return o.listSnapshots(ctx, "list pending snapshots", `SELECT `+snapshotColumns+` FROM snapshots
		WHERE state = 'pending' ORDER BY created_at, id`)
}

func (o ops) listSnapshots(ctx context.Context, what, query string, args ...any) ([]Snapshot, error) {
	rows, err := o.q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	defer rows.Close()
	var snaps []Snapshot
	for rows.Next() {
		s, err := scanSnapshot(rows)
		if err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, err)
		}
		snaps = append(snaps, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	return snaps, nil
}

// UpdateSnapshot replaces the fields of the ready snapshot s.ID, except
// CreatedAt, State, CreatorPID, TemplateKey and Template. Without a ready snapshot of that id it
// returns an error wrapping ErrNotFound.
func (o ops) UpdateSnapshot(ctx context.Context, s Snapshot) error {
	manifest, _, err := checkSnapshot(s)
	if err != nil {
		return fmt.Errorf("store: update %w", err)
	}
	res, err := o.q.ExecContext(ctx, `UPDATE snapshots SET vm_id = ?, backend = ?, type = ?, size_bytes = ?,
		restored = ?, restored_vm_id = ?, restore_count = ?, parent_image = ?, manifest = ?
		WHERE id = ? AND state = 'ready'`,
		s.VMID, s.Backend, string(s.Type), s.SizeBytes, s.Restored, nullString(s.RestoredVMID),
		s.RestoreCount, s.ParentImage, manifest, s.ID)
	if err != nil {
		return fmt.Errorf("store: update snapshot %q: %w", s.ID, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("snapshot %q %w", s.ID, ErrNotFound)
	}
	return nil
}

// DeleteSnapshot deletes the ready snapshot id, or returns an error
// wrapping ErrNotFound. Pending rows are removed with AbortSnapshot. VMs
// restored from the snapshot keep their RestoredFrom.
func (o ops) DeleteSnapshot(ctx context.Context, id string) error {
	res, err := o.q.ExecContext(ctx, `DELETE FROM snapshots WHERE id = ? AND state = 'ready'`, id)
	if err != nil {
		return fmt.Errorf("store: delete snapshot %q: %w", id, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("snapshot %q %w", id, ErrNotFound)
	}
	return nil
}
