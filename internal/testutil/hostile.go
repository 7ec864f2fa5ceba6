package testutil

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sync"

	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/image"
)

// HostileTag is the build tag of the hostile test agent (see
// internal/agent/hostile.go for what it does wrong on purpose).
const HostileTag = "smolvm_hostile"

var hostileOnce struct {
	once sync.Once
	dir  string
	err  error
}

// HostileImageDir returns an image cache dir whose "busybox" image boots the
// hostile test agent as /init: the busybox image of ImageDir() (kernel and
// root filesystem shared through symlinks) with an initramfs of its own.
// It lives next to ImageDir() (ImageDir()+"-hostile") and is rebuilt only
// when the hostile agent or the busybox image changes; the normal images
// are not touched.
func HostileImageDir(ctx context.Context) (string, error) {
	hostileOnce.once.Do(func() {
		hostileOnce.dir, hostileOnce.err = hostileImageDir(ctx)
	})
	return hostileOnce.dir, hostileOnce.err
}

func hostileImageDir(ctx context.Context) (string, error) {
	if _, err := EnsureImages(ctx, image.Busybox); err != nil {
		return "", err
	}
	base, err := image.Open(ImageDir(), image.Busybox)
	if err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp("", "smolvm-hostile-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	agentPath := filepath.Join(tmp, "smolvm-agent")
	if err := image.BuildAgent(ctx, ModuleRoot(), agentPath, HostileTag); err != nil {
		return "", fmt.Errorf("building the hostile agent: %w", err)
	}
	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return "", err
	}
	m := base.Manifest
	h := sha256.New()
	h.Write(agent)
	for _, mod := range m.Modules {
		io.WriteString(h, mod.SHA256)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]

	baseDir, err := filepath.Abs(base.Dir)
	if err != nil {
		return "", err
	}
	dir := baseDir + "-hostile"
	manifest := filepath.Join(dir, "images", image.Busybox, "manifest.json")
	if img, err := image.Open(dir, image.Busybox); err == nil && img.Manifest.InitrdKey == key &&
		img.Manifest.Kernel == m.Kernel && img.Manifest.Rootfs == m.Rootfs {
		return dir, nil
	}
	for _, d := range []string{filepath.Join(dir, "images", image.Busybox), filepath.Join(dir, "initramfs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	// Kernels, modules and root filesystems are the normal cache's.
	for _, sub := range []string{"kernels", "rootfs"} {
		link := filepath.Join(dir, sub)
		if _, err := os.Lstat(link); errors.Is(err, fs.ErrNotExist) {
			if err := os.Symlink(filepath.Join(baseDir, sub), link); err != nil && !errors.Is(err, fs.ErrExist) {
				return "", err
			}
		}
	}
	var mods []image.InitrdModule
	for _, mod := range m.Modules {
		data, err := os.ReadFile(filepath.Join(baseDir, filepath.FromSlash(mod.Path)))
		if err != nil {
			return "", err
		}
		mods = append(mods, image.InitrdModule{Name: path.Base(mod.Path), Data: data})
	}
	rel := "initramfs/hostile-" + key + ".cpio.gz"
	sum := sha256.New()
	var size int64
	err = fsutil.Write(filepath.Join(dir, filepath.FromSlash(rel)), func(w io.Writer) (os.FileMode, error) {
		cw := &countWriter{w: io.MultiWriter(w, sum)}
		_, err := image.WriteInitramfs(cw, agent, mods)
		size = cw.n
		return 0o644, err
	})
	if err != nil {
		return "", err
	}
	m.Initrd = image.File{Path: rel, SHA256: hex.EncodeToString(sum.Sum(nil)), Size: size}
	m.InitrdKey = key
	sum256 := sha256.Sum256(agent)
	m.AgentSHA256 = hex.EncodeToString(sum256[:])
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return "", err
	}
	if err := fsutil.WriteFile(manifest, b, 0o644); err != nil {
		return "", err
	}
	if _, err := image.Open(dir, image.Busybox); err != nil {
		return "", fmt.Errorf("hostile image: %w", err)
	}
	return dir, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
