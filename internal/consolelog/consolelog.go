// Package consolelog keeps a VM's serial console log bounded.
//
// QEMU writes the guest console into a ring buffer chardev (RingSize bytes,
// held in QEMU's memory): a guest that floods its console can neither fill
// the host's disk nor grow QEMU, even when no host process is watching.
// Drain moves what the ring holds into the log file (over QMP
// ringbuf-read), and Append keeps that file at most MaxSize bytes, the
// tail. The SDK drains on Logs, on a failed boot and before Stop. What the
// ring holds when QEMU dies unexpectedly is lost (the file keeps what was
// drained before).
package consolelog

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

const (
	// RingSize is the size of QEMU's console ring buffer (a power of 2).
	RingSize = 1 << 20
	// MaxSize bounds the console log file; older output is dropped.
	MaxSize = 1 << 20
	// Device is the id of the console chardev.
	Device = "console"
)

// Tail returns at most the last n bytes of the file at path.
func Tail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-n, 0)
	buf := make([]byte, st.Size()-off)
	k, err := f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return buf[:k], nil
}

// Append adds data to the log at path (created 0600), keeping only its
// last max bytes: when the file would pass max it is rewritten atomically
// with its tail.
func Append(path string, data []byte, max int64) error {
	if len(data) == 0 {
		return nil
	}
	if int64(len(data)) >= max {
		return fsutil.WriteFile(path, data[int64(len(data))-max:], 0o600)
	}
	st, err := os.Stat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err == nil && st.Size()+int64(len(data)) > max {
		tail, err := Tail(path, max-int64(len(data)))
		if err != nil {
			return err
		}
		return fsutil.WriteFile(path, append(tail, data...), 0o600)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Executor runs one QMP command (a *qmp.Client; an interface so that this
// package does not import qmp, whose tests use testutil, which uses this).
type Executor interface {
	Execute(ctx context.Context, cmd string, args any, result any) error
}

// Drain reads what QEMU's console ring buffer holds (through c) and appends
// it to the log at path, keeping at most MaxSize bytes.
func Drain(ctx context.Context, c Executor, path string) error {
	// A guest writing all the while refills the ring: a few rounds only.
	for range 4 {
		var b64 string
		err := c.Execute(ctx, "ringbuf-read", map[string]any{"device": Device, "size": RingSize, "format": "base64"}, &b64)
		if err != nil {
			return fmt.Errorf("console: ringbuf-read: %w", err)
		}
		if b64 == "" {
			return nil
		}
		data, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return fmt.Errorf("console: ringbuf-read: %w", err)
		}
		if err := Append(path, data, MaxSize); err != nil {
			return err
		}
	}
	return nil
}
