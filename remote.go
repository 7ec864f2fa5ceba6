package smolvm

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/remote"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/store"
	"golang.org/x/sys/unix"
)

// Remote is a snapshot store in an S3-compatible object store: snapshots
// pushed there are content-addressed chunks plus an index, and any data
// dir that names the same store can pull them. Credentials are never part
// of a Remote: they come from the AWS environment variables
// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the AWS
// shared credentials file when the store is used.
type Remote struct {
	Name     string `json:"name"`               // an id (ValidateID)
	URL      string `json:"url"`                // s3://BUCKET[/PREFIX]
	Endpoint string `json:"endpoint,omitempty"` // http(s)://host[:port]; empty: AWS
	Region   string `json:"region,omitempty"`
	// Default: the remote used when a call names none, and the one
	// FromSnapshot, Fork and restore pull a missing snapshot from. The
	// first remote added is the default.
	Default bool `json:"default"`
}

// remotesFileName is the remotes config in the data dir.
const remotesFileName = "remotes.json"

// remotesVersion is the remotes config format this code writes and reads.
const remotesVersion = 1

// Bounds of the remotes config (it is read as data from disk).
const (
	maxRemotesFile = 64 << 10
	maxRemotes     = 64
)

// remotesFile is remotes.json: versioned, strict, no credentials.
type remotesFile struct {
	Version int            `json:"version"`
	Default string         `json:"default,omitempty"`
	Remotes []remoteRecord `json:"remotes"`
}

type remoteRecord struct {
	Name     string `json:"name"`
	URL      string `json:"url"`
	Endpoint string `json:"endpoint,omitempty"`
	Region   string `json:"region,omitempty"`
}

func (f remotesFile) find(name string) (remoteRecord, bool) {
	for _, r := range f.Remotes {
		if r.Name == name {
			return r, true
		}
	}
	return remoteRecord{}, false
}

func (f remotesFile) remote(r remoteRecord) Remote {
	return Remote{Name: r.Name, URL: r.URL, Endpoint: r.Endpoint, Region: r.Region, Default: r.Name == f.Default}
}

var regionRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// validateRemote checks one remote as a caller value (AddRemote) and as
// data read back from remotes.json.
func validateRemote(r remoteRecord) error {
	if err := ValidateID(r.Name); err != nil {
		return newErr("remote", ErrInvalidID, Fix{}, fmt.Sprintf("invalid remote name %q: names follow the id rules (1-64 lowercase letters, digits, '-' and '_')", r.Name))
	}
	if _, _, err := remote.ParseURL(r.URL); err != nil {
		return newErr("remote", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "Remote.URL", ArgHint, "give the remote's URL as s3://BUCKET or s3://BUCKET/PREFIX"),
			fmt.Sprintf("invalid remote URL %q: %v", r.URL, err))
	}
	if err := validateEndpoint(r.Endpoint); err != nil {
		return newErr("remote", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "Remote.Endpoint", ArgHint, "give the endpoint as http(s)://HOST[:PORT], with no path, query or credentials"),
			fmt.Sprintf("invalid remote endpoint %q: %v", r.Endpoint, err))
	}
	if r.Region != "" && !regionRE.MatchString(r.Region) {
		return newErr("remote", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "Remote.Region", ArgHint, "give a region such as us-east-1"),
			fmt.Sprintf("invalid remote region %q", r.Region))
	}
	return nil
}

// validateEndpoint: empty (AWS), or an http(s) URL of a host and port only.
// Credentials in it are refused: they would be stored on disk.
func validateEndpoint(e string) error {
	if e == "" {
		return nil
	}
	if len(e) > 1024 {
		return errors.New("longer than 1024 bytes")
	}
	u, err := url.Parse(e)
	if err != nil {
		return err
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return errors.New("the scheme must be http or https")
	case u.User != nil:
		return errors.New("credentials do not belong in the endpoint (they come from the AWS environment variables or credentials file)")
	case u.Host == "" || u.Opaque != "":
		return errors.New("no host")
	case u.Path != "" && u.Path != "/", u.RawQuery != "", u.ForceQuery, u.Fragment != "":
		return errors.New("a path, query or fragment is not allowed")
	}
	return nil
}

func (m *Manager) remotesPath() string { return filepath.Join(m.opts.DataDir, remotesFileName) }

// remotesConfigError is a remotes.json that cannot be used as it is.
func (m *Manager) remotesConfigError(sentinel error, format string, a ...any) error {
	return &Error{Op: "remote", Message: fmt.Sprintf("%s: ", m.remotesPath()) + fmt.Sprintf(format, a...),
		Fix: newFix(FixEditOption, ArgOption, remotesFileName, ArgHint, "fix or remove "+m.remotesPath()+" (it holds only remote names, URLs and endpoints), then add the remotes again"),
		Err: sentinel}
}

