package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/qemu"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/qmp"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// SuiteOptions configure Suite.
type SuiteOptions struct {
	Options
	Clones      int      // clones per fork (default 10)
	CloneRounds int      // rounds of the clone rows (default Rounds)
	TouchMiB    int      // memory the guest fills before the snapshot-create row (default 200)
	SmallMiB    int      // restore-vs-RAM-size row: the small guest (default 256)
	BigMiB      int      // and the big one (default 2048)
	Settle      float64  // seconds to wait before reading idle memory (default 2)
	Only        []string // run only these groups (SuiteGroups); empty: all
}

// SuiteGroups are the units Suite runs, in order; each yields one or more
// rows.
var SuiteGroups = []string{"restore", "ram", "create", "clones", "boot", "template", "pool"}

func (o *SuiteOptions) defaults() {
	o.Options.defaults()
	if o.Clones <= 0 {
		o.Clones = 10
	}
	if o.CloneRounds <= 0 {
		o.CloneRounds = o.Rounds
	}
	if o.TouchMiB <= 0 {
		o.TouchMiB = 200
	}
	if o.SmallMiB <= 0 {
		o.SmallMiB = 256
	}
	if o.BigMiB <= 0 {
		o.BigMiB = 2048
	}
	if o.Settle <= 0 {
		o.Settle = 2
	}
}

// Row is one line of the suite: ours against a baseline, the ratio of the
// medians and the goal (met when Ratio <= Goal). An information row
// (Info) has no goal: it compares against a peer's mechanism or splits a
// cost, and is never met or missed. A row the build cannot measure at all
// says why in Skipped and has no samples.
type Row struct {
	Key      string     `json:"key"`
	Name     string     `json:"name"`
	Unit     string     `json:"unit"`
	Ours     Figure     `json:"ours"`
	Baseline Figure     `json:"baseline"`
	Ratio    float64    `json:"ratio"` // Ours.Median / Baseline.Median
	Goal     float64    `json:"goal"`
	Met      bool       `json:"met"`
	Info     bool       `json:"info,omitempty"`
	Skipped  string     `json:"skipped,omitempty"`
	Note     string     `json:"note,omitempty"`
	Error    string     `json:"error,omitempty"` // the row could not be measured (completely)
	Load     [3]float64 `json:"load_avg_at_start"`
	Seconds  float64    `json:"wall_seconds"`
}

func newRow(key, name, unit string, ours, base Figure, goal float64, note string) Row {
	r := Row{Key: key, Name: name, Unit: unit, Ours: ours, Baseline: base, Goal: goal, Note: note}
	if base.Median > 0 && len(ours.Samples) > 0 {
		r.Ratio = ours.Median / base.Median
		r.Met = r.Ratio <= goal
	}
	return r
}

// newInfoRow is a row without a goal: the ratio is information.
func newInfoRow(key, name, unit string, ours, base Figure, note string) Row {
	r := newRow(key, name, unit, ours, base, 0, note)
	r.Info, r.Met = true, false
	return r
}

// skippedRow is a row this build cannot measure, with the reason (it
// carries its goal so the report still shows what it asks for).
func skippedRow(key, name, unit string, goal float64, reason string) Row {
	return Row{Key: key, Name: name, Unit: unit, Goal: goal, Skipped: reason}
}

// Verdict is how a report shows the row's outcome: "yes", "no",
// "info", "not measured: <why>".
func (r Row) Verdict() string {
	switch {
	case r.Skipped != "":
		return "not measured: " + r.Skipped
	case r.Info && len(r.Ours.Samples) > 0 && len(r.Baseline.Samples) == 0:
		return "info" // a figure of its own, nothing to compare it with
	case r.Ratio == 0:
		return "not measured"
	case r.Info:
		return "info"
	case r.Met:
		return "yes"
	}
	return "no"
}

// SuiteReport is the result of Suite.
type SuiteReport struct {
	Host        Host       `json:"host"`
	Rounds      int        `json:"rounds"`
	Clones      int        `json:"clones"`
	CloneRounds int        `json:"clone_rounds"`
	MemoryMiB   int        `json:"memory_mib"`
	LoadStart   [3]float64 `json:"load_avg_start"`
	LoadEnd     [3]float64 `json:"load_avg_end"`
	Rows        []Row      `json:"rows"`
	Extras      []Figure   `json:"extras,omitempty"` // informational, no goal
	Notes       []string   `json:"notes,omitempty"`
	Seconds     float64    `json:"wall_seconds"`
}

