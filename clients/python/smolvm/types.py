"""Data types returned by the SmolVM client (mirroring the seed SDK's names)."""

import datetime as _dt
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = [
    "VMState",
    "SnapshotType",
    "CommandResult",
    "SnapshotArtifacts",
    "SnapshotInfo",
    "PortForward",
    "VMInfo",
    "TemplateInfo",
    "ExecEvent",
]


class _StrEnum(str, enum.Enum):
    """A str enum that prints as ``Class.MEMBER`` on every Python >= 3.9
    and compares equal to its value (``VMState.RUNNING == "running"``)."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value!r}>"


class VMState(_StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class SnapshotType(_StrEnum):
    """full (default): memory, CPU state and a self-contained disk.
    diff: the same, the disk stored relative to the image (which must stay).
    disk: the disk only; restoring boots it fresh."""

    FULL = "full"
    DIFF = "diff"
    DISK = "disk"

    @classmethod
    def coerce(cls, value: Any) -> "SnapshotType":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"snapshot_type must be one of 'full', 'diff', 'disk'; got {value!r}"
            ) from None


def _req(doc: Dict[str, Any], key: str, typ: type, what: str) -> Any:
    v = doc.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        from .exceptions import APIError

        raise APIError(f"the daemon sent a {what} without a valid {key!r}: {v!r}")
    return v


def _opt(doc: Dict[str, Any], key: str, typ: type, default: Any = None) -> Any:
    v = doc.get(key, default)
    if v is None or not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        return default
    return v


def _time(v: Any) -> Optional[_dt.datetime]:
    """Parse an RFC 3339 time as Go writes it (nanoseconds, Z or offset)."""
    if not isinstance(v, str) or not v:
        return None
    s = v.strip()
    if s.endswith("Z") or s.endswith("z"):
        s = s[:-1] + "+00:00"
    # fromisoformat (3.9/3.10) takes at most 6 fractional digits
    if "." in s:
        head, _, rest = s.partition(".")
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        frac, tail = rest[:i], rest[i:]
        s = head + ("." + (frac + "000000")[:6] if frac else "") + tail
    try:
        return _dt.datetime.fromisoformat(s)
    except ValueError:
        return None


@dataclass(frozen=True)
class CommandResult:
    """The result of :meth:`SmolVM.run`. A non-zero exit is not an exception."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        """The command exited 0 (and did not time out)."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """stdout without leading and trailing white space."""
        return self.stdout.strip()

    @classmethod
    def from_json(cls, doc: Any) -> "CommandResult":
        if not isinstance(doc, dict):
            from .exceptions import APIError

            raise APIError(f"the daemon sent an exec result that is not an object: {doc!r:.200}")
        dur = doc.get("duration_ms")
        if dur is None and isinstance(doc.get("duration_ns"), (int, float)):
            dur = doc["duration_ns"] / 1e6
        return cls(
            exit_code=_req(doc, "exit_code", int, "exec result"),
            stdout=_opt(doc, "stdout", str, ""),
            stderr=_opt(doc, "stderr", str, ""),
            timed_out=_opt(doc, "timed_out", bool, False),
            truncated=_opt(doc, "truncated", bool, False),
            duration_ms=float(dur) if isinstance(dur, (int, float)) and not isinstance(dur, bool) else 0.0,
        )


@dataclass(frozen=True)
class SnapshotArtifacts:
    state_path: Optional[Path] = None
    memory_path: Optional[Path] = None
    disk_path: Optional[Path] = None

    @classmethod
    def from_json(cls, doc: Any) -> "SnapshotArtifacts":
        if not isinstance(doc, dict):
            return cls()

        def p(key: str) -> Optional[Path]:
            v = _opt(doc, key, str)
            return Path(v) if v else None

        return cls(p("state_path"), p("memory_path"), p("disk_path"))


@dataclass(frozen=True)
class SnapshotInfo:
    """Metadata of one snapshot."""

    snapshot_id: str
    vm_id: str
    backend: str = ""
    snapshot_type: SnapshotType = SnapshotType.FULL
    created_at: Optional[_dt.datetime] = None
    restored: bool = False
    restored_vm_id: Optional[str] = None
    restore_count: int = 0
    size_bytes: int = 0
    parent_image: Optional[str] = None
    memory_mib: int = 0
    dir: Optional[Path] = None
    artifacts: SnapshotArtifacts = field(default_factory=SnapshotArtifacts)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> "SnapshotInfo":
        if not isinstance(doc, dict):
            from .exceptions import APIError

            raise APIError(f"the daemon sent snapshot info that is not an object: {doc!r:.200}")
        try:
            kind = SnapshotType(doc.get("snapshot_type") or "full")
        except ValueError:
            from .exceptions import APIError

            raise APIError(f"the daemon sent an unknown snapshot_type {doc.get('snapshot_type')!r}") from None
        d = _opt(doc, "dir", str)
        return cls(
            snapshot_id=_req(doc, "snapshot_id", str, "snapshot"),
            vm_id=_opt(doc, "vm_id", str, ""),
            backend=_opt(doc, "backend", str, ""),
            snapshot_type=kind,
            created_at=_time(doc.get("created_at")),
            restored=_opt(doc, "restored", bool, False),
            restored_vm_id=_opt(doc, "restored_vm_id", str) or None,
            restore_count=_opt(doc, "restore_count", int, 0),
            size_bytes=_opt(doc, "size_bytes", int, 0),
            parent_image=_opt(doc, "parent_image", str) or None,
            memory_mib=_opt(doc, "memory_mib", int, 0),
            dir=Path(d) if d else None,
            artifacts=SnapshotArtifacts.from_json(doc.get("artifacts")),
            raw=doc,
        )


@dataclass(frozen=True)
class PortForward:
    host_port: int
    guest_port: int
    host_addr: str = "127.0.0.1"


@dataclass(frozen=True)
class VMInfo:
    """What the daemon reports about one sandbox."""

    vm_id: str
    status: VMState
    image: str = ""
    backend: str = ""
    memory_mib: int = 0
    cpus: int = 0
    network: bool = False
    pid: Optional[int] = None
    hostname: str = ""
    created_at: Optional[_dt.datetime] = None
    restored_from: Optional[str] = None
    template: Optional[str] = None
    last_error: Optional[str] = None
    port_forwards: List[PortForward] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> "VMInfo":
        from .exceptions import APIError

        if not isinstance(doc, dict):
            raise APIError(f"the daemon sent sandbox info that is not an object: {doc!r:.200}")
        try:
            status = VMState(_req(doc, "status", str, "sandbox"))
        except ValueError:
            raise APIError(f"the daemon sent an unknown sandbox status {doc.get('status')!r}") from None
        forwards = []
        for pf in doc.get("port_forwards") or []:
            if isinstance(pf, dict):
                forwards.append(
                    PortForward(
                        host_port=_opt(pf, "host_port", int, 0),
                        guest_port=_opt(pf, "guest_port", int, 0),
                        host_addr=_opt(pf, "host_addr", str) or "127.0.0.1",
                    )
                )
        return cls(
            vm_id=_req(doc, "id", str, "sandbox"),
            status=status,
            image=_opt(doc, "image", str, ""),
            backend=_opt(doc, "backend", str, ""),
            memory_mib=_opt(doc, "memory_mib", int, 0),
            cpus=_opt(doc, "cpus", int, 0),
            network=_opt(doc, "network", bool, False),
            pid=_opt(doc, "pid", int) or None,
            hostname=_opt(doc, "hostname", str, ""),
            created_at=_time(doc.get("created_at")),
            restored_from=_opt(doc, "restored_from", str) or None,
            template=_opt(doc, "template", str) or None,
            last_error=_opt(doc, "last_error", str) or None,
            port_forwards=forwards,
            raw=doc,
        )


@dataclass(frozen=True)
class TemplateInfo:
    key: str
    snapshot_id: str = ""
    image: str = ""
    created_at: Optional[_dt.datetime] = None
    size_bytes: int = 0
    uses: int = 0
    stale: bool = False
    stale_reason: str = ""
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> "TemplateInfo":
        from .exceptions import APIError

        if not isinstance(doc, dict):
            raise APIError(f"the daemon sent template info that is not an object: {doc!r:.200}")
        shape = doc.get("shape") if isinstance(doc.get("shape"), dict) else {}
        return cls(
            key=_req(doc, "key", str, "template"),
            snapshot_id=_opt(doc, "snapshot_id", str, ""),
            image=_opt(shape, "image", str, ""),
            created_at=_time(doc.get("created_at")),
            size_bytes=_opt(doc, "size_bytes", int, 0),
            uses=_opt(doc, "uses", int, 0),
            stale=_opt(doc, "stale", bool, False),
            stale_reason=_opt(doc, "stale_reason", str, ""),
            raw=doc,
        )


@dataclass(frozen=True)
class ExecEvent:
    """One event of :meth:`SmolVM.stream`: ``kind`` is "stdout" or "stderr"
    (``data`` holds the bytes) or "exit" (``exit_code``, ``timed_out``)."""

    kind: str
    data: bytes = b""
    exit_code: Optional[int] = None
    timed_out: bool = False
    duration_ms: float = 0.0
