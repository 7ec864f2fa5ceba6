package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend"
)

func (a *app) sandboxCmd() *cobra.Command {
	c := &cobra.Command{Use: "sandbox", Aliases: []string{"sb", "vm"}, Short: "Create, run commands in, and manage sandboxes"}
	c.AddCommand(a.createCmd(), a.listCmd(), a.infoCmd(), a.execCmd(),
		a.simpleCmd("start", "Boot a stopped sandbox (or resume a paused one)", (*smolvm.VM).Start),
		a.simpleCmd("stop", "Shut a sandbox down (its disk is kept)", (*smolvm.VM).Stop),
		a.simpleCmd("pause", "Freeze a running sandbox", (*smolvm.VM).Pause),
		a.simpleCmd("resume", "Continue a paused sandbox", (*smolvm.VM).Resume),
		a.deleteCmd(), a.logsCmd(), a.fileCmd(), a.portCmd(), a.snapshotCmd(), a.shellCmd(), a.statsCmd())
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
			if isSandbox(i) {
				ids = append(ids, i.ID)
			}
		}
		return err
	})
	return ids, cobra.ShellCompDirectiveNoFileComp
}

func isSandbox(i smolvm.Info) bool { return i.IsSandbox() }

func (a *app) createCmd() *cobra.Command {
	var cfg smolvm.Config
	var ports, envs []string
	var bootTimeout time.Duration
	var allowDomains, allowCIDRs []string
	c := &cobra.Command{
		Use:   "create",
		Short: "Create and start a sandbox",
		Long: `Create and start a sandbox.

Network: by default the guest reaches the public internet but never the host's
loopback (10.0.2.2), link-local/cloud metadata, private or CGNAT ranges, nor the
host's own addresses. --allow-domain / --allow-cidr switch to an allow-list:
only those names (and the addresses DNS answers for them) and prefixes are
reachable, and DNS answers no other name. A host range such as loopback opens
only to a prefix inside it (--allow-cidr 127.0.0.1/32; never via 0.0.0.0/0).
Refusals and their reasons show in "smolvm sandbox info".`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			np, err := networkFlags(allowDomains, allowCIDRs)
			if err != nil {
				return err
			}
			cfg.Network = np
			for _, p := range ports {
				pf, err := parsePort(p)
				if err != nil {
					return err
				}
				cfg.PortForwards = append(cfg.PortForwards, pf)
			}
			env, err := parseEnv(envs)
			if err != nil {
				return err
			}
			cfg.Env = env
			cfg.BootTimeout = bootTimeout
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				vm, err := m.New(ctx, cfg)
				if err != nil {
					return err
				}
				defer vm.Close()
				if err := vm.Start(ctx); err != nil {
					// A start from a template rolls back to "created":
					// the create failed as a whole, so nothing stays. (A
					// failed cold boot is kept, in "error", with its logs.)
					if st, serr := vm.Status(context.WithoutCancel(ctx)); serr == nil && st == smolvm.StatusCreated {
						vm.Delete(context.WithoutCancel(ctx))
					}
					return err
				}
				info, err := vm.Info(ctx)
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) { fmt.Fprintf(w, "%s\n", info.ID) })
				a.refillPools(ctx, m) // after the claim returned
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
	f.StringArrayVar(&allowDomains, "allow-domain", nil, "allow-list mode: the guest may reach this host name (\"*.example.com\": names below it; repeatable)")
	f.StringArrayVar(&allowCIDRs, "allow-cidr", nil, "allow-list mode: the guest may reach this prefix or address (repeatable; 127.0.0.1/32 reaches the host's loopback through 10.0.2.2)")
	f.StringVar((*string)(&cfg.Backend), "backend", "", backendFlagHelp()) // checked by the SDK's Config validation
	f.StringVar((*string)(&cfg.Accel), "accel", "", "auto (default), kvm or tcg")
	f.StringArrayVarP(&envs, "env", "e", nil, "environment variable KEY=VALUE for every command (repeatable; the value is everything after the first '=', commas included)")
	f.StringArrayVarP(&ports, "port", "p", nil, "expose a guest tcp port: HOST:GUEST binds 127.0.0.1:HOST; ADDR:HOST:GUEST binds ADDR (0.0.0.0: every interface, an explicit opt-in; IPv6 in brackets) (repeatable)")
	f.DurationVar(&bootTimeout, "boot-timeout", 0, "give up booting after this long (default 90s)")
	f.BoolVar(&cfg.ColdBoot, "cold", false, "boot the kernel instead of restoring the image's pre-booted template (see smolvm template)")
	return c
}

