package remote

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// Bounds on an index read from the store (hostile input).
const (
	indexFormat     = 1
	MaxIndexSize    = 16 << 20 // bytes of one index object
	MaxManifestSize = 1 << 20  // bytes of the manifest stored in it
	MaxFiles        = 64       // files in one snapshot
	MaxFileSize     = 64 << 30 // bytes of one file
	MaxNameLen      = 128      // bytes of one file name
	minChunkSize    = 64 << 10 // chunk sizes an index may declare: powers of two in [min, max]
	maxChunkSize    = 64 << 20
)

// index is the object snapshots/<id>.json.
type index struct {
	Format    int         `json:"format"`
	ID        string      `json:"id"`
	PushedAt  time.Time   `json:"pushed_at"`
	ChunkSize int64       `json:"chunk_size"`
	DataBytes int64       `json:"data_bytes"`
	Manifest  []byte      `json:"manifest"` // base64 in JSON, verbatim bytes
	Files     []indexFile `json:"files"`
}

type indexFile struct {
	Name   string       `json:"name"`
	Size   int64        `json:"size"`
	Chunks []indexChunk `json:"chunks"` // data chunks in offset order; the rest of the file is holes
}

type indexChunk struct {
	Off int64  `json:"off"`
	Key string `json:"sha256"` // sha256 of the raw bytes, lowercase hex: the object chunks/<Key>
}

func indexKey(id string) string  { return "snapshots/" + id + ".json" }
func chunkKey(key string) string { return "chunks/" + key }

// chunkLen is the raw length of the chunk at off in a file of size.
func chunkLen(off, size, cs int64) int64 { return min(cs, size-off) }

// ValidateID checks a snapshot id: the one rule of the SDK and the
// backends, so an id never names a key or path outside its place.
func ValidateID(id string) error {
	if err := backend.ValidateID(id); err != nil {
		return fmt.Errorf("%w: snapshot id %q: ids are 1-64 characters of lowercase letters, digits, '-' and '_'", ErrInvalid, id)
	}
	return nil
}

// validName checks a file name of a snapshot: plain, local, no dot names.
func validName(name string) error {
	switch {
	case name == "" || len(name) > MaxNameLen:
		return fmt.Errorf("file name %q: empty or longer than %d bytes", name, MaxNameLen)
	case name == "." || name == ".." || strings.HasPrefix(name, "."):
		return fmt.Errorf("file name %q: dot names are not allowed", name)
	case strings.ContainsAny(name, `/\`) || strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("file name %q: must be a plain name, without separators", name)
	case !filepath.IsLocal(name):
		return fmt.Errorf("file name %q: not a local name", name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("file name %q: control characters are not allowed", name)
		}
	}
	return nil
}

func validKey(k string) bool {
	if len(k) != 64 {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// parseIndex decodes and validates an index object for snapshot id. Every
// error wraps ErrCorrupt, except a newer format (ErrNewer).
func parseIndex(data []byte, id string) (*index, error) {
	if len(data) > MaxIndexSize {
		return nil, fmt.Errorf("%w: index of %s is larger than %d bytes", ErrCorrupt, id, MaxIndexSize)
	}
	// The format first, leniently, so a newer index says ErrNewer instead
	// of failing on a field this version does not know.
	var head struct {
		Format int `json:"format"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("%w: index of %s: %v", ErrCorrupt, id, err)
	}
	if head.Format > indexFormat {
		return nil, fmt.Errorf("%w: index of %s has format %d, this smolvm reads up to %d: upgrade smolvm", ErrNewer, id, head.Format, indexFormat)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var ix index
	if err := dec.Decode(&ix); err != nil {
		return nil, fmt.Errorf("%w: index of %s: %v", ErrCorrupt, id, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: index of %s: data after the JSON object", ErrCorrupt, id)
	}
	if err := ix.validate(id); err != nil {
		return nil, fmt.Errorf("%w: index of %s: %v", ErrCorrupt, id, err)
	}
	return &ix, nil
}

func (ix *index) validate(id string) error {
	if ix.Format != indexFormat {
		return fmt.Errorf("format %d: this smolvm reads format %d", ix.Format, indexFormat)
	}
	if ix.ID != id {
		return fmt.Errorf("names snapshot %q, stored as %q", ix.ID, id)
	}
	cs := ix.ChunkSize
	if cs < minChunkSize || cs > maxChunkSize || cs&(cs-1) != 0 {
		return fmt.Errorf("chunk size %d: must be a power of two from %d to %d", cs, minChunkSize, maxChunkSize)
	}
	if len(ix.Manifest) > MaxManifestSize {
		return fmt.Errorf("manifest of %d bytes: at most %d", len(ix.Manifest), MaxManifestSize)
	}
	if len(ix.Files) > MaxFiles {
		return fmt.Errorf("%d files: at most %d", len(ix.Files), MaxFiles)
	}
	seen := make(map[string]bool, len(ix.Files))
	var data int64
	for _, f := range ix.Files {
		if err := validName(f.Name); err != nil {
			return err
		}
		if seen[f.Name] {
			return fmt.Errorf("file %q is listed twice", f.Name)
		}
		seen[f.Name] = true
		if f.Size < 0 || f.Size > MaxFileSize {
			return fmt.Errorf("file %q: size %d out of range (0 to %d)", f.Name, f.Size, int64(MaxFileSize))
		}
		if int64(len(f.Chunks)) > (f.Size+cs-1)/cs {
			return fmt.Errorf("file %q: %d chunks, more than its size holds", f.Name, len(f.Chunks))
		}
		next := int64(0) // the lowest offset the next chunk may start at
		for _, c := range f.Chunks {
			switch {
			case c.Off%cs != 0:
				return fmt.Errorf("file %q: chunk at %d is not aligned to %d", f.Name, c.Off, cs)
			case c.Off < next:
				return fmt.Errorf("file %q: chunk at %d overlaps or is out of order", f.Name, c.Off)
			case c.Off >= f.Size:
				return fmt.Errorf("file %q: chunk at %d is beyond its size %d", f.Name, c.Off, f.Size)
			case !validKey(c.Key):
				return fmt.Errorf("file %q: chunk at %d: key %q is not a lowercase sha256 hex digest", f.Name, c.Off, c.Key)
			}
			next = c.Off + cs
			data += chunkLen(c.Off, f.Size, cs)
		}
	}
	if ix.DataBytes != data {
		return fmt.Errorf("data_bytes %d, the chunks hold %d", ix.DataBytes, data)
	}
	return nil
}
