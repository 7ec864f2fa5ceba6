package mcpserver

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// Bounds of what one tool call moves (the model's context is the scarce
// resource, and the caller is untrusted).
const (
	// DefaultOutputLimit and MaxOutputLimit: bytes of each of stdout and
	// stderr sandbox_exec returns (the rest is dropped: truncated).
	DefaultOutputLimit = 64 << 10
	MaxOutputLimit     = 1 << 20
	// DefaultExecTimeout and MaxExecTimeout: seconds a command may run.
	DefaultExecTimeout = 60
	MaxExecTimeout     = 3600
	// MaxStdinBytes bounds sandbox_exec's stdin.
	MaxStdinBytes = 1 << 20
	// MaxReadBytes bounds what file_read returns (a longer file is cut:
	// truncated).
	MaxReadBytes = 1 << 20
	// MaxWriteBytes bounds the decoded content of file_write.
	MaxWriteBytes = 2 << 20
	// MaxEnv bounds the variables of one create or exec.
	MaxEnv = 64

	maxPathLen = 4096
	maxList    = 64 // allow-list entries
)

type tools struct {
	m           *smolvm.Manager
	afterCreate func() // AfterCreate's (may be nil)
}

// Sandbox is a sandbox as the tools report it (the SDK's smolvm.Info field
// names; host paths left out).
type Sandbox struct {
	ID           string `json:"id" jsonschema:"the sandbox id: pass it as sandbox_id to the other tools"`
	Status       string `json:"status" jsonschema:"created, running, paused, stopped or error"`
	Image        string `json:"image"`
	MemoryMiB    int    `json:"memory_mib"`
	CPUs         int    `json:"cpus"`
	Network      bool   `json:"network" jsonschema:"the guest has networking"`
	Hostname     string `json:"hostname"`
	CreatedAt    string `json:"created_at" jsonschema:"RFC 3339 time"`
	RestoredFrom string `json:"restored_from,omitempty" jsonschema:"the snapshot it was restored or forked from"`
	LastError    string `json:"last_error,omitempty"`
}

func sandboxOf(i smolvm.Info) Sandbox {
	return Sandbox{ID: i.ID, Status: string(i.Status), Image: i.Image, MemoryMiB: i.MemoryMiB, CPUs: i.CPUs,
		Network: i.Network, Hostname: i.Hostname, CreatedAt: i.CreatedAt.UTC().Format(time.RFC3339),
		RestoredFrom: i.RestoredFrom, LastError: i.LastError}
}

// Snapshot is a snapshot as the tools report it (smolvm.SnapshotInfo's
// field names; host paths left out).
type Snapshot struct {
	ID           string `json:"snapshot_id"`
	VMID         string `json:"vm_id" jsonschema:"the sandbox it was taken of"`
	Type         string `json:"snapshot_type" jsonschema:"full, diff or disk"`
	CreatedAt    string `json:"created_at" jsonschema:"RFC 3339 time"`
	SizeBytes    int64  `json:"size_bytes"`
	Restored     bool   `json:"restored" jsonschema:"restored once already: restoring again needs force"`
	RestoredVMID string `json:"restored_vm_id,omitempty"`
	RestoreCount int    `json:"restore_count"`
	MemoryMiB    int    `json:"memory_mib"`
}

func snapshotOf(s smolvm.SnapshotInfo) Snapshot {
	return Snapshot{ID: s.ID, VMID: s.VMID, Type: string(s.Type), CreatedAt: s.CreatedAt.UTC().Format(time.RFC3339),
		SizeBytes: s.SizeBytes, Restored: s.Restored, RestoredVMID: s.RestoredVMID, RestoreCount: s.RestoreCount, MemoryMiB: s.MemoryMiB}
}

// SandboxRef names one sandbox.
type SandboxRef struct {
	SandboxID string `json:"sandbox_id" jsonschema:"the sandbox id (from sandbox_create or sandbox_list)"`
}

// SnapshotRef names one snapshot.
type SnapshotRef struct {
	SnapshotID string `json:"snapshot_id" jsonschema:"the snapshot id (from snapshot_create or snapshot_list)"`
}

