// Package lifetime keeps the daemon's per-sandbox lifetimes: a deadline
// (the API's timeout_s) with what happens when it passes (pause or
// delete), and an idle timeout (no API call on the sandbox for that long:
// pause). A Keeper persists them in one versioned file in the data dir
// (lifetimes.json, written atomically, 0600), so they survive a restart of
// the daemon, and its reaper (Run) acts on them.
//
// Pausing a sandbox takes a full snapshot of it (memory, device state and
// disk) and then stops it, so an expired sandbox holds no host memory or
// CPU; Resume restores that snapshot into the same id, with the processes
// and the tmpfs files it had. The snapshot is an ordinary one (it is
// listed); it is deleted when the sandbox is paused again or forgotten.
//
// The reaper checks a sandbox is still due just before it acts; a call on
// the sandbox that starts while its pause runs (the snapshot pauses the
// guest) fails or waits, as with any concurrent pause. Resume waits for a
// pause in progress on the same sandbox, then restores it.
//
// A failed pause or delete is logged, reported to Run's callback and
// retried with a growing pause (1 s doubling, at most 5 min); the sandbox
// and its record stay as they were, never removed or marked paused
// without its snapshot.
package lifetime

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Action is what happens to a sandbox when its lifetime runs out.
type Action string

const (
	// ActionPause snapshots the sandbox's memory to a full snapshot, then
	// stops it; Resume restores that snapshot into the same id.
	ActionPause Action = "pause"
	// ActionDelete deletes the sandbox.
	ActionDelete Action = "delete"
)

// Valid reports whether a is one of the actions.
func (a Action) Valid() bool { return a == ActionPause || a == ActionDelete }

// Lifetime is one sandbox's lifetime and auto-pause state.
type Lifetime struct {
	ID     string `json:"id"`
	Action Action `json:"action"` // at the deadline
	// TTL is the lifetime Set or Extend gave last (0: none); Resume
	// starts it again.
	TTL time.Duration `json:"ttl_ns"`
	// Deadline is when Action happens (zero: no deadline).
	Deadline time.Time `json:"deadline,omitzero"`
	// Idle pauses the sandbox after this long without activity (Touch);
	// 0: never.
	Idle time.Duration `json:"idle_ns"`
	// LastActive is the last Touch (or Set, Extend, Resume). It is kept
	// in memory between writes of the file; a Keeper that loads the file
	// counts its start as activity.
	LastActive time.Time `json:"last_active"`

	// Paused says the Keeper paused the sandbox: it is stopped and
	// Snapshot holds its memory.
	Paused   bool      `json:"paused,omitempty"`
	PausedAt time.Time `json:"paused_at,omitzero"`
	// Snapshot is the snapshot of the pause: set once it is taken (before
	// the sandbox is stopped, so a pause that failed after it reuses it).
	Snapshot string `json:"snapshot,omitempty"`
	// Previous is the snapshot the running sandbox was resumed from; it is
	// deleted at the next pause (once the sandbox is stopped) or Forget.
	Previous string `json:"previous,omitempty"`

	// Failures counts the failed attempts at the due action in a row;
	// LastError is the last one's error; the next is not before NextTry.
	Failures  int       `json:"failures,omitempty"`
	LastError string    `json:"last_error,omitempty"`
	NextTry   time.Time `json:"next_try,omitzero"`
}

// FileName is the Keeper's file in the data dir.
const FileName = "lifetimes.json"

const (
	fileVersion = 1
	maxFileSize = 16 << 20 // bytes: far above any real number of sandboxes
	maxEntries  = 100000
	// MaxTTL bounds a lifetime and an idle timeout.
	MaxTTL = 366 * 24 * time.Hour
	// MinIdle is the shortest idle timeout.
	MinIdle   = time.Second
	maxBackof = 5 * time.Minute
	// opTimeout bounds one pause, delete or resume.
	opTimeout = 10 * time.Minute
)

// file is the persisted form.
type file struct {
	Version   int        `json:"version"`
	Lifetimes []Lifetime `json:"lifetimes"`
}

