package retry

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

var errTry = errors.New("not yet")

func TestDoSucceedsAfterFailures(t *testing.T) {
	n := 0
	v, err := Do(context.Background(), Policy{First: time.Millisecond}, func(context.Context) (int, error) {
		n++
		if n < 4 {
			return 0, errTry
		}
		return 42, nil
	})
	if err != nil || v != 42 || n != 4 {
		t.Fatalf("Do = %d, %v after %d attempts; want 42, nil after 4", v, err, n)
	}
}

func TestDoGivesUpWithLastError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	n := 0
	_, err := Do(ctx, Policy{First: time.Millisecond, Max: 5 * time.Millisecond}, func(context.Context) (struct{}, error) {
		n++
		return struct{}{}, fmt.Errorf("attempt %d: %w", n, errTry)
	})
	var g *GiveUpError
	if !errors.As(err, &g) || !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, errTry) {
		t.Fatalf("err = %v; want a GiveUpError wrapping DeadlineExceeded and the last attempt's error", err)
	}
	if want := fmt.Sprintf("attempt %d", n); g.Last == nil || g.Last.Error() != want+": not yet" {
		t.Fatalf("Last = %v; want the last attempt's (%s)", g.Last, want)
	}
	if n < 2 {
		t.Fatalf("only %d attempts in 30 ms at a 1-5 ms pause", n)
	}
}

func TestDoTimeoutBoundsTheLoop(t *testing.T) {
	start := time.Now()
	_, err := Do(context.Background(), Policy{First: time.Millisecond, Timeout: 20 * time.Millisecond},
		func(ctx context.Context) (int, error) {
			if _, ok := ctx.Deadline(); !ok {
				return 0, Stop(errors.New("try did not get the bounded context"))
			}
			return 0, errTry
		})
	wantGaveUp(t, err, context.DeadlineExceeded, start)
}

// wantGaveUp checks that err wraps why Do gave up and the last attempt's
// error, and that Do gave up soon after start.
func wantGaveUp(t *testing.T, err, why error, start time.Time) {
	t.Helper()
	if !errors.Is(err, why) || !errors.Is(err, errTry) {
		t.Fatalf("err = %v; want %v wrapping the last error", err, why)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Do gave up only after %v", d)
	}
}

func TestDoCancelledBeforeFirstAttempt(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	called := false
	_, err := Do(ctx, Policy{}, func(context.Context) (int, error) { called = true; return 0, nil })
	var g *GiveUpError
	if !errors.As(err, &g) || !errors.Is(err, context.Canceled) || g.Last != nil || called {
		t.Fatalf("err = %v, called = %v; want Canceled without an attempt", err, called)
	}
	if err.Error() != context.Canceled.Error() {
		t.Fatalf("text %q; want the context's error alone", err)
	}
}

func TestDoCancelInterruptsPause(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var n atomic.Int32
	go func() {
		for n.Load() == 0 {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}()
	start := time.Now()
	_, err := Do(ctx, Policy{First: time.Hour}, func(context.Context) (int, error) {
		n.Add(1)
		return 0, errTry
	})
	wantGaveUp(t, err, context.Canceled, start) // an hour-long pause ended by cancel
}

func TestDoStop(t *testing.T) {
	final := errors.New("the VMM exited")
	n := 0
	_, err := Do(context.Background(), Policy{First: time.Millisecond}, func(context.Context) (int, error) {
		n++
		return 0, Stop(final)
	})
	if err != final || n != 1 {
		t.Fatalf("Do = %v after %d attempts; want the Stop error unmarked after 1", err, n)
	}
	// A Stop wrapped by try also ends the loop; the wrapping is kept.
	_, err = Do(context.Background(), Policy{First: time.Millisecond}, func(context.Context) (int, error) {
		return 0, fmt.Errorf("dial: %w", Stop(final))
	})
	if !errors.Is(err, final) || err.Error() != "dial: the VMM exited" {
		t.Fatalf("wrapped Stop: err = %v", err)
	}
	if Stop(nil) != nil {
		t.Fatal("Stop(nil) != nil")
	}
}

func TestPolicyPause(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		p    Policy
		want []time.Duration
	}{
		{Policy{}, []time.Duration{10 * ms, 10 * ms, 10 * ms}},
		{Policy{First: 20 * ms}, []time.Duration{20 * ms, 20 * ms}},
		{Policy{First: 5 * ms, Max: 80 * ms}, []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 80 * ms}},
		{Policy{First: 10 * ms, Max: 250 * ms}, []time.Duration{10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 250 * ms, 250 * ms}},
	} {
		var prev time.Duration
		for i, want := range tc.want {
			prev = tc.p.pause(prev)
			if prev != want {
				t.Fatalf("%+v: pause %d = %v, want %v", tc.p, i, prev, want)
			}
		}
	}
}
