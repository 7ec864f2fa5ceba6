package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/qemu"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/procfs"
)

// Options configure a run.
type Options struct {
	Manager   *smolvm.Manager
	Image     string // default busybox
	Rounds    int    // default 5
	MemoryMiB int    // default 512
	Progress  io.Writer
}

func (o *Options) defaults() {
	if o.Image == "" {
		o.Image = "busybox"
	}
	if o.Rounds <= 0 {
		o.Rounds = 5
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 512
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
}

// Figure is one measured quantity with its samples.
type Figure struct {
	Name    string    `json:"name"`
	Unit    string    `json:"unit"`
	Samples []float64 `json:"samples"`
	Median  float64   `json:"median"`
}

func newFigure(name, unit string, s []float64) Figure {
	return Figure{Name: name, Unit: unit, Samples: s, Median: median(s)}
}

// Ratio compares ours against a baseline.
type Ratio struct {
	Name     string  `json:"name"`
	Ours     Figure  `json:"ours"`
	Baseline Figure  `json:"baseline"`
	Ratio    float64 `json:"ratio"` // ours.Median / baseline.Median
	Goal     float64 `json:"goal,omitempty"`
}

func newRatio(name string, ours, base Figure, goal float64) Ratio {
	r := Ratio{Name: name, Ours: ours, Baseline: base, Goal: goal}
	if base.Median > 0 {
		r.Ratio = ours.Median / base.Median
	}
	return r
}

// Report is the result of a run.
type Report struct {
	Host    Host     `json:"host"`
	Ratios  []Ratio  `json:"ratios,omitempty"`
	Figures []Figure `json:"figures,omitempty"`
}

// Host describes where the figures come from.
type Host struct {
	Accel  string `json:"accel"`
	QEMU   string `json:"qemu"`
	CPU    string `json:"cpu"`
	Cores  int    `json:"cores"`
	Kernel string `json:"guest_kernel"`
	Image  string `json:"image"`
	Date   string `json:"date"`
}

func median(s []float64) float64 {
	if len(s) == 0 {
		return 0
	}
	c := slices.Clone(s)
	slices.Sort(c)
	if len(c)%2 == 1 {
		return c[len(c)/2]
	}
	return (c[len(c)/2-1] + c[len(c)/2]) / 2
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func hostInfo(o Options, img image.Image) Host {
	h := Host{Image: o.Image, Kernel: img.Manifest.KernelRelease, Date: time.Now().UTC().Format(time.RFC3339)}
	a, _, _ := qemu.ProbeAccel(backend.AccelAuto)
	h.Accel = string(a)
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		h.QEMU = strings.SplitN(string(out), "\n", 2)[0]
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(l, "model name") {
				h.CPU = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
			}
			if strings.HasPrefix(l, "processor") {
				h.Cores++
			}
		}
	}
	return h
}