// CreateInput is sandbox_create's arguments.
type CreateInput struct {
	Name         string            `json:"name,omitempty" jsonschema:"the sandbox id to use (default: generated); ids are 1-64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit"`
	Image        string            `json:"image,omitempty" jsonschema:"guest image: debian (default: Debian with python3 and apt) or busybox (tiny)"`
	MemoryMiB    int               `json:"memory_mib,omitempty" jsonschema:"guest memory in MiB (default 512)"`
	CPUs         int               `json:"cpus,omitempty" jsonschema:"vCPUs (default 1)"`
	NoNetwork    bool              `json:"no_network,omitempty" jsonschema:"no guest networking at all"`
	AllowDomains []string          `json:"allow_domains,omitempty" jsonschema:"allow-list mode: the guest may reach only these host names ('*.example.com': names below it) and allow_cidrs. Default (no lists): the public internet, never the host, private or link-local ranges"`
	AllowCIDRs   []string          `json:"allow_cidrs,omitempty" jsonschema:"allow-list mode: prefixes the guest may reach, such as 203.0.113.0/24"`
	Env          map[string]string `json:"env,omitempty" jsonschema:"environment variables for every command in the sandbox"`
}

// Sandboxes is a list of sandboxes.
type Sandboxes struct {
	Sandboxes []Sandbox `json:"sandboxes"`
}

// ExecInput is sandbox_exec's arguments.
type ExecInput struct {
	SandboxID   string            `json:"sandbox_id" jsonschema:"the sandbox to run in"`
	Command     string            `json:"command,omitempty" jsonschema:"a shell command line, run with /bin/sh -c (give command or argv)"`
	Argv        []string          `json:"argv,omitempty" jsonschema:"a program and its arguments, run without a shell (give command or argv)"`
	Cwd         string            `json:"cwd,omitempty" jsonschema:"working directory (an absolute path)"`
	Env         map[string]string `json:"env,omitempty" jsonschema:"extra environment variables for this command"`
	Stdin       string            `json:"stdin,omitempty" jsonschema:"text fed to the command's standard input (at most 1 MiB)"`
	TimeoutS    float64           `json:"timeout_s,omitempty" jsonschema:"seconds before the command (its whole process group) is killed: default 60, at most 3600"`
	OutputLimit int               `json:"output_limit,omitempty" jsonschema:"bytes of each of stdout and stderr returned (default 65536, at most 1048576); the rest is dropped and truncated is set"`
}

// ExecOutput is sandbox_exec's result.
type ExecOutput struct {
	ExitCode   int    `json:"exit_code" jsonschema:"the command's exit status"`
	Stdout     string `json:"stdout" jsonschema:"standard output, at most output_limit bytes (invalid UTF-8 replaced)"`
	Stderr     string `json:"stderr" jsonschema:"standard error, at most output_limit bytes"`
	OK         bool   `json:"ok" jsonschema:"exit_code is 0 and the command did not time out"`
	TimedOut   bool   `json:"timed_out" jsonschema:"the command was killed at timeout_s"`
	Truncated  bool   `json:"truncated" jsonschema:"stdout or stderr had more than output_limit bytes; the rest was dropped"`
	DurationMS int64  `json:"duration_ms"`
}

// FileReadInput is file_read's arguments.
type FileReadInput struct {
	SandboxID string `json:"sandbox_id"`
	Path      string `json:"path" jsonschema:"absolute path of the file in the sandbox"`
	Encoding  string `json:"encoding,omitempty" jsonschema:"text (default: UTF-8 text; a file that is not valid UTF-8 comes back as base64) or base64"`
	MaxBytes  int    `json:"max_bytes,omitempty" jsonschema:"read at most this many bytes (default and maximum 1048576); a longer file is cut and truncated is set"`
}

