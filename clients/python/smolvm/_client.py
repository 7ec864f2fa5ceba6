"""Finding, starting and calling the smolvm daemon (``smolvm serve``).

Where the daemon is, in order:

1. ``SMOLVM_API_URL`` (``http://127.0.0.1:PORT`` or ``https://...``): TCP,
   with the bearer token from ``SMOLVM_API_TOKEN``. Never started by us.
2. ``SMOLVM_API_SOCKET``: that unix socket.
3. ``smolvm serve --print-socket`` (the binary from ``SMOLVM_BIN``, else
   ``smolvm`` on PATH; ``--data-dir`` when a data dir is given).

When nothing answers on the unix socket and the binary is known, the
client starts ``smolvm serve`` itself, detached in its own session with its
output in a private log file next to the socket, and waits (bounded by
``SMOLVM_API_START_TIMEOUT``, default 60 s) for ``/v1/health``.
"""

import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .exceptions import APIError, DaemonUnavailableError, SmolVMError, error_from_reply

# Socket timeouts of the client (the daemon's own deadlines are shorter:
# 60 s for quick calls, 10 min for long operations).
QUICK_TIMEOUT = 90.0
LONG_TIMEOUT = 11 * 60.0
MAX_JSON_REPLY = 64 << 20  # exec output is bounded by the daemon (4 MiB a stream)
_CHUNK = 1 << 16

