"""The client's behaviour beyond the seed page, against a real daemon and
real VMs: run results and timeouts, errors and their codes, the context
manager, pause/resume and status, files, streaming exec, fork, templates,
and several clients starting the daemon at once. One sandbox is shared by
the tests that only run commands in it."""

import asyncio
import hashlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _support import ROOT, Env, pids_mentioning, stop_pid  # noqa: E402

from smolvm import _client  # noqa: E402

from smolvm import (  # noqa: E402
    SmolVM,
    UnauthorizedError,
    SmolVMError,
    SmolVMManager,
    SnapshotNotFoundError,
    SnapshotType,
    ValidationError,
    VMNotFoundError,
    VMNotRunningError,
    VMState,
)

env = None
shared = None


def setUpModule():
    global env, shared
    env = Env()
    # module cleanups run even when setUpModule fails (last added, first run)
    unittest.addModuleCleanup(env.close)
    shared = SmolVM()
    unittest.addModuleCleanup(shared.delete)
    shared.start()


class Run(unittest.TestCase):
    def test_result(self):
        r = shared.run("echo out; echo err >&2; exit 3")
        self.assertEqual((r.exit_code, r.ok, r.output, r.stdout, r.stderr), (3, False, "out", "out\n", "err\n"))
        self.assertTrue(shared.run("true").ok)
        # the seed page's Alpine lines on our Debian image: a result, not an exception
        apk = shared.run("apk add python3")
        self.assertEqual((apk.ok, apk.exit_code), (False, 127))

    def test_timeout_is_a_result(self):
        t = time.monotonic()
        r = shared.run("sleep 30", timeout=1)
        self.assertTrue(r.timed_out, r)
        self.assertFalse(r.ok)
        self.assertLess(time.monotonic() - t, 20)

    def test_env_cwd_stdin(self):
        r = shared.run('echo "$GREETING $(pwd)"; cat', env={"GREETING": "hi"}, cwd="/tmp", stdin="piped")
        self.assertEqual(r.stdout, "hi /tmp\npiped")

    def test_stream(self):
        events = list(shared.stream("echo out; echo err >&2; exit 5"))
        out = b"".join(e.data for e in events if e.kind == "stdout")
        err = b"".join(e.data for e in events if e.kind == "stderr")
        self.assertEqual((out, err), (b"out\n", b"err\n"))
        self.assertEqual(events[-1].kind, "exit")
        self.assertEqual(events[-1].exit_code, 5)

    def test_stream_stdin_and_argv(self):
        data = os.urandom(200_000)
        events = list(shared.stream(["sha256sum"], stdin=data))
        out = b"".join(e.data for e in events if e.kind == "stdout")
        self.assertEqual(out.split()[0].decode(), hashlib.sha256(data).hexdigest())
        self.assertEqual(events[-1].exit_code, 0)

    def test_stream_left_early_kills_the_command(self):
        it = shared.stream("echo $$; exec sleep 120")
        pid = int(next(it).data.strip())
        self.assertEqual(shared.run(f"kill -0 {pid}").exit_code, 0)
        it.close()  # leaving the loop closes the request
        deadline = time.monotonic() + 15
        while shared.run(f"kill -0 {pid}").ok and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertFalse(shared.run(f"kill -0 {pid}").ok, "the command outlived its stream")

    def test_stream_output_arrives_while_running(self):
        t = time.monotonic()
        it = shared.stream("echo first; sleep 3; echo second")
        first = next(it)
        self.assertEqual(first.data, b"first\n")
        self.assertLess(time.monotonic() - t, 2.5, "the first line waited for the command's end")
        rest = list(it)
        self.assertEqual(rest[-1].exit_code, 0)


class Files(unittest.TestCase):
    def test_write_read(self):
        data = os.urandom(1 << 20)
        shared.write_file("/tmp/blob", data, mode=0o600)
        self.assertEqual(shared.read_file("/tmp/blob"), data)
        self.assertEqual(shared.run("stat -c %a /tmp/blob").output, "600")

    def test_upload_download(self):
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "src.bin")
            data = os.urandom(3 << 20)
            with open(src, "wb") as f:
                f.write(data)
            guest = shared.upload_file(src, "/root/deep/dir/")
            self.assertEqual(guest, "/root/deep/dir/src.bin")
            self.assertEqual(shared.run("sha256sum /root/deep/dir/src.bin").output.split()[0],
                             hashlib.sha256(data).hexdigest())
            dst = shared.download_file(guest, os.path.join(d, "out", "copy.bin"))
            with open(dst, "rb") as f:
                self.assertEqual(f.read(), data)
            # guest data lands private on the host
            self.assertEqual(stat.S_IMODE(os.stat(dst).st_mode), 0o600)

    def test_missing_file_is_an_error(self):
        with self.assertRaises(SmolVMError):
            shared.read_file("/no/such/file")


