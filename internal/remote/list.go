package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
)

// List returns the snapshots in the store, by id. An index that does not
// parse (corrupt, or from a newer smolvm) is left out rather than failing
// the whole listing; Stat on its id says what is wrong with it.
func List(ctx context.Context, st Store) ([]Entry, error) {
	keys, err := st.List(ctx, "snapshots/")
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, k := range keys {
		id, ok := strings.CutSuffix(strings.TrimPrefix(k, "snapshots/"), ".json")
		if !ok || ValidateID(id) != nil {
			continue
		}
		e, err := Stat(ctx, st, id)
		if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNewer) || errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Stat returns the entry of snapshot id (ErrNotFound when it is not in the store).
func Stat(ctx context.Context, st Store, id string) (Entry, error) {
	ix, err := readIndex(ctx, st, id)
	if err != nil {
		return Entry{}, err
	}
	return Entry{ID: ix.ID, Manifest: ix.Manifest, DataBytes: ix.DataBytes, PushedAt: ix.PushedAt}, nil
}

// Delete removes the index of snapshot id (ErrNotFound when absent); its
// chunks stay, shared with other snapshots (garbage collection: open).
func Delete(ctx context.Context, st Store, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	ok, err := st.Exists(ctx, indexKey(id))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%w: snapshot %s", ErrNotFound, id)
	}
	return st.Delete(ctx, indexKey(id))
}

// SizeLister is an optional Store method: the keys under prefix with their
// sizes in bytes. Usage uses it when the store has it (S3 does).
type SizeLister interface {
	ListSizes(ctx context.Context, prefix string) (map[string]int64, error)
}

// Usage says what the store holds in chunks: their count and stored
// (compressed) bytes. For figures (dedup ratio) and benchmarks.
func Usage(ctx context.Context, st Store) (chunks int, bytes int64, err error) {
	if sl, ok := st.(SizeLister); ok {
		m, err := sl.ListSizes(ctx, "chunks/")
		if err != nil {
			return 0, 0, err
		}
		for _, n := range m {
			bytes += n
		}
		return len(m), bytes, nil
	}
	keys, err := st.List(ctx, "chunks/")
	if err != nil {
		return 0, 0, err
	}
	for _, k := range keys {
		rc, err := st.Get(ctx, k)
		if err != nil {
			return 0, 0, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return 0, 0, err
		}
		bytes += n
	}
	return len(keys), bytes, nil
}
