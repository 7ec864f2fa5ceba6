"""Shared set-up of the integration tests: a data dir of their own, the
daemon the client starts on first use, and cleaning up after.

The Go test clients/python/python_test.go runs these tests (scripts/test):
it builds smolvm from this tree, sets SMOLVM_BIN and SMOLVM_PY_TEST_DIR,
runs the test modules in parallel against one daemon, and removes what
they leave. Run by hand (``python3 -m unittest discover -s tests`` in
clients/python, with SMOLVM_BIN or smolvm on PATH), each module makes a
data dir of its own and stops the daemon it started.
"""

import os
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
RUNNER = os.path.join(ROOT, "tests", "run_example.py")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from smolvm import SmolVMManager, _client  # noqa: E402


class Env:
    """The test data dir; owned when this process made it."""

    def __init__(self) -> None:
        for k in ("SMOLVM_API_SOCKET", "SMOLVM_API_URL", "SMOLVM_API_TOKEN"):
            os.environ.pop(k, None)
        if _client.find_binary() is None:
            raise RuntimeError(
                "no smolvm binary: set SMOLVM_BIN (go build -o bin/smolvm ./cmd/smolvm) or put smolvm on PATH"
            )
        d = os.environ.get("SMOLVM_PY_TEST_DIR")
        self.owned = not d
        self.dir = d or tempfile.mkdtemp(prefix="smolvm-py-")
        os.environ["SMOLVM_DATA_DIR"] = os.path.join(self.dir, "data")
        if self.owned:  # the daemon's socket and log, and the VMs' sockets
            os.environ["SMOLVM_RUN_DIR"] = os.path.join(self.dir, "run")
        pp = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = ROOT + (os.pathsep + pp if pp else "")
        # Connect (and start the daemon) here, before any example does.
        try:
            self.sdk = SmolVMManager()
        except BaseException:
            if self.owned:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def close(self) -> None:
        if not self.owned:
            return  # the Go driver cleans up after every module
        try:
            for info in self.sdk.list_vms():
                try:
                    self.sdk.delete(info.vm_id)
                except Exception as e:  # noqa: BLE001 - best effort, reported
                    print(f"cleanup: deleting {info.vm_id}: {e}", file=sys.stderr)
        finally:
            pid = self.sdk._client.started_pid
            if pid:
                stop_pid(pid)
            shutil.rmtree(self.dir, ignore_errors=True)


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM pid and wait (bounded) for it to go, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pids_mentioning(text: str) -> list:
    """Live processes whose command line contains text."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if text.encode() in cmd:
            out.append(int(name))
    return out