// FileReadOutput is file_read's result.
type FileReadOutput struct {
	Path      string `json:"path"`
	Content   string `json:"content"`
	Encoding  string `json:"encoding" jsonschema:"text or base64: how content is encoded"`
	Size      int    `json:"size" jsonschema:"bytes returned (before encoding)"`
	Truncated bool   `json:"truncated" jsonschema:"the file is longer than max_bytes; only its first max_bytes bytes are returned"`
	Mode      string `json:"mode,omitempty" jsonschema:"permission bits in octal, such as 0644 (absent when truncated)"`
}

// FileWriteInput is file_write's arguments.
type FileWriteInput struct {
	SandboxID string `json:"sandbox_id"`
	Path      string `json:"path" jsonschema:"absolute path of the file in the sandbox; missing parent directories are created, an existing file is replaced atomically"`
	Content   string `json:"content" jsonschema:"the file's content (at most 2 MiB once decoded)"`
	Encoding  string `json:"encoding,omitempty" jsonschema:"text (default) or base64"`
	Mode      string `json:"mode,omitempty" jsonschema:"permission bits in octal (default 0644)"`
}

// FileWriteOutput is file_write's result.
type FileWriteOutput struct {
	Path string `json:"path"`
	Size int    `json:"size" jsonschema:"bytes written"`
}

// SnapshotCreateInput is snapshot_create's arguments.
type SnapshotCreateInput struct {
	SandboxID    string `json:"sandbox_id" jsonschema:"the running or paused sandbox to snapshot"`
	SnapshotID   string `json:"snapshot_id,omitempty" jsonschema:"the snapshot's id (default: snap-<sandbox>-<time>); same rules as sandbox ids"`
	SnapshotType string `json:"snapshot_type,omitempty" jsonschema:"full (default: memory, CPU state and a self-contained disk copy), diff (disk as an overlay on the image) or disk (disk only: restore boots fresh)"`
	ResumeSource bool   `json:"resume_source,omitempty" jsonschema:"let the sandbox run again as soon as its state is captured (default: it stays paused)"`
}

// RestoreInput is snapshot_restore's arguments.
type RestoreInput struct {
	SnapshotID string `json:"snapshot_id"`
	Resume     bool   `json:"resume,omitempty" jsonschema:"run the restored sandbox (default: it is left paused; sandbox_resume runs it)"`
	Force      bool   `json:"force,omitempty" jsonschema:"restore a snapshot that was restored before (a snapshot restores once by default)"`
}

// ForkInput is snapshot_fork's arguments.
type ForkInput struct {
	SnapshotID string `json:"snapshot_id" jsonschema:"a full or diff snapshot"`
	Count      int    `json:"count" jsonschema:"how many new sandboxes to start from it"`
	Resume     bool   `json:"resume,omitempty" jsonschema:"leave the new sandboxes running (default: paused; sandbox_resume runs one)"`
}

// SnapshotListInput is snapshot_list's arguments.
type SnapshotListInput struct {
	VMID string `json:"vm_id,omitempty" jsonschema:"only the snapshots of this sandbox"`
}

// Snapshots is a list of snapshots.
type Snapshots struct {
	Snapshots []Snapshot `json:"snapshots"`
}

// Deleted reports what a delete removed.
type Deleted struct {
	Deleted string `json:"deleted" jsonschema:"the id removed"`
}

