"""The SmolVM class: one sandbox, driven through the smolvm daemon."""

import asyncio
import base64
import http.client
import json
import os as _os
import shlex
import socket
import tempfile
import threading
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

from . import _client
from .exceptions import (
    APIError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMNotFoundError,
    error_from_reply,
)
from .types import CommandResult, ExecEvent, SnapshotInfo, SnapshotType, VMInfo, VMState

__all__ = ["SmolVM"]

# Seed-SDK keyword names that mean something else here, mapped to this
# daemon's Config JSON names.
_CONFIG_ALIASES = {
    "vm_id": "name",
    "memory": "memory_mib",
    "mem_size_mib": "memory_mib",
    "vcpu_count": "cpus",
    "env_vars": "env",
}
_EXEC_GRACE = 30.0  # client socket timeout past a command's own timeout
_MAX_EVENT_LINE = 1 << 20


def _q(s: str) -> str:
    if not isinstance(s, str):
        raise ValidationError(f"an id must be a string, got {type(s).__name__}", code="invalid_id")
    return urllib.parse.quote(s, safe="")


def _unsupported(name: str, value: Any) -> ValidationError:
    return ValidationError(
        f"{name}={value!r} is not supported by SmolVM for Go's Python client",
        code="invalid_config",
        recovery=f"leave {name} at its default",
    )


