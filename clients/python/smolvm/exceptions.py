"""Exceptions raised by the SmolVM client.

Every error derives from :class:`SmolVMError`, which carries the daemon's
``message``, its stable ``code`` (the same codes as ``smolvm --json``), the
``recovery`` text (what to do next, the same words as the CLI) and
``details`` (the HTTP status and the typed fix, when the daemon sent them).
The daemon's error code picks the subclass (see :data:`ERROR_CLASSES`).
"""

from typing import Any, Dict, Optional

__all__ = [
    "SmolVMError",
    "ValidationError",
    "VMAlreadyExistsError",
    "VMNotFoundError",
    "VMNotRunningError",
    "SnapshotAlreadyExistsError",
    "SnapshotNotFoundError",
    "SnapshotInUseError",
    "SnapshotAlreadyRestoredError",
    "SnapshotCorruptError",
    "BackingImageMissingError",
    "TemplateNotFoundError",
    "ImageError",
    "UnsupportedError",
    "BootError",
    "OperationTimeoutError",
    "GuestProtocolError",
    "UnauthorizedError",
    "TooManyRequestsError",
    "APIError",
    "DaemonUnavailableError",
    "error_from_reply",
]


class SmolVMError(Exception):
    """Base class of every SmolVM error.

    Attributes:
        message: what went wrong.
        code: a stable machine-readable name ("snapshot_not_found", ...).
        recovery: what to do next (may be empty).
        details: extra facts: ``status`` (HTTP), ``fix`` (typed action).
    """

    default_code = "error"

    def __init__(
        self,
        message: str,
        details: Optional[Dict[str, Any]] = None,
        *,
        code: Optional[str] = None,
        recovery: str = "",
    ) -> None:
        self.message = message
        self.details = dict(details or {})
        self.code = code or self.default_code
        self.recovery = recovery or ""
        super().__init__(message)

    def __str__(self) -> str:
        if self.recovery:
            return f"{self.message} ({self.recovery})"
        return self.message

    @property
    def status(self) -> Optional[int]:
        """The HTTP status of the reply that carried the error, if any."""
        return self.details.get("status")


class ValidationError(SmolVMError, ValueError):
    """A value broke the rules (an id, a config field, a request)."""

    default_code = "invalid_request"


class VMAlreadyExistsError(SmolVMError):
    default_code = "vm_exists"


class VMNotFoundError(SmolVMError):
    default_code = "vm_not_found"


class VMNotRunningError(SmolVMError):
    """The sandbox is not in a state that allows the call (start it first)."""

    default_code = "vm_not_running"


class SnapshotAlreadyExistsError(SmolVMError):
    default_code = "snapshot_exists"


class SnapshotNotFoundError(SmolVMError):
    default_code = "snapshot_not_found"


class SnapshotInUseError(SmolVMError):
    """A sandbox restored from the snapshot still runs."""

    default_code = "snapshot_in_use"


class HostIncompatibleError(SmolVMError):
    """The snapshot was made on a host this one cannot restore it on (another
    accelerator, VMM major version, machine type or CPU); the message says
    what differs."""

    default_code = "host_incompatible"


class SnapshotAlreadyRestoredError(SmolVMError):
    """The snapshot was restored before; pass ``force=True`` to restore it again."""

    default_code = "snapshot_already_restored"


class SnapshotCorruptError(SmolVMError):
    default_code = "snapshot_corrupt"


class BackingImageMissingError(SmolVMError):
    """A diff snapshot's base image is gone; take a full snapshot instead."""

    default_code = "backing_image_missing"


class RemoteError(SmolVMError):
    """The daemon's remote snapshot store (asked for a snapshot this host does
    not have) refused its credentials or did not answer."""

    default_code = "remote_unreachable"


class NoSpaceError(SmolVMError):
    """Too little free disk on the daemon's host for the snapshot, or for a file
    it spools; nothing was written."""

    default_code = "no_space"


