package smolvm_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/store"
)

// TestForkErrorUnwrap: errors.Is and errors.As see each failed clone's
// cause through a ForkError, also when Fork wraps it in an *Error.
func TestForkErrorUnwrap(t *testing.T) {
	boom := errors.New("boom")
	var wrapped error = &smolvm.Error{Op: "start", Message: "clone b timed out", Err: errors.Join(smolvm.ErrTimeout, boom)}
	fe := &smolvm.ForkError{Failed: map[string]error{"b": wrapped, "a": smolvm.ErrBoot}}
	err := error(&smolvm.Error{Op: "fork", Message: fe.Error(), Err: fe})
	for _, want := range []error{smolvm.ErrTimeout, smolvm.ErrBoot, boom} {
		if !errors.Is(err, want) {
			t.Errorf("errors.Is(fork error, %v) = false", want)
		}
	}
	if errors.Is(err, smolvm.ErrSnapshotCorrupt) {
		t.Error("errors.Is sees a cause no clone had")
	}
	var e *smolvm.Error
	if !errors.As(fe, &e) || e.Message != "clone b timed out" {
		t.Errorf("errors.As(ForkError, *Error): %v", e)
	}
	if got := fe.Error(); !strings.HasPrefix(got, "2 clone(s) failed and were removed: a: vm failed to boot; b: clone b timed out") {
		t.Errorf("Error() = %q, want the clones in id order", got)
	}
	if got := fe.Unwrap(); len(got) != 2 || got[0] != smolvm.ErrBoot || got[1] != wrapped {
		t.Errorf("Unwrap = %v, want the causes in clone id order", got)
	}
}

// dbFDs counts this process's open files of the state database of dataDir
// (the database and its journal files).
func dbFDs(t *testing.T, dataDir string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	prefix := filepath.Join(dataDir, store.DBName)
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(target, prefix) {
			n++
		}
	}
	return n
}

