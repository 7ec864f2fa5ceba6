// Package retry is the one retry loop of the host side: it repeats an
// attempt (a dial, a handshake, a probe) with a growing pause until the
// attempt succeeds, reports a final error, or the context (and the
// policy's own deadline, when set) ends. Every wait in it is bounded by the
// context, so a caller's host-side deadline always holds.
package retry

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// DefaultFirst is the first pause when Policy.First is zero.
const DefaultFirst = 10 * time.Millisecond

// Policy is how Do paces its attempts.
type Policy struct {
	// First is the pause after the first failed attempt (DefaultFirst
	// when zero).
	First time.Duration
	// Max caps the pause, which doubles after every failed attempt; when
	// not above First the pause stays First.
	Max time.Duration
	// Timeout, when above zero, bounds the whole loop on top of ctx.
	Timeout time.Duration
}

// pause returns the pause after a failed attempt that followed a pause of
// prev (0 for the first).
func (p Policy) pause(prev time.Duration) time.Duration {
	first := p.First
	if first <= 0 {
		first = DefaultFirst
	}
	if prev <= 0 {
		return first
	}
	return max(min(prev*2, p.Max), first)
}

// GiveUpError is Do's error when the context ended (or the policy's
// Timeout passed) before an attempt succeeded. It wraps both why Do gave
// up (the context's error) and the last attempt's error.
type GiveUpError struct {
	Err  error // the context's error: context.DeadlineExceeded or context.Canceled
	Last error // the last attempt's error (nil when no attempt ran)
}

func (e *GiveUpError) Error() string {
	if e.Last == nil {
		return e.Err.Error()
	}
	return fmt.Sprintf("%v (last error: %v)", e.Err, e.Last)
}

// Unwrap returns the context's error and the last attempt's.
func (e *GiveUpError) Unwrap() []error {
	if e.Last == nil {
		return []error{e.Err}
	}
	return []error{e.Err, e.Last}
}

// stopError marks an error that ends Do at once.
type stopError struct{ err error }

func (e *stopError) Error() string { return e.err.Error() }
func (e *stopError) Unwrap() error { return e.err }

// Stop marks err as final: Do returns it (unmarked) without another
// attempt. Stop(nil) is nil.
func Stop(err error) error {
	if err == nil {
		return nil
	}
	return &stopError{err: err}
}

// Do calls try until it returns a nil error, then returns its value. An
// error marked with Stop (anywhere in its chain) ends the loop at once and
// is returned without the mark.
// Any other error is retried after a pause (see Policy); when ctx ends (or
// p.Timeout passes) first, Do returns a *GiveUpError with the last
// attempt's error. try receives the context that bounds the loop and
// should honour it.
func Do[T any](ctx context.Context, p Policy, try func(context.Context) (T, error)) (T, error) {
	var zero T
	if p.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.Timeout)
		defer cancel()
	}
	var last error
	var wait time.Duration
	for {
		if err := ctx.Err(); err != nil {
			return zero, &GiveUpError{Err: err, Last: last}
		}
		v, err := try(ctx)
		if err == nil {
			return v, nil
		}
		if se, ok := err.(*stopError); ok {
			return zero, se.err
		}
		if _, ok := errors.AsType[*stopError](err); ok {
			return zero, err // Stop wrapped by try: keep its wrapping
		}
		last = err
		wait = p.pause(wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return zero, &GiveUpError{Err: ctx.Err(), Last: last}
		case <-t.C:
		}
	}
}
