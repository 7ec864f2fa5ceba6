// Package s3server runs a real S3 server for tests: versitygw with its
// posix backend, as a process on 127.0.0.1 (installed by scripts/setup).
package s3server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Server is one running versitygw.
type Server struct {
	Endpoint  string // http://127.0.0.1:PORT
	AccessKey string
	SecretKey string
	Bucket    string
	Dir       string // the posix backend's root: Dir/Bucket/KEY is object KEY

	cmd    *exec.Cmd
	done   chan struct{}
	stderr *lockedBuffer
	once   sync.Once
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 { // keep the test log bounded
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Binary finds versitygw: $PATH, $SMOLVM_TOOLS_DIR, ~/.cache/smolvm/bin.
func Binary() (string, error) {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	var dirs []string
	if d := os.Getenv("SMOLVM_TOOLS_DIR"); d != "" {
		dirs = append(dirs, d)
	}
	if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".cache", "smolvm", "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, "versitygw")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("versitygw not found in PATH, $SMOLVM_TOOLS_DIR or ~/.cache/smolvm/bin: run scripts/setup")
}

func token(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Start runs versitygw (posix backend) on 127.0.0.1:<free port> with a
// private temp dir and root credentials it makes up, creates bucket, and
// stops it (and removes the dir) in t.Cleanup. Its stderr goes to the
// test log when the test fails. It fails the test, saying "run
// scripts/setup", when no versitygw binary is found.
func Start(t testing.TB, bucket string) *Server {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	var last error
	for range 3 { // a free port may be taken between probe and bind
		s, err := start(t, bin, bucket)
		if err == nil {
			return s
		}
		last = err
	}
	t.Fatalf("versitygw did not start: %v", last)
	return nil
}

func start(t testing.TB, bin, bucket string) (*Server, error) {
	dir, err := os.MkdirTemp("", "smolvm-s3-")
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s := &Server{
		Endpoint:  fmt.Sprintf("http://127.0.0.1:%d", port),
		AccessKey: "smolvm" + token(6),
		SecretKey: token(20),
		Bucket:    bucket,
		Dir:       dir,
		done:      make(chan struct{}),
		stderr:    &lockedBuffer{},
	}
	s.cmd = exec.Command(bin, "--access", s.AccessKey, "--secret", s.SecretKey,
		"--port", fmt.Sprintf("127.0.0.1:%d", port), "--quiet", "posix", dir)
	s.cmd.Stdout = s.stderr
	s.cmd.Stderr = s.stderr
	s.cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID=", "ROOT_SECRET_ACCESS_KEY=")
	if err := s.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	go func() { s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			t.Logf("versitygw output:\n%s", s.stderr.String())
		}
		os.RemoveAll(dir)
	})
	c, err := minio.New(fmt.Sprintf("127.0.0.1:%d", port), &minio.Options{
		Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""), Region: "us-east-1", MaxRetries: 1,
	})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		_, err := c.ListBuckets(ctx)
		if err == nil {
			break
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("versitygw exited: %s", s.stderr.String())
		case <-ctx.Done():
			s.Stop()
			return nil, fmt.Errorf("versitygw did not answer on %s within 30 s: %v", s.Endpoint, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err := c.MakeBucket(ctx, bucket, minio.MakeBucketOptions{Region: "us-east-1"}); err != nil {
		s.Stop()
		return nil, fmt.Errorf("make bucket %s: %v", bucket, err)
	}
	return s, nil
}

// Env is the environment that gives minio-go's credential chain (and the
// AWS tools) this server's credentials.
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey, "AWS_REGION=us-east-1"}
}

// Stop kills the server and waits for it to exit (idempotent); for tests
// that stop it on purpose. Its dir stays until the test's cleanup.
func (s *Server) Stop() {
	s.once.Do(func() {
		if s.cmd.Process != nil {
			s.cmd.Process.Kill()
		}
		<-s.done
	})
}