// Suite runs the benchmark suite of issue 4: every pair in one run, ours
// and the baseline alternating (the order flips every round), medians and
// ratios against goals. A group that fails is recorded in its rows' Error
// and the others still run; the returned error joins the failures. Every
// VM and snapshot it creates is deleted again.
func Suite(ctx context.Context, o SuiteOptions) (SuiteReport, error) {
	o.defaults()
	img, err := image.Open(o.Manager.ImageDir(), o.Image)
	if err != nil {
		return SuiteReport{}, err
	}
	host := hostInfo(o.Options, img)
	s := &suite{o: o, m: o.Manager, img: img, qb: qemu.New(qemu.Options{}), tag: randTag(), cores: max(host.Cores, 1)}
	rep := SuiteReport{Host: host, Rounds: o.Rounds, Clones: o.Clones, CloneRounds: o.CloneRounds,
		MemoryMiB: o.MemoryMiB, LoadStart: loadAvg()}
	if o.CloneRounds != o.Rounds {
		rep.Notes = append(rep.Notes, fmt.Sprintf("the clone rows ran %d rounds, the others %d", o.CloneRounds, o.Rounds))
	}
	t0 := time.Now()
	var errs []error
	groups := map[string]func(context.Context) ([]Row, error){
		"restore": s.restoreGroup, "ram": s.ramGroup, "create": s.createGroup, "clones": s.clonesGroup, "boot": s.bootGroup,
		"template": s.templateGroup, "pool": s.poolGroup,
	}
	for _, g := range SuiteGroups {
		if len(o.Only) > 0 && !slices.Contains(o.Only, g) {
			continue
		}
		if ctx.Err() != nil {
			errs = append(errs, ctx.Err())
			break
		}
		load := loadAvg()
		gt := time.Now()
		fmt.Fprintf(o.Progress, "== %s (load average %.2f %.2f %.2f)\n", g, load[0], load[1], load[2])
		rows, err := groups[g](ctx)
		if err != nil {
			err = fmt.Errorf("%s: %w", g, err)
			errs = append(errs, err)
			fmt.Fprintf(o.Progress, "   failed: %v\n", err)
			for i := range rows {
				rows[i].Error = err.Error()
			}
		}
		for i := range rows {
			rows[i].Load = load
			rows[i].Seconds = time.Since(gt).Seconds()
		}
		rep.Rows = append(rep.Rows, rows...)
	}
	rep.Extras = s.extras
	rep.Seconds = time.Since(t0).Seconds()
	rep.LoadEnd = loadAvg()
	return rep, errors.Join(errs...)
}

type suite struct {
	o     SuiteOptions
	m     *smolvm.Manager
	img   image.Image
	qb    *qemu.Backend
	tag   string // keeps names unique across concurrent runs on one data dir
	cores int    // host CPUs, for the clone row's CPU-time bound

	extras []Figure // informational figures (no goal)
}

func (s *suite) progress(format string, args ...any) {
	fmt.Fprintf(s.o.Progress, "   "+format+"\n", args...)
}

func (s *suite) name(parts ...string) string {
	return "bsuite-" + s.tag + "-" + strings.Join(parts, "-")
}

// alternate runs a and b in round i: a first in even rounds, b first in odd
// ones, so neither side always runs on a warmer (or busier) host.
func alternate(i int, a, b func() error) error { return rotate(i, a, b) }

// rotate runs every f in round i, starting with f[i mod len(f)]: over
// len(f) rounds each side runs once in each position.
func rotate(i int, fs ...func() error) error {
	for k := range fs {
		if err := fs[(i+k)%len(fs)](); err != nil {
			return err
		}
	}
	return nil
}

func del(ctx context.Context, vm *smolvm.VM) {
	if vm == nil {
		return
	}
	vm.Delete(context.WithoutCancel(ctx))
	vm.Close()
}

func delAll(ctx context.Context, vms []*smolvm.VM) {
	var wg sync.WaitGroup
	for _, vm := range vms {
		wg.Go(func() { del(ctx, vm) })
	}
	wg.Wait()
}

// boot creates and cold-boots a VM (never from a template: the rows that
// use it measure a booted guest) and checks that it answers.
func (s *suite) boot(ctx context.Context, name string, memMiB int) (*smolvm.VM, error) {
	// Cold, as before templates: the rows built on it keep their meaning.
	vm, err := s.m.New(ctx, smolvm.Config{Name: name, Image: s.o.Image, MemoryMiB: memMiB, NoNetwork: true, ColdBoot: true})
	if err != nil {
		return nil, err
	}
	if err := vm.Start(ctx); err != nil {
		del(ctx, vm)
		return nil, err
	}
	if err := runOK(ctx, vm, "true"); err != nil {
		del(ctx, vm)
		return nil, err
	}
	return vm, nil
}

func runOK(ctx context.Context, vm *smolvm.VM, cmd string) error {
	res, err := vm.Run(ctx, cmd, smolvm.WithTimeout(5*time.Minute))
	if err != nil {
		return err
	}
	if !res.OK() {
		return fmt.Errorf("%q exited %d: %s", cmd, res.ExitCode, strings.TrimSpace(res.Stderr))
	}
	return nil
}

// sourceSnapshot boots an idle VM, takes a full snapshot of it and deletes
// the VM (so restores do not have to stop it). The caller deletes the
// snapshot.
func (s *suite) sourceSnapshot(ctx context.Context, name string, memMiB int) (string, error) {
	vm, err := s.boot(ctx, name, memMiB)
	if err != nil {
		return "", err
	}
	defer del(ctx, vm)
	id := name + "-snap"
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: id, Type: smolvm.SnapshotFull}); err != nil {
		return "", err
	}
	return id, nil
}

func (s *suite) deleteSnapshot(ctx context.Context, id string) {
	if err := s.m.DeleteSnapshot(context.WithoutCancel(ctx), id); err != nil {
		s.progress("warning: deleting snapshot %s: %v", id, err)
	}
}

