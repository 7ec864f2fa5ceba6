package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

func (a *app) sandboxCmd() *cobra.Command {
	c := &cobra.Command{Use: "sandbox", Aliases: []string{"sb", "vm"}, Short: "Create, run commands in, and manage sandboxes"}
	c.AddCommand(a.createCmd(), a.listCmd(), a.infoCmd(), a.execCmd(),
		a.simpleCmd("start", "Boot a stopped sandbox (or resume a paused one)", (*smolvm.VM).Start),
		a.simpleCmd("stop", "Shut a sandbox down (its disk is kept)", (*smolvm.VM).Stop),
		a.simpleCmd("pause", "Freeze a running sandbox", (*smolvm.VM).Pause),
		a.simpleCmd("resume", "Continue a paused sandbox", (*smolvm.VM).Resume),
		a.deleteCmd(), a.logsCmd(), a.fileCmd(), a.portCmd(), a.snapshotCmd())
	return c
}

// completeVMs offers VM ids for shell completion.
func (a *app) completeVMs(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var ids []string
	a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		infos, err := m.List(ctx)
		for _, i := range infos {
			ids = append(ids, i.ID)
		}
		return err
	})
	return ids, cobra.ShellCompDirectiveNoFileComp
}

func (a *app) createCmd() *cobra.Command {
	var cfg smolvm.Config
	var ports []string
	var bootTimeout time.Duration
	c := &cobra.Command{
		Use:   "create",
		Short: "Create and start a sandbox",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, p := range ports {
				pf, err := parsePort(p)
				if err != nil {
					return err
				}
				cfg.PortForwards = append(cfg.PortForwards, pf)
			}
			cfg.BootTimeout = bootTimeout
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				vm, err := m.New(ctx, cfg)
				if err != nil {
					return err
				}
				defer vm.Close()
				if err := vm.Start(ctx); err != nil {
					return err
				}
				info, err := vm.Info(ctx)
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) { fmt.Fprintf(w, "%s\n", info.ID) })
				return nil
			})
		},
	}
	f := c.Flags()
	f.StringVar(&cfg.Name, "name", "", "sandbox id (default: generated)")
	f.StringVar(&cfg.Image, "image", "", "guest image: debian (default) or busybox")
	f.IntVar(&cfg.MemoryMiB, "memory", 0, "guest memory in MiB (128-16384, default 512)")
	f.IntVar(&cfg.CPUs, "cpus", 0, "vCPUs (1-32, default 1)")
	f.BoolVar(&cfg.NoNetwork, "no-network", false, "no guest networking")
	f.StringVar(&cfg.Backend, "backend", "", "qemu (default), firecracker or auto")
	f.StringVar(&cfg.Accel, "accel", "", "auto (default), kvm or tcg")
	f.StringToStringVarP(&cfg.Env, "env", "e", nil, "environment variable KEY=VALUE for every command (repeatable)")
	f.StringArrayVarP(&ports, "port", "p", nil, "expose HOST:GUEST tcp port (repeatable)")
	f.DurationVar(&bootTimeout, "boot-timeout", 0, "give up booting after this long (default 90s)")
	return c
}

func parsePort(s string) (smolvm.PortForward, error) {
	h, g, ok := strings.Cut(s, ":")
	hp, err1 := strconv.Atoi(h)
	gp, err2 := strconv.Atoi(g)
	if !ok || err1 != nil || err2 != nil {
		return smolvm.PortForward{}, &smolvm.Error{Message: fmt.Sprintf("invalid port mapping %q: want HOST:GUEST, e.g. 8080:80", s),
			Fix: "use -p 8080:80", Err: smolvm.ErrInvalidConfig}
	}
	return smolvm.PortForward{HostAddr: "127.0.0.1", HostPort: hp, GuestPort: gp}, nil
}