// readRemotes reads remotes.json (none: an empty config). The file must
// be a regular file of ours, mode 0600, at most maxRemotesFile bytes, in
// the current version, with no unknown field, and every remote valid.
func (m *Manager) readRemotes() (remotesFile, error) {
	empty := remotesFile{Version: remotesVersion}
	p := m.remotesPath()
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return empty, nil
	}
	if errors.Is(err, syscall.ELOOP) {
		return empty, m.remotesConfigError(errors.Join(ErrInvalidConfig, fsutil.ErrUnsafe), "it is a symlink; refusing to follow it")
	}
	if err != nil {
		return empty, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return empty, err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	switch {
	case !st.Mode().IsRegular():
		return empty, m.remotesConfigError(errors.Join(ErrInvalidConfig, fsutil.ErrUnsafe), "it is not a regular file")
	case !ok || int(sys.Uid) != os.Geteuid():
		return empty, m.remotesConfigError(errors.Join(ErrInvalidConfig, fsutil.ErrUnsafe), "it is not owned by us (uid %d)", os.Geteuid())
	case st.Mode().Perm()&0o077 != 0:
		return empty, m.remotesConfigError(errors.Join(ErrInvalidConfig, fsutil.ErrUnsafe), "it has mode %v, open to other users (want 0600)", st.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, maxRemotesFile+1))
	if err != nil {
		return empty, err
	}
	return m.parseRemotes(data)
}

// parseRemotes decodes remotes.json strictly.
func (m *Manager) parseRemotes(data []byte) (remotesFile, error) {
	var rf remotesFile
	if len(data) > maxRemotesFile {
		return rf, m.remotesConfigError(ErrInvalidConfig, "it is over %d bytes", maxRemotesFile)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rf); err != nil {
		return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "it does not parse: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "it has data after the JSON object")
	}
	if rf.Version > remotesVersion {
		return remotesFile{}, m.remotesConfigError(ErrUnsupported, "it has version %d; this smolvm reads version %d (upgrade smolvm)", rf.Version, remotesVersion)
	}
	if rf.Version != remotesVersion {
		return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "it has version %d; want %d", rf.Version, remotesVersion)
	}
	if len(rf.Remotes) > maxRemotes {
		return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "it lists %d remotes; at most %d", len(rf.Remotes), maxRemotes)
	}
	seen := map[string]bool{}
	for _, r := range rf.Remotes {
		if err := validateRemote(r); err != nil {
			return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "%v", err)
		}
		if seen[r.Name] {
			return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "it lists remote %q twice", r.Name)
		}
		seen[r.Name] = true
	}
	if rf.Default != "" && !seen[rf.Default] {
		return remotesFile{}, m.remotesConfigError(ErrInvalidConfig, "its default remote %q is not listed", rf.Default)
	}
	return rf, nil
}

