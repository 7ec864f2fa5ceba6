// Package store keeps smolvm's state — VMs and snapshots — in a SQLite
// database at <dataDir>/state.db, using the pure-Go modernc.org/sqlite
// driver.
//
// The database runs in WAL mode with a busy timeout, and every transaction
// starts with BEGIN IMMEDIATE, so one state directory can be shared by
// several goroutines and several processes. The schema is versioned with
// PRAGMA user_version; Open applies missing migrations and refuses a
// database written by a newer smolvm (ErrSchemaTooNew).
//
// Snapshot rows have two states. ReserveSnapshot inserts a 'pending' row,
// which claims the id (a second creator, in any process, gets ErrExists);
// CommitSnapshot turns it 'ready' once the artifacts are on disk and
// AbortSnapshot drops it. Only ready snapshots are visible to GetSnapshot,
// ListSnapshots, UpdateSnapshot and DeleteSnapshot; ListPendingSnapshots
// returns the pending ones with their creator's pid, for cleaning up after
// creators that died.
//
// The database serialises single statements, not whole operations. Code
// that must not run concurrently with another process working on the same
// VM or snapshot (start, stop, snapshot, delete) takes LockVM or
// LockSnapshot, an flock(2) on a file under <dataDir>/locks that the kernel
// releases when the holder dies.
//
// Ids of VMs and snapshots are checked with ValidID: they end up in file
// names, so the rule is strict.
package store
