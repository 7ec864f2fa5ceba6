package server

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/smolvm-go/smolvm"
)

// spoolMargin is what a spooled transfer must leave free on the data
// dir's filesystem besides itself (the daemon's state and snapshots live
// there too).
const spoolMargin = 64 << 20

// tooLarge refuses a file of size bytes (what it is) over
// Config.MaxFileBytes.
func (s *Server) tooLarge(what string, size int64) error {
	return errCode(codeTooLarge, fmt.Sprintf("%s of %d bytes is over the daemon's limit of %d bytes for one file (smolvm serve --max-file-bytes)", what, size, s.cfg.MaxFileBytes))
}

// checkRoom refuses (ErrNoSpace) a spool of need bytes when the data dir's
// filesystem has less than need plus spoolMargin free. A filesystem that
// cannot be asked passes: the write then fails if it must (noSpace).
func (s *Server) checkRoom(need int64) error {
	dir := s.m.DataDir()
	free, _, err := s.freeSpace(dir)
	if err != nil {
		return nil
	}
	if want := uint64(need) + spoolMargin; free < want {
		return s.noRoom(fmt.Sprintf("a file of %d bytes is spooled in %s first, which needs %d MiB free there (with a margin of %d MiB); it has %d MiB",
			need, dir, want>>20, spoolMargin>>20, free>>20))
	}
	return nil
}

func (s *Server) noRoom(msg string) error {
	dir := s.m.DataDir()
	return &smolvm.Error{Op: "files", Message: msg, Err: smolvm.ErrNoSpace,
		Fix: smolvm.Fix{Action: smolvm.FixFreeResources, Args: map[string]string{smolvm.ArgResource: smolvm.ResourceDisk, smolvm.ArgPath: dir}}}
}

// noSpace turns a write that found the disk full into ErrNoSpace.
func (s *Server) noSpace(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return s.noRoom("the data dir's filesystem filled up while a file was spooled: " + err.Error())
	}
	return err
}

// spoolTemp is a private (0600) temp file in the data dir for a transfer
// (New removes those a dead daemon left); done closes and removes it.
func (s *Server) spoolTemp(prefix string) (f *os.File, done func(), err error) {
	f, err = os.CreateTemp(s.m.DataDir(), prefix)
	if err != nil {
		return nil, nil, err
	}
	return f, func() { f.Close(); os.Remove(f.Name()) }, nil
}

// spoolBody copies a request body without a length to a spool file,
// rewound, and returns it with its size. A body past Config.MaxFileBytes
// is refused as soon as it passes it; on any error nothing is left.
func (s *Server) spoolBody(body io.Reader) (*os.File, func(), int64, error) {
	if err := s.checkRoom(0); err != nil {
		return nil, nil, 0, err
	}
	f, done, err := s.spoolTemp(".upload-*")
	if err != nil {
		return nil, nil, 0, err
	}
	n, err := io.Copy(f, io.LimitReader(body, s.cfg.MaxFileBytes+1))
	switch {
	case err != nil && errors.Is(err, syscall.ENOSPC):
		err = s.noSpace(err)
	case err != nil:
		err = errCode(codeInvalidRequest, "reading the body: "+err.Error())
	case n > s.cfg.MaxFileBytes:
		err = s.tooLarge("a chunked upload", n)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		done()
		return nil, nil, 0, err
	}
	return f, done, n, nil
}

// capWriter fails a write past max bytes (a file the guest announced with
// no size, read up to the SDK's bound, when Config.MaxFileBytes is lower).
type capWriter struct {
	w   io.Writer
	n   int64
	max int64
	s   *Server
}

func (c *capWriter) Write(p []byte) (int, error) {
	if c.n+int64(len(p)) > c.max {
		return 0, c.s.tooLarge("a guest file with no announced size", c.n+int64(len(p)))
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
