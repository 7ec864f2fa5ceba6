package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
)

// Snapshots measures, per snapshot type, create time, size on disk and
// restore to the first command result. The guest first touches TouchMiB of
// memory (random data in tmpfs) so memory snapshots have real content.
func Snapshots(ctx context.Context, o Options, touchMiB int) (Report, error) {
	o.defaults()
	m := o.Manager
	img, err := image.Open(m.ImageDir(), o.Image)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Host: hostInfo(o, img)}
	types := []smolvm.SnapshotType{smolvm.SnapshotFull, smolvm.SnapshotDiff, smolvm.SnapshotDisk}
	create := map[smolvm.SnapshotType][]float64{}
	size := map[smolvm.SnapshotType][]float64{}
	restore := map[smolvm.SnapshotType][]float64{}
	for i := 0; i < o.Rounds; i++ {
		for _, t := range types { // alternate the types within each round
			c, s, r, err := snapshotRound(ctx, m, o, t, i, touchMiB)
			if err != nil {
				return rep, fmt.Errorf("%s snapshot: %w", t, err)
			}
			create[t] = append(create[t], ms(c))
			size[t] = append(size[t], float64(s)/(1<<20))
			restore[t] = append(restore[t], ms(r))
			fmt.Fprintf(o.Progress, "round %d %-4s: create %.0f ms, %.1f MiB, restore->first command %.0f ms\n", i+1, t, ms(c), float64(s)/(1<<20), ms(r))
		}
	}
	for _, t := range types {
		rep.Figures = append(rep.Figures,
			newFigure(fmt.Sprintf("%s: snapshot create", t), "ms", create[t]),
			newFigure(fmt.Sprintf("%s: size on disk", t), "MiB", size[t]),
			newFigure(fmt.Sprintf("%s: restore -> first command", t), "ms", restore[t]))
	}
	return rep, nil
}

func snapshotRound(ctx context.Context, m *smolvm.Manager, o Options, t smolvm.SnapshotType, i, touchMiB int) (create time.Duration, size int64, restore time.Duration, err error) {
	id := fmt.Sprintf("bench-snap-%s-%d", t, i)
	vm, err := m.New(ctx, smolvm.Config{Name: id, Image: o.Image, MemoryMiB: o.MemoryMiB, NoNetwork: true})
	if err != nil {
		return
	}
	defer func() { vm.Delete(context.WithoutCancel(ctx)); vm.Close() }()
	if err = vm.Start(ctx); err != nil {
		return
	}
	if touchMiB > 0 {
		var res *smolvm.Result
		res, err = vm.Run(ctx, fmt.Sprintf("head -c %d /dev/urandom > /tmp/blob", touchMiB<<20)) // busybox head takes bytes only
		if err != nil {
			return
		}
		if !res.OK() {
			err = fmt.Errorf("touching memory: %s", res.Stderr)
			return
		}
	}
	t0 := time.Now()
	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: id, Type: t})
	if err != nil {
		return
	}
	create = time.Since(t0)
	size = snap.SizeBytes
	defer m.DeleteSnapshot(context.WithoutCancel(ctx), id)
	vm.Close()
	t0 = time.Now()
	rvm, err := m.FromSnapshot(ctx, id, smolvm.RestoreOptions{Resume: true})
	if err != nil {
		return
	}
	defer func() { rvm.Delete(context.WithoutCancel(ctx)); rvm.Close() }()
	if _, err = rvm.Run(ctx, "true"); err != nil {
		return
	}
	restore = time.Since(t0)
	return
}
