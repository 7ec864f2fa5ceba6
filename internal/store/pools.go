package store

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
)

// Pool is one row of the pools table: keep Size restored, paused VMs of
// Image with Options (the SDK's shape, as JSON) ready.
type Pool struct {
	Name      string
	Image     string
	Options   json.RawMessage
	Size      int
	UpdatedAt time.Time
}

// PutPool creates or replaces the pool p.Name.
func (o ops) PutPool(ctx context.Context, p Pool) error {
	if p.Name == "" || p.Size <= 0 || !json.Valid(p.Options) {
		return fmt.Errorf("store: pool %q: invalid (size %d)", p.Name, p.Size)
	}
	_, err := o.q.ExecContext(ctx, `INSERT INTO pools (name, image, options, size, updated_at) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET image = excluded.image, options = excluded.options, size = excluded.size, updated_at = excluded.updated_at`,
		p.Name, p.Image, string(p.Options), p.Size, toNanos(time.Now()))
	if err != nil {
		return fmt.Errorf("store: put pool %q: %w", p.Name, err)
	}
	return nil
}

// DeletePool deletes the pool name (ErrNotFound when there is none).
func (o ops) DeletePool(ctx context.Context, name string) error {
	res, err := o.q.ExecContext(ctx, `DELETE FROM pools WHERE name = ?`, name)
	if err != nil {
		return fmt.Errorf("store: delete pool %q: %w", name, err)
	}
	if n, err := rowsAffected(res); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("pool %q %w", name, ErrNotFound)
	}
	return nil
}

// ListPools returns the pools by name.
func (o ops) ListPools(ctx context.Context) ([]Pool, error) {
	rows, err := o.q.QueryContext(ctx, `SELECT name, image, options, size, updated_at FROM pools ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("store: list pools: %w", err)
	}
	defer rows.Close()
	var out []Pool
	for rows.Next() {
		var p Pool
		var opts string
		var at int64
		if err := rows.Scan(&p.Name, &p.Image, &opts, &p.Size, &at); err != nil {
			return nil, fmt.Errorf("store: list pools: %w", err)
		}
		p.Options, p.UpdatedAt = json.RawMessage(opts), fromNanos(at)
		out = append(out, p)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: list pools: %w", err)
	}
	return out, nil
}

// MoveUID gives the uid recorded for VM from to VM to (which must exist
// and hold none): a pool member claimed by a VM keeps its VMM, which runs
// as that uid. Nothing happens when from holds no uid.
func (o ops) MoveUID(ctx context.Context, from, to string) error {
	if _, err := o.q.ExecContext(ctx, `DELETE FROM vm_uids WHERE vm_id = ?`, to); err != nil {
		return fmt.Errorf("store: move uid of vm %q: %w", from, err)
	}
	_, err := o.q.ExecContext(ctx, `UPDATE vm_uids SET vm_id = ? WHERE vm_id = ?`, to, from)
	if err != nil {
		return fmt.Errorf("store: move uid of vm %q to %q: %w", from, to, err)
	}
	return nil
}