// updateRemotes runs change on the config under the remotes lock and
// writes the result atomically (temp file, fsync, rename), mode 0600.
func (m *Manager) updateRemotes(ctx context.Context, change func(*remotesFile) error) error {
	locks := filepath.Join(m.opts.DataDir, store.LockDir)
	if err := fsutil.PrivateDir(locks); err != nil {
		return err
	}
	// Ids contain no '.': this never collides with a VM's or snapshot's lock.
	unlock, err := fsutil.Lock(ctx, filepath.Join(locks, "remotes.config.lock"), nil)
	if err != nil {
		return err
	}
	defer unlock()
	rf, err := m.readRemotes()
	if err != nil {
		return err
	}
	if err := change(&rf); err != nil {
		return err
	}
	data, err := json.MarshalIndent(rf, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFile(m.remotesPath(), append(data, '\n'), 0o600)
}

// AddRemote adds a remote snapshot store to this data dir's config
// (remotes.json, mode 0600; it never holds credentials). The first remote
// added becomes the default; r.Default makes this one the default.
func (m *Manager) AddRemote(ctx context.Context, r Remote) error {
	rec := remoteRecord{Name: r.Name, URL: r.URL, Endpoint: r.Endpoint, Region: r.Region}
	if err := validateRemote(rec); err != nil {
		return err
	}
	return m.updateRemotes(ctx, func(rf *remotesFile) error {
		if _, ok := rf.find(r.Name); ok {
			return newErr("remote", ErrRemoteExists, newFix(FixRemoveRemote, ArgRemote, r.Name),
				fmt.Sprintf("remote %q already exists", r.Name))
		}
		if len(rf.Remotes) >= maxRemotes {
			return newErr("remote", ErrInvalidConfig, newFix(FixRemoveRemote), fmt.Sprintf("at most %d remotes", maxRemotes))
		}
		rf.Remotes = append(rf.Remotes, rec)
		if rf.Default == "" || r.Default {
			rf.Default = r.Name
		}
		return nil
	})
}

// RemoveRemote removes a remote from the config (the store and what it
// holds are untouched). When it was the default, no remote is the default
// until SetDefaultRemote names one.
func (m *Manager) RemoveRemote(ctx context.Context, name string) error {
	return m.updateRemotes(ctx, func(rf *remotesFile) error {
		for i, r := range rf.Remotes {
			if r.Name == name {
				rf.Remotes = append(rf.Remotes[:i], rf.Remotes[i+1:]...)
				if rf.Default == name {
					rf.Default = ""
				}
				return nil
			}
		}
		return remoteNotFound(name)
	})
}

// SetDefaultRemote makes the remote name the default.
func (m *Manager) SetDefaultRemote(ctx context.Context, name string) error {
	return m.updateRemotes(ctx, func(rf *remotesFile) error {
		if _, ok := rf.find(name); !ok {
			return remoteNotFound(name)
		}
		rf.Default = name
		return nil
	})
}

// Remotes lists the configured remotes in the order they were added.
func (m *Manager) Remotes(ctx context.Context) ([]Remote, error) {
	rf, err := m.readRemotes()
	if err != nil {
		return nil, err
	}
	out := make([]Remote, 0, len(rf.Remotes))
	for _, r := range rf.Remotes {
		out = append(out, rf.remote(r))
	}
	return out, nil
}

func remoteNotFound(name string) error {
	return newErr("remote", ErrRemoteNotFound, newFix(FixAddRemote, ArgRemote, name), fmt.Sprintf("remote %q is not configured", name))
}

// findRemote returns the remote called name, or the default one for "".
func (m *Manager) findRemote(name string) (Remote, error) {
	rf, err := m.readRemotes()
	if err != nil {
		return Remote{}, err
	}
	if name == "" {
		if rf.Default == "" {
			return Remote{}, newErr("remote", ErrRemoteNotFound, newFix(FixAddRemote), "no remote named and no default remote configured")
		}
		name = rf.Default
	}
	r, ok := rf.find(name)
	if !ok {
		return Remote{}, remoteNotFound(name)
	}
	return rf.remote(r), nil
}

// openRemote finds the remote and opens its store.
func (m *Manager) openRemote(ctx context.Context, name string) (Remote, remote.Store, error) {
	r, err := m.findRemote(name)
	if err != nil {
		return r, nil, err
	}
	open := m.openStore
	if open == nil {
		open = func(ctx context.Context, r Remote) (remote.Store, error) {
			return remote.NewS3(ctx, remote.S3Config{URL: r.URL, Endpoint: r.Endpoint, Region: r.Region})
		}
	}
	st, err := open(ctx, r)
	if err != nil {
		return r, nil, remoteErr("remote", r, "", err)
	}
	return r, st, nil
}

// remoteErr maps an error of the remote store to the SDK's sentinels,
// with what to do next. id is the snapshot concerned ("" for none).
func remoteErr(op string, r Remote, id string, err error) error {
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	where := r.URL
	if r.Endpoint != "" {
		where += " at " + r.Endpoint
	}
	switch {
	case errors.Is(err, remote.ErrAuth):
		return &Error{Op: op, Message: fmt.Sprintf("remote %s (%s) refused the credentials: %v", r.Name, where, err),
			Fix: newFix(FixSetEnv, ArgEnv, "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY", ArgHint,
				"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a shared credentials file) to credentials the store accepts"),
			Err: errors.Join(ErrRemoteAuth, err)}
	case errors.Is(err, remote.ErrUnreachable):
		return &Error{Op: op, Message: fmt.Sprintf("remote %s (%s) cannot be reached: %v", r.Name, where, err),
			Fix: newFix(FixCheckRemote, ArgRemote, r.Name, ArgValue, r.Endpoint), Err: errors.Join(ErrRemoteUnreachable, err)}
	case errors.Is(err, remote.ErrNotFound) && id != "":
		return &Error{Op: op, Message: fmt.Sprintf("snapshot %q is not in remote %s (%s)", id, r.Name, where),
			Fix: newFix(FixListRemoteSnapshots, ArgRemote, r.Name), Err: errors.Join(ErrSnapshotNotFound, err)}
	case errors.Is(err, remote.ErrNewer):
		return &Error{Op: op, Message: fmt.Sprintf("snapshot %s in remote %s was written by a newer smolvm: %v", id, r.Name, err),
			Err: errors.Join(ErrUnsupported, err)}
	case errors.Is(err, remote.ErrCorrupt):
		return &Error{Op: op, Message: fmt.Sprintf("snapshot %s in remote %s was refused: %v; nothing was pulled", id, r.Name, err),
			Err: errors.Join(ErrSnapshotCorrupt, err)}
	}
	return fmt.Errorf("%s: remote %s: %w", op, r.Name, err)
}

// TransferProgress is how far a push or pull is.
type TransferProgress struct {
	Phase       string `json:"phase"` // "upload", "download", "verify"
	DoneBytes   int64  `json:"done_bytes"`
	TotalBytes  int64  `json:"total_bytes"`
	DoneChunks  int    `json:"done_chunks"`
	TotalChunks int    `json:"total_chunks"`
}

func progressFn(f func(TransferProgress)) func(remote.Progress) {
	if f == nil {
		return nil
	}
	return func(p remote.Progress) {
		f(TransferProgress{Phase: p.Phase, DoneBytes: p.DoneBytes, TotalBytes: p.TotalBytes, DoneChunks: p.DoneChunks, TotalChunks: p.TotalChunks})
	}
}

// PushOptions configure PushSnapshot.
type PushOptions struct {
	Remote   string                 // "" for the default remote
	Progress func(TransferProgress) // called from one goroutine at a time; may be nil
}

// PushStats say what a push moved.
type PushStats struct {
	Remote        string `json:"remote"`
	SnapshotID    string `json:"snapshot_id"`
	Chunks        int    `json:"chunks"`         // data chunks of the snapshot (holes are none)
	Uploaded      int    `json:"uploaded"`       // chunks this push sent; the rest were in the store already
	LogicalBytes  int64  `json:"logical_bytes"`  // sum of the artifacts' sizes
	DataBytes     int64  `json:"data_bytes"`     // bytes in data chunks
	UploadedBytes int64  `json:"uploaded_bytes"` // bytes sent (compressed chunks and the index)
}

// PushSnapshot uploads snapshot id to a remote store: every data chunk
// the store lacks, then the snapshot's index (its manifest and chunk
// list) last, so a push that dies half-way lists nothing there and a new
// push sends only what is missing. The snapshot is locked while it is read
// and its manifest and artifacts are checked first (a changed snapshot is
// not pushed). A snapshot of that id already in the store is replaced.
func (m *Manager) PushSnapshot(ctx context.Context, id string, opts PushOptions) (PushStats, error) {
	stats := PushStats{SnapshotID: id}
	if _, err := m.GetSnapshot(ctx, id); err != nil {
		return stats, err
	}
	r, st, err := m.openRemote(ctx, opts.Remote)
	if err != nil {
		return stats, err
	}
	stats.Remote = r.Name
	locks := heldLocks{dataDir: m.opts.DataDir}
	defer locks.release()
	if err := locks.snapshot(ctx, id); err != nil {
		return stats, err
	}
	man, err := m.loadSnapshot(ctx, id, false)
	if err != nil && !errors.Is(err, ErrBackingImageMissing) { // a push needs no base image
		return stats, err
	}
	dir := filepath.Join(m.snapRoot(), id)
	manJSON, err := pushedManifest(dir, man)
	if err != nil {
		return stats, err
	}
	files := make([]remote.File, 0, len(man.Artifacts))
	for _, a := range man.Artifacts {
		files = append(files, remote.File{Name: a.Name, Path: filepath.Join(dir, a.Name)})
	}
	ps, err := remote.Push(ctx, st, id, manJSON, files, remote.PushOptions{Progress: progressFn(opts.Progress)})
	if man.FormatVersion < 3 {
		dropCache(files)
	}
	if err != nil {
		return stats, remoteErr("snapshot push", r, id, err)
	}
	stats.Chunks, stats.Uploaded = ps.Chunks, ps.Uploaded
	stats.LogicalBytes, stats.DataBytes, stats.UploadedBytes = ps.LogicalBytes, ps.DataBytes, ps.UploadedBytes
	return stats, nil
}

// dropCache drops the page cache of files a push read whole, for a
// snapshot whose manifest (format 1 or 2) has extent digests
// (snapshot.LegacyDigest). On ext4, SEEK_DATA reports an unwritten extent
// (a disk image's preallocated zeros) as data while its pages are cached:
// left cached, the zeros the push read would make the next verify or
// export of such a snapshot hash differently. Format 3 digests depend on
// the contents only and need none of this.
func dropCache(files []remote.File) {
	for _, f := range files {
		if fh, err := os.Open(f.Path); err == nil {
			unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
			fh.Close()
		}
	}
}

// PullOptions configure PullSnapshot.
type PullOptions struct {
	Remote string // "" for the default remote
	// SnapshotID adds the snapshot under this id instead of the one it
	// has in the remote (the VM id it restores to stays the manifest's).
	SnapshotID string
	Progress   func(TransferProgress) // called from one goroutine at a time; may be nil
	// Stats, when not nil, is filled with what the pull moved.
	Stats *PullStats
}

// PullStats say what a pull moved.
type PullStats struct {
	Remote          string `json:"remote"`
	Chunks          int    `json:"chunks"`           // data chunks of the snapshot
	Downloaded      int    `json:"downloaded"`       // chunks fetched (the rest were kept from an interrupted pull)
	DownloadedBytes int64  `json:"downloaded_bytes"` // bytes fetched
	LogicalBytes    int64  `json:"logical_bytes"`    // sum of the artifacts' sizes
}

// pullsDir holds interrupted pulls (one private dir per snapshot id) that
// the next pull of that id resumes. Snapshot listings never read it; the
// snapshot sweep removes what is older than pullKeep.
func (m *Manager) pullsDir() string { return filepath.Join(m.opts.DataDir, "pulls") }

// pullKeep is how long an interrupted pull is kept for a resume.
const pullKeep = 24 * time.Hour

// PullSnapshot downloads snapshot id from a remote store and adds it to
// this data dir. The remote is hostile input and the pull runs the same
// steps as ImportSnapshot: the manifest is bounded and validated (format
// version, artifact names from the backend's known set), every chunk is
// checked against its hash, every artifact must hash to the manifest's
// digest once written, a qcow2 disk may have no backing file but the
// declared base image (which this host must have), host files outside the
// image cache and the network grants of another host are refused or
// dropped, and the snapshot is published only when all of that passed:
// a failed pull lists nothing. The chunks of an interrupted pull are kept
// in a private staging dir (never listed) and the next pull of the same
// id downloads only what is missing; a refused pull keeps nothing.
func (m *Manager) PullSnapshot(ctx context.Context, id string, opts PullOptions) (*SnapshotInfo, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if opts.SnapshotID != "" {
		if err := ValidateID(opts.SnapshotID); err != nil {
			return nil, err
		}
	}
	r, st, err := m.openRemote(ctx, opts.Remote)
	if err != nil {
		return nil, err
	}
	p := &pullSource{m: m, r: r, st: st, id: id, opts: opts}
	op := &importOp{m: m, opts: ImportOptions{SnapshotID: opts.SnapshotID}, locks: heldLocks{dataDir: m.opts.DataDir},
		name: "snapshot pull", noun: "remote snapshot"}
	op.readSource = p.manifest
	op.extract = func(ctx context.Context) error { return p.extract(ctx, op) }
	info, err := op.run(ctx)
	if p.staging != "" && (err == nil || !resumable(err)) {
		os.RemoveAll(p.staging)
	}
	if err != nil {
		return nil, remoteErr("snapshot pull", r, id, err)
	}
	if opts.Stats != nil {
		*opts.Stats = p.stats
	}
	return info, nil
}

// resumable: a pull that failed this way may go on where it stopped.
func resumable(err error) bool {
	return errors.Is(err, remote.ErrUnreachable) || errors.Is(err, ErrRemoteUnreachable) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// pullSource is the remote side of one PullSnapshot.
type pullSource struct {
	m       *Manager
	r       Remote
	st      remote.Store
	id      string
	opts    PullOptions
	index   []byte // the manifest as the remote's index holds it
	extents map[string][][2]int64
	staging string
	stats   PullStats
}

// manifest reads the snapshot's manifest from the remote's index and
// validates it (snapshot.ParseManifest: bounded, strict, supported format,
// known artifact names).
func (p *pullSource) manifest(ctx context.Context) (snapshot.Manifest, error) {
	e, err := remote.Stat(ctx, p.st, p.id)
	if err != nil {
		return snapshot.Manifest{}, remoteErr("snapshot pull", p.r, p.id, err)
	}
	man, ext, err := parsePushed(e.Manifest)
	if err != nil {
		return man, err
	}
	p.extents = ext
	if man.ID != p.id {
		return man, fmt.Errorf("%w: the remote's index %s holds the manifest of snapshot %s", snapshot.ErrCorrupt, p.id, man.ID)
	}
	p.index = e.Manifest
	return man, nil
}

// extract downloads the artifacts into the staging dir of the snapshot's
// local id (resuming what an interrupted pull left there), then moves
// exactly the manifest's artifacts into the import's temp dir. The
// import's next steps check the disks' headers and every digest.
func (p *pullSource) extract(ctx context.Context, op *importOp) error {
	if err := fsutil.PrivateDir(p.m.pullsDir()); err != nil {
		return err
	}
	p.staging = filepath.Join(p.m.pullsDir(), op.man.ID) // op.man.ID is locked by the import
	if err := fsutil.PrivateDir(p.staging); err != nil {
		return err
	}
	now := time.Now()
	os.Chtimes(p.staging, now, now) // the sweep keeps it for pullKeep from now
	manJSON, ps, err := remote.Pull(ctx, p.st, p.id, p.staging, remote.PullOptions{Progress: progressFn(p.opts.Progress)})
	if err != nil {
		return remoteErr("snapshot pull", p.r, p.id, err)
	}
	p.stats = PullStats{Remote: p.r.Name, Chunks: ps.Chunks, Downloaded: ps.Downloaded, DownloadedBytes: ps.DownloadedBytes, LogicalBytes: ps.LogicalBytes}
	if !bytes.Equal(manJSON, p.index) {
		return fmt.Errorf("%w: the remote's snapshot %s changed during the pull (pushed again?); pull it again", snapshot.ErrCorrupt, p.id)
	}
	want := map[string]bool{}
	for _, a := range op.man.Artifacts {
		want[a.Name] = true
	}
	ents, err := os.ReadDir(p.staging)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !want[e.Name()] {
			return fmt.Errorf("%w: the remote's snapshot %s holds %q, which its manifest does not list", snapshot.ErrCorrupt, p.id, e.Name())
		}
	}
	for _, a := range op.man.Artifacts {
		src := filepath.Join(p.staging, a.Name)
		st, err := os.Lstat(src)
		if err != nil {
			return fmt.Errorf("%w: the remote's snapshot %s lacks %s, which its manifest lists", snapshot.ErrCorrupt, p.id, a.Name)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("%w: %s in the staging dir is not a regular file", snapshot.ErrCorrupt, a.Name)
		}
		if err := os.Chmod(src, 0o600); err != nil {
			return err
		}
		if op.man.FormatVersion < 3 { // a legacy digest binds the layout
			if err := layOut(src, a.Size, p.extents[a.Name]); err != nil {
				return err
			}
		}
		if err := os.Rename(src, filepath.Join(op.tmp, a.Name)); err != nil {
			return err
		}
	}
	return nil
}

// cleanupPulls removes interrupted pulls not touched for pullKeep.
func (m *Manager) cleanupPulls() {
	ents, err := os.ReadDir(m.pullsDir())
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(m.pullsDir(), e.Name())
		if newest(p).Before(time.Now().Add(-pullKeep)) {
			os.RemoveAll(p)
		}
	}
}

