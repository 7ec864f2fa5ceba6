package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// qemuImg runs qemu-img with args; errors carry its stderr.
func (b *Backend) qemuImg(ctx context.Context, args ...string) error {
	_, err := b.qemuImgOutput(ctx, args...)
	return err
}

func (b *Backend) qemuImgOutput(ctx context.Context, args ...string) ([]byte, error) {
	bin, err := b.qemuImgBinary()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = err.Error()
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("qemu-img %s: %w (%s)", args[0], ctx.Err(), msg)
		}
		return nil, fmt.Errorf("qemu-img %s: %s", args[0], msg)
	}
	return stdout.Bytes(), nil
}

// imageInfo is the part of `qemu-img info --output=json` we use.
type imageInfo struct {
	Filename              string `json:"filename"`
	Format                string `json:"format"`
	VirtualSize           int64  `json:"virtual-size"`
	BackingFilename       string `json:"backing-filename"`
	FullBackingFilename   string `json:"full-backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
}

// backingPath is the absolute backing file path of the image, or "".
func (ii imageInfo) backingPath() string {
	p := ii.FullBackingFilename
	if p == "" {
		p = ii.BackingFilename
	}
	if p == "" {
		return ""
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(ii.Filename), p)
	}
	return p
}

// info reads one image's header (no backing chain: works when the backing
// file is missing, and with -U while QEMU holds the image). The format is
// always explicit: qemu-img never probes (a raw image whose guest wrote a
// qcow2 header would otherwise be read as one, backing file and all).
func (b *Backend) info(ctx context.Context, path, format string) (imageInfo, error) {
	if err := checkImageFormat(format); err != nil {
		return imageInfo{}, err
	}
	out, err := b.qemuImgOutput(ctx, "info", "-U", "-f", format, "--output=json", path)
	if err != nil {
		return imageInfo{}, err
	}
	var ii imageInfo
	if err := json.Unmarshal(out, &ii); err != nil {
		return imageInfo{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	if ii.Filename == "" {
		ii.Filename = path
	}
	return ii, nil
}

// checkImageFormat accepts the image formats smolvm writes.
func checkImageFormat(format string) error {
	switch format {
	case "qcow2", "raw":
		return nil
	}
	return fmt.Errorf("qemu-img: image format %q: want qcow2 or raw", format)
}

// diskFormat is a machine's disk format (qcow2 when unset, as Prepare makes it).
func diskFormat(m backend.Machine) string {
	if m.DiskFormat == "" {
		return "qcow2"
	}
	return m.DiskFormat
}