// TestForkClonesShareManager: the clones of the package-level Fork share
// the Manager made for them. Closing the first (even twice) leaves the
// others working; the last one closed closes the database.
func TestForkClonesShareManager(t *testing.T) {
	ctx := testCtx(t)
	dataDir := os.Getenv("SMOLVM_DATA_DIR")
	before := dbFDs(t, dataDir)
	src, err := smolvm.New(ctx, smolvm.Config{Name: "share-src", Image: "busybox", NoNetwork: true, MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(ctx); err != nil {
		src.Delete(ctx)
		src.Close()
		t.Fatal(err)
	}
	mustOK(t, src, "echo shared > /tmp/mark")
	if _, err := src.Snapshot(ctx, smolvm.SnapshotOptions{ID: "share-snap"}); err != nil {
		t.Fatal(err)
	}
	src.Delete(ctx)
	src.Close()
	if n := dbFDs(t, dataDir); n != before {
		t.Fatalf("after closing the source's handle: %d database files open, want %d", n, before)
	}

	clones, err := smolvm.Fork(ctx, "share-snap", 3, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if n := dbFDs(t, dataDir); n <= before {
		t.Fatalf("with clones open: %d database files open, want more than %d", n, before)
	}
	first := clones[0].ID()
	if err := clones[0].Close(); err != nil {
		t.Fatal(err)
	}
	if err := clones[0].Close(); err != nil { // a second Close releases nothing more
		t.Fatal(err)
	}
	for _, c := range clones[1:] {
		if out := mustOK(t, c, "cat /tmp/mark; hostname"); out != "shared\n"+c.ID() {
			t.Errorf("clone %s after the first was closed: %q", c.ID(), out)
		}
		if info, err := c.Info(ctx); err != nil || info.Status != smolvm.StatusRunning {
			t.Errorf("clone %s Info after the first was closed: %+v, %v", c.ID(), info, err)
		}
	}
	// The closed clone's VM still runs; remove it through another's Manager.
	if h, err := clones[1].Manager().Open(ctx, first); err != nil {
		t.Errorf("open the first clone: %v", err)
	} else {
		mustOK(t, h, "true")
		h.Delete(ctx)
		h.Close() // not an owner: the Manager stays open
	}
	clones[1].Delete(ctx)
	clones[1].Close()
	last := clones[2]
	if out := mustOK(t, last, "hostname"); out != last.ID() {
		t.Errorf("last clone: %q", out)
	}
	if err := last.Manager().DeleteSnapshot(ctx, "share-snap"); !errors.Is(err, smolvm.ErrSnapshotInUse) {
		t.Errorf("delete the snapshot while a clone runs: %v", err)
	}
	if err := last.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if err := last.Manager().DeleteSnapshot(ctx, "share-snap"); err != nil {
		t.Errorf("delete the snapshot: %v", err)
	}
	if err := last.Close(); err != nil {
		t.Fatal(err)
	}
	if n := dbFDs(t, dataDir); n != before {
		t.Errorf("after closing every clone: %d database files open, want %d", n, before)
	}
	if _, err := last.Info(ctx); err == nil {
		t.Error("Info through a closed Manager succeeded")
	}
}

// TestRunStdinReader feeds a command's standard input from an io.Reader:
// the bytes arrive whole; a reader that fails or yields more than
// MaxStdinSize fails Run before the command runs.
func TestRunStdinReader(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	data := make([]byte, 1<<20+3)
	rand.Read(data)
	res := run(t, vm, "cat > /tmp/stdin-in; stat -c %s /tmp/stdin-in; md5sum < /tmp/stdin-in | cut -d' ' -f1; rm /tmp/stdin-in", smolvm.WithStdinReader(iotest.HalfReader(bytes.NewReader(data))))
	want := fmt.Sprintf("%d\n%x", len(data), md5sum(data))
	if res.Output() != want {
		t.Errorf("stdin from a reader: %q, want %q (stderr %q)", res.Output(), want, res.Stderr)
	}
	// The last of WithStdin and WithStdinReader wins.
	if out := run(t, vm, "cat", smolvm.WithStdinReader(strings.NewReader("reader")), smolvm.WithStdin([]byte("bytes"))).Stdout; out != "bytes" {
		t.Errorf("WithStdin after WithStdinReader: %q", out)
	}
	if out := run(t, vm, "cat", smolvm.WithStdin([]byte("bytes")), smolvm.WithStdinReader(strings.NewReader("reader"))).Stdout; out != "reader" {
		t.Errorf("WithStdinReader after WithStdin: %q", out)
	}
	mustOK(t, vm, "rm -f /tmp/stdin-ran")
	boom := errors.New("boom")
	if _, err := vm.Run(ctx, "touch /tmp/stdin-ran", smolvm.WithStdinReader(iotest.ErrReader(boom))); !errors.Is(err, boom) {
		t.Errorf("failing reader: %v", err)
	}
	big := io.LimitReader(zeros{}, smolvm.MaxStdinSize+1)
	if _, err := vm.Run(ctx, "touch /tmp/stdin-ran", smolvm.WithStdinReader(big)); !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Errorf("stdin over MaxStdinSize: %v", err)
	}
	if res := run(t, vm, "test -e /tmp/stdin-ran"); res.OK() {
		t.Error("a command whose stdin could not be read ran")
	}
}

func md5sum(data []byte) [md5.Size]byte { return md5.Sum(data) }

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// TestFilesStreamed moves a file larger than one chunk through the
// io.Reader / io.Writer variants, with its mode; a short reader writes
// nothing; the path rules are those of UploadFile.
func TestFilesStreamed(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	data := make([]byte, agentproto.ChunkSize+1<<20+5)
	rand.Read(data)
	if err := vm.WriteFileFrom(ctx, "/tmp/io/f", iotest.HalfReader(bytes.NewReader(data)), int64(len(data)), 0o640); err != nil {
		t.Fatal(err)
	}
	if got := mustOK(t, vm, "stat -c '%a %s' /tmp/io/f; md5sum /tmp/io/f | cut -d' ' -f1; ls -a /tmp/io | grep -c smolvm || true"); got != fmt.Sprintf("640 %d\n%x\n0", len(data), md5sum(data)) {
		t.Errorf("in the guest: %q", got)
	}
	var buf bytes.Buffer
	mode, n, err := vm.ReadFileTo(ctx, "/tmp/io/f", &buf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), data) || n != int64(len(data)) || mode.Perm() != 0o640 {
		t.Errorf("read back %d bytes (n %d, want %d), mode %v", buf.Len(), n, len(data), mode)
	}
	// A reader shorter than the size: an error, and no file.
	if err := vm.WriteFileFrom(ctx, "/tmp/io/short", strings.NewReader("abc"), 10, 0o600); err == nil {
		t.Error("a short reader succeeded")
	}
	if res := run(t, vm, "test -e /tmp/io/short"); res.OK() {
		t.Error("a short reader left a file")
	}
	for _, err := range []error{
		vm.WriteFileFrom(ctx, "rel/path", strings.NewReader(""), 0, 0o600),
		vm.WriteFileFrom(ctx, "/tmp/io/neg", strings.NewReader(""), -1, 0o600),
		func() error { _, _, err := vm.ReadFileTo(ctx, "rel/path", io.Discard); return err }(),
	} {
		if !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("bad input: %v", err)
		}
	}
	if _, _, err := vm.ReadFileTo(ctx, "/no/such/file", io.Discard); err == nil {
		t.Error("reading a missing file succeeded")
	}
	mustOK(t, vm, "rm -r /tmp/io")
}

// Stream data in and out of a VM: a command's standard input from an
// io.Reader, a guest file written from one and read into an io.Writer.
func ExampleVM_WriteFileFrom() {
	ctx := context.Background()
	vm, err := smolvm.New(ctx, smolvm.Config{Name: "io-example", Image: "busybox", NoNetwork: true})
	if err != nil {
		log.Fatal(err)
	}
	defer vm.Close()
	defer vm.Delete(ctx)
	if err := vm.Start(ctx); err != nil {
		log.Fatal(err)
	}
	res, err := vm.Run(ctx, "tr a-z A-Z", smolvm.WithStdinReader(strings.NewReader("hello\n")))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(res.Stdout)

	src := strings.NewReader("line 1\nline 2\n") // e.g. an *os.File or an HTTP body
	if err := vm.WriteFileFrom(ctx, "/root/in.txt", src, src.Size(), 0o644); err != nil {
		log.Fatal(err)
	}
	vm.Run(ctx, "wc -l < /root/in.txt > /root/out.txt")
	var out bytes.Buffer
	mode, n, err := vm.ReadFileTo(ctx, "/root/out.txt", &out)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s%v %d\n", out.String(), mode.Perm(), n)
	// Output:
	// HELLO
	// 2
	// -rw-r--r-- 2
}
