package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// writeFile writes req.Data to req.Path atomically: a temporary file in the
// same directory is written, fsynced and chmodded, then renamed over the
// target, and the directory is fsynced.
func writeFile(req agentproto.WriteFileRequest) error {
	if req.Path == "" || !filepath.IsAbs(req.Path) {
		return invalid("write_file: path must be absolute, got %q", req.Path)
	}
	if len(req.Data) > agentproto.MaxFileSize {
		return fmt.Errorf("write_file: %d bytes: %w (max %d)", len(req.Data), agentproto.ErrTooLarge, agentproto.MaxFileSize)
	}
	return atomicWrite(req.Path, req.Data, fileMode(req.Mode), req.Mkdirs)
}

// fileMode is the mode of a written file: Unix bits u, 0644 for 0.
func fileMode(u uint32) fs.FileMode {
	if u == 0 {
		return 0o644
	}
	return agentproto.UnixToFileMode(u)
}

// writeChunk writes one chunk of a file sent in pieces (see
// agentproto.ChunkSize) into the temporary file the host named.
func writeChunk(req agentproto.WriteChunkRequest) error {
	if !filepath.IsAbs(req.Path) {
		return invalid("write_chunk: path must be absolute, got %q", req.Path)
	}
	if req.Offset < 0 || len(req.Data) > agentproto.MaxFileSize {
		return invalid("write_chunk: offset %d, %d bytes", req.Offset, len(req.Data))
	}
	if req.Mkdirs {
		if err := os.MkdirAll(filepath.Dir(req.Path), 0o755); err != nil {
			return err
		}
	}
	if req.Offset == 0 {
		removeStaleTemps(req.Path)
	}
	f, err := os.OpenFile(req.Path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(req.Data, req.Offset)
	return errors.Join(err, f.Close())
}

// staleTemp is how long a temporary file of an upload may go unwritten
// before another upload to the same target removes it: a live upload
// writes a chunk every few seconds.
const staleTemp = 2 * time.Minute

// removeStaleTemps removes the temporary files that uploads to the same
// target as temp left when their host died mid-way: they are named
// ".<target>.smolvm-*" (as temp is) and have not been written for
// staleTemp.
func removeStaleTemps(temp string) {
	dir, name := filepath.Split(temp)
	i := strings.LastIndex(name, ".smolvm-")
	if !strings.HasPrefix(name, ".") || i <= 0 {
		return
	}
	prefix := name[:i+len(".smolvm-")]
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() == name || !strings.HasPrefix(e.Name(), prefix) || !e.Type().IsRegular() {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > staleTemp {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// commitFile turns a file written in chunks into its target, as
// atomicWrite does for a file sent whole.
func commitFile(req agentproto.CommitFileRequest) error {
	if !filepath.IsAbs(req.Path) || !filepath.IsAbs(req.Temp) {
		return invalid("commit_file: paths must be absolute, got %q and %q", req.Temp, req.Path)
	}
	dir := filepath.Dir(filepath.Clean(req.Path))
	if filepath.Dir(filepath.Clean(req.Temp)) != dir {
		return invalid("commit_file: %q is not in the directory of %q", req.Temp, req.Path)
	}
	if st, err := os.Stat(req.Path); err == nil && st.IsDir() {
		return &fs.PathError{Op: "write", Path: req.Path, Err: syscall.EISDIR}
	}
	f, err := os.OpenFile(req.Temp, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() || st.Size() != req.Size {
		return invalid("commit_file: %s holds %d bytes, want %d", req.Temp, st.Size(), req.Size)
	}
	return fsutil.Install(f, req.Path, fileMode(req.Mode))
}

// removeFile removes a file (not a directory); a missing one is fine.
func removeFile(req agentproto.RemoveFileRequest) error {
	if !filepath.IsAbs(req.Path) {
		return invalid("remove_file: path must be absolute, got %q", req.Path)
	}
	st, err := os.Lstat(req.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.IsDir() {
		return &fs.PathError{Op: "remove", Path: req.Path, Err: syscall.EISDIR}
	}
	return os.Remove(req.Path)
}

// readChunk reads one range of a file read in pieces.
func readChunk(req agentproto.ReadChunkRequest) (agentproto.Chunk, error) {
	if !filepath.IsAbs(req.Path) {
		return agentproto.Chunk{}, invalid("read_chunk: path must be absolute, got %q", req.Path)
	}
	if req.Offset < 0 || req.Length <= 0 || req.Length > agentproto.ChunkSize {
		return agentproto.Chunk{}, invalid("read_chunk: offset %d, length %d (max %d)", req.Offset, req.Length, agentproto.ChunkSize)
	}
	f, err := os.Open(req.Path)
	if err != nil {
		return agentproto.Chunk{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return agentproto.Chunk{}, err
	}
	if st.IsDir() {
		return agentproto.Chunk{}, &agentproto.Error{Code: agentproto.CodeIsDir, Message: req.Path + ": is a directory"}
	}
	// Sized from the file, not from Length: most files are small, and
	// zeroing an 8 MiB buffer costs an emulated guest milliseconds. One
	// byte more than the file holds shows its end at once; files that
	// report no size (procfs) or grew start at that and double.
	hint := int64(64 << 10)
	if st.Size() > 0 {
		hint = max(st.Size()-req.Offset, 0)
	}
	data := make([]byte, min(hint+1, int64(req.Length)))
	n, err := f.ReadAt(data, req.Offset)
	for err == nil && n == len(data) && n < req.Length {
		data = append(data, make([]byte, min(max(n, 64<<10), req.Length-n))...)
		var m int
		m, err = f.ReadAt(data[n:], req.Offset+int64(n))
		n += m
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return agentproto.Chunk{}, err
	}
	return agentproto.Chunk{Data: data[:n], Mode: agentproto.FileModeToUnix(st.Mode()), Size: st.Size(),
		MtimeNS: st.ModTime().UnixNano()}, nil
}

func atomicWrite(path string, data []byte, mode fs.FileMode, mkdirs bool) error {
	dir, base := filepath.Split(filepath.Clean(path))
	if base == "" || base == "." || base == "/" {
		return invalid("not a file path: %q", path)
	}
	if mkdirs {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return &fs.PathError{Op: "write", Path: path, Err: syscall.EISDIR}
	}
	f, err := os.CreateTemp(dir, "."+base+".smolvm-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := fsutil.Install(f, path, mode); err != nil {
		return err
	}
	ok = true
	return nil
}

func readFile(path string) (agentproto.FileData, error) {
	if path == "" || !filepath.IsAbs(path) {
		return agentproto.FileData{}, invalid("read_file: path must be absolute, got %q", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return agentproto.FileData{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return agentproto.FileData{}, err
	}
	if st.IsDir() {
		return agentproto.FileData{}, &agentproto.Error{Code: agentproto.CodeIsDir, Message: path + ": is a directory"}
	}
	if st.Size() > agentproto.MaxFileSize {
		return agentproto.FileData{}, fmt.Errorf("read_file %s: %d bytes: %w (max %d)", path, st.Size(), agentproto.ErrTooLarge, agentproto.MaxFileSize)
	}
	// Size may be 0 or wrong (procfs, sysfs): read up to the limit.
	data, err := io.ReadAll(io.LimitReader(f, agentproto.MaxFileSize+1))
	if err != nil {
		return agentproto.FileData{}, err
	}
	if len(data) > agentproto.MaxFileSize {
		return agentproto.FileData{}, fmt.Errorf("read_file %s: %w (max %d)", path, agentproto.ErrTooLarge, agentproto.MaxFileSize)
	}
	return agentproto.FileData{Data: data, Mode: agentproto.FileModeToUnix(st.Mode())}, nil
}

// Persisted environment.

func loadEnvFile(path string) (map[string]string, error) {
	env := map[string]string{}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return env, nil
	}
	if err != nil {
		return env, err
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return map[string]string{}, fmt.Errorf("%s: %w", path, err)
	}
	return env, nil
}

func (s *Server) setEnv(req agentproto.SetEnvRequest) error {
	for k, v := range req.Set {
		if !agentproto.ValidEnvName(k) {
			return invalid("set_env: invalid variable name %q", k)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return invalid("set_env: value of %s contains NUL", k)
		}
	}
	s.envMu.Lock()
	defer s.envMu.Unlock()
	env := maps.Clone(s.env)
	for _, k := range req.Unset {
		delete(env, k)
	}
	maps.Copy(env, req.Set)
	b, err := json.MarshalIndent(env, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicWrite(s.opts.EnvFile, append(b, '\n'), 0o600, true); err != nil {
		return fmt.Errorf("set_env: %w", err)
	}
	if err := atomicWrite(s.opts.ProfileFile, profileScript(env), 0o644, true); err != nil {
		return fmt.Errorf("set_env: %w", err)
	}
	s.env = env
	return nil
}

func (s *Server) getEnv() map[string]string {
	s.envMu.Lock()
	defer s.envMu.Unlock()
	return maps.Clone(s.env)
}

// profileScript renders env as sh exports.
func profileScript(env map[string]string) []byte {
	var b strings.Builder
	b.WriteString("# Generated by smolvm-agent from " + DefaultEnvFile + "; do not edit.\n")
	for _, k := range slices.Sorted(maps.Keys(env)) {
		b.WriteString("export " + k + "=" + shellQuote(env[k]) + "\n")
	}
	return []byte(b.String())
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// childEnv builds the environment of a process: base, then persisted, then
// the request's own.
func (s *Server) childEnv(extra map[string]string) ([]string, error) {
	for k, v := range extra {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
			return nil, invalid("exec: invalid environment variable %q", k)
		}
	}
	m := map[string]string{}
	var order []string
	add := func(k, v string) {
		if _, ok := m[k]; !ok {
			order = append(order, k)
		}
		m[k] = v
	}
	for _, kv := range s.opts.BaseEnv {
		if k, v, ok := strings.Cut(kv, "="); ok {
			add(k, v)
		}
	}
	persisted := s.getEnv()
	for _, k := range slices.Sorted(maps.Keys(persisted)) {
		add(k, persisted[k])
	}
	for _, k := range slices.Sorted(maps.Keys(extra)) {
		add(k, extra[k])
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+m[k])
	}
	return env, nil
}