// Keeper holds the lifetimes of one data dir's sandboxes. It is safe for
// concurrent use. One daemon per data dir runs one Keeper (the daemon's
// serve.lock guarantees it).
type Keeper struct {
	m    *smolvm.Manager
	log  *slog.Logger
	path string

	mu sync.Mutex
	l  map[string]*Lifetime

	wmu   sync.Mutex // serializes writes of the file
	busy  idLocks    // one operation per sandbox at a time
	now   func() time.Time
	tick  time.Duration
	pause func(ctx context.Context, id string, l Lifetime) (Lifetime, error)
}

// New loads the lifetimes of m's data dir. A file that is not a private
// regular file of this user, too large, of an unknown version or with an
// invalid entry is refused (fix: remove it; the sandboxes stay, without
// lifetimes).
func New(m *smolvm.Manager, log *slog.Logger) (*Keeper, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	k := &Keeper{m: m, log: log, path: filepath.Join(m.DataDir(), FileName),
		l: map[string]*Lifetime{}, now: time.Now, tick: time.Second}
	k.busy.m = map[string]chan struct{}{}
	k.pause = k.pauseVM
	ls, err := load(k.path)
	if err != nil {
		return nil, &smolvm.Error{Op: "lifetimes", Message: fmt.Sprintf("cannot load the sandbox lifetimes from %s: %v", k.path, err),
			Fix: smolvm.Fix{Action: smolvm.FixRemoveDir, Args: map[string]string{smolvm.ArgPath: k.path}}, Err: errors.Join(smolvm.ErrInvalidConfig, err)}
	}
	now := k.now()
	for i := range ls {
		l := ls[i]
		l.LastActive = now // a restart counts as activity: idle time is not known across it
		k.l[l.ID] = &l
	}
	return k, nil
}

// load reads and validates the file at path (none: no lifetimes).
func load(path string) ([]Lifetime, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.Mode().IsRegular() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return nil, errors.New("not a private regular file of this user (want mode 0600)")
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFileSize {
		return nil, fmt.Errorf("larger than %d bytes", maxFileSize)
	}
	return parse(b)
}

// parse decodes and validates the file's bytes.
func parse(b []byte) ([]Lifetime, error) {
	var fl file
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fl); err != nil {
		return nil, fmt.Errorf("malformed: %w", err)
	}
	if fl.Version != fileVersion {
		return nil, fmt.Errorf("version %d, this smolvm reads version %d", fl.Version, fileVersion)
	}
	if len(fl.Lifetimes) > maxEntries {
		return nil, fmt.Errorf("%d entries, at most %d", len(fl.Lifetimes), maxEntries)
	}
	seen := map[string]bool{}
	for _, l := range fl.Lifetimes {
		if err := l.validate(); err != nil {
			return nil, err
		}
		if seen[l.ID] {
			return nil, fmt.Errorf("sandbox %q listed twice", l.ID)
		}
		seen[l.ID] = true
	}
	return fl.Lifetimes, nil
}

func (l Lifetime) validate() error {
	if err := smolvm.ValidateID(l.ID); err != nil {
		return err
	}
	for _, s := range []string{l.Snapshot, l.Previous} {
		if s != "" {
			if err := smolvm.ValidateID(s); err != nil {
				return err
			}
		}
	}
	if !l.Action.Valid() {
		return fmt.Errorf("sandbox %s: unknown action %q", l.ID, l.Action)
	}
	if l.TTL < 0 || l.TTL > MaxTTL || l.Idle < 0 || l.Idle > MaxTTL || l.Failures < 0 {
		return fmt.Errorf("sandbox %s: lifetime out of range", l.ID)
	}
	if l.Paused && l.Snapshot == "" {
		return fmt.Errorf("sandbox %s: paused without a snapshot", l.ID)
	}
	return nil
}

