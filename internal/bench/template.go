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

// warmPool is what the pool rows need of the SDK's warm pool: the create
// they time is the same New+Start+Run("true") as the template row's, which
// claims a pooled sandbox when one is ready.
type warmPool struct {
	// Fill keeps n restored, paused sandboxes of cfg's shape ready and
	// returns once they are (the suite calls it before every timed create,
	// so a refill never overlaps the timing).
	Fill func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config, n int) error
	// Drain stops and removes the pool of cfg's shape.
	Drain func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config) error
}

// sdkPool is the SDK's warm pool (Manager.SetPool, FillPool).
var sdkPool = &warmPool{
	Fill: func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config, n int) error {
		if err := m.SetPool(ctx, cfg.Image, poolOptions(cfg), n); err != nil {
			return err
		}
		return m.FillPool(ctx, cfg.Image, poolOptions(cfg))
	},
	Drain: func(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config) error {
		return m.SetPool(ctx, cfg.Image, poolOptions(cfg), 0)
	},
}

// poolOptions is the pool shape of cfg (what a create of cfg claims).
func poolOptions(cfg smolvm.Config) smolvm.TemplateOptions {
	return smolvm.TemplateOptions{MemoryMiB: cfg.MemoryMiB, CPUs: cfg.CPUs, NoNetwork: cfg.NoNetwork, Backend: cfg.Backend, Accel: cfg.Accel}
}

// poolIdleSize is how many members the idle-cost row keeps ready.
const poolIdleSize = 2

// poolIdle measures what a full, idle pool of poolIdleSize costs the host:
// the PSS of its members' processes (VMMs and network sidecars) and their
// CPU time over a 10 s window, as an information row.
func (s *suite) poolIdle(ctx context.Context, shape smolvm.Config) (Row, error) {
	const key, name = "pool-idle", "idle cost of a warm pool of 2 (information)"
	if err := sdkPool.Fill(ctx, s.m, shape, poolIdleSize); err != nil {
		return skippedRow(key, name, "MiB", 0, err.Error()), err
	}
	pools, err := s.m.Pools(ctx)
	if err != nil {
		return skippedRow(key, name, "MiB", 0, err.Error()), err
	}
	var p *smolvm.PoolInfo
	for i := range pools {
		if pools[i].Image == shape.Image && pools[i].Options.MemoryMiB == shape.MemoryMiB {
			p = &pools[i]
		}
	}
	if p == nil || p.Ready < poolIdleSize {
		return skippedRow(key, name, "MiB", 0, "the pool did not fill"), nil
	}
	cpu := func() float64 {
		var t float64
		for _, pid := range p.PIDs {
			if v, err := procCPUms(pid); err == nil {
				t += v
			}
		}
		return t
	}
	const window = 10 * time.Second
	before := cpu()
	select {
	case <-ctx.Done():
		return skippedRow(key, name, "MiB", 0, ctx.Err().Error()), ctx.Err()
	case <-time.After(window):
	}
	cpuMs := cpu() - before
	mib := float64(p.IdleMemoryKiB) / 1024
	r := newInfoRow(key, name, "MiB",
		newFigure(fmt.Sprintf("PSS of the %d ready members' VMMs and sidecars", p.Ready), "MiB", []float64{mib}),
		Figure{},
		fmt.Sprintf("%d MiB guests, paused; CPU time of those processes over %s: %.0f ms (%.2f%% of one core)",
			shape.MemoryMiB, window, cpuMs, 100*cpuMs/float64(window.Milliseconds())))
	return r, nil
}

// poolGroup: create -> first command claiming a sandbox from a warm pool
// against restore -> first command of a full snapshot of the same guest.
func (s *suite) poolGroup(ctx context.Context) ([]Row, error) {
	const key, name, goal = "pool-restore", "create from the warm pool -> first command vs restore -> first command", 0.25
	var pooled, restore []float64
	var idle []Row
	rows := func() []Row {
		return append([]Row{newRow(key, name, "ms",
			newFigure("smolvm New+Start+Run(true), default path, a pooled sandbox ready", "ms", pooled),
			newFigure("smolvm FromSnapshot(Resume)+Run(true) of a full snapshot of the same guest", "ms", restore), goal,
			fmt.Sprintf("%d MiB guest, no network; the pool is full and idle (refilled untimed) before each side", s.o.MemoryMiB))}, idle...)
	}
	shape := s.createConfig("")
	defer sdkPool.Drain(context.WithoutCancel(ctx), s.m, shape)
	if r, err := s.poolIdle(ctx, shape); err == nil {
		idle = append(idle, r)
	} else {
		s.progress("pool idle cost: %v", err)
	}
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
