"""Client-side rules that need no daemon (milliseconds): error mapping,
reply parsing, enum printing, endpoint and socket-dir checks, and the
in-tree build backend's wheel."""

import base64
import datetime as dt
import hashlib
import json
import os
import socket
import sys
import tempfile
import unittest
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smolvm  # noqa: E402
from smolvm import _client, exceptions  # noqa: E402
from smolvm.types import CommandResult, SnapshotInfo, SnapshotType, VMInfo, VMState  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reply(code, message="m", recovery="r", **extra):
    err = {"code": code, "message": message, "recovery": recovery}
    err.update(extra)
    return json.dumps({"error": err}).encode()


class ErrorMapping(unittest.TestCase):
    def test_codes(self):
        cases = {
            "snapshot_exists": smolvm.SnapshotAlreadyExistsError,
            "snapshot_not_found": smolvm.SnapshotNotFoundError,
            "snapshot_already_restored": smolvm.SnapshotAlreadyRestoredError,
            "snapshot_in_use": smolvm.SnapshotInUseError,
            "vm_not_found": smolvm.VMNotFoundError,
            "vm_exists": smolvm.VMAlreadyExistsError,
            "vm_not_running": smolvm.VMNotRunningError,
            "invalid_id": smolvm.ValidationError,
            "invalid_config": smolvm.ValidationError,
            "invalid_request": smolvm.ValidationError,
            "image_not_built": smolvm.ImageError,
            "unsupported": smolvm.UnsupportedError,
            "host_incompatible": smolvm.HostIncompatibleError,
            "timeout": smolvm.OperationTimeoutError,
            "guest_protocol": smolvm.GuestProtocolError,
            "unauthorized": smolvm.UnauthorizedError,
            "template_not_found": smolvm.TemplateNotFoundError,
            "backing_image_missing": smolvm.BackingImageMissingError,
            "snapshot_corrupt": smolvm.SnapshotCorruptError,
            "boot_failed": smolvm.BootError,
            "remote_auth": smolvm.RemoteError,
            "remote_unreachable": smolvm.RemoteError,
            "no_space": smolvm.NoSpaceError,
            "too_many_requests": smolvm.TooManyRequestsError,
            "not_found": smolvm.APIError,
            "something_new": smolvm.SmolVMError,
        }
        for code, cls in cases.items():
            e = exceptions.error_from_reply(409, reply(code, fix={"action": "a", "args": {"k": "v"}}))
            self.assertIs(type(e), cls, code)
            self.assertIsInstance(e, smolvm.SmolVMError)
            self.assertEqual((e.code, e.message, e.recovery, e.status), (code, "m", "r", 409))
            self.assertEqual(e.details["fix"], {"action": "a", "args": {"k": "v"}})
        self.assertIsInstance(exceptions.error_from_reply(422, reply("invalid_id")), ValueError)
        self.assertIsInstance(exceptions.error_from_reply(504, reply("timeout")), TimeoutError)

    def test_unreadable_bodies(self):
        for body in (b"", b"<html>oops</html>", b'{"error": "flat"}', b"\xff\xfe", b"[]"):
            e = exceptions.error_from_reply(502, body)
            self.assertIs(type(e), smolvm.APIError, body)
            self.assertEqual(e.status, 502)
        # an unknown code on a 504 is still a timeout
        self.assertIsInstance(exceptions.error_from_reply(504, reply("gateway")), smolvm.OperationTimeoutError)

    def test_huge_fields_are_bounded(self):
        e = exceptions.error_from_reply(500, reply("error", message="x" * 100000, recovery=["not", "text"]))
        self.assertLessEqual(len(e.message), 4096)
        self.assertEqual(e.recovery, "")


class Parsing(unittest.TestCase):
    def test_command_result(self):
        r = CommandResult.from_json({"exit_code": 0, "stdout": " 42\n", "stderr": "", "ok": True,
                                     "timed_out": False, "truncated": False, "duration_ms": 7})
        self.assertEqual((r.ok, r.output, r.duration_ms), (True, "42", 7.0))
        self.assertFalse(CommandResult(0, "", "", timed_out=True).ok)
        for bad in ({}, {"exit_code": "0"}, {"exit_code": True}, [], None):
            with self.assertRaises(smolvm.APIError, msg=repr(bad)):
                CommandResult.from_json(bad)

    def test_snapshot_info(self):
        s = SnapshotInfo.from_json({
            "snapshot_id": "my-checkpoint", "vm_id": "sbx-1", "backend": "qemu", "snapshot_type": "diff",
            "created_at": "2026-12-01T04:01:12.688725123Z", "size_bytes": 5, "restored": True,
            "restored_vm_id": "sbx-1", "restore_count": 2, "artifacts": {"disk_path": "/d/disk.qcow2"},
            "dir": "/d", "memory_mib": 512, "future_field": 1,
        })
        self.assertIs(s.snapshot_type, SnapshotType.DIFF)
        self.assertEqual(s.created_at, dt.datetime(2026, 12, 1, 4, 1, 12, 688725, tzinfo=dt.timezone.utc))
        self.assertEqual(str(s.artifacts.disk_path), "/d/disk.qcow2")
        self.assertIsNone(s.artifacts.memory_path)
        with self.assertRaises(smolvm.APIError):
            SnapshotInfo.from_json({"snapshot_id": "x", "snapshot_type": "weird"})
        with self.assertRaises(smolvm.APIError):
            SnapshotInfo.from_json({"vm_id": "x"})

    def test_vm_info(self):
        i = VMInfo.from_json({"id": "a", "status": "paused", "created_at": "2026-12-01T04:01:12+02:00",
                              "port_forwards": [{"host_port": 8080, "guest_port": 80}, "junk"]})
        self.assertIs(i.status, VMState.PAUSED)
        self.assertEqual(i.port_forwards[0].host_addr, "127.0.0.1")
        self.assertEqual(len(i.port_forwards), 1)
        with self.assertRaises(smolvm.APIError):
            VMInfo.from_json({"id": "a", "status": "exploded"})

    def test_enums_print_like_the_seed(self):
        self.assertEqual(str(VMState.RUNNING), "VMState.RUNNING")
        self.assertEqual(f"{SnapshotType.DIFF}", "SnapshotType.DIFF")
        self.assertEqual(VMState.RUNNING, "running")
        self.assertIs(SnapshotType.coerce("disk"), SnapshotType.DISK)
        with self.assertRaises(ValueError):
            SnapshotType.coerce("bogus")