// newest is the latest mtime of dir and the files directly in it.
func newest(dir string) time.Time {
	var t time.Time
	if st, err := os.Lstat(dir); err == nil {
		t = st.ModTime()
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if info, err := e.Info(); err == nil && info.ModTime().After(t) {
			t = info.ModTime()
		}
	}
	return t
}

// RemoteSnapshot is a snapshot in a remote store, as its index describes
// it (for display: a pull validates everything again).
type RemoteSnapshot struct {
	ID        string       `json:"snapshot_id"`
	VMID      string       `json:"vm_id,omitempty"`
	Type      SnapshotType `json:"snapshot_type,omitempty"`
	SizeBytes int64        `json:"size_bytes"` // allocated size where it was taken
	DataBytes int64        `json:"data_bytes"` // bytes in its data chunks
	CreatedAt time.Time    `json:"created_at"`
	PushedAt  time.Time    `json:"pushed_at"`
	// Host is the host section of the snapshot's manifest, only when the
	// whole manifest passes validation (snapshot.ParseManifest).
	Host *SnapshotHost `json:"host,omitempty"`
}

// ListRemoteSnapshots lists the snapshots in a remote store ("" for the
// default remote). Each manifest is read leniently, for display only: a
// field that does not parse or is not well formed is left empty.
func (m *Manager) ListRemoteSnapshots(ctx context.Context, remoteName string) ([]RemoteSnapshot, error) {
	r, st, err := m.openRemote(ctx, remoteName)
	if err != nil {
		return nil, err
	}
	entries, err := remote.List(ctx, st)
	if err != nil {
		return nil, remoteErr("snapshot list", r, "", err)
	}
	out := make([]RemoteSnapshot, 0, len(entries))
	for _, e := range entries {
		if ValidateID(e.ID) != nil {
			continue
		}
		out = append(out, remoteSnapshot(e))
	}
	return out, nil
}