// oursRestore is the SDK's restore to the first command result. The
// restored VM is returned running; the caller deletes it.
func (s *suite) oursRestore(ctx context.Context, snapID string) (phases, *smolvm.VM, error) {
	var rt phases
	t0 := time.Now()
	vm, err := s.m.FromSnapshot(ctx, snapID, smolvm.RestoreOptions{Resume: true, Force: true})
	if err != nil {
		return rt, nil, err
	}
	rt.ready = time.Since(t0)
	if err := runOK(ctx, vm, "true"); err != nil {
		del(ctx, vm)
		return rt, nil, err
	}
	rt.first = time.Since(t0)
	return rt, vm, nil
}

// bareRestore restores the same snapshot with bare QEMU, driven by hand
// through the backend's restore plan (qemu.(*Backend).PlanRestore, the one
// Restore runs): the qcow2 overlay it names, qemu-system-x86_64 with its
// argv, its QMP commands (migrate-incoming, cont), then the agent
// handshake (ready); then, informational, one exec of "true" through the
// agent (first).
func (s *suite) bareRestore(ctx context.Context, snapID string) (phases, error) {
	var rt phases
	info, err := s.m.GetSnapshot(ctx, snapID)
	if err != nil {
		return rt, err
	}
	man, err := snapshot.ReadManifest(info.Dir)
	if err != nil {
		return rt, err
	}
	dir, err := os.MkdirTemp("", "smvbr")
	if err != nil {
		return rt, err
	}
	defer os.RemoveAll(dir)
	spec := man.Spec
	spec.ID, spec.Dir, spec.RunDir = "bare", dir, dir
	spec.Disk = filepath.Join(dir, "disk.qcow2")

	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	plan, err := s.qb.PlanRestore(backend.RestoreRequest{Spec: spec, SnapshotDir: info.Dir,
		Kind: man.Type, Result: man.Result, Resume: true})
	if err != nil {
		return rt, err
	}
	if len(plan.QMP) == 0 {
		return rt, fmt.Errorf("snapshot %s has no memory to restore", snapID)
	}
	if o := plan.Overlay; o.Path != "" {
		if out, err := exec.CommandContext(cctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", o.Backing, o.Path).CombinedOutput(); err != nil {
			return rt, fmt.Errorf("qemu-img: %v: %s", err, out)
		}
	}
	logf, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		return rt, err
	}
	defer logf.Close()
	cmd := exec.Command("qemu-system-x86_64", plan.Args...)
	cmd.Dir, cmd.Stdout, cmd.Stderr = dir, logf, logf
	if err := cmd.Start(); err != nil {
		return rt, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	withLog := func(err error) error {
		if b, _ := os.ReadFile(filepath.Join(dir, "qemu.log")); len(b) > 0 {
			return fmt.Errorf("%w (qemu: %s)", err, strings.TrimSpace(string(b)))
		}
		return err
	}
	c, err := qmp.Dial(cctx, plan.QMPSocket)
	if err != nil {
		return rt, withLog(err)
	}
	defer c.Close()
	// The plan's commands as written: this QEMU runs as we do, so the
	// migration channel opens the state file by its path.
	for _, q := range plan.QMP {
		var args any
		if q.Arguments != nil {
			args = q.Arguments
		}
		if err := c.Execute(cctx, q.Execute, args, nil); err != nil {
			return rt, withLog(fmt.Errorf("%s: %w", q.Execute, err))
		}
		if q.AwaitMigration {
			if err := awaitMigration(cctx, c); err != nil {
				return rt, withLog(err)
			}
		}
	}
	rt, err = firstCommand(cctx, plan.AgentSocket, t0)
	if err != nil {
		return rt, withLog(err)
	}
	return rt, nil
}

// awaitMigration polls query-migrate until the migration completed.
func awaitMigration(ctx context.Context, c *qmp.Client) error {
	return pollUntil(ctx, func() (bool, error) {
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return false, err
		}
		switch st.Status {
		case "completed":
			return true, nil
		case "failed", "cancelled":
			return false, fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		return false, nil
	})
}

