package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm-go/smolvm"
)

// remoteCmd is `remote add|ls|rm`: the snapshot stores of this data dir.
func (a *app) remoteCmd() *cobra.Command {
	c := &cobra.Command{Use: "remote", Short: "Configure remote snapshot stores (S3-compatible; credentials from the AWS environment)"}
	var endpoint, region string
	var def bool
	add := &cobra.Command{
		Use:   "add NAME s3://BUCKET[/PREFIX]",
		Short: "Add a remote (the first one is the default: restore and fork pull missing snapshots from it)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				r := smolvm.Remote{Name: args[0], URL: args[1], Endpoint: endpoint, Region: region, Default: def}
				if err := m.AddRemote(ctx, r); err != nil {
					return err
				}
				a.print(r, func(w io.Writer) { fmt.Fprintf(w, "added remote %s (%s)\n", r.Name, r.URL) })
				return nil
			})
		},
	}
	add.Flags().StringVar(&endpoint, "endpoint", "", "S3 endpoint http(s)://HOST[:PORT] (default: AWS)")
	add.Flags().StringVar(&region, "region", "", "region (e.g. us-east-1)")
	add.Flags().BoolVar(&def, "default", false, "make it the default remote")
	ls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List the remotes", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				rs, err := m.Remotes(ctx)
				if err != nil {
					return err
				}
				a.print(rs, func(w io.Writer) {
					rows := [][]string{}
					for _, r := range rs {
						d := ""
						if r.Default {
							d = "*"
						}
						rows = append(rows, []string{r.Name, r.URL, r.Endpoint, r.Region, d})
					}
					table(w, []string{"NAME", "URL", "ENDPOINT", "REGION", "DEFAULT"}, rows)
				})
				return nil
			})
		},
	}
	rm := &cobra.Command{
		Use: "rm NAME", Aliases: []string{"remove"}, Short: "Remove a remote from the config (what it stores stays)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				if err := m.RemoveRemote(ctx, args[0]); err != nil {
					return err
				}
				a.print(map[string]string{"removed": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "removed remote %s\n", args[0]) })
				return nil
			})
		},
	}
	c.AddCommand(add, ls, rm)
	return c
}

// snapshotPushCmd is `snapshot push ID [--remote NAME]`.
func (a *app) snapshotPushCmd() *cobra.Command {
	var remoteName string
	push := &cobra.Command{
		Use:               "push ID",
		Short:             "Upload a snapshot to a remote store (only the chunks it lacks)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				start := time.Now()
				p := newProgress(cmd.ErrOrStderr(), "push "+args[0])
				st, err := m.PushSnapshot(ctx, args[0], smolvm.PushOptions{Remote: remoteName, Progress: p.update})
				p.done()
				if err != nil {
					return err
				}
				a.print(st, func(w io.Writer) {
					fmt.Fprintf(w, "pushed %s to %s in %.2fs: %d chunks, %d uploaded, %d already there; %s of data, %s sent\n",
						st.SnapshotID, st.Remote, time.Since(start).Seconds(), st.Chunks, st.Uploaded, st.Chunks-st.Uploaded,
						humanBytes(st.DataBytes), humanBytes(st.UploadedBytes))
				})
				return nil
			})
		},
	}
	push.Flags().StringVar(&remoteName, "remote", "", "remote name (default: the default remote)")
	return push
}

// snapshotPullCmd is `snapshot pull ID [--remote NAME] [--snapshot-id NEW]`.
func (a *app) snapshotPullCmd() *cobra.Command {
	var remoteName, sid string
	pull := &cobra.Command{
		Use:   "pull ID",
		Short: "Download a snapshot from a remote store (verified before it is listed; an interrupted pull resumes)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				start := time.Now()
				p := newProgress(cmd.ErrOrStderr(), "pull "+args[0])
				var st smolvm.PullStats
				info, err := m.PullSnapshot(ctx, args[0], smolvm.PullOptions{Remote: remoteName, SnapshotID: sid, Progress: p.update, Stats: &st})
				p.done()
				if err != nil {
					return err
				}
				a.print(struct {
					*smolvm.SnapshotInfo
					Pull smolvm.PullStats `json:"pull"`
				}{info, st}, func(w io.Writer) {
					fmt.Fprintf(w, "pulled snapshot %s (%s, %s) of %s from %s in %.2fs: %d chunks, %d downloaded (%s), %d kept from an interrupted pull\n",
						info.ID, info.Type, humanBytes(info.SizeBytes), info.VMID, st.Remote, time.Since(start).Seconds(),
						st.Chunks, st.Downloaded, humanBytes(st.DownloadedBytes), st.Chunks-st.Downloaded)
				})
				return nil
			})
		},
	}
	pull.Flags().StringVar(&remoteName, "remote", "", "remote name (default: the default remote)")
	pull.Flags().StringVar(&sid, "snapshot-id", "", "add it under this id instead of the remote's")
	return pull
}

// remoteSnapshotList is `snapshot list --remote NAME`.
func (a *app) remoteSnapshotList(cmd *cobra.Command, name string) error {
	return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		snaps, err := m.ListRemoteSnapshots(ctx, name)
		if err != nil {
			return err
		}
		a.print(snaps, func(w io.Writer) {
			rows := [][]string{}
			for _, s := range snaps {
				rows = append(rows, []string{s.ID, s.VMID, string(s.Type), humanBytes(s.SizeBytes), humanBytes(s.DataBytes),
					s.PushedAt.Local().Format("2006-01-02 15:04:05")})
			}
			table(w, []string{"ID", "VM", "TYPE", "SIZE", "DATA", "PUSHED"}, rows)
		})
		return nil
	})
}

// progress prints a transfer's progress on stderr: a bar redrawn in place
// when stderr is a terminal, else a line at most once a second.
type progress struct {
	w     io.Writer
	what  string
	tty   bool
	mu    sync.Mutex
	last  time.Time
	drawn bool
}

func newProgress(w io.Writer, what string) *progress {
	p := &progress{w: w, what: what}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		p.tty = true
	}
	return p
}

func (p *progress) update(tp smolvm.TransferProgress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	end := tp.DoneChunks == tp.TotalChunks
	if !end && time.Since(p.last) < time.Second && !(p.tty && time.Since(p.last) > 100*time.Millisecond) {
		return
	}
	p.last = time.Now()
	pct := 100.0
	if tp.TotalBytes > 0 {
		pct = float64(tp.DoneBytes) * 100 / float64(tp.TotalBytes)
	}
	line := fmt.Sprintf("%s: %s %d/%d chunks, %s/%s (%.0f%%)", p.what, tp.Phase, tp.DoneChunks, tp.TotalChunks,
		humanBytes(tp.DoneBytes), humanBytes(tp.TotalBytes), pct)
	if p.tty {
		const width = 24
		n := int(pct / 100 * width)
		fmt.Fprintf(p.w, "\r\x1b[K[%s%s] %s", strings.Repeat("#", n), strings.Repeat(".", width-n), line)
		p.drawn = true
		return
	}
	fmt.Fprintln(p.w, line)
}

// done ends a bar's line.
func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		fmt.Fprintln(p.w)
	}
}