// remoteSnapshot reads what a listing shows of an index entry; strings
// that could carry terminal escapes or are out of their sets are dropped.
func remoteSnapshot(e remote.Entry) RemoteSnapshot {
	rs := RemoteSnapshot{ID: e.ID, DataBytes: e.DataBytes, PushedAt: e.PushedAt}
	var man struct {
		VMID      string       `json:"vm_id"`
		Type      SnapshotType `json:"type"`
		SizeBytes int64        `json:"size_bytes"`
		CreatedAt time.Time    `json:"created_at"`
	}
	var env pushedSnapshot
	if json.Unmarshal(e.Manifest, &env) != nil || json.Unmarshal(env.Manifest, &man) != nil {
		return rs
	}
	if ValidateID(man.VMID) == nil {
		rs.VMID = man.VMID
	}
	switch man.Type {
	case SnapshotFull, SnapshotDiff, SnapshotDisk:
		rs.Type = man.Type
	}
	if man.SizeBytes > 0 {
		rs.SizeBytes = man.SizeBytes
	}
	rs.CreatedAt = man.CreatedAt
	if full, err := snapshot.ParseManifest(env.Manifest); err == nil {
		rs.Host = snapshotHost(full.Host)
	}
	return rs
}

// DeleteRemoteSnapshot removes snapshot id from a remote store ("" for
// the default remote): its index goes, so no pull finds it; its chunks
// stay (other snapshots may share them).
func (m *Manager) DeleteRemoteSnapshot(ctx context.Context, remoteName, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	r, st, err := m.openRemote(ctx, remoteName)
	if err != nil {
		return err
	}
	if _, err := remote.Stat(ctx, st, id); err != nil {
		return remoteErr("snapshot delete", r, id, err)
	}
	if err := remote.Delete(ctx, st, id); err != nil {
		return remoteErr("snapshot delete", r, id, err)
	}
	return nil
}