class Errors(unittest.TestCase):
    def test_not_found(self):
        with self.assertRaises(VMNotFoundError) as cm:
            SmolVM.from_id("no-such-vm")
        e = cm.exception
        self.assertEqual((e.code, e.status), ("vm_not_found", 404))
        self.assertIn("no-such-vm", e.message)
        self.assertTrue(e.recovery)
        with self.assertRaises(SnapshotNotFoundError):
            SmolVMManager().delete_snapshot("missing-snapshot")

    def test_invalid_ids(self):
        for bad in ("Bad ID", "../escape", "a" * 65, "-x"):
            with self.assertRaises(ValidationError, msg=bad) as cm:
                shared.snapshot(snapshot_id=bad)
            self.assertIsInstance(cm.exception, ValueError)
            self.assertEqual(cm.exception.status, 422)
            with self.assertRaises(ValidationError, msg=bad):
                SmolVM.from_snapshot(bad)
        self.assertEqual(shared.status, VMState.RUNNING)  # nothing happened to it

    def test_snapshot_type_checked(self):
        with self.assertRaises(ValueError) as cm:
            shared.snapshot(snapshot_type="bogus")
        self.assertIn("'full', 'diff', 'disk'", str(cm.exception))

    def test_not_running(self):
        vm = SmolVM()  # created, never started: no boot
        try:
            self.assertEqual(vm.status, VMState.CREATED)
            with self.assertRaises(VMNotRunningError) as cm:
                vm.run("true")
            self.assertEqual(cm.exception.status, 409)
            self.assertTrue(cm.exception.recovery)
        finally:
            vm.delete()
        with self.assertRaises(VMNotFoundError):
            SmolVM.from_id(vm.vm_id)

    def test_unsupported_options_refused(self):
        with self.assertRaises(ValueError):
            SmolVM(mounts=["/tmp"])
        with self.assertRaises(ValueError):
            SmolVM(vm_id="x", image="debian")


class Lifecycle(unittest.TestCase):
    def test_start_reports_progress(self):
        vm = SmolVM()
        try:
            steps = []
            vm.start(on_progress=lambda step, secs: steps.append((step, secs)))
            self.assertEqual(vm.info.status, VMState.RUNNING)
            self.assertTrue(steps, "no progress line")
            self.assertTrue(all(isinstance(s, str) and s and t >= 0 for s, t in steps), steps)
            self.assertTrue(vm.run("true").ok)
        finally:
            vm.delete()
        # an error line of a progress stream is raised as its code says
        with self.assertRaises(SnapshotNotFoundError):
            SmolVM.from_snapshot("missing-snapshot", on_progress=lambda *a: None)

    def test_context_manager(self):
        with SmolVM() as vm:
            self.assertEqual(vm.status, VMState.RUNNING)
            self.assertEqual(vm.run("hostname").output, vm.vm_id)
            vid = vm.vm_id
        # owned: stopped and deleted on exit
        with self.assertRaises(VMNotFoundError):
            SmolVM.from_id(vid)

    def test_async(self):
        async def main():
            async with SmolVM() as vm:
                r = await vm.async_run("echo async")
                return vm.vm_id, r.output

        vid, out = asyncio.run(main())
        self.assertEqual(out, "async")
        with self.assertRaises(VMNotFoundError):
            SmolVM.from_id(vid)

    def test_pause_resume_status(self):
        vm = SmolVM.from_id(shared.vm_id)
        vm.pause()
        self.assertIs(shared.status, VMState.PAUSED)
        self.assertEqual(str(shared.status), "VMState.PAUSED")
        shared.start()  # resumes a paused sandbox
        self.assertIs(shared.status, VMState.RUNNING)
        self.assertTrue(shared.run("true").ok)

    def test_fork_and_templates(self):
        snap = shared.snapshot(resume_source=True)
        self.assertEqual(shared.status, VMState.RUNNING)
        self.assertEqual(snap.snapshot_type, SnapshotType.FULL)
        sdk = SmolVMManager()
        with self.assertRaises(SmolVMError) as cm:
            SmolVM.from_snapshot(snap.snapshot_id, backend="firecracker")
        self.assertIn("does not match the snapshot backend", cm.exception.message)
        clones = sdk.fork(snap.snapshot_id, count=2, resume_vm=True)
        try:
            self.assertEqual(len({c.vm_id for c in clones}), 2)
            for c in clones:
                self.assertEqual(c.run("hostname").output, c.vm_id)
        finally:
            for c in clones:
                c.delete()
            sdk.delete_snapshot(snap.snapshot_id)
        self.assertTrue(any(t.image == "debian" for t in sdk.list_templates()))


