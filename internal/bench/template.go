package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/smolvm-go/smolvm"
)

// createConfig is the shape every create row uses: the suite's image and
// memory, no network. Without ColdBoot, New+Start takes the default path
// (a template restore once the SDK has templates).
func (s *suite) createConfig(name string) smolvm.Config {
	return smolvm.Config{Name: name, Image: s.o.Image, MemoryMiB: s.o.MemoryMiB, NoNetwork: true}
}

// templateGroup: create -> first command on the default path (New+Start+
// Run("true") without ColdBoot: a restore from the shape's pre-booted
// template) against restore -> first command of a full snapshot of the
// same guest, and against a cold boot. The template is made before the
// timing by one untimed create: the first create of a shape makes it.
func (s *suite) templateGroup(ctx context.Context) ([]Row, error) {
	var tmpl, restore, cold []float64
	rows := func() []Row {
		t := newFigure("smolvm New+Start+Run(true), default path (template; made before the timing)", "ms", tmpl)
		note := fmt.Sprintf("%d MiB guest, no network; the three alternate, each round in a different order; "+
			"the template is built by one untimed create first (a build without templates cold-boots here)", s.o.MemoryMiB)
		return []Row{
			newRow("template-restore", "create -> first command (template) vs restore -> first command", "ms", t,
				newFigure("smolvm FromSnapshot(Resume)+Run(true) of a full snapshot of the same guest", "ms", restore), 1.2, note),
			newRow("template-cold", "create -> first command (template) vs a cold boot", "ms", t,
				newFigure("smolvm New+Start+Run(true), ColdBoot", "ms", cold), 0.1, note),
		}
	}
	t := time.Now()
	if _, err := oursCreate(ctx, s.m, s.createConfig(s.name("tmpl-warm"))); err != nil {
		return rows(), fmt.Errorf("making the template: %w", err)
	}
	s.progress("first create (makes the template when there is none): %.1f s", time.Since(t).Seconds())
	snapID, err := s.sourceSnapshot(ctx, s.name("tmpl-src"), s.o.MemoryMiB)
	if err != nil {
		return rows(), err
	}
	defer s.deleteSnapshot(ctx, snapID)
	for i := 0; i < s.o.Rounds; i++ {
		var td, cd time.Duration
		var rt phases
		err := rotate(i, func() error {
			d, err := oursCreate(ctx, s.m, s.createConfig(s.name("tmpl", fmt.Sprint(i))))
			td = d
			return err
		}, func() error {
			p, vm, err := s.oursRestore(ctx, snapID)
			del(ctx, vm)
			rt = p
			return err
		}, func() error {
			cfg := s.createConfig(s.name("cold", fmt.Sprint(i)))
			cfg.ColdBoot = true
			d, err := oursCreate(ctx, s.m, cfg)
			cd = d
			return err
		})
		if err != nil {
			return rows(), err
		}
		tmpl, restore, cold = append(tmpl, ms(td)), append(restore, ms(rt.first)), append(cold, ms(cd))
		s.progress("round %d: create (template) %.0f ms, restore %.0f ms, cold boot %.0f ms", i+1, ms(td), ms(rt.first), ms(cd))
	}
	return rows(), nil
}

// warmPool is what the pool row needs of the SDK's warm pool. While the
// SDK has none, sdkPool is nil and the row is reported as not measured.
// Once it has one, setting sdkPool (two functions wrapping the SDK's
// calls) is all the row needs: the create it times is the same
// New+Start+Run("true") as the template row's, which claims a pooled
// sandbox when one is ready.
type warmPool struct {
	// Fill keeps n restored, paused sandboxes of cfg's shape ready and
	// returns once they are (the suite calls it before every timed create,
	// so a refill never overlaps the timing).
	Fill func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config, n int) error
	// Drain stops and removes the pool of cfg's shape.
	Drain func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config) error
}

// sdkPool is the SDK's warm pool; nil: this build has none.
var sdkPool *warmPool

// noPool is why the pool row is not measured in a build without a pool.
const noPool = "no warm pool in this build"

// poolGroup: create -> first command claiming a sandbox from a warm pool
// against restore -> first command of a full snapshot of the same guest.
func (s *suite) poolGroup(ctx context.Context) ([]Row, error) {
	const key, name, goal = "pool-restore", "create from the warm pool -> first command vs restore -> first command", 0.25
	if sdkPool == nil {
		return []Row{skippedRow(key, name, "ms", goal, noPool)}, nil
	}
	var pooled, restore []float64
	rows := func() []Row {
		return []Row{newRow(key, name, "ms",
			newFigure("smolvm New+Start+Run(true), default path, a pooled sandbox ready", "ms", pooled),
			newFigure("smolvm FromSnapshot(Resume)+Run(true) of a full snapshot of the same guest", "ms", restore), goal,
			fmt.Sprintf("%d MiB guest, no network; the pool is full and idle (refilled untimed) before each side", s.o.MemoryMiB))}
	}
	shape := s.createConfig("")
	defer sdkPool.Drain(context.WithoutCancel(ctx), s.m, shape)
	snapID, err := s.sourceSnapshot(ctx, s.name("pool-src"), s.o.MemoryMiB)
	if err != nil {
		return rows(), err
	}
	defer s.deleteSnapshot(ctx, snapID)
	// Before either side: the pool is full and no refill runs (one after
	// the previous claim would load the host under the other side).
	fill := func() error {
		if err := sdkPool.Fill(ctx, s.m, shape, 1); err != nil {
			return fmt.Errorf("filling the pool: %w", err)
		}
		return nil
	}
	for i := 0; i < s.o.Rounds; i++ {
		var pd time.Duration
		var rt phases
		err := alternate(i, func() error {
			if err := fill(); err != nil {
				return err
			}
			d, err := oursCreate(ctx, s.m, s.createConfig(s.name("pool", fmt.Sprint(i))))
			pd = d
			return err
		}, func() error {
			if err := fill(); err != nil {
				return err
			}
			p, vm, err := s.oursRestore(ctx, snapID)
			del(ctx, vm)
			rt = p
			return err
		})
		if err != nil {
			return rows(), err
		}
		pooled, restore = append(pooled, ms(pd)), append(restore, ms(rt.first))
		s.progress("round %d: create from the pool %.0f ms, restore %.0f ms", i+1, ms(pd), ms(rt.first))
	}
	return rows(), nil
}