// networkFlags turns --allow-domain/--allow-cidr into a policy: any of
// them selects the allow-list mode.
func networkFlags(domains, cidrs []string) (smolvm.NetworkPolicy, error) {
	var np smolvm.NetworkPolicy
	if len(domains)+len(cidrs) == 0 {
		return np, nil
	}
	np.Mode = smolvm.NetworkAllowlist
	np.AllowDomains = domains
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			a, aerr := netip.ParseAddr(c)
			if aerr != nil {
				return np, &smolvm.Error{Message: fmt.Sprintf("invalid --allow-cidr %q: want a prefix such as 203.0.113.0/24 or an address", c),
					Fix: usageFix("use --allow-cidr 203.0.113.0/24"), Err: smolvm.ErrInvalidConfig}
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		np.AllowCIDRs = append(np.AllowCIDRs, p)
	}
	return np, nil
}

// parsePort parses a -p value: HOST:GUEST (bound to 127.0.0.1) or
// ADDR:HOST:GUEST with ADDR an IP address ("[::1]" for IPv6). Binding any
// address other than loopback is the caller's explicit choice.
func parsePort(s string) (smolvm.PortForward, error) {
	bad := func(why string) (smolvm.PortForward, error) {
		return smolvm.PortForward{}, &smolvm.Error{Message: fmt.Sprintf("invalid port mapping %q: %s", s, why),
			Fix: usageFix("use -p 8080:80 (127.0.0.1:8080 on the host), or -p 0.0.0.0:8080:80 to expose it on every interface"), Err: smolvm.ErrInvalidConfig}
	}
	rest, guest, ok := cut(s, strings.LastIndexByte(s, ':'))
	if !ok {
		return bad("want HOST:GUEST or ADDR:HOST:GUEST")
	}
	addr, host, hasAddr := cut(rest, strings.LastIndexByte(rest, ':'))
	if !hasAddr {
		host = rest
	}
	hp, ok1 := portNumber(host)
	gp, ok2 := portNumber(guest)
	if !ok1 || !ok2 {
		return bad("ports are numbers from 1 to 65535")
	}
	pf := smolvm.PortForward{HostAddr: "127.0.0.1", HostPort: hp, GuestPort: gp}
	if hasAddr {
		if strings.HasPrefix(addr, "[") && strings.HasSuffix(addr, "]") {
			addr = addr[1 : len(addr)-1]
			if a, err := netip.ParseAddr(addr); err != nil || !a.Is6() {
				return bad("the address in brackets must be an IPv6 address")
			}
		} else if strings.Contains(addr, ":") {
			return bad("write an IPv6 address in brackets, e.g. [::1]:8080:80")
		}
		a, err := netip.ParseAddr(addr)
		if err != nil || a.Zone() != "" {
			return bad(fmt.Sprintf("%q is not an IP address", addr))
		}
		pf.HostAddr = a.String()
	}
	return pf, nil
}

// hostPortString shows where a forward listens: ADDR:PORT, [ADDR]:PORT
// for IPv6, 127.0.0.1 when the address is empty (the default).
func hostPortString(pf smolvm.PortForward) string {
	addr := cmp.Or(pf.HostAddr, "127.0.0.1")
	return net.JoinHostPort(addr, strconv.Itoa(pf.HostPort))
}

// cut splits s around the byte at i (i < 0: not found).
func cut(s string, i int) (before, after string, ok bool) {
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+1:], true
}

