"""SmolVM for Go, from Python: disposable microVMs for AI agents.

A client of the smolvm daemon (``smolvm serve``), standard library only.
It mirrors the seed SmolVM SDK's API::

    from smolvm import SmolVM

    with SmolVM() as vm:
        print(vm.run("echo hello").output)

The daemon is found (``SMOLVM_API_SOCKET``, ``SMOLVM_API_URL`` +
``SMOLVM_API_TOKEN``, else ``smolvm serve --print-socket``) and started
when none answers: a script needs no set-up step.
"""

from .exceptions import (
    APIError,
    BackingImageMissingError,
    BootError,
    DaemonUnavailableError,
    GuestProtocolError,
    ImageError,
    OperationTimeoutError,
    SmolVMError,
    SnapshotAlreadyExistsError,
    SnapshotAlreadyRestoredError,
    SnapshotCorruptError,
    SnapshotInUseError,
    HostIncompatibleError,
    NoSpaceError,
    RemoteError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
    TooManyRequestsError,
    UnauthorizedError,
    UnsupportedError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
    VMNotRunningError,
)
from .facade import SmolVM
from .manager import SmolVMManager
from .types import (
    CommandResult,
    ExecEvent,
    PortForward,
    SnapshotArtifacts,
    SnapshotInfo,
    SnapshotType,
    TemplateInfo,
    VMInfo,
    VMState,
)

__version__ = "0.1.0"

__all__ = [
    "SmolVM",
    "SmolVMManager",
    "CommandResult",
    "ExecEvent",
    "PortForward",
    "SnapshotArtifacts",
    "SnapshotInfo",
    "SnapshotType",
    "TemplateInfo",
    "VMInfo",
    "VMState",
    "SmolVMError",
    "ValidationError",
    "VMAlreadyExistsError",
    "VMNotFoundError",
    "VMNotRunningError",
    "SnapshotAlreadyExistsError",
    "SnapshotNotFoundError",
    "SnapshotInUseError",
    "HostIncompatibleError",
    "NoSpaceError",
    "RemoteError",
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
]