class SmolVM:
    """One sandbox (a microVM).

    ``SmolVM()`` creates a sandbox with the default image; ``start()`` boots
    it; ``run()`` runs shell commands in it. ``SmolVM(vm_id="x")`` attaches
    to an existing sandbox. Use it as a context manager to start it on entry
    and stop and delete it (when this object created it) on exit.

    The daemon (``smolvm serve``) is found, or started, on first use: see
    :mod:`smolvm._client`.
    """

    def __init__(
        self,
        config: Optional[Mapping[str, Any]] = None,
        *,
        vm_id: Optional[str] = None,
        image: Optional[str] = None,
        data_dir: Optional[Union[str, Path]] = None,
        socket_dir: Optional[Union[str, Path]] = None,
        backend: Optional[str] = None,
        os: Optional[str] = None,
        qemu_machine: str = "auto",
        memory: Optional[int] = None,
        disk_size: Optional[int] = None,
        cpus: Optional[int] = None,
        network: Optional[bool] = None,
        env_vars: Optional[Mapping[str, str]] = None,
        port_forwards: Optional[Iterable[Mapping[str, Any]]] = None,
        timeout: Optional[float] = None,
        on_timeout: Optional[str] = None,
        idle_timeout: Optional[float] = None,
        ssh_user: str = "root",
        ssh_key_path: Optional[str] = None,
        ssh_password: Optional[str] = None,
        comm_channel: Optional[str] = None,
        internet_settings: Any = None,
        mounts: Any = None,
        writable_mounts: bool = False,
        callbacks: Any = None,
        _info: Optional[VMInfo] = None,
        _owned: bool = False,
    ) -> None:
        for name, value, default in (
            ("socket_dir", socket_dir, None),
            ("qemu_machine", qemu_machine, "auto"),
            ("disk_size", disk_size, None),
            ("ssh_key_path", ssh_key_path, None),
            ("ssh_password", ssh_password, None),
            ("internet_settings", internet_settings, None),
            ("mounts", mounts, None),
            ("writable_mounts", writable_mounts, False),
            ("callbacks", callbacks, None),
        ):
            if value != default:
                raise _unsupported(name, value)
        if comm_channel not in (None, "vsock"):
            raise _unsupported("comm_channel", comm_channel)
        if config is not None and vm_id is not None:
            raise ValidationError("give config or vm_id, not both", code="invalid_config")
        if image is not None and os is not None and image != os:
            raise ValidationError("give image or os, not both", code="invalid_config")
        self._data_dir = str(data_dir) if data_dir is not None else None
        self._client = _client.connect(self._data_dir)
        self._closed = False
        self._deleted = False
        if _info is not None:  # from_snapshot, fork, from_id
            self._info, self._owns_vm = _info, _owned
            return
        if vm_id is not None:
            creating = (image, os, memory, cpus, network, env_vars, port_forwards, backend, timeout)
            if any(v is not None for v in creating):
                raise ValidationError(
                    "options that shape a new sandbox cannot be set when attaching to one (vm_id)",
                    code="invalid_config",
                )
            self._info = VMInfo.from_json(self._client.call("GET", "/v1/sandboxes/" + _q(vm_id)))
            self._owns_vm = False
            return
        body: Dict[str, Any] = {}
        for k, v in dict(config or {}).items():
            body[_CONFIG_ALIASES.get(k, k)] = v
        for key, value in (
            ("image", image or os),
            ("backend", None if backend in (None, "auto") else backend),
            ("memory_mib", memory),
            ("cpus", cpus),
            ("env", dict(env_vars) if env_vars is not None else None),
            ("port_forwards", [dict(p) for p in port_forwards] if port_forwards is not None else None),
        ):
            if value is not None:
                if key in body and body[key] != value:
                    raise ValidationError(f"{key} is set both in config and as an argument", code="invalid_config")
                body[key] = value
        if backend == "auto":
            body.setdefault("backend", "auto")
        if network is not None:
            body["no_network"] = not network
        body["start"] = False
        if timeout is not None:
            body["timeout_s"] = int(timeout)
        if on_timeout is not None:
            body["on_timeout"] = on_timeout
        if idle_timeout is not None:
            body["idle_timeout_s"] = int(idle_timeout)
        self._info = VMInfo.from_json(
            self._client.call("POST", "/v1/sandboxes", body=body, timeout=_client.LONG_TIMEOUT)
        )
        self._owns_vm = True

    # -- constructors --------------------------------------------------------

    @classmethod
    def from_id(cls, vm_id: str, *, data_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> "SmolVM":
        """Attach to an existing sandbox (VMNotFoundError when there is none)."""
        return cls(vm_id=vm_id, data_dir=data_dir, **kwargs)

    @classmethod
    def from_snapshot(
        cls,
        snapshot_id: str,
        *,
        data_dir: Optional[Union[str, Path]] = None,
        socket_dir: Optional[Union[str, Path]] = None,
        backend: Optional[str] = None,
        resume_vm: bool = False,
        force: bool = False,
        ssh_user: str = "root",
        ssh_key_path: Optional[str] = None,
        comm_channel: Optional[str] = None,
        on_progress: Optional[Callable[[str, float], None]] = None,
    ) -> "SmolVM":
        """Recreate the snapshot's sandbox (same id) with the saved state.

        It is paused unless ``resume_vm``. A snapshot restores once unless
        ``force`` (else SnapshotAlreadyRestoredError). The object returned
        does not own the sandbox: leaving its ``with`` block stops it but
        does not delete it.
        """
        if socket_dir is not None:
            raise _unsupported("socket_dir", socket_dir)
        if ssh_key_path is not None:
            raise _unsupported("ssh_key_path", ssh_key_path)
        if comm_channel not in (None, "vsock"):
            raise _unsupported("comm_channel", comm_channel)
        c = _client.connect(str(data_dir) if data_dir is not None else None)
        if backend not in (None, "auto"):
            snap = SnapshotInfo.from_json(c.call("GET", "/v1/snapshots/" + _q(snapshot_id)))
            if snap.backend and snap.backend != backend:
                raise SmolVMError(
                    "Requested backend does not match the snapshot backend",
                    {"snapshot_id": snapshot_id, "requested_backend": backend, "snapshot_backend": snap.backend},
                    code="invalid_config",
                )
        doc = c.call_progress(
            "POST",
            "/v1/snapshots/" + _q(snapshot_id) + "/restore",
            body={"resume": bool(resume_vm), "force": bool(force)},
            on_progress=on_progress,
        )
        return cls(data_dir=data_dir, _info=VMInfo.from_json(doc), _owned=False)

    # -- state ---------------------------------------------------------------

    @property
    def vm_id(self) -> str:
        return self._info.vm_id

    @property
    def info(self) -> VMInfo:
        """The sandbox's info as of the last call (see refresh())."""
        return self._info

    @property
    def data_dir(self) -> Optional[str]:
        return self._data_dir

    @property
    def client(self) -> "_client.Client":
        return self._client

    @property
    def status(self) -> VMState:
        """The sandbox's state, asked of the daemon now."""
        if self._deleted:
            return self._info.status
        try:
            return self.refresh().status
        except VMNotFoundError:
            return self._info.status

    def refresh(self) -> VMInfo:
        self._info = VMInfo.from_json(self._client.call("GET", self._path()))
        return self._info

    def _path(self, tail: str = "") -> str:
        return "/v1/sandboxes/" + _q(self._info.vm_id) + tail

    def _lifecycle(self, action: str) -> "SmolVM":
        self._info = VMInfo.from_json(
            self._client.call("POST", self._path("/" + action), timeout=_client.LONG_TIMEOUT)
        )
        return self

    # -- lifecycle -----------------------------------------------------------

    def start(
        self, boot_timeout: float = 30.0, *, on_progress: Optional[Callable[[str, float], None]] = None
    ) -> "SmolVM":
        """Boot the sandbox (restored from its image's template when it has
        one), or resume it when paused; nothing when it runs.
        on_progress(step, elapsed_seconds) hears each step as it happens.
        boot_timeout is accepted for compatibility: the sandbox's own boot
        bound applies."""
        st = self.status
        if st == VMState.RUNNING:
            return self
        if st == VMState.PAUSED:
            return self.resume()
        self._info = VMInfo.from_json(
            self._client.call_progress("POST", self._path("/start"), on_progress=on_progress)
        )
        return self

    def stop(self, timeout: float = 3.0) -> "SmolVM":
        """Stop the sandbox (nothing when it is not running or paused)."""
        if self.status not in (VMState.RUNNING, VMState.PAUSED):
            return self
        return self._lifecycle("stop")

    def pause(self) -> "SmolVM":
        return self._lifecycle("pause")

    def resume(self) -> "SmolVM":
        return self._lifecycle("resume")

    def delete(self) -> None:
        """Stop the sandbox if it runs and remove it and everything it owns."""
        self._client.call("DELETE", self._path(), timeout=_client.LONG_TIMEOUT)
        self._deleted = True
        self._info = VMInfo(vm_id=self._info.vm_id, status=VMState.STOPPED, raw={})

    def close(self) -> None:
        """Release this object. The sandbox itself is left as it is (use
        stop() or delete(), or the context manager)."""
        self._closed = True

    def set_timeout(self, seconds: float) -> VMInfo:
        """Set the sandbox's lifetime to end ``seconds`` from now."""
        self._info = VMInfo.from_json(
            self._client.call("POST", self._path("/timeout"), body={"timeout_s": int(seconds)})
        )
        return self._info

    def __enter__(self) -> "SmolVM":
        if self._owns_vm and self.status != VMState.RUNNING:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self._deleted:
                if self._owns_vm:
                    self.delete()  # stops it first
                elif self.status == VMState.RUNNING:
                    self.stop()
        finally:
            self.close()

    # -- asyncio twins (the calls run in a worker thread) --------------------

    async def async_start(self, boot_timeout: float = 30.0) -> "SmolVM":
        return await asyncio.to_thread(self.start, boot_timeout)

    async def async_stop(self, timeout: float = 3.0) -> "SmolVM":
        return await asyncio.to_thread(self.stop, timeout)

    async def async_delete(self) -> None:
        await asyncio.to_thread(self.delete)

    async def async_run(self, command: str, timeout: Optional[float] = 30, shell: str = "login") -> CommandResult:
        return await asyncio.to_thread(self.run, command, timeout, shell)

    async def __aenter__(self) -> "SmolVM":
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.__exit__, *exc)

    def __repr__(self) -> str:
        return f"SmolVM(vm_id={self._info.vm_id!r}, status={self._info.status.value!r})"

    # -- commands ------------------------------------------------------------

    def run(
        self,
        command: str,
        timeout: Optional[float] = 30,
        shell: str = "login",
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        stdin: Optional[Union[str, bytes]] = None,
    ) -> CommandResult:
        """Run a shell command in the sandbox and wait for it.

        A non-zero exit is a result (``ok`` False), not an exception; so is a
        command killed at its ``timeout`` (``timed_out`` True). The sandbox
        must be running (VMNotRunningError otherwise).
        """
        if shell not in ("login", "raw"):
            raise ValidationError(f"shell must be 'login' or 'raw', got {shell!r}", code="invalid_request")
        if not isinstance(command, str):
            raise ValidationError("command must be a string (a shell command line)", code="invalid_request")
        body: Dict[str, Any] = {"command": command}
        if timeout is not None:
            body["timeout_s"] = float(timeout)
        if env:
            body["env"] = dict(env)
        if cwd:
            body["cwd"] = cwd
        if stdin is not None:
            if isinstance(stdin, bytes):
                try:
                    stdin = stdin.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValidationError(
                        "run(stdin=...) takes text; send binary input with stream(..., stdin=bytes)",
                        code="invalid_request",
                    ) from None
            body["stdin"] = stdin
        # the daemon's default command timeout is 600 s
        limit = (600.0 if not timeout else float(timeout)) + _EXEC_GRACE
        return CommandResult.from_json(self._client.call("POST", self._path("/exec"), body=body, timeout=limit))

    def stream(
        self,
        command: Union[str, List[str]],
        *,
        stdin: Union[None, bytes, Any, Iterable[bytes]] = None,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
    ) -> Iterator[ExecEvent]:
        """Run a command and yield its output as it comes: ExecEvent("stdout"
        or "stderr", data), then one ExecEvent("exit", exit_code=...).

        ``command`` is a shell line, or a list (argv, no shell). ``stdin``
        (bytes, a binary file or an iterable of bytes) is sent while the
        output is read; its end closes the command's stdin. Leaving the loop
        early closes the request: the daemon kills the command.
        """
        q: List[Any] = []
        if isinstance(command, str):
            q.append(("command", command))
        else:
            q.extend(("arg", a) for a in command)
        if timeout is not None:
            q.append(("timeout_s", str(float(timeout))))
        if cwd:
            q.append(("cwd", cwd))
        for k, v in (env or {}).items():
            q.append(("env", f"{k}={v}"))
        # a bound on each wait for the next event: the command's own
        # timeout (the daemon's default 600 s) plus a grace
        idle = (600.0 if not timeout else float(timeout)) + _EXEC_GRACE
        return self._stream(self._path("/exec/stream") + "?" + urllib.parse.urlencode(q), stdin, idle)

    def _stream(self, path: str, stdin: Any, idle: float) -> Iterator[ExecEvent]:
        c = self._client
        conn = c._connection(idle)
        writer: Optional[threading.Thread] = None
        try:
            try:
                conn.putrequest("POST", path)
                conn.putheader("Accept", "application/x-ndjson")
                if c._token:
                    conn.putheader("Authorization", "Bearer " + c._token)
                if stdin is None:
                    conn.putheader("Content-Length", "0")
                    conn.endheaders()
                else:
                    conn.putheader("Content-Type", "application/octet-stream")
                    conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    if c._tls is not None:
                        # one TLS connection is not safe to read and write
                        # from two threads: stdin goes first, then output
                        _send_chunked(conn.sock, stdin)
                    else:
                        writer = threading.Thread(target=_send_chunked, args=(conn.sock, stdin), daemon=True)
                        writer.start()
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise c._unreachable(e) from None
            if not 200 <= resp.status < 300:
                raise error_from_reply(resp.status, resp.read(64 << 10))
            for ev in _client.ndjson_events(lambda: self._readline(resp, idle), _MAX_EVENT_LINE, "exec stream"):
                kind = ev.get("type")
                if kind in ("stdout", "stderr"):
                    try:
                        data = base64.b64decode(ev.get("data") or "", validate=True)
                    except (ValueError, TypeError):
                        raise APIError("the daemon sent exec output that is not base64") from None
                    yield ExecEvent(kind, data)
                elif kind == "exit":
                    code = ev.get("exit_code")
                    if not isinstance(code, int) or isinstance(code, bool):
                        raise APIError(f"the daemon sent an exit event without an exit code: {ev!r:.200}")
                    dur = ev.get("duration_ms")
                    yield ExecEvent(
                        "exit",
                        exit_code=code,
                        timed_out=ev.get("timed_out") is True,
                        duration_ms=float(dur) if isinstance(dur, (int, float)) else 0.0,
                    )
                    return
                elif kind == "error":
                    raise error_from_reply(resp.status, json.dumps(ev).encode())
                # other event types (keep-alives, future ones) are skipped
            raise APIError("the daemon ended the exec stream without an exit event")
        finally:
            conn.close()

    def _readline(self, resp: Any, idle: float) -> bytes:
        try:
            return resp.readline(_MAX_EVENT_LINE + 1)
        except socket.timeout:
            raise OperationTimeoutError(
                f"no event from the daemon's exec stream in {idle:.0f} s", code="timeout"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise self._client._unreachable(e) from None

    # -- snapshots -----------------------------------------------------------

    def snapshot(
        self,
        snapshot_id: Optional[str] = None,
        *,
        snapshot_type: Union[str, SnapshotType] = "full",
        resume_source: bool = False,
        capture_policy: str = "allow-pause",
        flush_policy: str = "required",
        timeout_seconds: float = 600.0,
        max_bytes_per_second: Optional[int] = None,
    ) -> SnapshotInfo:
        """Save the sandbox (running or paused) as a snapshot.

        The sandbox stays paused afterwards unless ``resume_source``. Without
        ``snapshot_id`` one is generated (snap-<vm>-<unix seconds>).
        """
        kind = SnapshotType.coerce(snapshot_type)
        if capture_policy != "allow-pause":
            raise _unsupported("capture_policy", capture_policy)
        if flush_policy != "required":
            raise _unsupported("flush_policy", flush_policy)
        if max_bytes_per_second is not None:
            raise _unsupported("max_bytes_per_second", max_bytes_per_second)
        if not (isinstance(timeout_seconds, (int, float)) and 0 < timeout_seconds < float("inf")):
            raise ValueError("timeout_seconds must be a finite number greater than zero")
        body: Dict[str, Any] = {"snapshot_type": kind.value, "resume_source": bool(resume_source)}
        if snapshot_id is not None:
            body["snapshot_id"] = snapshot_id
        info = SnapshotInfo.from_json(
            self._client.call(
                "POST", self._path("/snapshots"), body=body, timeout=max(float(timeout_seconds), _client.LONG_TIMEOUT)
            )
        )
        try:
            self.refresh()
        except SmolVMError:
            pass
        return info

    # -- files ---------------------------------------------------------------

    def write_file(self, guest_path: str, data: Union[bytes, str, Any], mode: int = 0o644) -> None:
        """Write bytes (or a str as UTF-8, or a binary file, streamed) to an
        absolute path in the guest."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._client.call(
            "PUT",
            self._path("/files"),
            query=[("path", guest_path), ("mode", "%04o" % mode)],
            raw=data,
            timeout=_client.LONG_TIMEOUT,
        )

    def read_file(self, guest_path: str) -> bytes:
        """The bytes of a file in the guest (held in memory: use
        download_file for big files)."""
        conn, resp = self._client.open(
            "GET", self._path("/files"), query=[("path", guest_path)], timeout=_client.LONG_TIMEOUT
        )
        try:
            return resp.read()
        finally:
            conn.close()

    def upload_file(self, local_path: Union[str, Path], guest_path: str, *, make_dirs: bool = True) -> str:
        """Copy a local file into the guest (streamed); a guest path ending
        in '/' takes the local file's name. Returns the guest path."""
        local = Path(local_path)
        if not PurePosixPath(guest_path).is_absolute():
            raise ValidationError(f"guest path must be absolute, got {guest_path!r}", code="invalid_request")
        if guest_path.endswith("/"):
            guest_path = guest_path + local.name
        if make_dirs:
            parent = str(PurePosixPath(guest_path).parent)
            r = self.run("mkdir -p -- " + shlex.quote(parent), shell="raw")
            if not r.ok:
                raise SmolVMError(f"cannot create {parent} in the guest: {r.stderr.strip()}", code="error")
        mode = local.stat().st_mode & 0o777
        with open(local, "rb") as f:
            self.write_file(guest_path, f, mode=mode)
        return guest_path

    def download_file(self, guest_path: str, local_path: Union[str, Path], *, make_dirs: bool = True) -> str:
        """Copy a file out of the guest (streamed) into a private (0600)
        local file, written atomically. Returns the local path."""
        local = Path(local_path)
        if make_dirs:
            local.parent.mkdir(parents=True, exist_ok=True)
        conn, resp = self._client.open(
            "GET", self._path("/files"), query=[("path", guest_path)], timeout=_client.LONG_TIMEOUT
        )
        fd, tmp = tempfile.mkstemp(prefix="." + local.name + ".", dir=str(local.parent))
        try:
            with _os.fdopen(fd, "wb") as out:
                while True:
                    b = resp.read(1 << 16)
                    if not b:
                        break
                    out.write(b)
                out.flush()
                _os.fsync(out.fileno())
            _os.replace(tmp, local)
        except BaseException:
            try:
                _os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            conn.close()
        return str(local)

    # -- network, logs, stats ------------------------------------------------

    def expose_local(self, guest_port: int, host_port: Optional[int] = None) -> int:
        """Forward 127.0.0.1:host_port on the host to guest_port; returns the
        host port (host_port=None: the same number as guest_port)."""
        hp = guest_port if host_port is None else host_port
        self._info = VMInfo.from_json(
            self._client.call("POST", self._path("/ports"), body={"host_port": hp, "guest_port": guest_port})
        )
        return hp

    def logs(self) -> str:
        """The sandbox's console log (its last MiB)."""
        conn, resp = self._client.open("GET", self._path("/logs"))
        try:
            return _client._read_bounded(resp, 16 << 20).decode("utf-8", "replace")
        finally:
            conn.close()

    def stats(self) -> Dict[str, Any]:
        """CPU, memory, disk and network figures of the sandbox."""
        doc = self._client.call("GET", self._path("/stats"))
        if not isinstance(doc, dict):
            raise APIError("the daemon sent stats that are not an object")
        return doc


def _send_chunked(sock: Any, stdin: Any) -> None:
    """Send stdin as a chunked body on the request's socket, while the
    caller reads the reply (never through the connection object, which
    would reconnect once closed)."""
    try:
        if isinstance(stdin, (bytes, bytearray)):
            chunks: Iterable[bytes] = [bytes(stdin[i : i + (1 << 16)]) for i in range(0, len(stdin), 1 << 16)]
        elif hasattr(stdin, "read"):
            chunks = iter(lambda: stdin.read(1 << 16), b"")
        else:
            chunks = stdin
        for b in chunks:
            if isinstance(b, str):
                b = b.encode("utf-8")
            if b:
                sock.sendall(b"%x\r\n%s\r\n" % (len(b), b))
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the reply (or its end) tells the caller what happened