// portNumber parses 1-65535 written in decimal digits only.
func portNumber(s string) (int, bool) {
	if s == "" || len(s) > 5 || strings.TrimLeft(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	return n, err == nil && n >= 1 && n <= 65535
}

// parseEnv turns -e values into variables, each split at its first '=':
// "A=hello,LD_PRELOAD=/x" sets A to "hello,LD_PRELOAD=/x" (pflag's
// StringToString would split it at the comma into two variables). A
// later value for the same name wins.
func parseEnv(vals []string) (map[string]string, error) {
	if len(vals) == 0 {
		return nil, nil
	}
	env := make(map[string]string, len(vals))
	for _, kv := range vals {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, &smolvm.Error{Message: fmt.Sprintf("invalid environment variable %q: want KEY=VALUE", kv),
				Fix: usageFix("use -e KEY=VALUE"), Err: smolvm.ErrInvalidConfig}
		}
		env[k] = v
	}
	return env, nil
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
					if isSandbox(i) && (all || i.Status == smolvm.StatusRunning || i.Status == smolvm.StatusPaused) {
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
					for _, r := range [][]string{{"hostname", info.Hostname}, {"mac", info.MAC}, {"machine-id", info.MachineID}} {
						if r[1] != "" {
							rows = append(rows, r)
						}
					}
					if np := info.NetworkPolicy; np != nil {
						pol := string(np.Mode)
						for _, d := range np.AllowDomains {
							pol += " domain:" + d
						}
						for _, c := range np.AllowCIDRs {
							pol += " cidr:" + c.String()
						}
						rows = append(rows, []string{"network policy", pol})
					}
					if st := info.NetworkStats; st != nil {
						rows = append(rows, []string{"network", fmt.Sprintf("%d allowed, %d refused, %d DNS names refused", st.Allowed, st.Refused, st.DNSRefused)})
						for _, r := range st.LastRefused {
							line := fmt.Sprintf("%s %s %s: %s", r.Time.Local().Format(time.TimeOnly), r.Proto, r.Dest, r.Reason)
							if r.Count > 1 {
								line += fmt.Sprintf(" (x%d)", r.Count)
							}
							rows = append(rows, []string{"refused", line})
						}
					}
					for _, p := range info.PortForwards {
						rows = append(rows, []string{"port", fmt.Sprintf("%s -> %d", hostPortString(p), p.GuestPort)})
					}
					if info.Template != "" {
						rows = append(rows, []string{"template", info.Template[:16]})
					} else if info.RestoredFrom != "" {
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
	var envs []string
	var workdir string
	var iopts interactiveOpts
	c := &cobra.Command{
		Use:   "exec NAME -- CMD [ARGS...]",
		Short: "Run a command in a sandbox; exits with the command's exit code",
		Long: "Run a command in a sandbox. With one CMD argument it is a shell command line (sh -c);\n" +
			"with several they are run as argv. Output streams as it is produced (buffered with --json).\n" +
			"-i passes standard input through while the command runs (EOF included); --tty gives the command\n" +
			"a terminal in the guest of this terminal's size (raw mode, resizes follow, Ctrl-C reaches the guest).\n" +
			"Without --tty, SIGINT/SIGTERM/SIGHUP/SIGQUIT sent to smolvm are forwarded to the command.",
		Args:              cobra.MinimumNArgs(2),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			env, err := parseEnv(envs)
			if err != nil {
				return err
			}
			if iopts.stdin || iopts.tty {
				if a.json {
					return &smolvm.Error{Message: "exec -i/--tty is interactive: it has no --json output", Err: smolvm.ErrInvalidConfig}
				}
				iopts.timeout = timeout
				spec := smolvm.ExecSpec{Env: env, Cwd: workdir}
				if len(args) == 2 {
					spec.Shell = args[1]
				} else {
					spec.Argv = args[1:]
				}
				return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
					code, err := a.runInteractive(ctx, vm, spec, iopts)
					if err != nil {
						return err
					}
					return exitError{code}
				})
			}
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
	f.DurationVar(&timeout, "timeout", 0, "kill the command after this long (e.g. 30s; default none); exit code 124 when it fires")
	f.StringArrayVarP(&envs, "env", "e", nil, "environment variable KEY=VALUE (repeatable; the value is everything after the first '=', commas included)")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory in the guest")
	f.BoolVarP(&iopts.stdin, "interactive", "i", false, "pass standard input through to the command while it runs")
	f.BoolVarP(&iopts.tty, "tty", "t", false, "run the command on a terminal in the guest, of this terminal's size (with -i: docker exec -it; sandbox shell opens a login shell)")
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
				return &smolvm.Error{Message: "name a sandbox to delete, or pass --all", Fix: smolvm.Fix{Action: smolvm.FixListVMs}, Err: smolvm.ErrInvalidConfig}
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
						if !isSandbox(i) {
							continue // the pool's (smolvm template pool IMAGE --size 0) or a template build's
						}
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
			if pf.HostAddr != "127.0.0.1" {
				return &smolvm.Error{Message: fmt.Sprintf("port expose binds 127.0.0.1 only, not %s", pf.HostAddr),
					Fix: usageFix("use HOST:GUEST here, or create the sandbox with -p " + args[1]), Err: smolvm.ErrInvalidConfig}
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

// backendFlagHelp lists the registered backends for --backend.
func backendFlagHelp() string {
	return fmt.Sprintf("%s, or %s: the best one this host can run (default %s)",
		strings.Join(backend.Names(), ", "), backend.Auto, smolvm.DefaultBackend)
}
