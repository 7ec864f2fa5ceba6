// Package steps runs a long operation (restore, snapshot, fork, boot) as a
// list of named steps with a rollback stack: each step may register how to
// undo what it did, and when a later step fails the undos run in reverse
// order, so a failed operation leaves no process, file or record behind.
//
// The step names appear in errors ("start vmm: ..."), so a failure says
// where it happened. An undo can ask why it runs (Cause): the error of the
// step that failed.
package steps

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// UndoTimeout bounds each undo: rollback runs even when the operation's
// context is cancelled (that is often why it failed), but never forever.
const UndoTimeout = 30 * time.Second

// Step is one named part of an operation. Do performs it; Undo, when set,
// reverses it and runs only if Do succeeded and a later step failed.
type Step struct {
	Name string
	Do   func(ctx context.Context) error
	Undo func(ctx context.Context) error
}

// Error is returned by Run when a step fails: which step, its error, and
// any error the rollback met (nil when every undo succeeded).
type Error struct {
	Step     string
	Err      error
	Rollback error
}

func (e *Error) Error() string {
	msg := e.Step + ": " + e.Err.Error()
	if e.Rollback != nil {
		msg += " (rollback: " + e.Rollback.Error() + ")"
	}
	return msg
}

// Unwrap returns the step's error and the rollback's, so errors.Is sees
// the cause's sentinel.
func (e *Error) Unwrap() []error {
	if e.Rollback != nil {
		return []error{e.Err, e.Rollback}
	}
	return []error{e.Err}
}

// Run performs steps in order. When one fails (or ctx ends between steps),
// it undoes the steps that succeeded, newest first, and returns an *Error.
// The step that commits the operation (after which nothing may be undone)
// must therefore be the last: a cancel after it is not seen.
func Run(ctx context.Context, list ...Step) error {
	var s Stack
	for _, st := range list {
		if err := ctx.Err(); err != nil {
			return s.Fail(ctx, st.Name, err)
		}
		if err := st.Do(ctx); err != nil {
			return s.Fail(ctx, st.Name, err)
		}
		if st.Undo != nil {
			s.Push(st.Name, st.Undo)
		}
	}
	return nil
}

// Stack is a rollback stack for operations whose steps are written inline:
// push an undo after each action succeeds; on failure call Unwind; on
// success call Release (or just drop the stack). The zero value is ready.
type Stack struct {
	undos []undo
}

type undo struct {
	name string
	fn   func(ctx context.Context) error
}

// Push records how to undo the step just done.
func (s *Stack) Push(name string, fn func(ctx context.Context) error) {
	s.undos = append(s.undos, undo{name, fn})
}

// Len is the number of undos pending.
func (s *Stack) Len() int { return len(s.undos) }

// Release forgets every pending undo: the operation succeeded.
func (s *Stack) Release() { s.undos = nil }

// Unwind runs the pending undos newest first, each under its own
// UndoTimeout and independent of ctx's cancellation, and returns their
// errors joined (nil when all succeeded). The stack is empty afterwards.
func (s *Stack) Unwind(ctx context.Context) error {
	return s.unwind(ctx, nil)
}

// causeKey carries, in an undo's context, the error it undoes for.
type causeKey struct{}

// Cause returns, inside an undo, the error of the step whose failure
// started the rollback (nil when the stack was unwound without one, by
// Unwind). An undo uses it to record why, e.g. in a record's last error.
func Cause(ctx context.Context) error {
	err, _ := ctx.Value(causeKey{}).(error)
	return err
}

func (s *Stack) unwind(ctx context.Context, cause error) error {
	base := context.WithoutCancel(ctx)
	if cause != nil {
		base = context.WithValue(base, causeKey{}, cause)
	}
	var errs []error
	for i := len(s.undos) - 1; i >= 0; i-- {
		u := s.undos[i]
		uctx, cancel := context.WithTimeout(base, UndoTimeout)
		if err := u.fn(uctx); err != nil {
			errs = append(errs, fmt.Errorf("undo %s: %w", u.name, err))
		}
		cancel()
	}
	s.undos = nil
	return errors.Join(errs...)
}

// Fail unwinds the stack and returns an *Error for step: the inline
// form of a failed step, "return s.Fail(ctx, "start vmm", err)".
func (s *Stack) Fail(ctx context.Context, step string, err error) error {
	return &Error{Step: step, Err: err, Rollback: s.unwind(ctx, err)}
}