// autoPull makes sure snapshot id is in this data dir before a restore or
// fork: when it is not and a default remote is configured, it is pulled
// from there first. Without a default remote the caller gets the
// not-found error, with a fix that names pulling.
func (m *Manager) autoPull(ctx context.Context, op, id string) error {
	_, err := m.store.GetSnapshot(ctx, id)
	if !errors.Is(err, store.ErrNotFound) {
		return nil // there (or the operation reports the error)
	}
	rf, err := m.readRemotes()
	if err != nil {
		return err
	}
	if rf.Default == "" {
		return newErr(op, ErrSnapshotNotFound, newFix(FixPullSnapshot, ArgSnapshot, id),
			fmt.Sprintf("snapshot %q not found (no default remote is configured to pull it from)", id))
	}
	m.log.Info("snapshot not in this data dir: pulling it from the default remote", "snapshot", id, "remote", rf.Default)
	_, err = m.PullSnapshot(ctx, id, PullOptions{Remote: rf.Default})
	if errors.Is(err, ErrSnapshotExists) {
		return nil // pulled meanwhile by another caller
	}
	var e *Error
	if errors.As(err, &e) && errors.Is(err, ErrSnapshotNotFound) {
		return &Error{Op: op, Message: fmt.Sprintf("snapshot %q is neither in this data dir nor in the default remote %s", id, rf.Default),
			Fix: e.Fix, Err: e.Err}
	}
	return err
}

