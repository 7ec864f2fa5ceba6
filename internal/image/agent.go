package image

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildAgent compiles the guest agent (./cmd/smolvm-agent of the module at
// moduleRoot) as a static binary at outPath:
// CGO_ENABLED=0 go build -trimpath -ldflags "-s -w", with -tags when tags
// are given (tests build a hostile agent so). The output is written next
// to outPath first and renamed, so outPath is never half written.
func BuildAgent(ctx context.Context, moduleRoot, outPath string, tags ...string) error {
	out, err := filepath.Abs(outPath)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp)
	args := []string{"build", "-trimpath", "-ldflags", "-s -w", "-o", tmp}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/smolvm-agent")...)
	cmd.Dir = moduleRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build agent in %s: %v\n%s", moduleRoot, err, b)
	}
	if !isStaticELF(tmp) {
		return fmt.Errorf("build agent: %s is not a static ELF binary", tmp)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}