// save writes every lifetime to the file (temp, fsync, rename).
func (k *Keeper) save() error {
	k.wmu.Lock()
	defer k.wmu.Unlock()
	k.mu.Lock()
	fl := file{Version: fileVersion, Lifetimes: make([]Lifetime, 0, len(k.l))}
	for _, l := range k.l {
		fl.Lifetimes = append(fl.Lifetimes, *l)
	}
	k.mu.Unlock()
	slices.SortFunc(fl.Lifetimes, func(a, b Lifetime) int { return strings.Compare(a.ID, b.ID) })
	b, err := json.MarshalIndent(fl, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFile(k.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("saving sandbox lifetimes: %w", err)
	}
	return nil
}

func invalid(msg string, option string) error {
	return &smolvm.Error{Op: "lifetime", Message: msg,
		Fix: smolvm.Fix{Action: smolvm.FixEditOption, Args: map[string]string{smolvm.ArgOption: option, smolvm.ArgHint: "give a duration from 0 (none) to 366 days"}},
		Err: smolvm.ErrInvalidConfig}
}

func checkDurations(ttl, idle time.Duration) error {
	if ttl < 0 || ttl > MaxTTL {
		return invalid(fmt.Sprintf("lifetime %v out of range (0 to %v)", ttl, MaxTTL), "timeout")
	}
	if idle != 0 && (idle < MinIdle || idle > MaxTTL) {
		return invalid(fmt.Sprintf("idle timeout %v out of range (0 = none, or %v to %v)", idle, MinIdle, MaxTTL), "idle_timeout")
	}
	return nil
}

// Set gives the sandbox a lifetime of ttl from now (0: no deadline), the
// action at its deadline ("" is delete) and an idle timeout (0: none). A
// sandbox with neither has no lifetime (an auto-paused one stays paused,
// until Resume). The sandbox must exist.
func (k *Keeper) Set(ctx context.Context, id string, ttl time.Duration, action Action, idle time.Duration) error {
	if action == "" {
		action = ActionDelete
	}
	if !action.Valid() {
		return &smolvm.Error{Op: "lifetime", Message: fmt.Sprintf("unknown action %q at the end of a lifetime", action),
			Fix: smolvm.Fix{Action: smolvm.FixSetOption, Args: map[string]string{smolvm.ArgOption: "on_timeout", smolvm.ArgChoices: "pause,delete"}},
			Err: smolvm.ErrInvalidConfig}
	}
	if err := checkDurations(ttl, idle); err != nil {
		return err
	}
	return k.update(ctx, id, func(l *Lifetime) {
		l.Action, l.TTL, l.Idle = action, ttl, idle
	})
}

// Extend sets the sandbox's deadline to ttl from now (0: no deadline),
// keeping its action (delete for a sandbox that had no lifetime) and idle
// timeout. It counts as activity.
func (k *Keeper) Extend(ctx context.Context, id string, ttl time.Duration) error {
	if err := checkDurations(ttl, 0); err != nil {
		return err
	}
	return k.update(ctx, id, func(l *Lifetime) { l.TTL = ttl })
}

// update applies fn to the sandbox's lifetime (a new one when it has
// none), restarts its deadline from its TTL and saves.
func (k *Keeper) update(ctx context.Context, id string, fn func(*Lifetime)) error {
	if err := smolvm.ValidateID(id); err != nil {
		return err
	}
	unlock, err := k.busy.lock(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	vm, err := k.m.Open(ctx, id)
	if err != nil {
		return err
	}
	vm.Close()
	k.mu.Lock()
	l, ok := k.l[id]
	if !ok {
		if len(k.l) >= maxEntries {
			k.mu.Unlock()
			return &smolvm.Error{Op: "lifetime", Message: fmt.Sprintf("too many sandbox lifetimes (%d)", maxEntries),
				Fix: smolvm.Fix{Action: smolvm.FixDeleteVM}, Err: smolvm.ErrUnsupported}
		}
		l = &Lifetime{ID: id, Action: ActionDelete}
	}
	c := *l
	fn(&c)
	now := k.now()
	c.LastActive, c.Deadline = now, time.Time{}
	if c.TTL > 0 {
		c.Deadline = now.Add(c.TTL)
	}
	c.Failures, c.LastError, c.NextTry = 0, "", time.Time{}
	if c.TTL == 0 && c.Idle == 0 && !c.Paused && c.Previous == "" && c.Snapshot == "" {
		delete(k.l, id)
	} else {
		k.l[id] = &c
	}
	k.mu.Unlock()
	return k.save()
}

// Touch records activity on the sandbox (any API call on it): its idle
// timeout starts again. Cheap; nothing is written.
func (k *Keeper) Touch(id string) {
	k.mu.Lock()
	if l, ok := k.l[id]; ok {
		l.LastActive = k.now()
	}
	k.mu.Unlock()
}

// Get returns the sandbox's lifetime.
func (k *Keeper) Get(id string) (Lifetime, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l, ok := k.l[id]
	if !ok {
		return Lifetime{}, false
	}
	return *l, true
}

// Forget drops the lifetime of a sandbox that is gone (the daemon calls it
// when it deletes one) and deletes the snapshots its pauses made (a paused
// sandbox loses its memory: Start boots it from its disk). A snapshot that
// cannot be deleted (another sandbox runs from it) is kept and logged.
func (k *Keeper) Forget(ctx context.Context, id string) error {
	if err := smolvm.ValidateID(id); err != nil {
		return err
	}
	unlock, err := k.busy.lock(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	k.mu.Lock()
	l, ok := k.l[id]
	delete(k.l, id)
	k.mu.Unlock()
	if !ok {
		return nil
	}
	if err := k.save(); err != nil {
		return err
	}
	k.dropSnapshot(ctx, id, l.Snapshot)
	k.dropSnapshot(ctx, id, l.Previous)
	return nil
}

// dropSnapshot deletes a snapshot a pause made (best effort: logged).
func (k *Keeper) dropSnapshot(ctx context.Context, id, snap string) {
	if snap == "" {
		return
	}
	if err := k.m.DeleteSnapshot(ctx, snap); err != nil && !errors.Is(err, smolvm.ErrSnapshotNotFound) {
		k.log.Warn("lifetime: cannot delete the snapshot of an earlier pause; delete it yourself", "vm", id, "snapshot", snap, "err", err)
	}
}

// Resume wakes an auto-paused sandbox: it restores the pause's snapshot
// into the same id (running), restarts its lifetime and returns it. A
// sandbox the Keeper did not pause is returned as it is (the caller
// resumes or starts it itself). The daemon calls Resume, not VM.Start, for
// an auto-paused sandbox: Start boots it from its disk (its memory is
// lost), after which Resume finds it running, keeps it and deletes the
// stale snapshot.
func (k *Keeper) Resume(ctx context.Context, id string) (*smolvm.VM, error) {
	if err := smolvm.ValidateID(id); err != nil {
		return nil, err
	}
	unlock, err := k.busy.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	l, ok := k.Get(id)
	if !ok || !l.Paused {
		return k.m.Open(ctx, id)
	}
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	vm, stale, err := k.resumeFrom(ctx, id, l.Snapshot)
	if err != nil {
		return nil, err
	}
	prev := l.Snapshot
	if stale {
		k.log.Warn("lifetime: the auto-paused sandbox was started meanwhile; its pause snapshot is stale and is deleted", "vm", id, "snapshot", l.Snapshot)
		k.dropSnapshot(ctx, id, l.Snapshot)
		prev = l.Previous
	}
	now := k.now()
	k.mu.Lock()
	if c, ok := k.l[id]; ok {
		c.Paused, c.PausedAt, c.Previous, c.Snapshot = false, time.Time{}, prev, ""
		c.LastActive, c.Deadline = now, time.Time{}
		if c.TTL > 0 {
			c.Deadline = now.Add(c.TTL)
		}
		c.Failures, c.LastError, c.NextTry = 0, "", time.Time{}
	}
	k.mu.Unlock()
	if err := k.save(); err != nil {
		k.log.Warn("lifetime: resumed, but cannot save the lifetimes", "vm", id, "err", err)
	}
	return vm, nil
}

// resumeFrom restores snap into its sandbox. A sandbox that runs (or is
// paused by the SDK) already is not replaced: either a resume that was
// not recorded restored it (the daemon died after it), or it was started
// some other way (Start boots it from its disk), and then snap is stale
// (stale = true) and restoring it would throw away what ran since.
func (k *Keeper) resumeFrom(ctx context.Context, id, snap string) (vm *smolvm.VM, stale bool, err error) {
	if vm, err := k.m.Open(ctx, id); err == nil {
		info, err := vm.Info(ctx)
		if err == nil && (info.Status == smolvm.StatusRunning || info.Status == smolvm.StatusPaused) {
			if info.RestoredFrom != snap {
				return vm, true, nil
			}
			if info.Status == smolvm.StatusPaused {
				err = vm.Resume(ctx)
			}
			if err == nil {
				return vm, false, nil
			}
		}
		vm.Close()
		if err != nil {
			return nil, false, err
		}
	}
	vm, err = k.m.FromSnapshot(ctx, snap, smolvm.RestoreOptions{Resume: true})
	return vm, false, err
}

// Run is the reaper: every second it pauses or deletes the sandboxes whose
// deadline passed, and pauses those idle for their idle timeout, one at a
// time, each within 10 minutes. onExpire (may be nil) is called after each
// attempt, with its error (nil: done). A failed attempt is retried after
// 1 s, 2 s, 4 s, ... (at most 5 min). Run returns ctx's error when ctx ends.
func (k *Keeper) Run(ctx context.Context, onExpire func(id string, a Action, err error)) error {
	t := time.NewTicker(k.tick)
	defer t.Stop()
	for {
		k.reap(ctx, onExpire)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// due lists the sandboxes whose action is due now, and what it is.
func (k *Keeper) due() map[string]Action {
	now := k.now()
	out := map[string]Action{}
	k.mu.Lock()
	defer k.mu.Unlock()
	for id, l := range k.l {
		if a, ok := l.due(now); ok {
			out[id] = a
		}
	}
	return out
}

// due says whether an action is due at now, and which: the deadline's, or
// a pause for being idle.
func (l *Lifetime) due(now time.Time) (Action, bool) {
	switch {
	case now.Before(l.NextTry):
	case !l.Deadline.IsZero() && !now.Before(l.Deadline):
		return l.Action, true
	case l.Idle > 0 && !l.Paused && now.Sub(l.LastActive) >= l.Idle:
		return ActionPause, true
	}
	return "", false
}

// reap runs the due actions once.
func (k *Keeper) reap(ctx context.Context, onExpire func(string, Action, error)) {
	ids := k.due()
	keys := make([]string, 0, len(ids))
	for id := range ids {
		keys = append(keys, id)
	}
	slices.Sort(keys)
	for _, id := range keys {
		if ctx.Err() != nil {
			return
		}
		unlock, ok := k.busy.tryLock(id)
		if !ok {
			continue // a call on it is in progress: next tick
		}
		a := ids[id]
		l, ok := k.Get(id)
		if cur, _ := l.due(k.now()); !ok || cur != a { // forgotten, extended or touched meanwhile
			unlock()
			continue
		}
		err := k.expire(ctx, id, a, l)
		unlock()
		if err != nil {
			k.log.Warn("lifetime: action failed; will retry", "vm", id, "action", a, "err", err)
		} else {
			k.log.Info("lifetime: sandbox expired", "vm", id, "action", a)
		}
		if onExpire != nil {
			onExpire(id, a, err)
		}
	}
}

// expire does a due action and records its outcome.
func (k *Keeper) expire(ctx context.Context, id string, a Action, l Lifetime) error {
	octx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	var err error
	switch a {
	case ActionDelete:
		err = k.deleteVM(octx, id, l)
		if err == nil {
			return nil
		}
	case ActionPause:
		var nl Lifetime
		nl, err = k.pause(octx, id, l)
		k.mu.Lock()
		if c, ok := k.l[id]; ok {
			// Keep what the pause achieved (its snapshot) even when it failed later.
			c.Paused, c.PausedAt, c.Snapshot, c.Previous = nl.Paused, nl.PausedAt, nl.Snapshot, nl.Previous
			if err == nil {
				c.Deadline, c.LastActive = time.Time{}, k.now()
				c.Failures, c.LastError, c.NextTry = 0, "", time.Time{}
			}
		}
		k.mu.Unlock()
		if err == nil {
			return k.save()
		}
	}
	if errors.Is(err, smolvm.ErrVMNotFound) {
		// Deleted by someone else: nothing left to act on.
		k.mu.Lock()
		delete(k.l, id)
		k.mu.Unlock()
		k.save()
		k.dropSnapshot(ctx, id, l.Snapshot)
		k.dropSnapshot(ctx, id, l.Previous)
		return err
	}
	k.mu.Lock()
	if c, ok := k.l[id]; ok {
		c.Failures++
		c.LastError = err.Error()
		c.NextTry = k.now().Add(backoff(c.Failures))
	}
	k.mu.Unlock()
	if serr := k.save(); serr != nil {
		k.log.Warn("lifetime: cannot save the lifetimes", "err", serr)
	}
	return err
}

// backoff is the pause before attempt n+1 after n failures.
func backoff(n int) time.Duration {
	if n > 9 {
		return maxBackof
	}
	return min(maxBackof, time.Second<<(n-1))
}

// deleteVM deletes the sandbox and forgets its lifetime.
func (k *Keeper) deleteVM(ctx context.Context, id string, l Lifetime) error {
	vm, err := k.m.Open(ctx, id)
	if err != nil {
		return err
	}
	defer vm.Close()
	if err := vm.Delete(ctx); err != nil {
		return err
	}
	k.mu.Lock()
	delete(k.l, id)
	k.mu.Unlock()
	if err := k.save(); err != nil {
		k.log.Warn("lifetime: cannot save the lifetimes", "err", err)
	}
	k.dropSnapshot(ctx, id, l.Snapshot)
	k.dropSnapshot(ctx, id, l.Previous)
	return nil
}

// pauseVM snapshots the sandbox (a full snapshot: memory, device state,
// disk) and stops it. It returns l with what it achieved: Snapshot once
// the snapshot exists, Paused once the sandbox is stopped. A sandbox that
// does not run (stopped by someone) has nothing to save: it is left as it
// is and its deadline ends.
func (k *Keeper) pauseVM(ctx context.Context, id string, l Lifetime) (Lifetime, error) {
	vm, err := k.m.Open(ctx, id)
	if err != nil {
		return l, err
	}
	defer vm.Close()
	st, err := vm.Status(ctx)
	if err != nil {
		return l, err
	}
	if l.Paused {
		if st != smolvm.StatusRunning && st != smolvm.StatusPaused {
			return l, nil // paused already (a deadline after the pause)
		}
		// Started meanwhile some other way: the pause's snapshot is stale.
		k.dropSnapshot(ctx, id, l.Snapshot)
		l.Paused, l.PausedAt, l.Snapshot = false, time.Time{}, ""
	}
	switch st {
	case smolvm.StatusRunning, smolvm.StatusPaused:
		if l.Snapshot != "" && st == smolvm.StatusRunning {
			// An earlier attempt's snapshot, but the sandbox ran since:
			// it is stale.
			k.dropSnapshot(ctx, id, l.Snapshot)
			l.Snapshot = ""
		}
		if l.Snapshot == "" {
			snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{Type: smolvm.SnapshotFull})
			if err != nil {
				return l, err
			}
			l.Snapshot = snap.ID
			k.record(id, func(c *Lifetime) { c.Snapshot = snap.ID })
		}
		if err := vm.Stop(ctx); err != nil {
			return l, err
		}
	default:
		if l.Snapshot == "" {
			return l, nil // nothing runs: nothing to pause
		}
		// Stopped after an earlier attempt's snapshot: that snapshot is
		// the pause.
	}
	l.Paused, l.PausedAt = true, k.now()
	k.dropSnapshot(ctx, id, l.Previous)
	l.Previous = ""
	return l, nil
}

// record applies fn to the sandbox's lifetime and saves at once (the
// snapshot of a pause in progress must not be forgotten).
func (k *Keeper) record(id string, fn func(*Lifetime)) {
	k.mu.Lock()
	if c, ok := k.l[id]; ok {
		fn(c)
	}
	k.mu.Unlock()
	if err := k.save(); err != nil {
		k.log.Warn("lifetime: cannot save the lifetimes", "err", err)
	}
}

// idLocks serializes the operations on one sandbox within the Keeper (the
// SDK's VM lock covers each call; this covers a pause's snapshot + stop
// against a Resume).
type idLocks struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

func (l *idLocks) tryLock(id string) (func(), bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, busy := l.m[id]; busy {
		return nil, false
	}
	ch := make(chan struct{})
	l.m[id] = ch
	return func() {
		l.mu.Lock()
		delete(l.m, id)
		l.mu.Unlock()
		close(ch)
	}, true
}

func (l *idLocks) lock(ctx context.Context, id string) (func(), error) {
	for {
		if unlock, ok := l.tryLock(id); ok {
			return unlock, nil
		}
		l.mu.Lock()
		ch := l.m[id]
		l.mu.Unlock()
		if ch == nil {
			continue
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