// pollUntil calls f every few milliseconds (2 ms, backing off to 20 ms)
// until it reports done or fails.
func pollUntil(ctx context.Context, f func() (bool, error)) error {
	delay := 2 * time.Millisecond
	for {
		done, err := f()
		if err != nil || done {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// restoreGroup: restore -> first command against bare QEMU restoring the
// same state.
func (s *suite) restoreGroup(ctx context.Context) ([]Row, error) {
	var ours, bare, oursReady, bareReady, chain, chainCreate []float64
	defer func() {
		s.extras = append(s.extras,
			newFigure("restore: smolvm FromSnapshot(Resume) alone (agent answered, clock request sent; no command yet)", "ms", oursReady),
			newFigure("restore: bare QEMU to the agent handshake only (no command)", "ms", bareReady),
			newFigure("restore: FromSnapshot(Resume)+Run(true) of a full snapshot taken of a restored VM (made mappable through a helper VM)", "ms", chain),
			newFigure("restore: creating that snapshot of a restored VM", "ms", chainCreate))
	}()
	row := func() []Row {
		return []Row{newRow("restore", "restore -> first command (full snapshot)", "ms",
			newFigure("smolvm FromSnapshot(Resume)+Run(true)", "ms", ours),
			newFigure("bare QEMU: same argv, migrate-incoming, cont, agent handshake, one exec of true", "ms", bare), 1.15,
			fmt.Sprintf("%d MiB idle guest; both sides end with the result of the same command; the baseline creates the same disk overlay but does not set the guest clock", s.o.MemoryMiB))}
	}
	snapID, err := s.sourceSnapshot(ctx, s.name("restore"), s.o.MemoryMiB)
	if err != nil {
		return row(), err
	}
	defer s.deleteSnapshot(ctx, snapID)
	for i := 0; i < s.o.Rounds; i++ {
		var o, b phases
		err := alternate(i, func() error {
			rt, vm, err := s.oursRestore(ctx, snapID)
			del(ctx, vm)
			o = rt
			return err
		}, func() error {
			rt, err := s.bareRestore(ctx, snapID)
			b = rt
			return err
		})
		if err != nil {
			return row(), err
		}
		ours, bare = append(ours, ms(o.first)), append(bare, ms(b.first))
		oursReady, bareReady = append(oursReady, ms(o.ready)), append(bareReady, ms(b.ready))
		s.progress("round %d: smolvm %.0f ms (restored at %.0f), bare qemu %.0f ms (handshake at %.0f)",
			i+1, ms(o.first), ms(o.ready), ms(b.first), ms(b.ready))
	}

	// Informational: a snapshot of a restored VM restores the same way.
	_, vm, err := s.oursRestore(ctx, snapID)
	if err != nil {
		return row(), err
	}
	chainID := s.name("restore", "chain")
	t0 := time.Now()
	_, err = vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: chainID, Type: smolvm.SnapshotFull})
	chainCreate = append(chainCreate, ms(time.Since(t0)))
	del(ctx, vm)
	if err != nil {
		return row(), err
	}
	defer s.deleteSnapshot(ctx, chainID)
	for i := 0; i < s.o.Rounds; i++ {
		rt, vm, err := s.oursRestore(ctx, chainID)
		del(ctx, vm)
		if err != nil {
			return row(), err
		}
		chain = append(chain, ms(rt.first))
		s.progress("snapshot of a restored VM, round %d: restore -> first command %.0f ms", i+1, ms(rt.first))
	}
	return row(), nil
}

// ramGroup: restore -> first command of a big guest against a small one.
func (s *suite) ramGroup(ctx context.Context) ([]Row, error) {
	var big, small []float64
	row := func() []Row {
		return []Row{newRow("restore-ram", fmt.Sprintf("restore -> first command, %d MiB guest vs %d MiB guest", s.o.BigMiB, s.o.SmallMiB), "ms",
			newFigure(fmt.Sprintf("%d MiB guest", s.o.BigMiB), "ms", big),
			newFigure(fmt.Sprintf("%d MiB guest", s.o.SmallMiB), "ms", small), 1.2,
			"both: FromSnapshot(Resume)+Run(true) of a full snapshot of an idle guest")}
	}
	bigID, err := s.sourceSnapshot(ctx, s.name("big"), s.o.BigMiB)
	if err != nil {
		return row(), err
	}
	defer s.deleteSnapshot(ctx, bigID)
	smallID, err := s.sourceSnapshot(ctx, s.name("small"), s.o.SmallMiB)
	if err != nil {
		return row(), err
	}
	defer s.deleteSnapshot(ctx, smallID)
	restore := func(id string, out *time.Duration) func() error {
		return func() error {
			rt, vm, err := s.oursRestore(ctx, id)
			del(ctx, vm)
			*out = rt.first
			return err
		}
	}
	for i := 0; i < s.o.Rounds; i++ {
		var b, sm time.Duration
		if err := alternate(i, restore(bigID, &b), restore(smallID, &sm)); err != nil {
			return row(), err
		}
		big, small = append(big, ms(b)), append(small, ms(sm))
		s.progress("round %d: %d MiB %.0f ms, %d MiB %.0f ms", i+1, s.o.BigMiB, ms(b), s.o.SmallMiB, ms(sm))
	}
	return row(), nil
}

// createGroup: full snapshot create against the disk floor and, as
// information, QMP snapshot-save on the same VM; the snapshot's size
// against the memory the guest uses; the source's downtime.
func (s *suite) createGroup(ctx context.Context) ([]Row, error) {
	var ours, save, size, touched, floor, down, downCall, copyFloor []float64
	defer func() {
		s.extras = append(s.extras, newFigure("source-downtime: the whole VM.Snapshot(full, ResumeSource) call of those rounds", "ms", downCall))
	}()
	rows := func() []Row {
		oursFig := newFigure("smolvm VM.Snapshot(full, ResumeSource)", "ms", ours)
		return []Row{
			newRow("snapshot-create", fmt.Sprintf("full snapshot create vs the disk floor, %d MiB guest, %d MiB touched", s.o.MemoryMiB, s.o.TouchMiB), "ms",
				oursFig, newFigure(diskFloorName, "ms", floor), 1.1,
				"ours = stop, device-state migration, sparse RAM copy, disk flatten, resume, digests, fsync, publish, commit; "+
					"the floor writes as many bytes as that round's snapshot allocates, right after it"),
			newInfoRow("snapshot-create-save", "full snapshot create vs QMP snapshot-save (information)", "ms",
				oursFig, newFigure("QMP snapshot-save job into the VM's qcow2 overlay", "ms", save),
				"same VM, alternating; the internal snapshot is deleted after each round (not timed) so every save starts from the same overlay"),
			newRow("snapshot-size", "snapshot size on disk vs memory the guest uses", "MiB",
				newFigure("SnapshotInfo.SizeBytes (allocated)", "MiB", size),
				newFigure("guest MemTotal-MemFree before the snapshot", "MiB", touched), 1.10,
				"goal: size <= touched + 10%; the size includes the flattened disk, the device state and the manifest"),
			newInfoRow("source-downtime", "source downtime of a full snapshot with ResumeSource, vs the RAM copy floor", "ms",
				newFigure("time the source does not answer: the longest agent ping round trip during VM.Snapshot(full, ResumeSource)", "ms", down),
				newFigure("RAM copy floor: writing as many bytes as the snapshot's memory image allocates into the data dir's page cache (no fsync)", "ms", copyFloor),
				fmt.Sprintf("pings every %v on an agent channel of their own (a ping sent while the VM is stopped is answered after cont; "+
					"resolution about one interval); separate rounds after the create rows, same VM; the floor is what any snapshot that "+
					"copies RAM while the guest is stopped pays", probeInterval)),
		}
	}
	vm, err := s.boot(ctx, s.name("create"), s.o.MemoryMiB)
	if err != nil {
		return rows(), err
	}
	defer del(ctx, vm)
	t := time.Now()
	if err := runOK(ctx, vm, fmt.Sprintf("head -c %d /dev/urandom > /tmp/blob", s.o.TouchMiB<<20)); err != nil {
		return rows(), err
	}
	s.progress("guest wrote %d MiB of random data to tmpfs in %.1f s", s.o.TouchMiB, time.Since(t).Seconds())
	info, err := vm.Info(ctx)
	if err != nil {
		return rows(), err
	}
	qmpPath := qemu.QMPSocket(info.RunDir)
	for i := 0; i < s.o.Rounds; i++ {
		used, err := guestUsedMiB(ctx, vm)
		if err != nil {
			return rows(), err
		}
		var o, b time.Duration
		var sz int64
		err = alternate(i, func() error {
			id := s.name("create", strconv.Itoa(i))
			t0 := time.Now()
			snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: id, Type: smolvm.SnapshotFull, ResumeSource: true})
			if err != nil {
				return err
			}
			o, sz = time.Since(t0), snap.SizeBytes
			s.deleteSnapshot(ctx, id)
			return nil
		}, func() error {
			d, err := qmpSnapshotSave(ctx, qmpPath, fmt.Sprintf("bsuite%d", i))
			b = d
			return err
		})
		if err != nil {
			return rows(), err
		}
		f, err := diskFloor(s.m.DataDir(), sz, true)
		if err != nil {
			return rows(), err
		}
		ours, save, floor = append(ours, ms(o)), append(save, ms(b)), append(floor, ms(f))
		size, touched = append(size, float64(sz)/(1<<20)), append(touched, used)
		s.progress("round %d: smolvm %.0f ms (%.1f MiB), disk floor %.0f ms, snapshot-save %.0f ms; guest uses %.1f MiB",
			i+1, ms(o), float64(sz)/(1<<20), ms(f), ms(b), used)
	}
	for i := 0; i < s.o.Rounds; i++ {
		d, call, mem, err := s.sourceDowntime(ctx, vm, info, s.name("down", strconv.Itoa(i)))
		if err != nil {
			return rows(), err
		}
		f, err := diskFloor(s.m.DataDir(), mem, false)
		if err != nil {
			return rows(), err
		}
		down, downCall, copyFloor = append(down, ms(d)), append(downCall, ms(call)), append(copyFloor, ms(f))
		s.progress("downtime round %d: source stopped %.0f ms of a %.0f ms snapshot; copying its %.0f MiB of RAM into the page cache alone: %.0f ms",
			i+1, ms(d), ms(call), float64(mem)/(1<<20), ms(f))
	}
	return rows(), nil
}