// Boot measures cold boot, command round trip and idle memory.
func Boot(ctx context.Context, o Options) (Report, error) {
	o.defaults()
	m := o.Manager
	img, err := image.Open(m.ImageDir(), o.Image)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Host: hostInfo(o, img)}
	var ours, bare, bareReady []float64
	for i := 0; i < o.Rounds; i++ {
		var d time.Duration
		var b phases
		err := alternate(i, func() error {
			var err error
			if d, err = oursBoot(ctx, m, o, i); err != nil {
				return fmt.Errorf("smolvm boot: %w", err)
			}
			return nil
		}, func() error {
			var err error
			if b, err = bareBoot(ctx, img, o, plainCmdline()); err != nil {
				return fmt.Errorf("bare qemu boot: %w", err)
			}
			return nil
		})
		if err != nil {
			return rep, err
		}
		ours, bare, bareReady = append(ours, ms(d)), append(bare, ms(b.first)), append(bareReady, ms(b.ready))
		fmt.Fprintf(o.Progress, "round %d: smolvm New+Start+Run %.0f ms, bare qemu to the first result %.0f ms (agent handshake %.0f ms)\n",
			i+1, ms(d), ms(b.first), ms(b.ready))
	}
	rep.Ratios = append(rep.Ratios, newRatio("cold boot -> first command (ms)",
		newFigure("smolvm New+Start+Run(true)", "ms", ours), newFigure(bareBootName(), "ms", bare), 1.10))
	rep.Figures = append(rep.Figures, newFigure("bare qemu cold boot to the agent handshake only (no command)", "ms", bareReady))

	// Round trips and memory on one VM.
	vm, err := m.New(ctx, smolvm.Config{Name: "bench-rtt", Image: o.Image, MemoryMiB: o.MemoryMiB, NoNetwork: true, ColdBoot: true})
	if err != nil {
		return rep, err
	}
	defer func() { vm.Delete(context.WithoutCancel(ctx)); vm.Close() }()
	if err := vm.Start(ctx); err != nil {
		return rep, err
	}
	info, err := vm.Info(ctx)
	if err != nil {
		return rep, err
	}
	raw, err := rawChannel(ctx, info)
	if err != nil {
		return rep, fmt.Errorf("raw channel: %w", err)
	}
	defer raw.Close()
	const n = 50
	var runT, rawT, pingT []float64
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if _, err := vm.Run(ctx, "true"); err != nil {
			return rep, err
		}
		runT = append(runT, ms(time.Since(t0)))
		d, err := raw.exec(i)
		if err != nil {
			return rep, err
		}
		rawT = append(rawT, ms(d))
		d, err = raw.ping(i)
		if err != nil {
			return rep, err
		}
		pingT = append(pingT, ms(d))
	}
	rep.Ratios = append(rep.Ratios, newRatio("command round trip (ms)",
		newFigure("smolvm Run(\"true\")", "ms", runT), newFigure("raw exec request line on the same virtio-serial channel", "ms", rawT), 1.5))
	rep.Figures = append(rep.Figures, newFigure("raw ping round trip on the channel (no fork)", "ms", pingT))
	time.Sleep(2 * time.Second)
	if mem, err := procfs.Rollup(info.PID); err == nil {
		rep.Figures = append(rep.Figures, newFigure(fmt.Sprintf("host memory (PSS) of one idle %d MiB VM", o.MemoryMiB), "MiB", []float64{float64(mem.Pss) / 1024}))
	}
	// What an idle VM costs in CPU: its QEMU's CPU time over a quiet 5 s
	// (an agent that polls shows up here).
	const idle = 5 * time.Second
	c0, err0 := procCPUms(info.PID)
	time.Sleep(idle)
	c1, err1 := procCPUms(info.PID)
	if err0 == nil && err1 == nil {
		rep.Figures = append(rep.Figures, newFigure("host CPU of one idle VM's QEMU over 5 s", "% of a core",
			[]float64{100 * (c1 - c0) / float64(idle.Milliseconds())}))
	}
	up, down, err := fileTransfer(ctx, vm, 16<<20, 3)
	if err != nil {
		return rep, fmt.Errorf("file transfer: %w", err)
	}
	rep.Figures = append(rep.Figures, newFigure("WriteFile of 16 MiB into the guest", "MB/s", up),
		newFigure("ReadFile of 16 MiB from the guest", "MB/s", down))
	return rep, nil
}

// fileTransfer writes size random bytes into the guest and reads them back,
// rounds times, and returns both rates in MB/s.
func fileTransfer(ctx context.Context, vm *smolvm.VM, size, rounds int) (up, down []float64, err error) {
	data := make([]byte, size)
	rand.Read(data)
	const path = "/tmp/smolvm-bench-transfer"
	defer vm.Run(context.WithoutCancel(ctx), "rm -f "+path)
	rate := func(d time.Duration) float64 { return float64(size) / 1e6 / d.Seconds() }
	for range rounds {
		t0 := time.Now()
		if err := vm.WriteFile(ctx, path, data, 0o644); err != nil {
			return nil, nil, err
		}
		up = append(up, rate(time.Since(t0)))
		t0 = time.Now()
		got, err := vm.ReadFile(ctx, path)
		if err != nil {
			return nil, nil, err
		}
		down = append(down, rate(time.Since(t0)))
		if !bytes.Equal(got, data) {
			return nil, nil, errors.New("the file read back differs from the one written")
		}
	}
	return up, down, nil
}