func (t *tools) register(s *mcp.Server) {
	envRules := []rule{values(maxLen(64 << 10))}
	add(s, spec{name: "sandbox_create", title: "Create a sandbox", deadline: longDeadline,
		desc: "Create and start a new sandbox (a Linux microVM) and return it. Its id is what the other tools take " +
			"as sandbox_id. It keeps running until sandbox_delete, also after this session ends.",
		rules: rules{"memory_mib": {minMax(smolvm.MinMemoryMiB, smolvm.MaxMemoryMiB)}, "cpus": {minMax(1, smolvm.MaxCPUs)}, "name": {maxLen(64)},
			"image": {maxLen(64)}, "allow_domains": {maxItems(maxList), each(maxLen(253))},
			"allow_cidrs": {maxItems(maxList), each(maxLen(64))}, "env": envRules}}, t.create)
	add(s, spec{name: "sandbox_list", title: "List sandboxes", deadline: quickDeadline, readOnly: true,
		desc: "List the sandboxes with their status (created, running, paused, stopped, error)."}, t.list)
	add(s, spec{name: "sandbox_exec", title: "Run a command", destructive: true,
		desc: "Run a command in a running sandbox and wait for it: returns exit_code, stdout, stderr, ok, timed_out, truncated. " +
			"Give command (a shell line) or argv. stdout and stderr are cut at output_limit bytes each (default 64 KiB; " +
			"truncated says so); the command is killed after timeout_s seconds (default 60; timed_out says so). " +
			"A non-zero exit is a normal result, not an error.",
		rules: rules{
			"timeout_s":    {minMax(0, MaxExecTimeout), byDefault(DefaultExecTimeout)},
			"output_limit": {minMax(0, MaxOutputLimit), byDefault(DefaultOutputLimit)},
			"argv":         {maxItems(4096)},
			"stdin":        {maxLen(MaxStdinBytes)},
			"cwd":          {maxLen(maxPathLen)},
			"env":          envRules,
		}}, t.exec)
	add(s, spec{name: "file_read", title: "Read a file", deadline: quickDeadline, readOnly: true,
		desc: "Read a file from a running sandbox. At most max_bytes (default and maximum 1 MiB) are returned; a longer " +
			"file is cut and truncated is set (read the rest with sandbox_exec, e.g. tail -c +N). Text comes back as " +
			"text, anything that is not valid UTF-8 as base64 (encoding says which).",
		rules: rules{"encoding": {oneOf("text", "base64")}, "max_bytes": {minMax(0, MaxReadBytes), byDefault(MaxReadBytes)},
			"path": {maxLen(maxPathLen)}}}, t.fileRead)
	add(s, spec{name: "file_write", title: "Write a file", deadline: quickDeadline, destructive: true,
		desc: "Write a file in a running sandbox (atomically: replaced whole; missing parent directories are created). " +
			"content is text, or base64 with encoding base64; at most 2 MiB once decoded.",
		rules: rules{"encoding": {oneOf("text", "base64")}, "mode": {pattern(`^0?[0-7]{3}$`)},
			"content": {maxLen(base64.StdEncoding.EncodedLen(MaxWriteBytes))}, "path": {maxLen(maxPathLen)}}}, t.fileWrite)
	add(s, spec{name: "snapshot_create", title: "Snapshot a sandbox", deadline: longDeadline,
		desc: "Save a sandbox's whole state (memory, CPU, disk) as a snapshot. The sandbox is paused while it is " +
			"captured and stays paused unless resume_source. snapshot_restore brings it back, snapshot_fork makes copies.",
		rules: rules{"snapshot_type": {oneOf("full", "diff", "disk")}, "snapshot_id": {maxLen(64)}}}, t.snapshot)
	add(s, spec{name: "snapshot_restore", title: "Restore a snapshot", deadline: longDeadline, destructive: true,
		desc: "Bring a snapshot's sandbox back (same id) exactly as it was; a sandbox that has that id now is stopped " +
			"and replaced. A snapshot restores once: again needs force (error code snapshot_already_restored). " +
			"The sandbox is left paused unless resume."}, t.restore)
	add(s, spec{name: "snapshot_fork", title: "Fork a snapshot", deadline: longDeadline,
		desc: "Start count new sandboxes (new ids, each with its own hostname, MAC and machine-id) from one full or " +
			"diff snapshot, sharing its memory. Paused unless resume. Does not count as a restore.",
		rules: rules{"count": {minMax(1, smolvm.MaxClones)}}}, t.fork)
	add(s, spec{name: "snapshot_list", title: "List snapshots", deadline: quickDeadline, readOnly: true,
		desc: "List snapshots (all, or those of the sandbox vm_id)."}, t.snapshots)
	add(s, spec{name: "snapshot_delete", title: "Delete a snapshot", deadline: longDeadline, destructive: true,
		desc: "Delete a snapshot and its files. Refused while a sandbox restored or forked from it runs."}, t.deleteSnapshot)
	add(s, spec{name: "sandbox_pause", title: "Pause a sandbox", deadline: quickDeadline,
		desc: "Freeze a running sandbox (its processes stop; memory is kept)."}, t.lifecycle((*smolvm.VM).Pause))
	add(s, spec{name: "sandbox_resume", title: "Resume a sandbox", deadline: quickDeadline,
		desc: "Continue a paused sandbox."}, t.lifecycle((*smolvm.VM).Resume))
	add(s, spec{name: "sandbox_delete", title: "Delete a sandbox", deadline: longDeadline, destructive: true,
		desc: "Stop a sandbox and delete it with its disk (its snapshots are kept)."}, t.deleteSandbox)
}

