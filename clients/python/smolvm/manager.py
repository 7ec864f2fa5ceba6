"""SmolVMManager: the sandboxes, snapshots and templates of one data dir."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from . import _client
from .exceptions import APIError, ValidationError
from .facade import SmolVM, _q, _unsupported
from .types import SnapshotInfo, SnapshotType, TemplateInfo, VMInfo, VMState

__all__ = ["SmolVMManager"]


def _list(doc: Any, key: str) -> List[Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise APIError(f"the daemon's reply has no {key!r} list")
    return doc[key]


class SmolVMManager:
    """Manage the sandboxes and snapshots of one data dir (through its
    daemon). A context manager; close() is idempotent."""

    def __init__(
        self,
        data_dir: Optional[Union[str, Path]] = None,
        socket_dir: Optional[Union[str, Path]] = None,
        backend: Optional[str] = None,
    ) -> None:
        if socket_dir is not None:
            raise _unsupported("socket_dir", socket_dir)
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.backend = backend
        self._client = _client.connect(self.data_dir)

    def __enter__(self) -> "SmolVMManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: every call uses its own connection."""

    # -- daemon ---------------------------------------------------------------

    def version(self) -> Dict[str, Any]:
        doc = self._client.call("GET", "/v1/version")
        if not isinstance(doc, dict):
            raise APIError("the daemon sent a version that is not an object")
        return doc

    # -- sandboxes -----------------------------------------------------------

    def create(self, config: Optional[Dict[str, Any]] = None, *, start: bool = False) -> VMInfo:
        body = dict(config or {})
        body["start"] = bool(start)
        return VMInfo.from_json(self._client.call("POST", "/v1/sandboxes", body=body, timeout=_client.LONG_TIMEOUT))

    def get(self, vm_id: str) -> VMInfo:
        return VMInfo.from_json(self._client.call("GET", "/v1/sandboxes/" + _q(vm_id)))

    def list_vms(self, status: Optional[Union[str, VMState]] = None) -> List[VMInfo]:
        infos = [VMInfo.from_json(d) for d in _list(self._client.call("GET", "/v1/sandboxes"), "sandboxes")]
        if status is not None:
            want = VMState(status)
            infos = [i for i in infos if i.status == want]
        return infos

    def _action(self, vm_id: str, action: str) -> VMInfo:
        return VMInfo.from_json(
            self._client.call("POST", "/v1/sandboxes/" + _q(vm_id) + "/" + action, timeout=_client.LONG_TIMEOUT)
        )

    def start(self, vm_id: str, boot_timeout: float = 30.0) -> VMInfo:
        return self._action(vm_id, "start")

    def stop(self, vm_id: str, timeout: float = 10.0) -> VMInfo:
        return self._action(vm_id, "stop")

    def pause(self, vm_id: str) -> VMInfo:
        return self._action(vm_id, "pause")

    def resume(self, vm_id: str) -> VMInfo:
        return self._action(vm_id, "resume")

    def delete(self, vm_id: str) -> None:
        self._client.call("DELETE", "/v1/sandboxes/" + _q(vm_id), timeout=_client.LONG_TIMEOUT)

    # -- snapshots -----------------------------------------------------------

    def create_snapshot(
        self,
        vm_id: str,
        snapshot_id: Optional[str] = None,
        *,
        snapshot_type: Union[str, SnapshotType] = SnapshotType.FULL,
        resume_source: bool = False,
    ) -> SnapshotInfo:
        body: Dict[str, Any] = {
            "snapshot_type": SnapshotType.coerce(snapshot_type).value,
            "resume_source": bool(resume_source),
        }
        if snapshot_id is not None:
            body["snapshot_id"] = snapshot_id
        return SnapshotInfo.from_json(
            self._client.call(
                "POST", "/v1/sandboxes/" + _q(vm_id) + "/snapshots", body=body, timeout=_client.LONG_TIMEOUT
            )
        )

    def list_snapshots(self, vm_id: Optional[str] = None) -> List[SnapshotInfo]:
        """The snapshots, oldest first; only those of vm_id when given."""
        q = [("vm_id", vm_id)] if vm_id is not None else None
        doc = self._client.call("GET", "/v1/snapshots", query=q)
        return [SnapshotInfo.from_json(d) for d in _list(doc, "snapshots")]

    def get_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        return SnapshotInfo.from_json(self._client.call("GET", "/v1/snapshots/" + _q(snapshot_id)))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot and its files (SnapshotInUseError while a
        sandbox restored from it runs)."""
        self._client.call("DELETE", "/v1/snapshots/" + _q(snapshot_id), timeout=_client.LONG_TIMEOUT)

    def restore_snapshot(self, snapshot_id: str, *, resume_vm: bool = False, force: bool = False) -> VMInfo:
        return VMInfo.from_json(
            self._client.call(
                "POST",
                "/v1/snapshots/" + _q(snapshot_id) + "/restore",
                body={"resume": bool(resume_vm), "force": bool(force)},
                timeout=_client.LONG_TIMEOUT,
            )
        )

    def fork(self, snapshot_id: str, count: int = 1, *, resume_vm: bool = False) -> List[SmolVM]:
        """Make ``count`` new sandboxes from a snapshot (each a clone with
        its own identity), paused unless ``resume_vm``; the objects
        returned own them (their ``with`` block deletes them)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValidationError(f"count must be a positive integer, got {count!r}", code="invalid_request")
        doc = self._client.call(
            "POST", "/v1/snapshots/" + _q(snapshot_id) + "/fork", body={"count": count, "resume": bool(resume_vm)}, timeout=_client.LONG_TIMEOUT
        )
        return [
            SmolVM(data_dir=self.data_dir, _info=VMInfo.from_json(d), _owned=True) for d in _list(doc, "sandboxes")
        ]

    # -- templates -----------------------------------------------------------

    def list_templates(self) -> List[TemplateInfo]:
        doc = self._client.call("GET", "/v1/templates")
        return [TemplateInfo.from_json(d) for d in _list(doc, "templates")]

    def build_template(self, image: str, **options: Any) -> TemplateInfo:
        body = dict(options)
        body["image"] = image
        return TemplateInfo.from_json(
            self._client.call("POST", "/v1/templates", body=body, timeout=_client.LONG_TIMEOUT)
        )

    def delete_template(self, key: str) -> None:
        self._client.call("DELETE", "/v1/templates/" + _q(key), timeout=_client.LONG_TIMEOUT)

    def gc_templates(self) -> Dict[str, Any]:
        doc = self._client.call("POST", "/v1/templates/gc", timeout=_client.LONG_TIMEOUT)
        if not isinstance(doc, dict):
            raise APIError("the daemon sent a template collection that is not an object")
        return doc
