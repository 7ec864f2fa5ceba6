package image

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"

	"github.com/pierrec/lz4/v4"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// compression formats a bzImage payload can use, by magic.
var payloadMagics = []struct {
	name  string
	magic []byte
}{
	{"gzip", []byte{0x1f, 0x8b, 0x08}},
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}},
	{"bzip2", []byte("BZh")},
	{"lzma", []byte{0x5d, 0x00, 0x00}},
	{"lz4", []byte{0x02, 0x21, 0x4c, 0x18}},
}

// ExtractVmlinux writes the uncompressed ELF kernel contained in the bzImage
// at src to dst, atomically (fsutil.WriteFile). It uses the
// payload_offset/payload_length fields of the x86 boot header when present and otherwise scans for a compression magic.
// gzip, bzip2 and lz4 (the Debian cloud kernel's format) are decoded in
// Go; xz, lzma and zstd through the host's xz or zstd tools.
func ExtractVmlinux(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if bytes.HasPrefix(data, []byte("\x7fELF")) {
		return writeVmlinux(dst, data)
	}
	var tried []string
	if p, ok := bzImagePayload(data); ok {
		for _, m := range payloadMagics {
			if bytes.HasPrefix(p, m.magic) {
				out, err := decompressPayload(m.name, p)
				if err == nil && isELF(out) {
					return writeVmlinux(dst, out)
				}
				tried = append(tried, fmt.Sprintf("header payload (%s): %v", m.name, err))
			}
		}
	}
	// Fallback: scan for each magic, like scripts/extract-vmlinux.
	for _, m := range payloadMagics {
		for off, attempts := 0, 0; attempts < 32; attempts++ {
			i := bytes.Index(data[off:], m.magic)
			if i < 0 {
				break
			}
			pos := off + i
			out, err := decompressPayload(m.name, data[pos:])
			if err == nil && isELF(out) {
				return writeVmlinux(dst, out)
			}
			off = pos + 1
			if len(tried) < 8 {
				tried = append(tried, fmt.Sprintf("%s at %d: %v", m.name, pos, err))
			}
		}
	}
	return fmt.Errorf("extract vmlinux from %s: no compressed ELF kernel found (%v)", src, tried)
}

// bzImagePayload returns the compressed kernel of an x86 bzImage using the
// setup header (boot protocol >= 2.08).
func bzImagePayload(data []byte) ([]byte, bool) {
	if len(data) < 0x250 || string(data[0x202:0x206]) != "HdrS" {
		return nil, false
	}
	if binary.LittleEndian.Uint16(data[0x206:]) < 0x0208 {
		return nil, false
	}
	setupSects := int(data[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	pm := (setupSects + 1) * 512
	off := pm + int(binary.LittleEndian.Uint32(data[0x248:]))
	n := int(binary.LittleEndian.Uint32(data[0x24c:]))
	if off < 0 || n <= 0 || off+n > len(data) {
		return nil, false
	}
	return data[off : off+n], true
}

func isELF(b []byte) bool {
	if !bytes.HasPrefix(b, []byte("\x7fELF")) {
		return false
	}
	_, err := elf.NewFile(bytes.NewReader(b))
	return err == nil
}

func decompressPayload(format string, p []byte) ([]byte, error) {
	switch format {
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(p))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		out, err := io.ReadAll(zr)
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, err
		}
		return out, nil
	case "bzip2":
		return io.ReadAll(bzip2.NewReader(bytes.NewReader(p)))
	case "xz":
		return externalDecompress(p, "xz", "-dc", "--single-stream")
	case "lzma":
		return externalDecompress(p, "xz", "--format=lzma", "-dc")
	case "zstd":
		return externalDecompress(p, "zstd", "-dcq")
	case "lz4":
		return decompressLZ4Legacy(p)
	}
	return nil, fmt.Errorf("unknown format %s", format)
}

// externalDecompress pipes p through a host tool. Trailing data after the
// stream makes these tools complain; the output is still used when it is
// a complete ELF image.
func externalDecompress(p []byte, tool string, args ...string) ([]byte, error) {
	path, err := exec.LookPath(tool)
	if err != nil {
		return nil, fmt.Errorf("%s not installed", tool)
	}
	cmd := exec.Command(path, args...)
	cmd.Stdin = bytes.NewReader(p)
	var out, stderr bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &stderr
	runErr := cmd.Run()
	if isELF(out.Bytes()) {
		return out.Bytes(), nil
	}
	if runErr != nil {
		return nil, fmt.Errorf("%s: %v: %s", tool, runErr, bytes.TrimSpace(stderr.Bytes()))
	}
	return out.Bytes(), nil
}

// writeVmlinux writes the kernel to dst atomically (fsutil.WriteFile),
// mode 0644 masked by the umask.
func writeVmlinux(dst string, b []byte) error {
	return fsutil.WriteFile(dst, b, fsutil.HostMode(0o644))
}

// lz4LegacyMagic starts an LZ4 "legacy" stream, the format kbuild uses.
const lz4LegacyMagic = 0x184c2102

// lz4LegacyBlockMax is the most one legacy block decodes to (8 MiB, fixed
// by the format).
const lz4LegacyBlockMax = 8 << 20

// decompressLZ4Legacy decodes an LZ4 legacy stream: the magic, then blocks
// each preceded by its compressed size (uint32 LE), each decoding
// independently (lz4.UncompressBlock). Data that cannot be a block (such as
// the uncompressed size kbuild appends) ends the stream. The framing is
// read here rather than by lz4.Reader so that trailing bytes after the
// stream inside a bzImage end it instead of failing it.
func decompressLZ4Legacy(p []byte) ([]byte, error) {
	if len(p) < 4 || binary.LittleEndian.Uint32(p) != lz4LegacyMagic {
		return nil, errors.New("lz4: no legacy magic")
	}
	p = p[4:]
	out := make([]byte, 0, 64<<20)
	for len(p) >= 4 {
		n := binary.LittleEndian.Uint32(p)
		if n == lz4LegacyMagic { // concatenated stream
			p = p[4:]
			continue
		}
		if n == 0 || uint64(n) > uint64(len(p)-4) {
			break
		}
		out = slices.Grow(out, lz4LegacyBlockMax)
		k, err := lz4.UncompressBlock(p[4:4+n], out[len(out):len(out)+lz4LegacyBlockMax])
		if err != nil {
			return nil, fmt.Errorf("lz4: corrupt block: %w", err)
		}
		out = out[:len(out)+k]
		p = p[4+n:]
	}
	if len(out) == 0 {
		return nil, errors.New("lz4: empty stream")
	}
	return out, nil
}