class NDJSON(unittest.TestCase):
    def events(self, data, limit=64):
        import io

        buf = io.BytesIO(data)
        return list(_client.ndjson_events(lambda: buf.readline(limit + 1), limit, "test"))

    def test_lines(self):
        self.assertEqual(self.events(b'{"a":1}\n\n{"b":2}'), [{"a": 1}, {"b": 2}])
        self.assertEqual(self.events(b""), [])
        for bad in (b"not json\n", b"[1,2]\n", b'{"a":"' + b"x" * 100 + b'"}\n', b"\xff\n"):
            with self.assertRaises(smolvm.APIError, msg=bad):
                self.events(bad)


class Endpoints(unittest.TestCase):
    def test_urls(self):
        c = _client.Client(url="http://127.0.0.1:8080", token="t")
        self.assertEqual((c._host, c._port), ("127.0.0.1", 8080))
        _client.Client(url="http://[::1]:1")
        _client.Client(url="https://sandbox.example:443")
        for bad in ("http://10.0.0.5:80", "ftp://127.0.0.1:1", "http://127.0.0.1:1/v1", "http://u:p@127.0.0.1:1", "nope"):
            with self.assertRaises(ValueError, msg=bad):
                _client.Client(url=bad)

    def test_socket_dir_must_be_private(self):
        with tempfile.TemporaryDirectory() as d:
            open_dir = os.path.join(d, "open")
            os.mkdir(open_dir)
            os.chmod(open_dir, 0o777)  # writable by all, not sticky
            with self.assertRaises(smolvm.SmolVMError) as cm:
                _client.check_socket_dir(os.path.join(open_dir, "api.sock"))
            self.assertEqual(cm.exception.code, "unsafe_dir")
            private = os.path.join(d, "private")
            os.mkdir(private, 0o700)
            _client.check_socket_dir(os.path.join(private, "api.sock"))  # absent: fine
            plant = os.path.join(private, "api.sock")
            with open(plant, "w"):
                pass  # a regular file where the socket should be
            with self.assertRaises(smolvm.SmolVMError):
                _client.check_socket_dir(plant)
            os.unlink(plant)
            s = socket.socket(socket.AF_UNIX)
            s.bind(plant)
            _client.check_socket_dir(plant)
            s.close()
            sticky = os.path.join(d, "sticky")
            os.mkdir(sticky)
            os.chmod(sticky, 0o1777)
            with self.assertRaises(smolvm.SmolVMError):
                # shared dir, no socket yet: we will not start a daemon there
                _client.check_socket_dir(os.path.join(sticky, "api.sock"))

    def test_nothing_listening(self):
        with tempfile.TemporaryDirectory() as d:
            c = _client.Client(socket_path=os.path.join(d, "none.sock"))
            self.assertFalse(c.health())
            with self.assertRaises(smolvm.DaemonUnavailableError) as cm:
                c.call("GET", "/v1/health")
            self.assertIn("smolvm serve", cm.exception.recovery)

    def test_daemon_log_is_private(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "serve.log")
            os.close(_client._open_log(p))
            self.assertEqual(os.stat(p).st_mode & 0o777, 0o600)
            os.symlink(p, os.path.join(d, "link.log"))
            with self.assertRaises(OSError):
                _client._open_log(os.path.join(d, "link.log"))


class BuildBackend(unittest.TestCase):
    def test_wheel(self):
        sys.path.insert(0, os.path.join(ROOT, "build_backend"))
        try:
            import smolvm_build
        finally:
            sys.path.pop(0)
        with tempfile.TemporaryDirectory() as d:
            name = smolvm_build.build_wheel(d)
            self.assertEqual(name, f"smolvm-{smolvm.__version__}-py3-none-any.whl")
            with zipfile.ZipFile(os.path.join(d, name)) as z:
                names = set(z.namelist())
                self.assertIn("smolvm/__init__.py", names)
                self.assertFalse([n for n in names if "__pycache__" in n or n.endswith(".pyc")])
                record = z.read(f"smolvm-{smolvm.__version__}.dist-info/RECORD").decode().splitlines()
                for line in record:
                    path, digest, size = line.rsplit(",", 2)
                    if not digest:
                        continue
                    data = z.read(path)
                    want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                    self.assertEqual((digest, int(size)), (want, len(data)), path)
                meta = z.read(f"smolvm-{smolvm.__version__}.dist-info/METADATA").decode()
                self.assertIn("Requires-Python: >=3.9", meta)
            self.assertEqual(smolvm_build.get_requires_for_build_wheel(), [])


if __name__ == "__main__":
    unittest.main()
