package steps

import (
	"context"
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestRunRollsBackInReverse(t *testing.T) {
	var log []string
	step := func(name string, fail bool) Step {
		return Step{
			Name: name,
			Do: func(context.Context) error {
				log = append(log, "do "+name)
				if fail {
					return errBoom
				}
				return nil
			},
			Undo: func(context.Context) error { log = append(log, "undo "+name); return nil },
		}
	}
	err := Run(context.Background(), step("a", false), step("b", false), step("c", true), step("d", false))
	var se *Error
	if !errors.As(err, &se) || se.Step != "c" || !errors.Is(err, errBoom) {
		t.Fatalf("err = %v, want step c wrapping errBoom", err)
	}
	want := []string{"do a", "do b", "do c", "undo b", "undo a"}
	if diff := cmp.Diff(want, log); diff != "" {
		t.Fatalf("steps (-want +got):\n%s", diff)
	}
}

func TestUnwindRunsAfterCancelAndJoinsErrors(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var s Stack
	var ran []string
	s.Push("first", func(ctx context.Context) error {
		if ctx.Err() != nil {
			t.Error("undo got a cancelled context")
		}
		ran = append(ran, "first")
		return nil
	})
	s.Push("second", func(context.Context) error { ran = append(ran, "second"); return errBoom })
	err := s.Fail(ctx, "third", errors.New("cause"))
	if !errors.Is(err, errBoom) {
		t.Fatalf("rollback error lost: %v", err)
	}
	if diff := cmp.Diff([]string{"second", "first"}, ran); diff != "" {
		t.Fatalf("undo order (-want +got):\n%s", diff)
	}
	if s.Len() != 0 {
		t.Fatal("stack not empty after unwind")
	}
}

func TestRunStopsOnCancelledContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	undone := false
	err := Run(ctx,
		Step{Name: "a", Do: func(context.Context) error { cancel(); return nil }, Undo: func(context.Context) error { undone = true; return nil }},
		Step{Name: "b", Do: func(context.Context) error { t.Error("step b ran after cancel"); return nil }},
	)
	if !errors.Is(err, context.Canceled) || !undone {
		t.Fatalf("err = %v, undone = %v", err, undone)
	}
}

func TestUndoSeesCause(t *testing.T) {
	var seen []error
	undo := func(ctx context.Context) error { seen = append(seen, Cause(ctx)); return nil }
	err := Run(context.Background(),
		Step{Name: "a", Do: func(context.Context) error { return nil }, Undo: undo},
		Step{Name: "b", Do: func(context.Context) error { return errBoom }},
	)
	if !errors.Is(err, errBoom) || len(seen) != 1 || seen[0] != errBoom {
		t.Fatalf("err = %v, undo saw %v; want errBoom both", err, seen)
	}
	// Inline form: Fail passes its error; a bare Unwind has no cause.
	var s Stack
	s.Push("x", undo)
	s.Fail(context.Background(), "y", errBoom)
	s.Push("x", undo)
	s.Unwind(context.Background())
	if len(seen) != 3 || seen[1] != errBoom || seen[2] != nil {
		t.Fatalf("causes seen = %v, want [boom boom <nil>]", seen)
	}
}

var errBoom = errors.New("boom")