// invalid is a caller error in the SDK's type.
func invalid(msg, hint string) error {
	return &smolvm.Error{Op: "mcp", Message: msg, Err: smolvm.ErrInvalidConfig,
		Fix: smolvm.Fix{Action: smolvm.FixEditOption, Args: map[string]string{smolvm.ArgHint: hint}}}
}

// guestPath checks a path in the guest: absolute, bounded, no NUL.
func guestPath(p string) error {
	switch {
	case !strings.HasPrefix(p, "/"):
		return invalid(fmt.Sprintf("path %q is not absolute", p), "give an absolute path such as /root/file.txt")
	case len(p) > maxPathLen:
		return invalid(fmt.Sprintf("path is %d bytes long", len(p)), fmt.Sprintf("give a path of at most %d bytes", maxPathLen))
	case strings.IndexByte(p, 0) >= 0:
		return invalid("path contains a NUL byte", "remove the NUL byte from the path")
	}
	return nil
}

// checkEnv checks variables with the guest agent's own rule.
func checkEnv(env map[string]string) error {
	if len(env) > MaxEnv {
		return invalid(fmt.Sprintf("%d environment variables", len(env)), fmt.Sprintf("give at most %d", MaxEnv))
	}
	for k, v := range env {
		if !agentproto.ValidEnvName(k) {
			return invalid(fmt.Sprintf("invalid environment variable name %q", k), "names are letters, digits and '_', not starting with a digit")
		}
		if strings.IndexByte(v, 0) >= 0 {
			return invalid(fmt.Sprintf("the value of %s contains a NUL byte", k), "remove the NUL byte from the value")
		}
	}
	return nil
}

// open validates id and opens the sandbox (close it after use).
func (t *tools) open(ctx context.Context, id string) (*smolvm.VM, error) {
	if err := smolvm.ValidateID(id); err != nil {
		return nil, err
	}
	return t.m.Open(ctx, id)
}

// info is the sandbox vm is now.
func info(ctx context.Context, vm *smolvm.VM) (Sandbox, error) {
	i, err := vm.Info(ctx)
	if err != nil {
		return Sandbox{}, err
	}
	return sandboxOf(i), nil
}

func (t *tools) create(ctx context.Context, in CreateInput) (Sandbox, error) {
	if in.Name != "" {
		if err := smolvm.ValidateID(in.Name); err != nil {
			return Sandbox{}, err
		}
	}
	if err := checkEnv(in.Env); err != nil {
		return Sandbox{}, err
	}
	cfg := smolvm.Config{Name: in.Name, Image: in.Image, MemoryMiB: in.MemoryMiB, CPUs: in.CPUs, NoNetwork: in.NoNetwork, Env: in.Env}
	if len(in.AllowDomains)+len(in.AllowCIDRs) > 0 {
		if len(in.AllowDomains) > maxList || len(in.AllowCIDRs) > maxList {
			return Sandbox{}, invalid("allow-list too long", fmt.Sprintf("give at most %d domains and %d prefixes", maxList, maxList))
		}
		cfg.Network = smolvm.NetworkPolicy{Mode: smolvm.NetworkAllowlist, AllowDomains: in.AllowDomains}
		for _, c := range in.AllowCIDRs {
			p, err := netip.ParsePrefix(c)
			if err != nil {
				return Sandbox{}, invalid(fmt.Sprintf("invalid CIDR prefix %q", c), "give prefixes such as 203.0.113.0/24 or 127.0.0.1/32")
			}
			cfg.Network.AllowCIDRs = append(cfg.Network.AllowCIDRs, p)
		}
	}
	vm, err := t.m.New(ctx, cfg)
	if err != nil {
		return Sandbox{}, err
	}
	defer vm.Close()
	if err := vm.Start(ctx); err != nil {
		// As `sandbox create`: a start that rolled back to "created"
		// failed the create as a whole, so nothing stays; a failed cold
		// boot is kept ("error") with its logs.
		if st, serr := vm.Status(context.WithoutCancel(ctx)); serr == nil && st == smolvm.StatusCreated {
			vm.Delete(context.WithoutCancel(ctx))
		}
		return Sandbox{}, err
	}
	if t.afterCreate != nil {
		t.afterCreate()
	}
	return info(ctx, vm)
}

