package backend

import (
	"context"
	"errors"
	"strings"
	"testing"
)

type stubBackend struct{ Backend }

type detachingStub struct{ stubBackend }

func (detachingStub) Detach(context.Context, Machine) error { return nil }

type wrapper struct{ Backend }

func (w wrapper) Unwrap() Backend { return w.Backend }

func TestRegistryChooseAndLookup(t *testing.T) {
	newStub := func(Options) (Backend, error) { return stubBackend{}, nil }
	Register(Registration{Name: "t-slow", New: newStub, AutoRank: 1})
	Register(Registration{Name: "t-fast", New: newStub, AutoRank: 5, Usable: func() string { return "no kvm" }})
	Register(Registration{Name: "t-best", New: newStub, AutoRank: 3})

	if _, ok := Lookup("t-best"); !ok {
		t.Fatal("t-best not found")
	}
	if _, ok := Lookup("nope"); ok {
		t.Fatal("unknown name found")
	}
	names := strings.Join(Names(), ",")
	if names != "t-best,t-fast,t-slow" {
		t.Fatalf("Names() = %s", names)
	}
	// t-fast ranks highest but is unusable: the next usable by rank wins.
	if got, err := Choose(); err != nil || got != "t-best" {
		t.Fatalf("Choose() = %q, %v; want t-best", got, err)
	}

	for _, bad := range []Registration{{Name: "t-best", New: newStub}, {Name: Auto, New: newStub}, {Name: "t-nil"}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Register(%q) did not panic", bad.Name)
				}
			}()
			Register(bad)
		}()
	}
}

func TestAsFindsOptionalInterfaceThroughWrappers(t *testing.T) {
	var b Backend = wrapper{wrapper{detachingStub{}}}
	if _, ok := b.(Detacher); ok {
		t.Fatal("a plain type assertion sees through the wrapper: the test proves nothing")
	}
	if _, ok := As[Detacher](b); !ok {
		t.Fatal("As did not find Detach through two wrappers")
	}
	if _, ok := As[Detacher](wrapper{stubBackend{}}); ok {
		t.Fatal("As found Detach on a backend without it")
	}
	if _, ok := As[Detacher](nil); ok {
		t.Fatal("As found Detach on nil")
	}
}

func TestChooseReportsWhyNoneIsUsable(t *testing.T) {
	regMu.Lock()
	saved := reg
	reg = map[string]Registration{"a": {Name: "a", Usable: func() string { return "binary missing" }}}
	regMu.Unlock()
	defer func() { regMu.Lock(); reg = saved; regMu.Unlock() }()
	_, err := Choose()
	if !errors.Is(err, ErrNoUsableBackend) || !strings.Contains(err.Error(), "a: binary missing") {
		t.Fatalf("Choose() error %v", err)
	}
}