// oursBoot is a cold boot: New+Start+Run("true") with ColdBoot.
func oursBoot(ctx context.Context, m *smolvm.Manager, o Options, i int) (time.Duration, error) {
	return oursCreate(ctx, m, smolvm.Config{Name: fmt.Sprintf("bench-boot-%d", i), Image: o.Image, MemoryMiB: o.MemoryMiB,
		NoNetwork: true, ColdBoot: true})
}

// oursCreate times New+Start+Run("true") of cfg up to the result, then
// deletes the VM (not timed).
func oursCreate(ctx context.Context, m *smolvm.Manager, cfg smolvm.Config) (time.Duration, error) {
	t0 := time.Now()
	vm, err := m.New(ctx, cfg)
	if err != nil {
		return 0, err
	}
	defer func() { vm.Delete(context.WithoutCancel(ctx)); vm.Close() }()
	if err := vm.Start(ctx); err != nil {
		return 0, err
	}
	res, err := vm.Run(ctx, "true")
	if err != nil {
		return 0, err
	}
	d := time.Since(t0)
	if !res.OK() {
		return 0, fmt.Errorf("true exited %d", res.ExitCode)
	}
	return d, nil
}

// bareBootName describes bareBoot's figure with plainCmdline.
func bareBootName() string {
	return "bare qemu, same kernel/initramfs/disk, plain kernel command line (" + plainCmdline() +
		"), to the result of one exec of true through the agent"
}

// plainCmdline is the bare baseline's kernel command line: the console,
// where the guest finds its root (without it the agent has no root
// filesystem) and, under TCG, the TSC frequency (without tsc_early_khz a
// microvm guest under TCG has nothing to calibrate its TSC against and
// hangs at boot now and then: 3 boots in about 40 in ADR 0014, 1 in 4
// plain bare boots here). Nothing else: none of the image's flags (no
// init_on_free) and none of the backend's choices (no reboot=t or
// panic=-1). So the cold-boot ratio shows what those choices cost.
func plainCmdline() string {
	cmdline := "console=ttyS0 quiet smol.root=/dev/vda"
	if accel, _, _ := qemu.ProbeAccel(backend.AccelAuto); accel == backend.AccelTCG {
		if khz := qemu.HostTSCkHz(); khz > 0 {
			cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
		}
	}
	return cmdline
}

// initOnFreeArg is the image's flag that the boot group prices on its own
// (image.DefaultKernelArgs).
const initOnFreeArg = "init_on_free=1"

// phases are the two end points of a boot or restore: the agent answered
// (ready), and the result of the first command (first).
type phases struct{ ready, first time.Duration }

// bareBoot starts QEMU by hand with the same kernel, initramfs, disk
// (a fresh overlay), machine, accelerator and memory, and the agent's
// channel, with the kernel command line cmdline, waits until the agent
// answers its handshake (ready), and runs one "true" through it (first):
// the same end point as oursBoot.
func bareBoot(ctx context.Context, img image.Image, o Options, cmdline string) (phases, error) {
	var bt phases
	dir, err := os.MkdirTemp("/tmp", "smvbare")
	if err != nil {
		return bt, err
	}
	defer os.RemoveAll(dir)
	accel, _, _ := qemu.ProbeAccel(backend.AccelAuto)
	cpu := "max"
	if accel == backend.AccelKVM {
		cpu = "host"
	}
	sock := filepath.Join(dir, "a.sock")
	t0 := time.Now()
	disk := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", img.Rootfs, disk).CombinedOutput(); err != nil {
		return bt, fmt.Errorf("qemu-img: %v: %s", err, out)
	}
	var fw []string
	if p := qemu.MicrovmFirmware(); p != "" {
		fw = []string{"-bios", p} // the firmware the backend uses
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", append(fw, "-nodefaults", "-no-user-config", "-nographic",
		"-M", "microvm", "-accel", string(accel), "-cpu", cpu, "-m", fmt.Sprintf("%dM", o.MemoryMiB),
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", cmdline,
		"-serial", "file:"+filepath.Join(dir, "console.log"),
		"-device", "virtio-serial-device,id=vser0",
		"-chardev", "socket,id=agent,server=on,wait=off,path="+sock,
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.smolvm.agent",
		"-blockdev", "driver=qcow2,node-name=disk0,file.driver=file,file.filename="+disk,
		"-device", "virtio-blk-device,drive=disk0")...)
	if err := cmd.Start(); err != nil {
		return bt, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	ph, err := firstCommand(cctx, sock, t0)
	if err != nil {
		return ph, fmt.Errorf("bare qemu boot (%s): %w; console: %s", cmdline, err, consoleTail(filepath.Join(dir, "console.log")))
	}
	return ph, nil
}