func (t *tools) list(ctx context.Context, _ struct{}) (Sandboxes, error) {
	infos, err := t.m.List(ctx)
	if err != nil {
		return Sandboxes{}, err
	}
	out := Sandboxes{Sandboxes: []Sandbox{}}
	for _, i := range infos {
		if i.IsSandbox() { // warm pool members and template builders are not sandboxes of their own
			out.Sandboxes = append(out.Sandboxes, sandboxOf(i))
		}
	}
	return out, nil
}

func (t *tools) exec(ctx context.Context, in ExecInput) (ExecOutput, error) {
	if err := smolvm.ValidateID(in.SandboxID); err != nil {
		return ExecOutput{}, err
	}
	if (in.Command == "") == (len(in.Argv) == 0) {
		return ExecOutput{}, invalid("give command or argv (one of them)", `give "command": "echo hi" or "argv": ["echo", "hi"]`)
	}
	if len(in.Argv) > 0 && in.Argv[0] == "" {
		return ExecOutput{}, invalid("argv[0] is empty", "name the program in argv[0]")
	}
	if in.Cwd != "" {
		if err := guestPath(in.Cwd); err != nil {
			return ExecOutput{}, err
		}
	}
	if err := checkEnv(in.Env); err != nil {
		return ExecOutput{}, err
	}
	if len(in.Stdin) > MaxStdinBytes {
		return ExecOutput{}, invalid(fmt.Sprintf("stdin is %d bytes", len(in.Stdin)), "give at most 1 MiB of stdin; write larger input to a file with file_write")
	}
	timeout := in.TimeoutS
	if timeout == 0 {
		timeout = DefaultExecTimeout
	}
	if !(timeout > 0 && timeout <= MaxExecTimeout) { // also NaN
		return ExecOutput{}, invalid(fmt.Sprintf("timeout_s %v is out of range", in.TimeoutS), fmt.Sprintf("give timeout_s between 0 and %d", MaxExecTimeout))
	}
	limit := in.OutputLimit
	if limit == 0 {
		limit = DefaultOutputLimit
	}
	if limit < 0 || limit > MaxOutputLimit {
		return ExecOutput{}, invalid(fmt.Sprintf("output_limit %d is out of range", in.OutputLimit), fmt.Sprintf("give output_limit between 1 and %d", MaxOutputLimit))
	}
	d := time.Duration(timeout * float64(time.Second))
	ctx, cancel := context.WithTimeout(ctx, d+smolvm.ExecTimeoutGrace+execSlack)
	defer cancel()
	vm, err := t.open(ctx, in.SandboxID)
	if err != nil {
		return ExecOutput{}, err
	}
	defer vm.Close()
	opts := []smolvm.RunOption{smolvm.WithTimeout(d), smolvm.WithOutputLimit(limit)}
	if len(in.Env) > 0 {
		opts = append(opts, smolvm.WithEnv(in.Env))
	}
	if in.Cwd != "" {
		opts = append(opts, smolvm.WithWorkdir(in.Cwd))
	}
	if in.Stdin != "" {
		opts = append(opts, smolvm.WithStdin([]byte(in.Stdin)))
	}
	var res *smolvm.Result
	if in.Command != "" {
		res, err = vm.Run(ctx, in.Command, opts...)
	} else {
		res, err = vm.RunArgs(ctx, in.Argv, opts...)
	}
	if err != nil {
		return ExecOutput{}, err
	}
	return ExecOutput{ExitCode: res.ExitCode, Stdout: strings.ToValidUTF8(res.Stdout, "\uFFFD"), Stderr: strings.ToValidUTF8(res.Stderr, "\uFFFD"),
		OK: res.OK(), TimedOut: res.TimedOut, Truncated: res.Truncated, DurationMS: res.Duration.Milliseconds()}, nil
}