// diskFloorName describes the disk floor.
const diskFloorName = "disk floor: writing as many bytes as the snapshot allocates into the data dir, then fsync " +
	"(what any durable snapshot of this guest costs on this disk)"

// sourceDowntime takes a full snapshot with ResumeSource of the running vm
// while a probe pings its agent, and returns how long the source did not
// answer, how long the call took and the bytes its memory image
// allocates. The snapshot is deleted (not timed).
func (s *suite) sourceDowntime(ctx context.Context, vm *smolvm.VM, info smolvm.Info, id string) (down, call time.Duration, mem int64, err error) {
	p, err := startPauseProbe(ctx, info, probeInterval)
	if err != nil {
		return 0, 0, 0, err
	}
	t0 := time.Now()
	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: id, Type: smolvm.SnapshotFull, ResumeSource: true})
	call = time.Since(t0)
	// A few more intervals: the ping in flight at the resume is answered.
	time.Sleep(5 * probeInterval)
	down, n, perr := p.finish()
	if err != nil {
		return 0, 0, 0, err
	}
	defer s.deleteSnapshot(ctx, id)
	if perr != nil {
		return 0, 0, 0, perr
	}
	if n < 2 {
		return 0, 0, 0, fmt.Errorf("the downtime probe got %d answers during a %v snapshot", n, call)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(snap.Artifacts.Memory, &st); err != nil {
		return 0, 0, 0, fmt.Errorf("snapshot %s has no memory image: %w", id, err)
	}
	return down, call, st.Blocks * 512, nil
}