// consoleTail is the end of a guest console log, for an error.
func consoleTail(path string) string {
	b, _ := os.ReadFile(path)
	const n = 600
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// firstCommand connects to the agent on the unix socket sock (ready: its
// handshake answered) and runs one "true" through it (first: the result),
// both timed from t0.
func firstCommand(ctx context.Context, sock string, t0 time.Time) (phases, error) {
	var ph phases
	c, err := agentclient.Connect(ctx, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	})
	if err != nil {
		return ph, err
	}
	defer c.Close()
	ph.ready = time.Since(t0)
	if err := execTrue(ctx, c); err != nil {
		return ph, err
	}
	ph.first = time.Since(t0)
	return ph, nil
}

// execTrue runs "true" through an agent client: the first command both
// sides of the boot and restore rows end with.
func execTrue(ctx context.Context, c *agentclient.Client) error {
	res, err := c.Exec(ctx, agentproto.ExecRequest{Shell: "true"}, io.Discard, io.Discard)
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("true exited %d", res.ExitCode)
	}
	return nil
}

// rawConn speaks the agent's line protocol without the client library
// (agentproto's encoder and line reader only) on a channel port of its own.
type rawConn struct {
	c net.Conn
	r *agentproto.LineReader
}

// rawChannel takes a free agent port of the running VM info describes.
func rawChannel(ctx context.Context, info smolvm.Info) (*rawConn, error) {
	b := qemu.New(qemu.Options{})
	rec := backend.Machine{Spec: backend.Spec{ID: info.ID, RunDir: info.RunDir, Dir: info.Dir}, PID: info.PID}
	c, err := b.DialAgent(ctx, rec)
	if err != nil {
		return nil, err
	}
	return newRawConn(c)
}

// newRawConn says hello on c (closed on failure).
func newRawConn(c net.Conn) (*rawConn, error) {
	rc := &rawConn{c: c, r: agentproto.NewLineReader(c, agentproto.MaxReplySize)}
	hello, err := agentproto.Marshal(1, agentproto.TypeHello,
		agentproto.HelloRequest{Nonce: "bench", ProtocolVersion: agentproto.ProtocolVersion})
	if err != nil {
		c.Close()
		return nil, err
	}
	// Resync: a newline, then hello until answered.
	c.Write([]byte("\n"))
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c.Write(hello)
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		line, err := rc.r.ReadLine()
		if err != nil {
			continue
		}
		var h agentproto.Hello
		if hd, err := agentproto.DecodeHeader(line); err == nil && hd.Type == agentproto.TypeHello &&
			agentproto.DecodePayload(line, &h) == nil && h.Nonce == "bench" {
			c.SetReadDeadline(time.Time{})
			return rc, nil
		}
	}
	c.Close()
	return nil, fmt.Errorf("no hello reply on the raw channel")
}

func (rc *rawConn) Close() error { return rc.c.Close() }

// roundTrip sends one request and reads until the reply of type until to
// it; the message is encoded before the clock starts.
func (rc *rawConn) roundTrip(id uint64, typ string, payload any, until string) (time.Duration, error) {
	msg, err := agentproto.Marshal(id, typ, payload)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	if _, err := rc.c.Write(msg); err != nil {
		return 0, err
	}
	rc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		line, err := rc.r.ReadLine()
		if err != nil {
			return 0, err
		}
		if h, err := agentproto.DecodeHeader(line); err == nil && h.ID == id && h.Type == until {
			return time.Since(t0), nil
		}
	}
}

func (rc *rawConn) exec(i int) (time.Duration, error) {
	return rc.roundTrip(uint64(1000+i), agentproto.TypeExec, agentproto.ExecRequest{Shell: "true"}, agentproto.TypeExit)
}

func (rc *rawConn) ping(i int) (time.Duration, error) {
	return rc.roundTrip(uint64(100000+i), agentproto.TypePing, nil, agentproto.TypePong)
}