// errFull stops a file read at its cap.
var errFull = errors.New("read cap reached")

// capWriter keeps the first max bytes written and then fails.
type capWriter struct {
	buf []byte
	max int
	cut bool
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - len(w.buf); len(p) > room {
		w.buf = append(w.buf, p[:room]...)
		w.cut = true
		return room, errFull
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

func (t *tools) fileRead(ctx context.Context, in FileReadInput) (FileReadOutput, error) {
	if err := guestPath(in.Path); err != nil {
		return FileReadOutput{}, err
	}
	max := in.MaxBytes
	if max == 0 {
		max = MaxReadBytes
	}
	if max < 0 || max > MaxReadBytes {
		return FileReadOutput{}, invalid(fmt.Sprintf("max_bytes %d is out of range", in.MaxBytes), fmt.Sprintf("give max_bytes between 1 and %d", MaxReadBytes))
	}
	enc, err := encoding(in.Encoding)
	if err != nil {
		return FileReadOutput{}, err
	}
	vm, err := t.open(ctx, in.SandboxID)
	if err != nil {
		return FileReadOutput{}, err
	}
	defer vm.Close()
	w := &capWriter{max: max}
	mode, _, err := vm.ReadFileTo(ctx, in.Path, w)
	if err != nil && !(errors.Is(err, errFull) && w.cut) {
		return FileReadOutput{}, err
	}
	out := FileReadOutput{Path: in.Path, Size: len(w.buf), Truncated: w.cut}
	if !w.cut {
		out.Mode = fmt.Sprintf("%04o", mode.Perm())
	}
	if enc == "text" && utf8.Valid(w.buf) {
		out.Content, out.Encoding = string(w.buf), "text"
	} else {
		out.Content, out.Encoding = base64.StdEncoding.EncodeToString(w.buf), "base64"
	}
	return out, nil
}

// encoding checks an encoding argument ("" is text).
func encoding(e string) (string, error) {
	switch e {
	case "", "text":
		return "text", nil
	case "base64":
		return e, nil
	}
	return "", invalid(fmt.Sprintf("unknown encoding %q", e), "give encoding text or base64")
}

func (t *tools) fileWrite(ctx context.Context, in FileWriteInput) (FileWriteOutput, error) {
	if err := guestPath(in.Path); err != nil {
		return FileWriteOutput{}, err
	}
	enc, err := encoding(in.Encoding)
	if err != nil {
		return FileWriteOutput{}, err
	}
	data := []byte(in.Content)
	if enc == "base64" {
		if data, err = base64.StdEncoding.DecodeString(in.Content); err != nil {
			return FileWriteOutput{}, invalid("content is not valid base64: "+err.Error(), "give standard base64 (RFC 4648, with padding)")
		}
	}
	if len(data) > MaxWriteBytes {
		return FileWriteOutput{}, invalid(fmt.Sprintf("content is %d bytes", len(data)), "write at most 2 MiB per call")
	}
	mode := fs.FileMode(0o644)
	if in.Mode != "" {
		m, err := strconv.ParseUint(in.Mode, 8, 32)
		if err != nil || m > 0o777 {
			return FileWriteOutput{}, invalid(fmt.Sprintf("invalid mode %q", in.Mode), "give permission bits in octal, such as 0644 or 0755")
		}
		mode = fs.FileMode(m)
	}
	vm, err := t.open(ctx, in.SandboxID)
	if err != nil {
		return FileWriteOutput{}, err
	}
	defer vm.Close()
	if err := vm.WriteFile(ctx, in.Path, data, mode); err != nil {
		return FileWriteOutput{}, err
	}
	return FileWriteOutput{Path: in.Path, Size: len(data)}, nil
}

func (t *tools) snapshot(ctx context.Context, in SnapshotCreateInput) (Snapshot, error) {
	if in.SnapshotID != "" {
		if err := smolvm.ValidateID(in.SnapshotID); err != nil {
			return Snapshot{}, err
		}
	}
	typ, err := smolvm.ParseSnapshotType(in.SnapshotType)
	if err != nil {
		return Snapshot{}, err
	}
	vm, err := t.open(ctx, in.SandboxID)
	if err != nil {
		return Snapshot{}, err
	}
	defer vm.Close()
	s, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: in.SnapshotID, Type: typ, ResumeSource: in.ResumeSource})
	if err != nil {
		return Snapshot{}, err
	}
	return snapshotOf(*s), nil
}

