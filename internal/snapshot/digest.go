package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
)

// Two digests name an artifact's bytes (docs/adr/0023-export-format.md):
//
// Digest (format 3) depends on the contents only. The file is read in
// its data extents (SEEK_DATA/SEEK_HOLE: holes cost nothing) and cut into
// 4 KiB blocks at multiples of 4 KiB (the last one may be shorter); a block
// of zeros is skipped whether it is a hole or written zeros, and each
// maximal run of non-zero blocks is hashed as its offset (u64 big-endian),
// its bytes, then its length (u64). The apparent size (u64) ends the hash.
// Parsed from its end this input has one reading, so equal digests mean
// equal contents, whatever the layout: on ext4 SEEK_DATA reports an
// unwritten (fallocated) extent as data while its pages are cached and as
// a hole otherwise, so the layout changes when a file is merely read.
//
// LegacyDigest (formats 1-2) hashes each data extent as its offset, its
// length, then its bytes, and then the size: it depends on the layout, and
// is kept only to verify manifests written with it.

// BlockSize is the unit in which Digest skips zeros.
const BlockSize = 4096

var zeroBlock [BlockSize]byte

// Digest is the content digest (format 3) of the file at path, and its size.
func Digest(path string) (string, int64, error) {
	return DigestFormat(path, FormatVersion)
}

// LegacyDigest is the extent digest of manifest formats 1 and 2.
func LegacyDigest(path string) (string, int64, error) {
	return DigestFormat(path, 2)
}

// DigestFormat is the digest a manifest of format version format records
// for the file at path: LegacyDigest below format 3, Digest from it on.
func DigestFormat(path string, format int) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	d, _, size, err := DigestFile(f, format)
	return d, size, err
}

// DigestFile is DigestFormat of an open file, with the data extents it
// read (for a legacy digest, the layout it binds: the layout of a file
// with unwritten extents may change while its contents do not, so a caller
// that sends the layout with a legacy digest takes both from one look).
func DigestFile(f *os.File, format int) (string, [][2]int64, int64, error) {
	st, err := f.Stat()
	if err != nil {
		return "", nil, 0, err
	}
	size := st.Size()
	ext, err := Extents(f, size)
	if err != nil {
		return "", nil, 0, err
	}
	h := newStreamHash(format)
	buf := make([]byte, 1<<20)
	for _, e := range ext {
		n, err := io.CopyBuffer(h.at(e[0], e[1]), io.NewSectionReader(f, e[0], e[1]), buf)
		if err != nil {
			return "", nil, 0, err
		}
		if n != e[1] {
			return "", nil, 0, fmt.Errorf("%s shrank while it was hashed", f.Name())
		}
	}
	return h.sum(size), ext, size, nil
}

// streamHash computes a digest from the data extents of a file, given in
// increasing order of offset, each with its length before its bytes.
type streamHash interface {
	at(off, n int64) io.Writer // the next extent's n bytes at off
	sum(size int64) string
}

func newStreamHash(format int) streamHash {
	if format < 3 {
		return &legacyHash{h: sha256.New()}
	}
	return newContentHash()
}

type legacyHash struct{ h hash.Hash }

func (l *legacyHash) at(off, n int64) io.Writer {
	var rec [16]byte
	binary.BigEndian.PutUint64(rec[:8], uint64(off))
	binary.BigEndian.PutUint64(rec[8:], uint64(n))
	l.h.Write(rec[:])
	return l.h
}

func (l *legacyHash) sum(size int64) string {
	var rec [8]byte
	binary.BigEndian.PutUint64(rec[:], uint64(size))
	l.h.Write(rec[:])
	return hex.EncodeToString(l.h.Sum(nil))
}

// contentHash computes Digest from bytes given at increasing offsets;
// what lies between them is zeros.
type contentHash struct {
	h    hash.Hash
	pos  int64 // the offset after the last byte taken
	blk  [BlockSize]byte
	fill int   // blk[:fill] holds the bytes of the block pos is in (fill = pos mod BlockSize)
	run  int64 // offset where the open run of non-zero blocks starts, or -1
}

func newContentHash() *contentHash { return &contentHash{h: sha256.New(), run: -1} }

func (c *contentHash) at(off, _ int64) io.Writer {
	if off > c.pos {
		c.zeros(off - c.pos)
	}
	return c
}

// Write takes p at c.pos.
func (c *contentHash) Write(p []byte) (int, error) {
	n := len(p)
	if c.fill > 0 {
		k := copy(c.blk[c.fill:], p)
		c.fill += k
		c.pos += int64(k)
		p = p[k:]
		if c.fill < BlockSize {
			return n, nil
		}
		c.block(c.blk[:], c.pos-BlockSize)
		c.fill = 0
	}
	// Whole blocks straight from p; a span of non-zero ones in one Write.
	span := 0 // p[:span] is non-zero blocks not yet hashed
	for span+BlockSize <= len(p) {
		b := p[span : span+BlockSize]
		if !bytes.Equal(b, zeroBlock[:]) {
			if c.run < 0 {
				c.open(c.pos + int64(span))
			}
			span += BlockSize
			continue
		}
		c.h.Write(p[:span])
		c.pos += int64(span)
		c.close(c.pos)
		c.pos += BlockSize
		p = p[span+BlockSize:]
		span = 0
	}
	c.h.Write(p[:span])
	c.pos += int64(span)
	p = p[span:]
	c.fill = copy(c.blk[:], p)
	c.pos += int64(c.fill)
	return n, nil
}

// zeros takes n zero bytes at c.pos.
func (c *contentHash) zeros(n int64) {
	if c.fill > 0 {
		k := min(n, int64(BlockSize-c.fill))
		clear(c.blk[c.fill : c.fill+int(k)])
		c.fill += int(k)
		c.pos += k
		n -= k
		if c.fill < BlockSize {
			return
		}
		c.block(c.blk[:], c.pos-BlockSize)
		c.fill = 0
	}
	if n >= BlockSize {
		c.close(c.pos)
		whole := n &^ (BlockSize - 1)
		c.pos += whole
		n -= whole
	}
	clear(c.blk[:n])
	c.fill = int(n)
	c.pos += n
}

// block takes the (whole or last) block b at off, already counted in pos.
func (c *contentHash) block(b []byte, off int64) {
	if bytes.Equal(b, zeroBlock[:len(b)]) {
		c.close(off)
		return
	}
	if c.run < 0 {
		c.open(off)
	}
	c.h.Write(b)
}

func (c *contentHash) open(off int64) {
	var rec [8]byte
	binary.BigEndian.PutUint64(rec[:], uint64(off))
	c.h.Write(rec[:])
	c.run = off
}

// close ends the open run at end.
func (c *contentHash) close(end int64) {
	if c.run < 0 {
		return
	}
	var rec [8]byte
	binary.BigEndian.PutUint64(rec[:], uint64(end-c.run))
	c.h.Write(rec[:])
	c.run = -1
}

func (c *contentHash) sum(size int64) string {
	if size > c.pos {
		c.zeros(size - c.pos)
	}
	if c.fill > 0 { // the last, short block
		c.block(c.blk[:c.fill], c.pos-int64(c.fill))
		c.fill = 0
	}
	c.close(c.pos)
	var rec [8]byte
	binary.BigEndian.PutUint64(rec[:], uint64(size))
	c.h.Write(rec[:])
	return hex.EncodeToString(c.h.Sum(nil))
}
