package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// ErrNoFreeUID is returned by AssignUID when every uid of the range is
// taken.
var ErrNoFreeUID = errors.New("no free uid in the range")

// AssignUID returns the uid recorded for VM vmID, or records and returns
// the lowest uid in [base, base+count) that no other VM holds and that
// taken does not report as in use (a real user, say; nil: none). It runs in
// one transaction (the database's write lock), so two processes never get
// the same uid. The uid is released when the VM's row is deleted. The VM
// must exist (ErrNotFound otherwise).
func (s *Store) AssignUID(ctx context.Context, vmID string, base, count int, taken func(int) bool) (int, error) {
	if base <= 0 || count <= 0 || base+count-1 > 1<<31-2 {
		return 0, fmt.Errorf("store: assign uid: invalid range %d+%d", base, count)
	}
	var uid int
	err := s.Tx(ctx, func(tx *Tx) error {
		var exists int
		if err := tx.q.QueryRowContext(ctx, `SELECT COUNT(*) FROM vms WHERE id = ?`, vmID).Scan(&exists); err != nil {
			return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
		}
		if exists == 0 {
			return fmt.Errorf("vm %q %w", vmID, ErrNotFound)
		}
		err := tx.q.QueryRowContext(ctx, `SELECT uid FROM vm_uids WHERE vm_id = ?`, vmID).Scan(&uid)
		if err == nil {
			return nil
		}
		if !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
		}
		rows, err := tx.q.QueryContext(ctx, `SELECT uid FROM vm_uids WHERE uid >= ? AND uid < ? ORDER BY uid`, base, base+count)
		if err != nil {
			return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
		}
		used := map[int]bool{}
		for rows.Next() {
			var u int
			if err := rows.Scan(&u); err != nil {
				rows.Close()
				return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
			}
			used[u] = true
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
		}
		uid = 0
		for u := base; u < base+count; u++ {
			if !used[u] && (taken == nil || !taken(u)) {
				uid = u
				break
			}
		}
		if uid == 0 {
			return fmt.Errorf("store: assign uid to vm %q: %w %d-%d", vmID, ErrNoFreeUID, base, base+count-1)
		}
		if _, err := tx.q.ExecContext(ctx, `INSERT INTO vm_uids (uid, vm_id) VALUES (?, ?)`, uid, vmID); err != nil {
			return fmt.Errorf("store: assign uid to vm %q: %w", vmID, err)
		}
		return nil
	})
	return uid, err
}

// UIDOf returns the uid recorded for VM vmID, or 0 when it has none.
func (o ops) UIDOf(ctx context.Context, vmID string) (int, error) {
	var uid int
	err := o.q.QueryRowContext(ctx, `SELECT uid FROM vm_uids WHERE vm_id = ?`, vmID).Scan(&uid)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("store: uid of vm %q: %w", vmID, err)
	}
	return uid, nil
}