class TemplateNotFoundError(SmolVMError):
    default_code = "template_not_found"


class ImageError(SmolVMError):
    """The guest image is not built (run ``smolvm image build``)."""

    default_code = "image_not_built"


class UnsupportedError(SmolVMError):
    """The host, backend or client does not support the request."""

    default_code = "unsupported"


class BootError(SmolVMError):
    default_code = "boot_failed"


class OperationTimeoutError(SmolVMError, TimeoutError):
    """The host stopped waiting (for the guest, or for the daemon)."""

    default_code = "timeout"


class GuestProtocolError(SmolVMError):
    """The guest agent broke the protocol; the sandbox may be compromised."""

    default_code = "guest_protocol"


class UnauthorizedError(SmolVMError):
    """The daemon refused the bearer token (set SMOLVM_API_TOKEN)."""

    default_code = "unauthorized"


class TooManyRequestsError(SmolVMError):
    """The daemon already runs its limit of long operations and streams
    (``smolvm serve --max-in-flight``); try again in a second (the reply's
    ``Retry-After``)."""

    default_code = "too_many_requests"


class APIError(SmolVMError):
    """The daemon refused the request itself (unknown route, body too large...)
    or sent a reply this client cannot read."""

    default_code = "api_error"


class DaemonUnavailableError(SmolVMError, ConnectionError):
    """No daemon answers and none could be started."""

    default_code = "daemon_unavailable"


ERROR_CLASSES = {
    "invalid_id": ValidationError,
    "invalid_config": ValidationError,
    "invalid_request": ValidationError,
    "vm_exists": VMAlreadyExistsError,
    "vm_not_found": VMNotFoundError,
    "vm_not_running": VMNotRunningError,
    "snapshot_exists": SnapshotAlreadyExistsError,
    "snapshot_not_found": SnapshotNotFoundError,
    "snapshot_in_use": SnapshotInUseError,
    "host_incompatible": HostIncompatibleError,
    "snapshot_already_restored": SnapshotAlreadyRestoredError,
    "snapshot_corrupt": SnapshotCorruptError,
    "backing_image_missing": BackingImageMissingError,
    "remote_auth": RemoteError,
    "remote_unreachable": RemoteError,
    "no_space": NoSpaceError,
    "template_not_found": TemplateNotFoundError,
    "image_not_built": ImageError,
    "unsupported": UnsupportedError,
    "boot_failed": BootError,
    "timeout": OperationTimeoutError,
    "guest_protocol": GuestProtocolError,
    "unauthorized": UnauthorizedError,
    "too_many_requests": TooManyRequestsError,
    "not_found": APIError,
    "method_not_allowed": APIError,
    "request_too_large": APIError,
}

_MAX_TEXT = 4096  # bound on each text field kept from an error reply


def _text(v: Any) -> str:
    if not isinstance(v, str):
        return ""
    return v[:_MAX_TEXT]


def error_from_reply(status: int, body: bytes) -> SmolVMError:
    """Turn a non-2xx reply into the matching exception.

    The body should be ``{"error": {"code", "message", "recovery", "fix"}}``;
    anything else becomes an :class:`APIError` quoting the start of it.
    """
    import json

    err = None
    try:
        doc = json.loads(body.decode("utf-8"))
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            err = doc["error"]
    except (ValueError, UnicodeDecodeError):
        pass
    if err is None:
        snippet = body[:300].decode("utf-8", "replace").strip()
        return APIError(
            f"the daemon answered HTTP {status} without an error body: {snippet!r}",
            {"status": status},
            code="api_error",
        )
    code = _text(err.get("code")) or "error"
    message = _text(err.get("message")) or f"HTTP {status}"
    details: Dict[str, Any] = {"status": status}
    if isinstance(err.get("fix"), dict):
        details["fix"] = err["fix"]
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        cls = OperationTimeoutError if status == 504 else SmolVMError
    return cls(message, details, code=code, recovery=_text(err.get("recovery")))