func (a *app) listCmd() *cobra.Command {
	var all bool
	c := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List sandboxes (running and paused; --all for every state)",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				infos, err := m.List(ctx)
				if err != nil {
					return err
				}
				shown := []smolvm.Info{}
				for _, i := range infos {
					if all || i.Status == smolvm.StatusRunning || i.Status == smolvm.StatusPaused {
						shown = append(shown, i)
					}
				}
				a.print(shown, func(w io.Writer) {
					rows := [][]string{}
					for _, i := range shown {
						rows = append(rows, []string{i.ID, string(i.Status), i.Image, i.Backend, fmt.Sprint(i.MemoryMiB), fmt.Sprint(i.CPUs), i.CreatedAt.Local().Format("2006-01-02 15:04:05")})
					}
					table(w, []string{"ID", "STATUS", "IMAGE", "BACKEND", "MEMORY", "CPUS", "CREATED"}, rows)
				})
				return nil
			})
		},
	}
	c.Flags().BoolVarP(&all, "all", "a", false, "include created, stopped and failed sandboxes")
	return c
}

// withVM opens the named VM and runs fn.
func (a *app) withVM(cmd *cobra.Command, id string, fn func(ctx context.Context, vm *smolvm.VM) error) error {
	return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		vm, err := m.Open(ctx, id)
		if err != nil {
			return err
		}
		defer vm.Close()
		return fn(ctx, vm)
	})
}

func (a *app) infoCmd() *cobra.Command {
	return &cobra.Command{
		Use: "info NAME", Short: "Show a sandbox", Args: cobra.ExactArgs(1), ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				info, err := vm.Info(ctx)
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) {
					rows := [][]string{{"id", info.ID}, {"status", string(info.Status)}, {"image", info.Image},
						{"backend", info.Backend}, {"accel", info.Accel}, {"memory", fmt.Sprintf("%d MiB", info.MemoryMiB)},
						{"cpus", fmt.Sprint(info.CPUs)}, {"network", fmt.Sprint(info.Network)}, {"pid", fmt.Sprint(info.PID)},
						{"created", info.CreatedAt.Local().Format(time.RFC3339)}, {"dir", info.Dir}}
					for _, p := range info.PortForwards {
						rows = append(rows, []string{"port", fmt.Sprintf("%s:%d -> %d", p.HostAddr, p.HostPort, p.GuestPort)})
					}
					if info.RestoredFrom != "" {
						rows = append(rows, []string{"restored from", info.RestoredFrom})
					}
					if info.LastError != "" {
						rows = append(rows, []string{"last error", info.LastError})
					}
					table(w, []string{"FIELD", "VALUE"}, rows)
				})
				return nil
			})
		},
	}
}

func (a *app) execCmd() *cobra.Command {
	var timeout time.Duration
	var env map[string]string
	var workdir string
	c := &cobra.Command{
		Use:   "exec NAME -- CMD [ARGS...]",
		Short: "Run a command in a sandbox; exits with the command's exit code",
		Long: "Run a command in a sandbox. With one CMD argument it is a shell command line (sh -c);\n" +
			"with several they are run as argv. Output streams as it is produced (buffered with --json).",
		Args:              cobra.MinimumNArgs(2),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				opts := []smolvm.RunOption{smolvm.WithEnv(env), smolvm.WithWorkdir(workdir)}
				if timeout > 0 {
					opts = append(opts, smolvm.WithTimeout(timeout))
				}
				if !a.json {
					opts = append(opts, smolvm.WithStdout(a.stdout), smolvm.WithStderr(a.stderr))
				}
				var res *smolvm.Result
				var err error
				if len(args) == 2 {
					res, err = vm.Run(ctx, args[1], opts...)
				} else {
					res, err = vm.RunArgs(ctx, args[1:], opts...)
				}
				if err != nil {
					return err
				}
				a.out = res
				code := res.ExitCode
				if res.TimedOut {
					if !a.json {
						fmt.Fprintf(a.stderr, "smolvm: command timed out after %s (process group killed)\n", timeout)
					}
					code = 124 // like timeout(1)
				}
				if res.Truncated && !a.json {
					fmt.Fprintf(a.stderr, "smolvm: note: the command's output passed the capture limit of %d bytes per stream; "+
						"it was streamed in full, but a captured copy (--json) keeps only the first %d bytes\n", smolvm.DefaultOutputLimit, smolvm.DefaultOutputLimit)
				}
				return exitError{code}
			})
		},
	}
	f := c.Flags()
	f.DurationVarP(&timeout, "timeout", "t", 0, "kill the command after this long (e.g. 30s; default none); exit code 124 when it fires")
	f.StringToStringVarP(&env, "env", "e", nil, "environment variable KEY=VALUE (repeatable)")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory in the guest")
	return c
}

