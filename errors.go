package smolvm

import (
	"errors"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Sentinel errors. Every error the SDK returns for these conditions wraps the
// sentinel, so callers test with errors.Is.
var (
	ErrVMNotFound          = errors.New("vm not found")
	ErrVMExists            = errors.New("vm already exists")
	ErrVMNotRunning        = errors.New("vm is not running")
	ErrInvalidID           = errors.New("invalid id")
	ErrInvalidConfig       = errors.New("invalid configuration")
	ErrImageNotBuilt       = errors.New("image not built")
	ErrUnsupported         = errors.New("not supported")
	ErrBoot                = errors.New("vm failed to boot")
	ErrSnapshotExists      = errors.New("snapshot already exists")
	ErrSnapshotNotFound    = errors.New("snapshot not found")
	ErrSnapshotInUse       = errors.New("snapshot in use")
	ErrSnapshotRestored    = errors.New("snapshot already restored")
	ErrSnapshotCorrupt     = errors.New("snapshot artifact corrupt")
	ErrBackingImageMissing = errors.New("backing image missing")
	// ErrHostIncompatible: a memory snapshot taken on another host (another
	// accelerator, VMM major version, machine type, or under KVM another
	// CPU vendor or missing CPU flags) cannot be loaded here.
	ErrHostIncompatible = errors.New("snapshot was taken on an incompatible host")
	// ErrTimeout: the host stopped waiting for the guest (a command past
	// its WithTimeout plus a grace, or an agent request past its
	// host-side deadline). A command the guest itself killed at its
	// timeout is a Result with TimedOut set instead.
	ErrTimeout = errors.New("timed out waiting for the guest")
	// ErrGuestProtocol: the guest agent sent a reply that breaks the
	// protocol (oversized, malformed, a file that does not match its
	// announced size). The host refused it; the VM may be compromised.
	ErrGuestProtocol = errors.New("the guest agent broke the protocol")
	// ErrNoSpace: the host filesystem that would hold a snapshot (an
	// import) or a temp file (a flattened export) has too little free
	// space; nothing was written.
	ErrNoSpace = errors.New("not enough free disk space")
	// ErrRemoteNotFound: no remote snapshot store of that name is
	// configured (or none is the default).
	ErrRemoteNotFound = errors.New("remote not found")
	// ErrRemoteExists: a remote of that name is configured already.
	ErrRemoteExists = errors.New("remote already exists")
	// ErrRemoteAuth: the remote store refused the credentials.
	ErrRemoteAuth = errors.New("remote refused the credentials")
	// ErrRemoteUnreachable: the remote store did not answer.
	ErrRemoteUnreachable = errors.New("remote unreachable")
)

// ErrUnsafeDir is wrapped when a directory smolvm keeps guest data or
// control sockets in (a run dir, a guest RAM dir) exists but is not private
// (a symlink, another owner, group or other permission bits): it is refused,
// never reused, as another local user may have planted it.
var ErrUnsafeDir = fsutil.ErrUnsafe

// Error is the SDK's error type. Message says what went wrong; Fix, when
// set, is the typed action that fixes it (a front end words it: see
// [Fix]). It wraps a sentinel (or the underlying cause) for errors.Is/As.
type Error struct {
	Op      string // operation, e.g. "start", "snapshot"
	Message string
	Fix     Fix
	Err     error
}

// Error is the message and, when there is one, the fix in neutral words.
func (e *Error) Error() string {
	if e.Fix.IsZero() {
		return e.Message
	}
	return e.Message + " (fix: " + e.Fix.String() + ")"
}

func (e *Error) Unwrap() error { return e.Err }

// Code is a stable, machine-readable name for the error (used by the CLI's
// JSON output), derived from the wrapped sentinel.
func (e *Error) Code() string { return ErrorCode(e) }

// ErrorCode maps an error to a stable code string ("vm_not_found", ...).
func ErrorCode(err error) string {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return "error"
}

var errorCodes = []struct {
	err  error
	code string
}{
	{ErrVMNotFound, "vm_not_found"},
	{ErrVMExists, "vm_exists"},
	{ErrVMNotRunning, "vm_not_running"},
	{ErrInvalidID, "invalid_id"},
	{ErrInvalidConfig, "invalid_config"},
	{ErrImageNotBuilt, "image_not_built"},
	{ErrUnsupported, "unsupported"},
	{ErrBoot, "boot_failed"},
	{ErrSnapshotExists, "snapshot_exists"},
	{ErrSnapshotNotFound, "snapshot_not_found"},
	{ErrSnapshotInUse, "snapshot_in_use"},
	{ErrSnapshotRestored, "snapshot_already_restored"},
	{ErrSnapshotCorrupt, "snapshot_corrupt"},
	{ErrBackingImageMissing, "backing_image_missing"},
	{ErrHostIncompatible, "host_incompatible"},
	{ErrTimeout, "timeout"},
	{ErrGuestProtocol, "guest_protocol"},
	{ErrNoSpace, "no_space"},
	{ErrRemoteNotFound, "remote_not_found"},
	{ErrRemoteExists, "remote_exists"},
	{ErrRemoteAuth, "remote_auth"},
	{ErrRemoteUnreachable, "remote_unreachable"},
}

func newErr(op string, sentinel error, fix Fix, msg string) *Error {
	return &Error{Op: op, Message: msg, Fix: fix, Err: sentinel}
}