// pushedSnapshot is what PushSnapshot stores as the manifest of a remote
// snapshot: the snapshot's manifest and each artifact's data extents.
// The extents matter only for a manifest of format 1 or 2, whose digests
// cover the files' data extents and not their holes (snapshot.LegacyDigest),
// while the chunk store keeps all-zero chunks as holes and writes whole
// chunks: a pull lays such a file out as it was (holes punched, zeros
// written) before the import hashes it against the manifest, and the
// digest binds the extents, so a wrong list fails. A format 3 digest
// (snapshot.Digest) depends on the contents only: its files are not laid
// out. Pushes still send the extents so the remote format stays one.
type pushedSnapshot struct {
	Format   int               `json:"smolvm_remote_format"`
	Manifest json.RawMessage   `json:"manifest"`
	Extents  map[string]string `json:"extents"` // artifact name: base64 of uvarint pairs (gap after the previous extent, length)
}

const pushedFormat = 1

// pushedManifest encodes the manifest and the artifacts' extents in dir.
// Each artifact is hashed again with its extents in one look. A format 3
// digest must be the manifest's (the file changed otherwise). A legacy
// digest (formats 1-2) binds the layout, which for a file with unwritten
// extents can change after it was first hashed while its data does not:
// the manifest sent carries the digests of this look.
func pushedManifest(dir string, man snapshot.Manifest) ([]byte, error) {
	man.Artifacts = slices.Clone(man.Artifacts)
	exts := map[string][][2]int64{}
	for i, a := range man.Artifacts {
		f, err := os.Open(filepath.Join(dir, a.Name))
		if err != nil {
			return nil, err
		}
		d, ext, size, err := snapshot.DigestFile(f, man.FormatVersion)
		f.Close()
		if err != nil {
			return nil, err
		}
		if size != a.Size {
			return nil, fmt.Errorf("%w: %s is %d bytes, the manifest says %d", snapshot.ErrCorrupt, a.Name, size, a.Size)
		}
		if man.FormatVersion >= 3 && d != a.SHA256 {
			return nil, fmt.Errorf("%w: %s does not match its checksum (sha256 %s, manifest %s)", snapshot.ErrCorrupt, a.Name, d[:12], a.SHA256[:12])
		}
		man.Artifacts[i].SHA256, exts[a.Name] = d, ext
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return nil, err
	}
	return encodePushed(manJSON, man.Artifacts, exts)
}

// encodePushed wraps a manifest and its artifacts' extents.
func encodePushed(manJSON []byte, arts []snapshot.Artifact, exts map[string][][2]int64) ([]byte, error) {
	ps := pushedSnapshot{Format: pushedFormat, Manifest: manJSON, Extents: map[string]string{}}
	for _, a := range arts {
		ext := exts[a.Name]
		var b []byte
		end := int64(0)
		for _, e := range ext {
			b = binary.AppendUvarint(b, uint64(e[0]-end))
			b = binary.AppendUvarint(b, uint64(e[1]))
			end = e[0] + e[1]
		}
		ps.Extents[a.Name] = base64.StdEncoding.EncodeToString(b)
	}
	return json.Marshal(ps)
}