// diskFloor times writing n bytes of non-zero data into a new file in dir
// and, with sync, fsyncing it: the least a durable snapshot of that size
// costs there. Without sync it is the least it costs to put that much
// into dir's page cache, what a snapshot's RAM copy does while the VM is
// stopped. The file is removed afterwards (not timed).
func diskFloor(dir string, n int64, sync bool) (time.Duration, error) {
	buf := make([]byte, 8<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	f, err := os.CreateTemp(dir, ".bench-floor-*")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	t0 := time.Now()
	for left := n; left > 0; {
		k := min(left, int64(len(buf)))
		if _, err := f.Write(buf[:k]); err != nil {
			return 0, err
		}
		left -= k
	}
	if sync {
		if err := f.Sync(); err != nil {
			return 0, err
		}
	}
	return time.Since(t0), nil
}

// guestUsedMiB is MemTotal-MemFree from the guest's /proc/meminfo.
func guestUsedMiB(ctx context.Context, vm *smolvm.VM) (float64, error) {
	res, err := vm.Run(ctx, "cat /proc/meminfo")
	if err != nil {
		return 0, err
	}
	kib := map[string]float64{}
	for _, l := range strings.Split(res.Stdout, "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 {
			v, err := strconv.ParseFloat(f[1], 64)
			if err == nil {
				kib[strings.TrimSuffix(f[0], ":")] = v
			}
		}
	}
	if kib["MemTotal"] == 0 {
		return 0, fmt.Errorf("no MemTotal in the guest's /proc/meminfo")
	}
	return (kib["MemTotal"] - kib["MemFree"]) / 1024, nil
}

// qmpSnapshotSave is the internal-snapshot mechanism: a snapshot-save job
// writing the VM state and the disk snapshot into the qcow2 node "disk0",
// timed from the command until the job concluded. The snapshot is deleted
// again afterwards (not timed).
func qmpSnapshotSave(ctx context.Context, sock, tag string) (time.Duration, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	c, err := qmp.Dial(cctx, sock)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	// A snapshot of ours left x-ignore-shared on: with it, the shared guest
	// RAM would be skipped.
	caps := []map[string]any{{"capability": "x-ignore-shared", "state": false}, {"capability": "mapped-ram", "state": false}}
	if err := c.Execute(cctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := c.Execute(cctx, "snapshot-save", map[string]any{"job-id": "save-" + tag, "tag": tag,
		"vmstate": "disk0", "devices": []string{"disk0"}}, nil); err != nil {
		return 0, err
	}
	if err := waitJob(cctx, c, "save-"+tag); err != nil {
		return 0, err
	}
	d := time.Since(t0)
	if err := c.Execute(cctx, "snapshot-delete", map[string]any{"job-id": "del-" + tag, "tag": tag,
		"devices": []string{"disk0"}}, nil); err != nil {
		return d, fmt.Errorf("deleting the internal snapshot: %w", err)
	}
	if err := waitJob(cctx, c, "del-"+tag); err != nil {
		return d, fmt.Errorf("deleting the internal snapshot: %w", err)
	}
	return d, nil
}

// waitJob polls query-jobs until job id concluded, then dismisses it.
func waitJob(ctx context.Context, c *qmp.Client, id string) error {
	var jobErr string
	err := pollUntil(ctx, func() (bool, error) {
		var jobs []struct {
			ID     string `json:"id"`
			Status string `json:"status"`
			Error  string `json:"error"`
		}
		if err := c.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
			return false, err
		}
		for _, j := range jobs {
			if j.ID == id {
				jobErr = j.Error
				return j.Status == "concluded", nil
			}
		}
		return false, fmt.Errorf("job %s disappeared", id)
	})
	if err != nil {
		return err
	}
	c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
	if jobErr != "" {
		return fmt.Errorf("job %s: %s", id, jobErr)
	}
	return nil
}