class Autostart(unittest.TestCase):
    def test_clients_starting_at_once_share_one_daemon(self):
        """Three fresh processes find no daemon for a new data dir and all
        start one: exactly one serves, every client gets its answer."""
        with tempfile.TemporaryDirectory(prefix="smolvm-py-race-") as d:
            data = os.path.join(d, "data")
            code = "import sys; from smolvm import SmolVMManager; print(len(SmolVMManager(data_dir=sys.argv[1]).list_snapshots()))"
            e = dict(os.environ, PYTHONPATH=ROOT)
            procs = [
                subprocess.Popen([sys.executable, "-c", code, data], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(3)
            ]
            try:
                for p in procs:
                    out, err = p.communicate(timeout=120)
                    self.assertEqual((p.returncode, out.strip()), (0, b"0"), err.decode("utf-8", "replace"))
                daemons = pids_mentioning(data)
                self.assertEqual(len(daemons), 1, daemons)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                for pid in pids_mentioning(data):
                    stop_pid(pid)


class TCP(unittest.TestCase):
    """SMOLVM_API_URL + SMOLVM_API_TOKEN reach a real daemon on TCP (plain
    on loopback, and TLS with SMOLVM_API_CA); the client never starts one."""

    def daemon(self, d, extra):
        """Start `smolvm serve --listen` on a free loopback port for a data
        dir of its own; return (url, token, Popen). Stopped on cleanup."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        token = os.urandom(16).hex()
        p = subprocess.Popen(
            [_client.find_binary(), "--data-dir", os.path.join(d, "data"), "serve",
             "--listen", f"127.0.0.1:{port}", *extra],
            env=dict(os.environ, SMOLVM_API_TOKEN=token),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def stop():
            p.terminate()  # our child: wait() reaps it
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

        self.addCleanup(stop)
        # it serves TCP once its unix socket answers (it listens on both)
        sock = subprocess.run(
            [_client.find_binary(), "--data-dir", os.path.join(d, "data"), "serve", "--print-socket"],
            capture_output=True, check=True,
        ).stdout.decode().strip()
        c = _client.Client(socket_path=sock)
        deadline = time.monotonic() + 30
        while p.poll() is None and not c.health() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIsNone(p.poll(), "the TCP daemon exited")
        scheme = "https" if extra else "http"
        return f"{scheme}://127.0.0.1:{port}", token, p

    def client_says(self, **env):
        code = ("from smolvm import SmolVMManager; m = SmolVMManager(); "
                "print(m.version()['api_version'], len(m.list_snapshots()))")
        e = dict(os.environ, PYTHONPATH=ROOT)
        e.pop("SMOLVM_API_CA", None)
        e.update(env)
        return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, timeout=60)

    def test_token_over_loopback(self):
        with tempfile.TemporaryDirectory(prefix="smolvm-py-tcp-") as d:
            url, token, _ = self.daemon(d, [])
            p = self.client_says(SMOLVM_API_URL=url, SMOLVM_API_TOKEN=token)
            self.assertEqual((p.returncode, p.stdout.strip()), (0, b"1 0"), p.stderr.decode())
            with self.assertRaises(UnauthorizedError) as cm:
                _client.Client(url=url, token="wrong").call("GET", "/v1/snapshots")
            self.assertEqual(cm.exception.status, 401)
            with self.assertRaises(UnauthorizedError):
                _client.Client(url=url).call("GET", "/v1/snapshots")
            # through the environment, a wrong token says so (not "no daemon")
            p = self.client_says(SMOLVM_API_URL=url, SMOLVM_API_TOKEN="wrong")
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(b"UnauthorizedError", p.stderr)

    def test_tls(self):
        with tempfile.TemporaryDirectory(prefix="smolvm-py-tls-") as d:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True, capture_output=True,
            )
            url, token, _ = self.daemon(d, ["--tls-cert", cert, "--tls-key", key])
            p = self.client_says(SMOLVM_API_URL=url, SMOLVM_API_TOKEN=token, SMOLVM_API_CA=cert)
            self.assertEqual((p.returncode, p.stdout.strip()), (0, b"1 0"), p.stderr.decode())
            # without the CA the certificate is not trusted: refused, not used
            p = self.client_says(SMOLVM_API_URL=url, SMOLVM_API_TOKEN=token)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(b"CERTIFICATE_VERIFY_FAILED", p.stderr)


if __name__ == "__main__":
    unittest.main()
