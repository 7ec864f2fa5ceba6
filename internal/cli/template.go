package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

// templateCmd is `smolvm template ls|build|rm|gc`: the pre-booted
// templates sandboxes are created from (smolvm.Manager's *Template*).
func (a *app) templateCmd() *cobra.Command {
	c := &cobra.Command{Use: "template", Aliases: []string{"templates"}, Short: "List, build and remove the pre-booted templates sandboxes start from",
		Long: `A template is a full snapshot of an image booted to agent-ready with one shape
(memory, vCPUs, network on/off, backend, accelerator). "sandbox create" restores
the matching template instead of booting (and builds it on first use); a rebuilt
image or agent makes a new one. Stale templates are removed by "template gc".`}
	ls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List templates (stale ones are marked)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				list, err := m.ListTemplates(ctx)
				if err != nil {
					return err
				}
				a.print(list, func(w io.Writer) {
					rows := [][]string{}
					for _, t := range list {
						state := "current"
						if t.Stale {
							state = "stale: " + t.StaleReason
						}
						net := "on"
						if !t.Shape.Network {
							net = "off"
						}
						rows = append(rows, []string{t.Key[:16], t.Shape.Image, fmt.Sprintf("%d MiB", t.Shape.MemoryMiB), fmt.Sprint(t.Shape.CPUs),
							net, t.Shape.Backend + "/" + string(t.Shape.Accel), fmt.Sprintf("%.0f MiB", float64(t.SizeBytes)/(1<<20)),
							fmt.Sprint(t.Uses), state})
					}
					table(w, []string{"KEY", "IMAGE", "MEMORY", "CPUS", "NETWORK", "BACKEND", "SIZE", "USES", "STATE"}, rows)
				})
				return nil
			})
		},
	}
	var opts smolvm.TemplateOptions
	build := &cobra.Command{
		Use: "build IMAGE", Short: "Build the template of an image and shape now (a create would on first use)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				t, err := m.BuildTemplate(ctx, args[0], opts)
				if err != nil {
					return err
				}
				a.print(t, func(w io.Writer) {
					fmt.Fprintf(w, "template %s ready (%s, %d MiB)\n", t.Key[:16], t.Shape.Image, t.Shape.MemoryMiB)
				})
				return nil
			})
		},
	}
	f := build.Flags()
	f.IntVar(&opts.MemoryMiB, "memory", 0, "guest memory in MiB (default 512)")
	f.IntVar(&opts.CPUs, "cpus", 0, "vCPUs (default 1)")
	f.BoolVar(&opts.NoNetwork, "no-network", false, "the template of sandboxes without networking")
	f.StringVar((*string)(&opts.Backend), "backend", "", backendFlagHelp())
	f.StringVar((*string)(&opts.Accel), "accel", "", "auto (default), kvm or tcg")
	rm := &cobra.Command{
		Use: "rm KEY", Aliases: []string{"remove", "delete"}, Short: "Remove a template (KEY: at least 8 leading hex digits)", Args: cobra.ExactArgs(1),
		Long: `Remove a template. Refused while a sandbox created from it runs or is paused;
the disks of stopped ones are made independent of it first, so they keep working.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				if err := m.DeleteTemplate(ctx, args[0]); err != nil {
					return err
				}
				a.print(map[string]string{"removed": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "removed %s\n", args[0]) })
				return nil
			})
		},
	}
	gc := &cobra.Command{
		Use: "gc", Short: "Remove stale templates (image rebuilt or gone, agent changed)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				res, err := m.CollectTemplates(ctx)
				if err != nil {
					return err
				}
				a.print(res, func(w io.Writer) {
					for _, t := range res.Removed {
						fmt.Fprintf(w, "removed %s (%s)\n", t.Key[:16], t.StaleReason)
					}
					for k, why := range res.Kept {
						fmt.Fprintf(w, "kept %s: %s\n", k[:16], why)
					}
					if len(res.Removed)+len(res.Kept) == 0 {
						fmt.Fprintln(w, "no stale templates")
					}
				})
				return nil
			})
		},
	}
	c.AddCommand(ls, build, rm, gc, a.poolCmd())
	return c
}

// poolCmd is `smolvm template pool IMAGE --size N`, `pool ls` and `pool
// fill`: the warm pools (smolvm.Manager's SetPool, FillPool, Pools,
// FillPools).
func (a *app) poolCmd() *cobra.Command {
	var opts smolvm.TemplateOptions
	var size int
	c := &cobra.Command{
		Use: "pool IMAGE --size N", Short: "Keep N restored, paused sandboxes of an image and shape ready (0 removes the pool)",
		Long: `A warm pool keeps N sandboxes restored from the image's template and paused.
"sandbox create" with that image and shape (and no port forwards or network
allow-list) claims one, gives it its name, identity and environment, and
resumes it; the pool is refilled by a detached "smolvm template pool fill" once
the create returned (its output: pool-fill.log in the data dir). This command
fills the pool before it returns.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				if err := m.SetPool(ctx, args[0], opts, size); err != nil {
					return err
				}
				if size > 0 {
					if err := m.FillPool(ctx, args[0], opts); err != nil { // this pool only
						return err
					}
				}
				pools, err := m.Pools(ctx)
				if err != nil {
					return err
				}
				a.print(pools, func(w io.Writer) { poolTable(w, pools) })
				return nil
			})
		},
	}
	f := c.Flags()
	f.IntVar(&size, "size", 0, fmt.Sprintf("sandboxes to keep ready (0-%d; 0 removes the pool)", smolvm.MaxPoolSize))
	c.MarkFlagRequired("size")
	f.IntVar(&opts.MemoryMiB, "memory", 0, "guest memory in MiB (default 512)")
	f.IntVar(&opts.CPUs, "cpus", 0, "vCPUs (default 1)")
	f.BoolVar(&opts.NoNetwork, "no-network", false, "the pool of sandboxes without networking")
	f.StringVar((*string)(&opts.Backend), "backend", "", backendFlagHelp())
	f.StringVar((*string)(&opts.Accel), "accel", "", "auto (default), kvm or tcg")
	ls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List warm pools: size, ready members, idle memory", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				pools, err := m.Pools(ctx)
				if err != nil {
					return err
				}
				a.print(pools, func(w io.Writer) { poolTable(w, pools) })
				return nil
			})
		},
	}
	fill := &cobra.Command{
		Use: "fill", Short: "Bring every warm pool to its size (what a create runs, detached, after claiming)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				// Detached fillers have no caller to stop them: each gives
				// up after poolFillTimeout (one stuck behind another's lock
				// or on a guest does not stay forever).
				ctx, cancel := context.WithTimeout(ctx, poolFillTimeout)
				defer cancel()
				if err := m.FillPools(ctx); err != nil {
					return err
				}
				a.print(map[string]bool{"filled": true}, nil)
				return nil
			})
		},
	}
	c.AddCommand(ls, fill)
	return c
}

func poolTable(w io.Writer, pools []smolvm.PoolInfo) {
	rows := [][]string{}
	for _, p := range pools {
		rows = append(rows, []string{p.Image, fmt.Sprintf("%d MiB", p.Options.MemoryMiB), fmt.Sprint(p.Options.CPUs), fmt.Sprint(!p.Options.NoNetwork),
			fmt.Sprint(p.Size), fmt.Sprint(p.Ready), fmt.Sprintf("%.0f MiB", float64(p.IdleMemoryKiB)/1024)})
	}
	table(w, []string{"IMAGE", "MEMORY", "CPUS", "NETWORK", "SIZE", "READY", "IDLE MEMORY (PSS)"}, rows)
}

// poolFillTimeout bounds one "template pool fill" run.
const poolFillTimeout = 10 * time.Minute

// refillPools starts a detached "smolvm template pool fill" when a pool
// is short (a create just claimed a member): after the create's Start
// returned, never before. The filler waits for any other filler of the
// pool, fills it and exits; its output goes to pool-fill.log in the data
// dir (restarted past 1 MiB).
func (a *app) refillPools(ctx context.Context, m *smolvm.Manager) {
	pools, err := m.Pools(ctx)
	if err != nil {
		return
	}
	short := false
	for _, p := range pools {
		short = short || p.Ready < p.Size
	}
	if !short {
		return
	}
	exe, err := os.Executable()
	if err != nil {
		return
	}
	logPath := filepath.Join(m.DataDir(), "pool-fill.log")
	logf, err := openFillLog(logPath)
	if err != nil {
		fmt.Fprintf(a.stderr, "warning: not refilling the warm pool: %v\n", err)
		return
	}
	defer logf.Close()
	cmd := exec.Command(exe, "--data-dir", m.DataDir(), "--image-dir", m.ImageDir(), "template", "pool", "fill")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(a.stderr, "warning: refilling the warm pool: %v\n", err)
		return
	}
	cmd.Process.Release()
}

// openFillLog opens the detached filler's log for appending (truncated
// past 1 MiB): never through a link, never a FIFO or device (opened
// non-blocking, then it must be a regular file of this user), as the data
// dir is not known to be private.
func openFillLog(path string) (*os.File, error) {
	flags := os.O_CREATE | os.O_WRONLY | os.O_APPEND | syscall.O_NOFOLLOW | syscall.O_NONBLOCK
	if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() && st.Size() > 1<<20 {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err == nil && (!st.Mode().IsRegular() || st.Sys().(*syscall.Stat_t).Uid != uint32(os.Geteuid())) {
		err = fmt.Errorf("%s is not a regular file of this user", path)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