// clonesGroup: N clones answering against one restore, and their host
// memory against one idle restored VM.
func (s *suite) clonesGroup(ctx context.Context) ([]Row, error) {
	n := s.o.Clones
	var forkT, forkRet, oneT, forkMem, oneMem, forkAnon, forkFile, oneAnon, oneFile []float64
	var oneCPU, forkCPU, bound, oneJIT, memFloor []float64
	defer func() {
		s.extras = append(s.extras, newFigure("clones-memory: TCG translation cache of one restored VM (anonymous rwx memory; none under KVM)", "MiB", oneJIT))
		s.extras = append(s.extras,
			newFigure(fmt.Sprintf("clones: Fork(%d, Resume) alone (every clone restored, agent answered, identity and clock set)", n), "ms", forkRet),
			newFigure("clones: CPU time (user+system) of one restore's QEMU up to its first result", "ms", oneCPU),
			newFigure(fmt.Sprintf("clones: CPU time of the %d clones' QEMUs up to the last result (sum)", n), "ms", forkCPU),
			newFigure(fmt.Sprintf("clones-memory: Pss_Anon of %d clones (QEMU heap, TCG code cache, guest pages copied on write)", n), "MiB", forkAnon),
			newFigure(fmt.Sprintf("clones-memory: Pss_File of %d clones (the shared memory image, QEMU binary and libraries)", n), "MiB", forkFile),
			newFigure("clones-memory: Pss_Anon of one restored VM", "MiB", oneAnon),
			newFigure("clones-memory: Pss_File of one restored VM", "MiB", oneFile))
	}()
	rows := func() []Row {
		forkFig := newFigure(fmt.Sprintf("smolvm Fork(%d, Resume) + Run(true) on every clone at once", n), "ms", forkT)
		memFig := newFigure(fmt.Sprintf("sum of Pss of %d clones' QEMU processes", n), "MiB", forkMem)
		return []Row{
			newRow("clones", fmt.Sprintf("%d clones -> all answer a command, vs the CPU floor", n), "ms", forkFig,
				newFigure(fmt.Sprintf("CPU floor: max(one restore, %d x one restore's QEMU CPU time / %d cores)", n, s.cores), "ms", bound), 1.15,
				fmt.Sprintf("%d MiB idle guest; %d rounds; the floor is measured on the one restore of the same round", s.o.MemoryMiB, s.o.CloneRounds)),
			newInfoRow("clones-one", fmt.Sprintf("%d clones -> all answer a command, vs one restore (information)", n), "ms", forkFig,
				newFigure("one FromSnapshot(Resume)+Run(true)", "ms", oneT), "the peers' mechanism: one restore"),
			newRow("clones-memory", fmt.Sprintf("host memory (PSS) of %d idle clones, vs the shared image + TCG cache floor", n), "MiB", memFig,
				newFigure(fmt.Sprintf("floor: Pss of one idle restored VM + %d x its TCG translation cache", n-1), "MiB", memFloor), 1.2,
				fmt.Sprintf("read from /proc/PID/smaps_rollup %.0f s after the last command; the first clone costs what one VM costs "+
					"(the shared memory image, QEMU's binary and libraries included), each further one at least its own TCG cache", s.o.Settle)),
			newInfoRow("clones-memory-one", fmt.Sprintf("host memory (PSS) of %d idle clones, vs one restored VM (information)", n), "MiB", memFig,
				newFigure("Pss of one idle restored VM's QEMU", "MiB", oneMem), "the peers' mechanism: one restored VM's PSS"),
		}
	}
	snapID, err := s.sourceSnapshot(ctx, s.name("fork"), s.o.MemoryMiB)
	if err != nil {
		return rows(), err
	}
	defer s.deleteSnapshot(ctx, snapID)
	settle := time.Duration(s.o.Settle * float64(time.Second))
	for i := 0; i < s.o.CloneRounds; i++ {
		var fd, fr, od time.Duration
		var fm, om pss
		var fc, oc, oj float64
		err := alternate(i, func() error {
			t0 := time.Now()
			vms, err := s.m.Fork(ctx, snapID, n, smolvm.ForkOptions{Resume: true, Prefix: s.name("f" + strconv.Itoa(i))})
			defer delAll(ctx, vms)
			if err != nil {
				return err
			}
			fr = time.Since(t0)
			if len(vms) != n {
				return fmt.Errorf("fork returned %d clones, want %d", len(vms), n)
			}
			errs := make([]error, n)
			var wg sync.WaitGroup
			for k, vm := range vms {
				wg.Go(func() { errs[k] = runOK(ctx, vm, "true") })
			}
			wg.Wait()
			fd = time.Since(t0)
			if err := errors.Join(errs...); err != nil {
				return err
			}
			for _, vm := range vms {
				c, err := vmCPU(ctx, vm)
				if err != nil {
					return err
				}
				fc += c
			}
			time.Sleep(settle)
			fm, err = pssSum(ctx, vms)
			return err
		}, func() error {
			rt, vm, err := s.oursRestore(ctx, snapID)
			defer del(ctx, vm)
			if err != nil {
				return err
			}
			od = rt.first
			if oc, err = vmCPU(ctx, vm); err != nil {
				return err
			}
			time.Sleep(settle)
			if om, err = pssSum(ctx, []*smolvm.VM{vm}); err != nil {
				return err
			}
			info, err := vm.Info(ctx)
			if err != nil {
				return err
			}
			oj, err = jitMiB(info.PID)
			return err
		})
		if err != nil {
			return rows(), err
		}
		forkT, forkRet, oneT = append(forkT, ms(fd)), append(forkRet, ms(fr)), append(oneT, ms(od))
		forkMem, oneMem = append(forkMem, fm.total), append(oneMem, om.total)
		forkAnon, forkFile = append(forkAnon, fm.anon), append(forkFile, fm.file)
		oneAnon, oneFile = append(oneAnon, om.anon), append(oneFile, om.file)
		oneCPU, forkCPU, oneJIT = append(oneCPU, oc), append(forkCPU, fc), append(oneJIT, oj)
		bound = append(bound, cpuFloor(ms(od), oc, n, s.cores))
		memFloor = append(memFloor, memoryFloor(om.total, oj, n))
		s.progress("round %d: %d clones answering %.0f ms (%.1f MiB PSS), one restore %.0f ms (%.1f MiB PSS)", i+1, n, ms(fd), fm.total, ms(od), om.total)
	}
	return rows(), nil
}

