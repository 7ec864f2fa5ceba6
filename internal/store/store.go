package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Sentinel errors. Errors returned by the store wrap them with %w and name
// the record involved.
var (
	ErrNotFound     = errors.New("not found")
	ErrExists       = errors.New("already exists")
	ErrSchemaTooNew = errors.New("state database was written by a newer smolvm")
	// ErrConflict is wrapped by UpdateVMIfUnchanged when the row changed
	// since it was read.
	ErrConflict = errors.New("changed by another writer")
)

// DBName is the database file inside the data dir.
const DBName = "state.db"

// busyTimeout is how long a statement waits for another connection's write
// lock before failing with SQLITE_BUSY.
const busyTimeout = 10 * time.Second

// Store is the state database. It is safe for concurrent use by several
// goroutines, and several processes may open the same data dir.
type Store struct {
	ops
	db   *sql.DB
	path string
}

// Tx is a transaction started by Store.Tx. It has the same record methods
// as Store; they run inside the transaction.
type Tx struct {
	ops
}

// querier is what *sql.DB and *sql.Tx have in common.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// ops holds the record methods shared by Store and Tx.
type ops struct {
	q querier
}

// Open opens (creating it if needed) the state database in dataDir, which
// is created with mode 0700 if missing, and brings its schema up to date.
// A database whose schema is newer than this code is refused with an error
// wrapping ErrSchemaTooNew.
func Open(ctx context.Context, dataDir string) (*Store, error) {
	if dataDir == "" {
		return nil, errors.New("store: empty data dir")
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("store: create data dir: %w", err)
	}
	path, err := filepath.Abs(filepath.Join(dataDir, DBName))
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	// Private: SQLite would create the database 0644 (and its -wal and
	// -shm files take the database's mode); the VMs' configs and
	// environments are in it.
	if f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY|syscall.O_NOFOLLOW, 0o600); err == nil {
		f.Close()
	}
	params := url.Values{
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()),
			"journal_mode(WAL)",
			"foreign_keys(1)",
		},
		// Every transaction takes the write lock up front, so a
		// read-modify-write never fails half way with SQLITE_BUSY when
		// another connection wrote in between.
		"_txlock": {"immediate"},
	}
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + params.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	if err := migrate(ctx, db, path); err != nil {
		db.Close()
		return nil, err
	}
	return &Store{ops: ops{q: db}, db: db, path: path}, nil
}

// Path returns the database file's absolute path.
func (s *Store) Path() string { return s.path }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Tx runs fn in a transaction (BEGIN IMMEDIATE: it holds the database's
// write lock from the start) and commits it when fn returns nil; otherwise,
// or if fn panics, it rolls back. Inside fn use only tx: writing through the
// Store would wait for the lock tx holds.
func (s *Store) Tx(ctx context.Context, fn func(tx *Tx) error) error {
	sqlTx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("store: begin transaction: %w", err)
	}
	defer sqlTx.Rollback() // no-op after Commit
	if err := fn(&Tx{ops: ops{q: sqlTx}}); err != nil {
		return err
	}
	if err := sqlTx.Commit(); err != nil {
		return fmt.Errorf("store: commit: %w", err)
	}
	return nil
}