func (t *tools) restore(ctx context.Context, in RestoreInput) (Sandbox, error) {
	if err := smolvm.ValidateID(in.SnapshotID); err != nil {
		return Sandbox{}, err
	}
	vm, err := t.m.FromSnapshot(ctx, in.SnapshotID, smolvm.RestoreOptions{Resume: in.Resume, Force: in.Force})
	if err != nil {
		return Sandbox{}, err
	}
	defer vm.Close()
	return info(ctx, vm)
}

func (t *tools) fork(ctx context.Context, in ForkInput) (Sandboxes, error) {
	if err := smolvm.ValidateID(in.SnapshotID); err != nil {
		return Sandboxes{}, err
	}
	vms, err := t.m.Fork(ctx, in.SnapshotID, in.Count, smolvm.ForkOptions{Resume: in.Resume})
	for _, vm := range vms {
		defer vm.Close()
	}
	if err != nil {
		// Clones that started keep running (the error names the failed
		// ones); an agent reads their ids from sandbox_list.
		return Sandboxes{}, err
	}
	out := Sandboxes{Sandboxes: []Sandbox{}}
	for _, vm := range vms {
		s, err := info(ctx, vm)
		if err != nil {
			return Sandboxes{}, err
		}
		out.Sandboxes = append(out.Sandboxes, s)
	}
	return out, nil
}

func (t *tools) snapshots(ctx context.Context, in SnapshotListInput) (Snapshots, error) {
	if in.VMID != "" {
		if err := smolvm.ValidateID(in.VMID); err != nil {
			return Snapshots{}, err
		}
	}
	list, err := t.m.ListSnapshots(ctx, smolvm.SnapshotFilter{VMID: in.VMID})
	if err != nil {
		return Snapshots{}, err
	}
	out := Snapshots{Snapshots: []Snapshot{}}
	for _, s := range list {
		out.Snapshots = append(out.Snapshots, snapshotOf(s))
	}
	return out, nil
}

func (t *tools) deleteSnapshot(ctx context.Context, in SnapshotRef) (Deleted, error) {
	if err := smolvm.ValidateID(in.SnapshotID); err != nil {
		return Deleted{}, err
	}
	if err := t.m.DeleteSnapshot(ctx, in.SnapshotID); err != nil {
		return Deleted{}, err
	}
	return Deleted{Deleted: in.SnapshotID}, nil
}

// lifecycle is a tool that runs op on a sandbox and reports it after.
func (t *tools) lifecycle(op func(*smolvm.VM, context.Context) error) func(context.Context, SandboxRef) (Sandbox, error) {
	return func(ctx context.Context, in SandboxRef) (Sandbox, error) {
		vm, err := t.open(ctx, in.SandboxID)
		if err != nil {
			return Sandbox{}, err
		}
		defer vm.Close()
		if err := op(vm, ctx); err != nil {
			return Sandbox{}, err
		}
		return info(ctx, vm)
	}
}

func (t *tools) deleteSandbox(ctx context.Context, in SandboxRef) (Deleted, error) {
	vm, err := t.open(ctx, in.SandboxID)
	if err != nil {
		return Deleted{}, err
	}
	defer vm.Close()
	if err := vm.Delete(ctx); err != nil {
		return Deleted{}, err
	}
	return Deleted{Deleted: in.SandboxID}, nil
}