// cpuFloor is the least time n restores can take on cores CPUs when one
// takes oneMS of wall time and oneCPU ms of CPU: none is faster than one
// alone, and together they need n x oneCPU of CPU time.
func cpuFloor(oneMS, oneCPU float64, n, cores int) float64 {
	return max(oneMS, float64(n)*oneCPU/float64(max(cores, 1)))
}

// memoryFloor is the least host memory n clones can take when one
// restored VM takes onePSS and its TCG translation cache (private to every
// process) is jit: the first clone costs what one VM costs, the shared
// memory image included; each further one at least its own cache.
func memoryFloor(onePSS, jit float64, n int) float64 {
	return onePSS + float64(max(n-1, 0))*jit
}

// vmCPU is the CPU time (user+system, ms) the VM's QEMU process has used.
func vmCPU(ctx context.Context, vm *smolvm.VM) (float64, error) {
	info, err := vm.Info(ctx)
	if err != nil {
		return 0, err
	}
	if info.PID <= 0 {
		return 0, fmt.Errorf("vm %s has no process", vm.ID())
	}
	return procCPUms(info.PID)
}

// procCPUms reads utime+stime of a process from /proc/PID/stat, in ms
// (USER_HZ is 100 on Linux: 10 ms resolution).
func procCPUms(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: fields count from ")".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	ut, err1 := strconv.ParseFloat(f[11], 64) // field 14
	st, err2 := strconv.ParseFloat(f[12], 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return (ut + st) * 10, nil
}

// jitMiB is the anonymous memory in a process's writable+executable
// mappings: QEMU's TCG code buffer (translated guest code), from smaps.
func jitMiB(pid int) (float64, error) {
	m, err := procfs.Smaps(pid)
	return float64(m.WXAnon) / 1024, err
}

// pss is a process's proportional set size (MiB), split like smaps_rollup.
type pss struct{ total, anon, file float64 }

func (p *pss) add(q pss) { p.total, p.anon, p.file = p.total+q.total, p.anon+q.anon, p.file+q.file }

// pssSum sums the Pss of the VMs' QEMU processes.
func pssSum(ctx context.Context, vms []*smolvm.VM) (pss, error) {
	var sum pss
	for _, vm := range vms {
		info, err := vm.Info(ctx)
		if err != nil {
			return sum, err
		}
		if info.PID <= 0 {
			return sum, fmt.Errorf("vm %s has no process", vm.ID())
		}
		p, err := readPss(info.PID)
		if err != nil {
			return sum, err
		}
		sum.add(p)
	}
	return sum, nil
}

// readPss reads Pss, Pss_Anon and Pss_File from /proc/PID/smaps_rollup.
func readPss(pid int) (pss, error) {
	m, err := procfs.Rollup(pid)
	return pss{total: float64(m.Pss) / 1024, anon: float64(m.PssAnon) / 1024, file: float64(m.PssFile) / 1024}, err
}

// bootGroup: cold boot -> first command against bare QEMU with the plain
// kernel command line, and, as information, what init_on_free=1 costs a
// bare boot.
func (s *suite) bootGroup(ctx context.Context) ([]Row, error) {
	var ours, bare, bareReady, bareIOF []float64
	defer func() {
		s.extras = append(s.extras, newFigure("cold-boot: bare QEMU (plain command line) to the agent handshake only (no command)", "ms", bareReady))
	}()
	rows := func() []Row {
		bareFig := newFigure(bareBootName(), "ms", bare)
		return []Row{
			newRow("cold-boot", "cold boot -> first command", "ms",
				newFigure("smolvm New+Start+Run(true), ColdBoot", "ms", ours), bareFig, 1.10,
				fmt.Sprintf("%d MiB guest; both sides end with the result of the same command; ours passes the backend's and the image's flags "+
					"(init_on_free=1, reboot=t, panic=-1), the baseline none of them (both pass tsc_early_khz under TCG: without it boots hang)", s.o.MemoryMiB)),
			newInfoRow("init-on-free", "init_on_free=1 share of a bare cold boot (information)", "ms",
				newFigure("bare qemu, plain command line + "+initOnFreeArg, "ms", bareIOF), bareFig,
				"both bare QEMU, same argv, ending with the result of one exec of true; the difference is what the flag costs a boot"),
		}
	}
	o := s.o.Options
	for i := 0; i < s.o.Rounds; i++ {
		var od time.Duration
		var bt, bi phases
		err := rotate(i, func() error {
			d, err := oursBoot(ctx, s.m, o, i)
			od = d
			return err
		}, func() error {
			b, err := bareBoot(ctx, s.img, o, plainCmdline())
			bt = b
			return err
		}, func() error {
			b, err := bareBoot(ctx, s.img, o, plainCmdline()+" "+initOnFreeArg)
			bi = b
			return err
		})
		if err != nil {
			return rows(), err
		}
		ours, bare, bareReady, bareIOF = append(ours, ms(od)), append(bare, ms(bt.first)), append(bareReady, ms(bt.ready)), append(bareIOF, ms(bi.first))
		s.progress("round %d: smolvm %.0f ms, bare qemu %.0f ms (handshake %.0f ms), bare qemu with %s %.0f ms",
			i+1, ms(od), ms(bt.first), ms(bt.ready), initOnFreeArg, ms(bi.first))
	}
	return rows(), nil
}

func loadAvg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}

func randTag() string {
	return strconv.FormatInt(time.Now().UnixNano()%(36*36*36*36), 36)
}