Body = Union[None, bytes, Any]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Client:
    """One daemon endpoint. Thread-safe: every request uses its own
    connection (on a unix socket a connect costs microseconds)."""

    def __init__(
        self,
        *,
        socket_path: Optional[str] = None,
        url: Optional[str] = None,
        token: Optional[str] = None,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path and url")
        self.socket_path = socket_path
        self.url = url
        self._token = token
        self._tls: Optional[ssl.SSLContext] = None
        self.started_pid: Optional[int] = None  # the daemon this client started, if any
        self.log_path: Optional[str] = None
        if url is not None:
            u = urllib.parse.urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"SMOLVM_API_URL must be http://HOST:PORT or https://HOST:PORT, got {url!r}")
            if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
                raise ValueError(f"SMOLVM_API_URL must name only a scheme, host and port, got {url!r}")
            if u.scheme == "http" and not _is_loopback(u.hostname):
                raise ValueError(
                    f"SMOLVM_API_URL {url!r} is plain HTTP to a non-loopback host: the token would "
                    "cross the network in clear; use https://"
                )
            self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
            if u.scheme == "https":
                self._tls = ssl.create_default_context(cafile=os.environ.get("SMOLVM_API_CA") or None)

    def __repr__(self) -> str:
        return f"Client({self.socket_path or self.url!r})"

    # -- connections -------------------------------------------------------

    def _connection(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, timeout)
        if self._tls is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _unreachable(self, err: BaseException) -> DaemonUnavailableError:
        where = self.socket_path or self.url
        return DaemonUnavailableError(
            f"cannot reach the smolvm daemon at {where}: {err}",
            {"endpoint": where},
            recovery="start it with 'smolvm serve' (or unset SMOLVM_API_SOCKET/SMOLVM_API_URL to let the client start it)",
        )

    def open(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Iterable[Tuple[str, str]]] = None,
        body: Body = None,
        raw: Union[None, bytes, Any] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = QUICK_TIMEOUT,
    ) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request and return the connection and its response (status
        2xx; the caller reads and closes both). ``body`` is sent as JSON;
        ``raw`` as bytes or a binary file (streamed, chunked)."""
        if query:
            path = path + "?" + urllib.parse.urlencode(list(query))
        hdrs = {"Accept": "application/json"}
        if self._token:
            hdrs["Authorization"] = "Bearer " + self._token
        payload: Any = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        elif raw is not None:
            payload = raw
            hdrs["Content-Type"] = "application/octet-stream"
            if not isinstance(raw, (bytes, bytearray)):
                hdrs["Transfer-Encoding"] = "chunked"
        if headers:
            hdrs.update(headers)
        conn = self._connection(timeout)
        try:
            if payload is not None and not isinstance(payload, (bytes, bytearray)):
                conn.request(method, path, body=_chunks(payload), headers=hdrs, encode_chunked=True)
            else:
                conn.request(method, path, body=payload, headers=hdrs)
            resp = conn.getresponse()
        except (ConnectionRefusedError, FileNotFoundError) as e:
            conn.close()
            raise self._unreachable(e) from None
        except socket.timeout as e:
            conn.close()
            from .exceptions import OperationTimeoutError

            raise OperationTimeoutError(
                f"{method} {path.split('?')[0]}: no answer from the daemon in {timeout:.0f} s", code="timeout"
            ) from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._unreachable(e) from None
        if not 200 <= resp.status < 300:
            try:
                data = resp.read(64 << 10)
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise error_from_reply(resp.status, data)
        return conn, resp

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Iterable[Tuple[str, str]]] = None,
        body: Body = None,
        raw: Union[None, bytes, Any] = None,
        timeout: Optional[float] = QUICK_TIMEOUT,
    ) -> Any:
        """A request whose reply is JSON (or empty, as 204): returns it parsed."""
        conn, resp = self.open(method, path, query=query, body=body, raw=raw, timeout=timeout)
        try:
            data = _read_bounded(resp, MAX_JSON_REPLY)
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None
        finally:
            conn.close()
        if resp.status == 204 or not data.strip():
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise APIError(
                f"{method} {path}: the daemon's reply is not JSON: {data[:200]!r}", {"status": resp.status}
            ) from None

    def call_progress(
        self,
        method: str,
        path: str,
        *,
        body: Body = None,
        on_progress: Optional[Callable[[str, float], None]] = None,
        timeout: Optional[float] = LONG_TIMEOUT,
    ) -> Any:
        """A long operation. With on_progress, the daemon streams its steps
        (NDJSON): on_progress(step, elapsed_seconds) is called for each, and
        the result line's body is returned (its error line raised)."""
        if on_progress is None:
            return self.call(method, path, body=body, timeout=timeout)
        conn, resp = self.open(
            method, path, body=body, headers={"Accept": "application/x-ndjson"}, timeout=timeout
        )
        try:
            if "ndjson" not in (resp.getheader("Content-Type") or ""):
                data = _read_bounded(resp, MAX_JSON_REPLY)
                return json.loads(data) if data.strip() else None
            for ev in ndjson_events(lambda: resp.readline(MAX_JSON_REPLY + 1), MAX_JSON_REPLY, f"{method} {path}"):
                kind = ev.get("type")
                if kind == "progress":
                    ms = ev.get("elapsed_ms")
                    secs = ms / 1000.0 if isinstance(ms, (int, float)) and not isinstance(ms, bool) else 0.0
                    on_progress(str(ev.get("step", ""))[:1000], secs)
                elif kind == "result":
                    return ev.get("body")
                elif kind == "error":
                    st = ev.get("status")
                    raise error_from_reply(
                        st if isinstance(st, int) and not isinstance(st, bool) else 500,
                        json.dumps({"error": ev.get("error")}).encode(),
                    )
            raise APIError(f"{method} {path}: the daemon ended its progress stream without a result")
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None
        finally:
            conn.close()

    def health(self, timeout: float = 5.0) -> bool:
        try:
            doc = self.call("GET", "/v1/health", timeout=timeout)
        except SmolVMError:
            return False
        return isinstance(doc, dict) and doc.get("ok") is True


