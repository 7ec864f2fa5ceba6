package agentclient

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

func TestVMTry(t *testing.T) {
	dir := os.Getenv("AGENTVM")
	if dir == "" {
		t.Skip()
	}
	sd, _ := os.MkdirTemp("", "vm")
	defer os.RemoveAll(sd)
	sock := filepath.Join(sd, "a.sock")
	args := []string{"-M", os.Getenv("AGENTVM_MACHINE"), "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-nographic",
		"-serial", "file:" + filepath.Join(dir, "console.log"),
		"-kernel", filepath.Join(dir, "deb/boot/vmlinuz-6.1.0-56-cloud-amd64"), "-initrd", filepath.Join(dir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 tsc_early_khz=2596128 smol.root=/dev/vda smol.net=1 smol.hostname=tryvm " + os.Getenv("AGENTVM_APPEND"),
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-drive", "id=root,file=" + filepath.Join(dir, "root.ext4") + ",format=raw,if=none",
		"-netdev", "user,id=n0",
	}
	if os.Getenv("AGENTVM_MACHINE") == "microvm" {
		args = append(args, "-device", "virtio-serial-device", "-device", "virtserialport,chardev=agent,name=org.smolvm.agent",
			"-device", "virtio-blk-device,drive=root", "-device", "virtio-net-device,netdev=n0")
	} else {
		args = append(args, "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=agent,name=org.smolvm.agent",
			"-device", "virtio-blk-pci,drive=root", "-device", "virtio-net-pci,netdev=n0")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	var qerr bytes.Buffer
	cmd.Stderr = &qerr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		b, _ := os.ReadFile(filepath.Join(dir, "console.log"))
		t.Logf("qemu stderr: %s\nconsole:\n%s", qerr.String(), b)
	}()
	dial := func(ctx context.Context) (net.Conn, error) { return (&net.Dialer{}).DialContext(ctx, "unix", sock) }
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := Connect(ctx, dial)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("connected after %v: %+v", time.Since(start), c.Hello())
	var rtts []time.Duration
	for range 200 {
		d, err := c.Ping(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rtts = append(rtts, d)
	}
	slices.Sort(rtts)
	t.Logf("ping rtts min %v med %v p90 %v max %v", rtts[0], rtts[100], rtts[180], rtts[199])
	var ex []time.Duration
	var gd []int64
	for range 30 {
		t0 := time.Now()
		r, _ := c.Exec(ctx, agentproto.ExecRequest{Argv: []string{"true"}}, nil, nil)
		ex = append(ex, time.Since(t0))
		gd = append(gd, r.DurationMS)
	}
	t.Logf("guest durations %v", gd)
	{
		var out bytes.Buffer
		c.Exec(ctx, agentproto.ExecRequest{Shell: "i=0; time while [ $i -lt 20 ]; do /bin/true; i=$((i+1)); done"}, &out, &out)
		t.Logf("20x fork/exec from sh in guest: %s", out.String())
	}
	slices.Sort(ex)
	t.Logf("exec true min %v med %v max %v", ex[0], ex[15], ex[29])
	inf, err := c.Info(ctx)
	t.Logf("info %+v %v", inf, err)
	for _, sh := range []string{"cat /etc/marker; hostname; mount; ip addr; ip route; cat /etc/resolv.conf; ls -la /dev/pts /dev/shm; ps", "echo $PATH $HOME $LANG; pwd", "sleep 100 & sleep 100"} {
		var out, eb bytes.Buffer
		t0 := time.Now()
		res, err := c.Exec(ctx, agentproto.ExecRequest{Shell: sh, TimeoutMS: 1000}, &out, &eb)
		t.Logf("exec %q (%v): %+v %v\n%s%s", sh, time.Since(t0), res, err, out.String(), eb.String())
	}
	{
		for _, size := range []int{256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20} {
			big := make([]byte, size)
			for i := range big {
				big[i] = byte(i * 7)
			}
			t0 := time.Now()
			err := c.WriteFile(ctx, "/tmp/big", big, 0o644)
			t1 := time.Now()
			got, _, err2 := c.ReadFile(ctx, "/tmp/big")
			t.Logf("%d write %v (%v) read %v (%v) equal=%v", size, t1.Sub(t0), err, time.Since(t1), err2, bytes.Equal(got, big))
		}
		var out bytes.Buffer
		c.Exec(ctx, agentproto.ExecRequest{Shell: "grep -E 'VmRSS|VmHWM' /proc/1/status; free"}, &out, &out)
		t.Logf("%s", out.String())
		d, err := c.Ping(ctx)
		t.Logf("ping after %v %v", d, err)
	}
	if err := c.WriteFile(ctx, "/root/x/y.txt", []byte("data"), 0o600); err != nil {
		t.Error(err)
	}
	b, m, err := c.ReadFile(ctx, "/root/x/y.txt")
	t.Logf("read %q %v %v", b, m, err)
	if err := c.SetEnv(ctx, map[string]string{"FOO": "bar"}, nil); err != nil {
		t.Error(err)
	}
	if err := c.SetTime(ctx, time.Now()); err != nil {
		t.Error(err)
	}
	if err := c.SetIdentity(ctx, "clone1", []byte("seedseedseed")); err != nil {
		t.Error(err)
	}
	// reconnect several times
	for i := range 3 {
		c.Close()
		t0 := time.Now()
		c, err = Connect(ctx, dial)
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		_, err = c.Exec(ctx, agentproto.ExecRequest{Shell: "echo $FOO; hostname; date"}, &out, nil)
		t.Logf("reconnect %d in %v: %q %v", i, time.Since(t0), out.String(), err)
	}
	// disconnect with an exec in flight, then reconnect
	go c.Exec(context.Background(), agentproto.ExecRequest{Shell: "sleep 0.3; seq 1 20000"}, nil, nil)
	time.Sleep(100 * time.Millisecond)
	c.Close()
	time.Sleep(time.Second)
	c, err = Connect(ctx, dial)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	res, err := c.Exec(ctx, agentproto.ExecRequest{Shell: "echo after"}, &out, nil)
	t.Logf("after in-flight disconnect: %q %+v %v dropped=%d", out.String(), res, err, c.dropped.Load())
	if strings.TrimSpace(out.String()) != "after" {
		t.Error("bad")
	}
	if os.Getenv("AGENTVM_SHUTDOWN") != "" {
		t0 := time.Now()
		err := c.Shutdown(ctx)
		werr := make(chan error)
		go func() { werr <- cmd.Wait() }()
		select {
		case e := <-werr:
			t.Logf("shutdown %v; qemu exited %v after %v", err, e, time.Since(t0))
		case <-time.After(10 * time.Second):
			t.Errorf("qemu did not exit after shutdown (%v)", err)
		}
	}
}