// migrations[i] brings the schema from version i to i+1. Append only.
var migrations = []string{
	// 1: initial schema. Times are Unix nanoseconds; JSON is stored as text.
	`
CREATE TABLE vms (
	id            TEXT PRIMARY KEY,
	backend       TEXT NOT NULL,
	status        TEXT NOT NULL,
	config        TEXT,
	machine       TEXT NOT NULL,
	pid           INTEGER NOT NULL DEFAULT 0,
	created_at    INTEGER NOT NULL,
	updated_at    INTEGER NOT NULL,
	restored_from TEXT,
	last_error    TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX vms_created_at ON vms (created_at, id);
CREATE INDEX vms_restored_from ON vms (restored_from);

CREATE TABLE snapshots (
	id             TEXT PRIMARY KEY,
	state          TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
	creator_pid    INTEGER NOT NULL DEFAULT 0,
	vm_id          TEXT NOT NULL,
	backend        TEXT NOT NULL,
	type           TEXT NOT NULL,
	created_at     INTEGER NOT NULL,
	size_bytes     INTEGER NOT NULL DEFAULT 0,
	restored       INTEGER NOT NULL DEFAULT 0,
	restored_vm_id TEXT,
	restore_count  INTEGER NOT NULL DEFAULT 0,
	parent_image   TEXT NOT NULL DEFAULT '',
	manifest       TEXT
) STRICT;
CREATE INDEX snapshots_vm_id ON snapshots (vm_id, created_at);
`,
	// 2: the unprivileged uid each VM's VMM drops to when smolvm runs as
	// root (see AssignUID); released with the VM.
	`
CREATE TABLE vm_uids (
	uid   INTEGER PRIMARY KEY,
	vm_id TEXT NOT NULL UNIQUE REFERENCES vms (id) ON DELETE CASCADE
) STRICT;
`,
	// 3: templates. A template is a snapshot row with a template key (""
	// for a user's snapshot) and what it was built from (JSON); a VM
	// created from a template names it.
	`
ALTER TABLE snapshots ADD COLUMN template_key TEXT NOT NULL DEFAULT '';
ALTER TABLE snapshots ADD COLUMN template TEXT;
CREATE INDEX snapshots_template_key ON snapshots (template_key);
ALTER TABLE vms ADD COLUMN template TEXT NOT NULL DEFAULT '';
`,
	// 4: warm pools. One row per pool: an image and a shape (the options
	// as JSON), and how many restored, paused VMs to keep ready. The
	// members are VM rows (see the SDK's pool.go).
	`
CREATE TABLE pools (
	name       TEXT PRIMARY KEY,
	image      TEXT NOT NULL,
	options    TEXT NOT NULL,
	size       INTEGER NOT NULL CHECK (size > 0),
	updated_at INTEGER NOT NULL
) STRICT;
`,
}

func userVersion(ctx context.Context, q querier) (int, error) {
	var v int
	if err := q.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("store: read schema version: %w", err)
	}
	return v, nil
}

func tooNew(path string, v int) error {
	return fmt.Errorf("store: %s: %w (schema version %d, this smolvm knows up to %d); upgrade smolvm or use another data dir",
		path, ErrSchemaTooNew, v, len(migrations))
}

// migrate applies the missing migrations in one transaction. Concurrent
// openers serialise on the write lock and re-read the version inside it,
// so each migration runs once.
func migrate(ctx context.Context, db *sql.DB, path string) error {
	v, err := userVersion(ctx, db)
	if err != nil {
		return err
	}
	if v > len(migrations) {
		return tooNew(path, v)
	}
	if v == len(migrations) {
		return nil
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("store: begin migration: %w", err)
	}
	defer tx.Rollback()
	if v, err = userVersion(ctx, tx); err != nil {
		return err
	}
	if v > len(migrations) {
		return tooNew(path, v)
	}
	for ; v < len(migrations); v++ {
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			return fmt.Errorf("store: %s: migrate schema to version %d: %w", path, v+1, err)
		}
		// PRAGMA takes no bound parameters; v is an int.
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
			return fmt.Errorf("store: %s: set schema version %d: %w", path, v+1, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("store: %s: commit migration: %w", path, err)
	}
	return nil
}

// Helpers for column encoding.

func toNanos(t time.Time) int64 { return t.UnixNano() }

func fromNanos(n int64) time.Time { return time.Unix(0, n).UTC() }

// nullString maps "" to SQL NULL.
func nullString(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }

// jsonText maps an empty raw message to SQL NULL and rejects invalid JSON.
func jsonText(what string, raw []byte) (sql.NullString, error) {
	if len(raw) == 0 {
		return sql.NullString{}, nil
	}
	if !json.Valid(raw) {
		return sql.NullString{}, fmt.Errorf("%s is not valid JSON", what)
	}
	return sql.NullString{String: string(raw), Valid: true}, nil
}

func rawJSON(s sql.NullString) []byte {
	if !s.Valid || s.String == "" {
		return nil
	}
	return []byte(s.String)
}

// scanner is *sql.Row or *sql.Rows.
type scanner interface {
	Scan(dest ...any) error
}

// rowsAffected returns how many rows a write changed.
func rowsAffected(res sql.Result) (int64, error) {
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("store: rows affected: %w", err)
	}
	return n, nil
}