// parsePushed decodes a remote snapshot's manifest (hostile): strict,
// versioned, the manifest validated (snapshot.ParseManifest), extents for
// exactly its artifacts, in order, inside each file, bounded in number.
func parsePushed(data []byte) (snapshot.Manifest, map[string][][2]int64, error) {
	var ps pushedSnapshot
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ps); err != nil {
		return snapshot.Manifest{}, nil, fmt.Errorf("%w: the remote snapshot's manifest does not parse: %v", snapshot.ErrCorrupt, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return snapshot.Manifest{}, nil, fmt.Errorf("%w: the remote snapshot's manifest has data after it", snapshot.ErrCorrupt)
	}
	if ps.Format > pushedFormat {
		return snapshot.Manifest{}, nil, fmt.Errorf("%w: the remote snapshot has format %d; this smolvm reads %d (upgrade smolvm)", snapshot.ErrNewer, ps.Format, pushedFormat)
	}
	if ps.Format != pushedFormat {
		return snapshot.Manifest{}, nil, fmt.Errorf("%w: the remote snapshot has format %d", snapshot.ErrCorrupt, ps.Format)
	}
	man, err := snapshot.ParseManifest(ps.Manifest)
	if err != nil {
		return man, nil, err
	}
	if len(ps.Extents) != len(man.Artifacts) {
		return man, nil, fmt.Errorf("%w: the remote snapshot lists extents of %d files for %d artifacts", snapshot.ErrCorrupt, len(ps.Extents), len(man.Artifacts))
	}
	out := map[string][][2]int64{}
	for _, a := range man.Artifacts {
		enc, ok := ps.Extents[a.Name]
		if !ok {
			return man, nil, fmt.Errorf("%w: the remote snapshot lists no extents for %s", snapshot.ErrCorrupt, a.Name)
		}
		b, err := base64.StdEncoding.DecodeString(enc)
		if err != nil {
			return man, nil, fmt.Errorf("%w: the extents of %s do not decode", snapshot.ErrCorrupt, a.Name)
		}
		var ext [][2]int64
		end := int64(0)
		for len(b) > 0 {
			gap, n := binary.Uvarint(b)
			if n <= 0 {
				return man, nil, fmt.Errorf("%w: the extents of %s do not decode", snapshot.ErrCorrupt, a.Name)
			}
			b = b[n:]
			l, n := binary.Uvarint(b)
			if n <= 0 {
				return man, nil, fmt.Errorf("%w: the extents of %s do not decode", snapshot.ErrCorrupt, a.Name)
			}
			b = b[n:]
			if gap > uint64(a.Size) || l == 0 || l > uint64(a.Size) || end+int64(gap) > a.Size-int64(l) {
				return man, nil, fmt.Errorf("%w: %s has an extent outside its %d bytes", snapshot.ErrCorrupt, a.Name, a.Size)
			}
			off := end + int64(gap)
			ext = append(ext, [2]int64{off, int64(l)})
			end = off + int64(l)
		}
		out[a.Name] = ext
	}
	return man, out, nil
}

// layOut gives the file at path (of size bytes, written by a pull) the
// data extents ext: holes punched outside them, zeros written into its
// holes inside them. Its contents do not change where ext says data and
// become zeros elsewhere.
func layOut(path string, size int64, ext [][2]int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != size {
		return fmt.Errorf("%w: %s is %d bytes, the manifest says %d", snapshot.ErrCorrupt, filepath.Base(path), st.Size(), size)
	}
	punch := func(off, n int64) error {
		if n <= 0 {
			return nil
		}
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	zeros := make([]byte, 1<<20)
	fill := func(from, to int64) error { // write zeros over [from, to)
		for from < to {
			n := min(to-from, int64(len(zeros)))
			if _, err := f.WriteAt(zeros[:n], from); err != nil {
				return err
			}
			from += n
		}
		return nil
	}
	// The file's data as written; punching outside ext and filling inside
	// one extent never changes it inside a later extent.
	have, err := snapshot.Extents(f, size)
	if err != nil {
		return err
	}
	end, j := int64(0), 0
	for _, e := range ext {
		if err := punch(end, e[0]-end); err != nil {
			return err
		}
		at, stop := e[0], e[0]+e[1]
		for ; j < len(have) && have[j][0] < stop; j++ {
			h0, h1 := have[j][0], have[j][0]+have[j][1]
			if h1 <= at {
				continue
			}
			if h0 > at {
				if err := fill(at, h0); err != nil {
					return err
				}
			}
			at = max(at, h1)
			if h1 > stop {
				break // this data run goes on into the next extent's range
			}
		}
		if at < stop {
			if err := fill(at, stop); err != nil {
				return err
			}
		}
		end = stop
	}
	if err := punch(end, size-end); err != nil {
		return err
	}
	return f.Sync()
}
