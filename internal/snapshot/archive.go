package snapshot

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// An export archive (docs/adr/0023-export-format.md) is a zstd-compressed
// tar: manifest.json first, then one entry per artifact of the manifest,
// in its order, and nothing else. An artifact entry is packed: its apparent
// size (u64, big-endian), then each data extent as offset (u64), length
// (u64) and the bytes; holes are not sent and come back as holes.

// maxWindow bounds the zstd decoder's window (its memory) on import.
const maxWindow = 64 << 20

// WriteArchive writes the snapshot in dir, described by m, to w. Each
// artifact is hashed as it is sent (with the digest of m's format,
// DigestFormat): one whose data no longer matches the manifest fails the
// export (ErrCorrupt).
func WriteArchive(w io.Writer, dir string, m Manifest) error {
	return WriteArchiveFiles(w, m, func(a Artifact) string { return filepath.Join(dir, a.Name) })
}

// WriteArchiveFiles is WriteArchive with each artifact read from the file
// path gives (a flattened export sends its disk from a temp file).
func WriteArchiveFiles(w io.Writer, m Manifest, path func(Artifact) string) error {
	zw, err := zstd.NewWriter(w, zstd.WithEncoderConcurrency(1))
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	man, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	hdr := &tar.Header{Name: ManifestName, Mode: 0o600, Size: int64(len(man)), ModTime: m.CreatedAt, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if _, err := tw.Write(man); err != nil {
		return err
	}
	for _, a := range m.Artifacts {
		if err := writeArtifact(tw, path(a), a, m); err != nil {
			return fmt.Errorf("exporting %s: %w", a.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// Extents lists f's data extents (offset, length) by SEEK_DATA/SEEK_HOLE;
// a filesystem without them has one extent, the whole file.
func Extents(f *os.File, size int64) ([][2]int64, error) {
	var out [][2]int64
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				break
			}
			data = off
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		hole = min(hole, size)
		if hole <= data {
			break // the file shrank meanwhile
		}
		out = append(out, [2]int64{data, hole - data})
		off = hole
	}
	return out, nil
}

func writeArtifact(tw *tar.Writer, path string, a Artifact, m Manifest) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() || st.Size() != a.Size {
		return fmt.Errorf("%w: %s is not the %d-byte file the manifest describes", ErrCorrupt, path, a.Size)
	}
	ext, err := Extents(f, a.Size)
	if err != nil {
		return err
	}
	packed := int64(8)
	for _, e := range ext {
		packed += 16 + e[1]
	}
	if err := tw.WriteHeader(&tar.Header{Name: a.Name, Mode: 0o600, Size: packed, ModTime: m.CreatedAt, Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
		return err
	}
	h := newStreamHash(m.FormatVersion)
	var rec [16]byte
	binary.BigEndian.PutUint64(rec[:8], uint64(a.Size))
	if _, err := tw.Write(rec[:8]); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, e := range ext {
		binary.BigEndian.PutUint64(rec[:8], uint64(e[0]))
		binary.BigEndian.PutUint64(rec[8:], uint64(e[1]))
		if _, err := tw.Write(rec[:]); err != nil {
			return err
		}
		// Exactly e[1] bytes go out: a file shrunk meanwhile fails here.
		if _, err := io.CopyBuffer(io.MultiWriter(tw, h.at(e[0], e[1])), io.NewSectionReader(f, e[0], e[1]), buf); err != nil {
			return err
		}
	}
	if got := h.sum(a.Size); got != a.SHA256 {
		return fmt.Errorf("%w: %s does not match its checksum (sha256 %s, manifest %s)", ErrCorrupt, path, got[:12], a.SHA256[:12])
	}
	return nil
}

// ArchiveReader reads an export archive: the manifest (validated), then
// each artifact into a directory, verified against the manifest.
type ArchiveReader struct {
	zr  *zstd.Decoder
	tr  *tar.Reader
	man Manifest
}

// truncated is the error for a stream that ends early or does not decode.
func truncated(what string, err error) error {
	return fmt.Errorf("%w: the archive is truncated or damaged (%s: %v)", ErrCorrupt, what, err)
}

// OpenArchive reads and validates the manifest at the start of r
// (ParseManifest: supported format, plain known artifact names, at most
// MaxManifestSize bytes). Close releases the decoder.
func OpenArchive(r io.Reader) (*ArchiveReader, error) {
	zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxWindow), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil, err
	}
	ar := &ArchiveReader{zr: zr, tr: tar.NewReader(zr)}
	hdr, err := ar.tr.Next()
	if err != nil {
		zr.Close()
		return nil, truncated("reading the manifest", err)
	}
	if hdr.Name != ManifestName || hdr.Typeflag != tar.TypeReg || hdr.Size < 0 || hdr.Size > MaxManifestSize {
		zr.Close()
		return nil, fmt.Errorf("%w: the archive does not start with a %s of at most %d bytes (it starts with %q, %d bytes)",
			ErrCorrupt, ManifestName, MaxManifestSize, hdr.Name, hdr.Size)
	}
	data, err := io.ReadAll(io.LimitReader(ar.tr, MaxManifestSize+1))
	if err != nil {
		zr.Close()
		return nil, truncated("reading the manifest", err)
	}
	m, err := ParseManifest(data)
	if err != nil {
		zr.Close()
		return nil, err
	}
	ar.man = m
	return ar, nil
}

// Manifest is the archive's manifest as validated by OpenArchive.
func (ar *ArchiveReader) Manifest() Manifest { return ar.man }

// Close releases the decoder.
func (ar *ArchiveReader) Close() { ar.zr.Close() }

// Extract writes every artifact of the manifest into dir (which must
// exist and be empty), creating each file exclusively with mode 0600, with
// its holes as holes. Each entry must be the next artifact the manifest
// lists, no larger than the manifest says, and hash (the digest of the
// manifest's format, DigestFormat) to the manifest's digest; after the last one the archive must end. Errors
// wrap ErrCorrupt; the caller removes dir on error.
func (ar *ArchiveReader) Extract(dir string) error {
	buf := make([]byte, 1<<20)
	for _, a := range ar.man.Artifacts {
		hdr, err := ar.tr.Next()
		if err != nil {
			return truncated("expecting "+a.Name, err)
		}
		if hdr.Name != a.Name || hdr.Typeflag != tar.TypeReg {
			return fmt.Errorf("%w: the archive holds %q where the manifest lists %q next", ErrCorrupt, hdr.Name, a.Name)
		}
		if err := extractArtifact(ar.tr, hdr.Size, filepath.Join(dir, a.Name), a, ar.man.FormatVersion, buf); err != nil {
			return err
		}
	}
	if hdr, err := ar.tr.Next(); err != io.EOF {
		if err == nil {
			return fmt.Errorf("%w: the archive holds %q, which the manifest does not list", ErrCorrupt, hdr.Name)
		}
		return truncated("after the last artifact", err)
	}
	return nil
}

func extractArtifact(r io.Reader, packed int64, path string, a Artifact, format int, buf []byte) (err error) {
	if packed < 8 || packed-8 > a.Size+16*(a.Size/2+1) {
		return fmt.Errorf("%w: entry %s is %d bytes, out of bounds for a %d-byte artifact", ErrCorrupt, a.Name, packed, a.Size)
	}
	lr := &io.LimitedReader{R: r, N: packed}
	var rec [16]byte
	if _, err := io.ReadFull(lr, rec[:8]); err != nil {
		return truncated(a.Name, err)
	}
	if size := binary.BigEndian.Uint64(rec[:8]); size != uint64(a.Size) {
		return fmt.Errorf("%w: %s is %d bytes in the archive, the manifest says %d", ErrCorrupt, a.Name, size, a.Size)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	h := newStreamHash(format)
	end := int64(-1) // end of the previous extent: extents are maximal, so a gap must follow each
	for lr.N > 0 {
		if _, err := io.ReadFull(lr, rec[:]); err != nil {
			return truncated(a.Name, err)
		}
		off, n := int64(binary.BigEndian.Uint64(rec[:8])), int64(binary.BigEndian.Uint64(rec[8:]))
		if off < 0 || n <= 0 || off <= end || off > a.Size || n > a.Size-off || n > lr.N {
			return fmt.Errorf("%w: %s has an extent (%d, %d) out of order or outside its %d bytes", ErrCorrupt, a.Name, off, n, a.Size)
		}
		c, err := io.CopyBuffer(io.MultiWriter(io.NewOffsetWriter(f, off), h.at(off, n)), io.LimitReader(lr, n), buf)
		if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
			return err // writing here failed: the archive is not at fault
		} else if err != nil {
			return truncated(a.Name, err)
		}
		if c != n {
			return truncated(a.Name, io.ErrUnexpectedEOF)
		}
		end = off + n
	}
	if err := f.Truncate(a.Size); err != nil {
		return err
	}
	if got := h.sum(a.Size); got != a.SHA256 {
		return fmt.Errorf("%w: %s does not match its checksum (sha256 %s, manifest %s)", ErrCorrupt, a.Name, got[:12], a.SHA256[:12])
	}
	return nil
}

// Qcow2 header facts (docs/interop/qcow2.txt in QEMU).
const (
	qcow2Magic        = "QFI\xfb"
	qcow2V2HeaderLen  = 72
	qcow2IncompatOK   = 1<<0 | 1<<3 | 1<<4 // dirty, compression type, extended L2
	qcow2ExtEnd       = 0
	qcow2ExtDataFile  = 0x44415441
	qcow2ExtBackFmt   = 0xe2792aca
	qcow2MaxHeaderLen = 1 << 16
)

// ErrForeignBacking is a qcow2 artifact that names a backing file other
// than the manifest's base image, an external data file, or features this
// code does not know.
var ErrForeignBacking = errors.New("qcow2 artifact points outside the snapshot")

// CheckQcow2 reads the qcow2 header of path and returns its backing file
// ("" for none). It refuses (ErrForeignBacking) encryption, an external
// data file, unknown incompatible features, a backing format other than
// qcow2 or raw or none given (QEMU would probe the backing file), and a
// backing file other than allowed ("" allows none).
// A file that is not qcow2 is refused (ErrCorrupt).
func CheckQcow2(path, allowed string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hdr := make([]byte, 104)
	if _, err := io.ReadFull(f, hdr[:qcow2V2HeaderLen]); err != nil || string(hdr[:4]) != qcow2Magic {
		return "", fmt.Errorf("%w: %s is not a qcow2 image", ErrCorrupt, filepath.Base(path))
	}
	be := binary.BigEndian
	version := be.Uint32(hdr[4:])
	backOff, backLen := be.Uint64(hdr[8:]), be.Uint32(hdr[16:])
	foreign := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s %s", ErrForeignBacking, filepath.Base(path), fmt.Sprintf(format, a...))
	}
	if be.Uint32(hdr[32:]) != 0 {
		return "", foreign("is encrypted")
	}
	extAt := uint64(qcow2V2HeaderLen)
	switch version {
	case 2:
	case 3:
		if _, err := io.ReadFull(f, hdr[qcow2V2HeaderLen:]); err != nil {
			return "", fmt.Errorf("%w: %s has a short qcow2 header", ErrCorrupt, filepath.Base(path))
		}
		if inc := be.Uint64(hdr[72:]); inc&^qcow2IncompatOK != 0 {
			return "", foreign("has incompatible features %#x (an external data file or ones this smolvm does not know)", inc)
		}
		extAt = uint64(be.Uint32(hdr[100:]))
		if extAt < 104 || extAt > qcow2MaxHeaderLen {
			return "", fmt.Errorf("%w: %s has a qcow2 header length of %d", ErrCorrupt, filepath.Base(path), extAt)
		}
	default:
		return "", foreign("is qcow2 version %d", version)
	}
	// Header extensions: refuse an external data file; check the backing format.
	backFmt := false
	for n := 0; ; n++ {
		var ext [8]byte
		if n > 256 || extAt > qcow2MaxHeaderLen {
			return "", fmt.Errorf("%w: %s has too many qcow2 header extensions", ErrCorrupt, filepath.Base(path))
		}
		if _, err := f.ReadAt(ext[:], int64(extAt)); err != nil {
			return "", fmt.Errorf("%w: %s has a damaged qcow2 header", ErrCorrupt, filepath.Base(path))
		}
		typ, l := be.Uint32(ext[:4]), be.Uint32(ext[4:])
		if typ == qcow2ExtEnd {
			break
		}
		if l > qcow2MaxHeaderLen {
			return "", fmt.Errorf("%w: %s has a damaged qcow2 header", ErrCorrupt, filepath.Base(path))
		}
		switch typ {
		case qcow2ExtDataFile:
			return "", foreign("names an external data file")
		case qcow2ExtBackFmt:
			v := make([]byte, l)
			if _, err := f.ReadAt(v, int64(extAt)+8); err != nil {
				return "", fmt.Errorf("%w: %s has a damaged qcow2 header", ErrCorrupt, filepath.Base(path))
			}
			if s := string(v); s != "qcow2" && s != "raw" {
				return "", foreign("has backing format %q", s)
			}
			backFmt = true
		}
		extAt += 8 + (uint64(l)+7)&^7
	}
	if backOff == 0 || backLen == 0 {
		return "", nil
	}
	if backLen > 1023 || backOff > qcow2MaxHeaderLen {
		return "", foreign("has a backing file name out of bounds")
	}
	name := make([]byte, backLen)
	if _, err := f.ReadAt(name, int64(backOff)); err != nil {
		return "", fmt.Errorf("%w: %s has a damaged qcow2 header", ErrCorrupt, filepath.Base(path))
	}
	if allowed == "" || !bytes.Equal(name, []byte(allowed)) {
		return "", foreign("names backing file %q; the manifest allows %q", name, allowed)
	}
	if !backFmt {
		return "", foreign("names backing file %q without its format (QEMU would probe it)", name)
	}
	return string(name), nil
}
