package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// ErrNoFDPassing is returned by ExecuteWithFile on a connection that is not
// a unix socket (descriptors travel only as SCM_RIGHTS ancillary data).
var ErrNoFDPassing = errors.New("qmp: descriptor passing needs a unix socket connection")

// ExecuteWithFile runs cmd like Execute and sends f's descriptor with it
// (SCM_RIGHTS, in the same sendmsg as the command's first byte). QEMU keeps
// the last descriptor it received on the monitor for the command that
// consumes one: add-fd (into an fdset, then opened by QEMU as
// /dev/fdset/N) or getfd (a named descriptor). QEMU gets its own copy; the
// caller still owns f and may close it once the call returns.
func (c *Client) ExecuteWithFile(ctx context.Context, cmd string, args any, result any, f *os.File) error {
	if f == nil {
		return fmt.Errorf("qmp: %s: nil file", cmd)
	}
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp: %s: %w", cmd, ErrNoFDPassing)
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	var oob []byte
	if err := raw.Control(func(fd uintptr) { oob = unix.UnixRights(int(fd)) }); err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	// f must stay open until the message is sent (execute returns after
	// the reply, so after the send).
	err = c.execute(ctx, cmd, args, result, oob)
	runtime.KeepAlive(f)
	return err
}

// writeMsg writes b, with oob (ancillary data) attached to its first byte
// when given. A short write is completed without the ancillary data, which
// the kernel has already delivered with the first part.
func (c *Client) writeMsg(b, oob []byte) (int, error) {
	if len(oob) == 0 {
		return c.conn.Write(b)
	}
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return 0, ErrNoFDPassing
	}
	n, _, err := uc.WriteMsgUnix(b, oob, nil)
	if err != nil || n == len(b) {
		return n, err
	}
	m, err := uc.Write(b[n:])
	return n + m, err
}
