package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
)

// Remote measures the remote snapshot store through the SDK, against the
// remote named remoteName in the caller's data dir (its URL, endpoint and
// region; credentials from the environment as for any push). It works
// under a fresh prefix of that remote (bench-<random>) so earlier pushes
// share no chunk with it, and in two private data dirs of its own: host A
// makes the snapshots and pushes them, host B pulls. Nothing is left in
// either data dir; the pushed chunks stay in the store under that prefix
// (the store has no garbage collection yet), and the report names it.
//
// Figures: push and pull throughput of one full snapshot (data bytes over
// wall time, MiB/s), and dedup: n sandboxes created from one template each
// write a file and take a full snapshot, every one is pushed, and the bytes
// the store received for all n are compared with what the first one alone
// took (a store without dedup takes n times as much: ratio n).
func Remote(ctx context.Context, o Options, remoteName string, n int) (Report, error) {
	o.defaults()
	if n < 2 {
		n = 10
	}
	img, err := image.Open(o.Manager.ImageDir(), o.Image)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Host: hostInfo(o, img)}
	remotes, err := o.Manager.Remotes(ctx)
	if err != nil {
		return rep, err
	}
	var base *smolvm.Remote
	for i := range remotes {
		if remotes[i].Name == remoteName || (remoteName == "" && remotes[i].Default) {
			base = &remotes[i]
		}
	}
	if base == nil {
		return rep, fmt.Errorf("no remote %q in %s: add one first", remoteName, o.Manager.DataDir())
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	prefix := "bench-" + hex.EncodeToString(rnd[:])
	r := smolvm.Remote{Name: "bench", URL: strings.TrimSuffix(base.URL, "/") + "/" + prefix, Endpoint: base.Endpoint, Region: base.Region}
	fmt.Fprintf(o.Progress, "store: %s (endpoint %s)\n", r.URL, r.Endpoint)

	dir, err := os.MkdirTemp("", "smolvm-bench-remote-")
	if err != nil {
		return rep, err
	}
	defer os.RemoveAll(dir)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	host := func(name string) (*smolvm.Manager, error) {
		m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: filepath.Join(dir, name), ImageDir: o.Manager.ImageDir(), Logger: quiet})
		if err != nil {
			return nil, err
		}
		if err := m.AddRemote(ctx, r); err != nil {
			m.Close()
			return nil, err
		}
		return m, nil
	}
	a, err := host("a")
	if err != nil {
		return rep, err
	}
	defer a.Close()
	b, err := host("b")
	if err != nil {
		return rep, err
	}
	defer b.Close()

	// n sandboxes from one template (the first create makes it), each with
	// its own file, each snapshotted (full) and deleted.
	ids := make([]string, n)
	defer func() {
		for _, id := range ids {
			if id != "" {
				a.DeleteSnapshot(context.WithoutCancel(ctx), id)
			}
		}
	}()
	for i := range ids {
		vm, err := a.New(ctx, smolvm.Config{Name: fmt.Sprintf("bench-remote-%d", i), Image: o.Image, MemoryMiB: o.MemoryMiB, NoNetwork: true})
		if err != nil {
			return rep, err
		}
		snapID := fmt.Sprintf("bench-remote-snap-%d", i)
		err = func() error {
			defer func() { vm.Delete(context.WithoutCancel(ctx)); vm.Close() }()
			if err := vm.Start(ctx); err != nil {
				return err
			}
			res, err := vm.Run(ctx, fmt.Sprintf("echo sandbox %d > /root/who && sync", i))
			if err != nil {
				return err
			}
			if res.ExitCode != 0 {
				return fmt.Errorf("guest command exited %d: %s", res.ExitCode, res.Stderr)
			}
			_, err = vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: snapID, Type: smolvm.SnapshotFull})
			return err
		}()
		if err != nil {
			return rep, fmt.Errorf("sandbox %d: %w", i, err)
		}
		ids[i] = snapID
	}

	// Push each; the first one goes to an empty prefix.
	var pushMiBs, uploaded []float64
	var stored, first float64
	var dataMiB float64
	for i, id := range ids {
		t0 := time.Now()
		st, err := a.PushSnapshot(ctx, id, smolvm.PushOptions{})
		if err != nil {
			return rep, fmt.Errorf("push %s: %w", id, err)
		}
		d := time.Since(t0)
		up := float64(st.UploadedBytes) / (1 << 20)
		uploaded = append(uploaded, up)
		stored += up
		if i == 0 {
			first = up
			dataMiB = float64(st.DataBytes) / (1 << 20)
			pushMiBs = append(pushMiBs, dataMiB/d.Seconds())
		}
		fmt.Fprintf(o.Progress, "push %d: %d of %d chunks sent, %.1f MiB sent, %.1f MiB data, %.0f ms\n",
			i+1, st.Uploaded, st.Chunks, up, float64(st.DataBytes)/(1<<20), ms(d))
	}

	// Pull the first one on host B, o.Rounds times (deleting it between).
	var pullMiBs []float64
	for i := 0; i < o.Rounds; i++ {
		var ps smolvm.PullStats
		t0 := time.Now()
		if _, err := b.PullSnapshot(ctx, ids[0], smolvm.PullOptions{Stats: &ps}); err != nil {
			return rep, fmt.Errorf("pull %s: %w", ids[0], err)
		}
		d := time.Since(t0)
		pullMiBs = append(pullMiBs, dataMiB/d.Seconds())
		fmt.Fprintf(o.Progress, "pull round %d: %d chunks, %.1f MiB fetched, %.0f ms\n", i+1, ps.Downloaded, float64(ps.DownloadedBytes)/(1<<20), ms(d))
		if err := b.DeleteSnapshot(ctx, ids[0]); err != nil {
			return rep, err
		}
	}
	rep.Figures = append(rep.Figures,
		newFigure("push of one full snapshot to an empty store (data MiB/s)", "MiB/s", pushMiBs),
		newFigure("pull of that snapshot into an empty data dir (data MiB/s)", "MiB/s", pullMiBs),
		newFigure("data of one full snapshot (allocated, uncompressed)", "MiB", []float64{dataMiB}),
		newFigure(fmt.Sprintf("bytes the store received per push, in order (%d snapshots of one template)", n), "MiB", uploaded),
		newFigure(fmt.Sprintf("store bytes for all %d snapshots", n), "MiB", []float64{stored}),
	)
	if first > 0 {
		rep.Ratios = append(rep.Ratios, newRatio(fmt.Sprintf("store bytes of %d snapshots vs one (dedup; %g = none)", n, float64(n)),
			newFigure("all", "MiB", []float64{stored}), newFigure("first", "MiB", []float64{first}), 0))
	}
	fmt.Fprintf(o.Progress, "chunks left in the store under %s (no garbage collection yet)\n", r.URL)
	return rep, nil
}