func (a *app) simpleCmd(name, short string, fn func(*smolvm.VM, context.Context) error) *cobra.Command {
	return &cobra.Command{
		Use: name + " NAME", Short: short, Args: cobra.ExactArgs(1), ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				if err := fn(vm, ctx); err != nil {
					return err
				}
				info, err := vm.Info(ctx)
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) { fmt.Fprintf(w, "%s %s\n", info.ID, info.Status) })
				return nil
			})
		},
	}
}

func (a *app) deleteCmd() *cobra.Command {
	var all bool
	c := &cobra.Command{
		Use: "delete NAME...", Aliases: []string{"rm"}, Short: "Stop and remove sandboxes (--all for every one)",
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if !all && len(args) == 0 {
				return &smolvm.Error{Message: "name a sandbox to delete, or pass --all", Fix: "smolvm sandbox list --all", Err: smolvm.ErrInvalidConfig}
			}
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				ids := args
				if all {
					infos, err := m.List(ctx)
					if err != nil {
						return err
					}
					ids = nil
					for _, i := range infos {
						ids = append(ids, i.ID)
					}
				}
				deleted := []string{}
				for _, id := range ids {
					vm, err := m.Open(ctx, id)
					if err != nil {
						return err
					}
					err = vm.Delete(ctx)
					vm.Close()
					if err != nil {
						return err
					}
					deleted = append(deleted, id)
				}
				a.print(map[string]any{"deleted": deleted}, func(w io.Writer) {
					for _, id := range deleted {
						fmt.Fprintf(w, "deleted %s\n", id)
					}
				})
				return nil
			})
		},
	}
	c.Flags().BoolVar(&all, "all", false, "delete every sandbox")
	return c
}

func (a *app) logsCmd() *cobra.Command {
	var tail int
	c := &cobra.Command{
		Use: "logs NAME", Short: "Print the guest console log", Args: cobra.ExactArgs(1), ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				data, err := vm.Logs(ctx)
				if err != nil {
					return err
				}
				s := string(data)
				if tail > 0 {
					lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
					if len(lines) > tail {
						lines = lines[len(lines)-tail:]
					}
					s = strings.Join(lines, "\n") + "\n"
				}
				a.print(map[string]string{"console": s}, func(w io.Writer) { io.WriteString(w, s) })
				return nil
			})
		},
	}
	c.Flags().IntVarP(&tail, "tail", "n", 0, "only the last N lines")
	return c
}

func (a *app) fileCmd() *cobra.Command {
	c := &cobra.Command{Use: "file", Short: "Copy files into and out of a sandbox"}
	c.AddCommand(&cobra.Command{
		Use: "upload NAME LOCAL GUEST", Short: "Copy a host file into the guest (atomic, keeps the mode)", Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				if err := vm.UploadFile(ctx, args[1], args[2]); err != nil {
					return err
				}
				a.print(map[string]string{"local": args[1], "guest": args[2]}, nil)
				return nil
			})
		},
	}, &cobra.Command{
		Use: "download NAME GUEST LOCAL", Short: "Copy a guest file to the host (atomic, keeps the mode)", Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				if err := vm.DownloadFile(ctx, args[1], args[2]); err != nil {
					return err
				}
				a.print(map[string]string{"guest": args[1], "local": args[2]}, nil)
				return nil
			})
		},
	})
	return c
}

func (a *app) portCmd() *cobra.Command {
	c := &cobra.Command{Use: "port", Short: "Expose guest ports on the host"}
	c.AddCommand(&cobra.Command{
		Use: "expose NAME HOST:GUEST", Short: "Forward 127.0.0.1:HOST to the guest's TCP port GUEST", Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			pf, err := parsePort(args[1])
			if err != nil {
				return err
			}
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				if err := vm.ExposePort(ctx, pf.HostPort, pf.GuestPort); err != nil {
					return err
				}
				a.print(pf, func(w io.Writer) { fmt.Fprintf(w, "127.0.0.1:%d -> %s:%d\n", pf.HostPort, args[0], pf.GuestPort) })
				return nil
			})
		},
	})
	return c
}

var _ = os.Stdout