def ndjson_events(readline: Callable[[], bytes], limit: int, what: str) -> Iterator[Dict[str, Any]]:
    """The objects of an NDJSON reply, one a line, until its end. readline
    returns at most limit+1 bytes; a longer line, a line that is not a
    JSON object, is APIError (the daemon's replies are checked, not
    trusted)."""
    while True:
        line = readline()
        if not line:
            return
        if len(line) > limit:
            raise APIError(f"{what}: the daemon sent a line over {limit} bytes")
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            raise APIError(f"{what}: the daemon sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(ev, dict):
            raise APIError(f"{what}: the daemon sent a line that is not an object: {line[:200]!r}")
        yield ev


def _chunks(f: Any) -> Iterable[bytes]:
    while True:
        b = f.read(_CHUNK)
        if not b:
            return
        yield b


def _read_bounded(resp: http.client.HTTPResponse, limit: int) -> bytes:
    n = resp.getheader("Content-Length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise APIError(f"the daemon's reply is {n} bytes, over the client's limit of {limit}")
    data = resp.read(limit + 1)
    if len(data) > limit:
        raise APIError(f"the daemon's reply is over the client's limit of {limit} bytes")
    return data


# -- discovery ---------------------------------------------------------------

_clients: Dict[Tuple[Optional[str], ...], Client] = {}
_clients_lock = threading.Lock()


def find_binary() -> Optional[str]:
    """The smolvm binary, as an absolute path (the daemon starts in /):
    $SMOLVM_BIN, else smolvm on PATH."""
    import shutil

    b = os.environ.get("SMOLVM_BIN")
    if b:
        if os.sep not in b:
            return shutil.which(b) or b
        return os.path.abspath(b)
    found = shutil.which("smolvm")
    return os.path.abspath(found) if found else None


def _global_args(data_dir: Optional[str]) -> List[str]:
    return ["--data-dir", os.path.abspath(data_dir)] if data_dir else []


def _print_socket(binary: str, data_dir: Optional[str]) -> str:
    try:
        out = subprocess.run(
            [binary, *_global_args(data_dir), "serve", "--print-socket"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise DaemonUnavailableError(
            f"cannot run {binary!r} to find the daemon's socket: {e}",
            recovery="set SMOLVM_BIN to the smolvm binary (scripts/setup builds bin/smolvm) or SMOLVM_API_SOCKET",
        ) from None
    lines = [ln for ln in out.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        err = out.stderr.decode("utf-8", "replace").strip()[-1000:]
        raise DaemonUnavailableError(
            f"'{binary} serve --print-socket' failed (exit {out.returncode}): {err}",
            recovery="check the smolvm binary (SMOLVM_BIN) and its data dir",
        )
    path = lines[-1].strip()
    if not os.path.isabs(path) or "\x00" in path or len(path.encode()) > 107:
        raise DaemonUnavailableError(f"'{binary} serve --print-socket' printed no usable socket path: {path!r}")
    return path


def check_socket_dir(path: str) -> None:
    """Refuse a socket whose directory another user could have planted or
    can write: a fake daemon there would receive our commands and files."""
    d = os.path.dirname(path) or "."
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return  # nothing listens; an autostart creates it (the daemon checks it)
    # A private dir of ours; or a sticky shared one (/tmp) where only the
    # socket's owner can replace it, checked below.
    sticky = bool(st.st_mode & stat.S_ISVTX)
    private = st.st_uid == os.geteuid() and not st.st_mode & 0o022
    if not stat.S_ISDIR(st.st_mode) or not (private or sticky):
        raise SmolVMError(
            f"the daemon's socket directory {d} is not a private directory of this user "
            f"(owner uid {st.st_uid}, mode {oct(stat.S_IMODE(st.st_mode))}): refusing to talk to a socket in it",
            code="unsafe_dir",
            recovery=f"remove {d} (someone else may have created it) or set SMOLVM_RUN_DIR to a private directory",
        )
    try:
        ss = os.lstat(path)
    except FileNotFoundError:
        if private:
            return
        raise SmolVMError(
            f"no daemon socket at {path}, and its directory {d} is shared: refusing to start a daemon there",
            code="unsafe_dir",
            recovery="start 'smolvm serve' yourself, or point SMOLVM_API_SOCKET into a private directory",
        ) from None
    if not stat.S_ISSOCK(ss.st_mode) or ss.st_uid != os.geteuid():
        raise SmolVMError(
            f"{path} is not a socket of this user: refusing to talk to it",
            code="unsafe_dir",
            recovery=f"remove {path} and let the client start 'smolvm serve'",
        )


def _open_log(path: str) -> int:
    """Open (append) the private log of a daemon we start: 0600, a regular
    file of ours, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise SmolVMError(f"{path} is not a regular file of this user: refusing to log into it", code="unsafe_dir")
    os.fchmod(fd, 0o600)
    return fd


def _log_tail(path: Optional[str], n: int = 2000) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _start_daemon(client: Client, binary: str, data_dir: Optional[str]) -> None:
    """Start `smolvm serve` detached and wait for its health check."""
    sock = client.socket_path
    assert sock is not None
    d = os.path.dirname(sock)
    os.makedirs(d, mode=0o700, exist_ok=True)
    check_socket_dir(sock)
    log = sock[: -len(".sock")] if sock.endswith(".sock") else sock
    log += ".log"
    fd = _open_log(log)
    client.log_path = log
    env = dict(os.environ)
    for k in ("SMOLVM_DATA_DIR", "SMOLVM_IMAGE_DIR", "SMOLVM_RUN_DIR", "SMOLVM_API_SOCKET"):
        if env.get(k):
            env[k] = os.path.abspath(env[k])
    try:
        os.write(fd, f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} started by the Python client (pid {os.getpid()})\n".encode())
        proc = subprocess.Popen(
            [binary, *_global_args(data_dir), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd="/",
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        raise DaemonUnavailableError(
            f"cannot start '{binary} serve': {e}", recovery="set SMOLVM_BIN to the smolvm binary"
        ) from None
    finally:
        os.close(fd)
    client.started_pid = proc.pid
    limit = float(os.environ.get("SMOLVM_API_START_TIMEOUT") or 60)
    deadline = time.monotonic() + limit
    pause = 0.02
    while time.monotonic() < deadline:
        if client.health(timeout=5.0):
            # reap it when it exits some day, without blocking (no zombie)
            threading.Thread(target=proc.wait, daemon=True).start()
            return
        # A daemon that exited lost the race to another one (serve.lock)
        # or failed: keep asking until the deadline either way.
        proc.poll()
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
    code = proc.poll()
    if code is None:
        # it never answered: stop it rather than leave it running unseen
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        state = "did not answer and was stopped"
    else:
        state = f"exited with status {code}"
    raise DaemonUnavailableError(
        f"started '{binary} serve' but no daemon answered on {sock} within {limit:.0f} s (it {state}); "
        f"its log {log} ends with:\n{_log_tail(log)}",
        {"log": log},
        recovery=f"read {log}, fix what it says, or run 'smolvm serve' yourself",
    )


def connect(data_dir: Optional[str] = None, *, autostart: bool = True) -> Client:
    """The client for the daemon of data_dir (default: the daemon's own
    default), started when none answers (see the module doc). Cached."""
    env = os.environ
    key = (
        data_dir and os.path.abspath(data_dir),
        env.get("SMOLVM_API_URL"),
        env.get("SMOLVM_API_TOKEN"),
        env.get("SMOLVM_API_SOCKET"),
        env.get("SMOLVM_BIN"),
        env.get("SMOLVM_DATA_DIR"),
        env.get("SMOLVM_RUN_DIR"),
    )
    with _clients_lock:
        c = _clients.get(key)
        if c is not None and c.health():
            return c
        url = env.get("SMOLVM_API_URL")
        if url:
            c = Client(url=url, token=env.get("SMOLVM_API_TOKEN") or None)
            # never started here; its own error (unreachable, 401) is raised
            c.call("GET", "/v1/health", timeout=10.0)
            _clients[key] = c
            return c
        binary = find_binary()
        sock = env.get("SMOLVM_API_SOCKET")
        if not sock:
            if binary is None:
                raise DaemonUnavailableError(
                    "cannot find the smolvm daemon: no SMOLVM_API_SOCKET and no smolvm binary (SMOLVM_BIN or PATH)",
                    recovery="put the smolvm binary on PATH (scripts/setup builds bin/smolvm) or set SMOLVM_BIN",
                )
            sock = _print_socket(binary, data_dir)
        check_socket_dir(sock)
        c = Client(socket_path=sock)
        if not c.health():
            if not autostart or binary is None:
                raise c._unreachable(ConnectionRefusedError("nothing answers"))
            _start_daemon(c, binary, data_dir)
        _clients[key] = c
        return c
