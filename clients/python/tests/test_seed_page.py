"""Every Python example of the seed's snapshot page, run unchanged against a
real daemon and real VMs, in the page's order.

Each example is a file of ../examples, copied verbatim from the page, run
as a script in a fresh interpreter (tests/run_example.py) with no set-up
step: the first one finds no daemon and the client starts it. The page's
fragments use the ``vm`` or ``sdk`` of the examples before them: the test
hands them one (see run_example.py) and puts the sandbox into the state the
page implies (running, or the snapshot id free). Our guest image is Debian:
the page's ``apk add`` lines are commands that exit non-zero, not errors.
After each example the test checks what the page says happens.

The tests share sandboxes (the class keeps their ids) and run in order.
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _support import EXAMPLES, RUNNER, Env

from smolvm import (  # noqa: E402
    SmolVM,
    SnapshotAlreadyRestoredError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    SnapshotType,
    VMState,
)

env = None


def setUpModule():
    global env
    env = Env()
    # module cleanups run even when setUpModule fails
    unittest.addModuleCleanup(env.close)


class SeedPage(unittest.TestCase):
    maxDiff = None
    vm_a = None  # the sandbox of examples 01, 02, 04, 06, 07
    vm_b = None  # the sandbox of example 03 (diff), reused by 12
    auto_id = None

    def example(self, name, vm=None, sdk=False, fragment=False):
        """Run examples/name; return its stdout lines and its state. A
        fragment gets the page's earlier imports (see run_example.py)."""
        e = dict(os.environ)
        for k in ("SMOLVM_EXAMPLE_VM", "SMOLVM_EXAMPLE_SDK", "SMOLVM_EXAMPLE_IMPORTS"):
            e.pop(k, None)
        if fragment or vm or sdk:
            e["SMOLVM_EXAMPLE_IMPORTS"] = "1"
        if vm:
            e["SMOLVM_EXAMPLE_VM"] = vm
        if sdk:
            e["SMOLVM_EXAMPLE_SDK"] = "1"
        with tempfile.NamedTemporaryFile(suffix=".json") as st:
            e["SMOLVM_EXAMPLE_STATE"] = st.name
            p = subprocess.run(
                [sys.executable, RUNNER, os.path.join(EXAMPLES, name)],
                env=e,
                capture_output=True,
                timeout=300,
            )
            out = p.stdout.decode("utf-8", "replace")
            self.assertEqual(
                p.returncode, 0, f"{name} failed (exit {p.returncode}):\n{out}\n{p.stderr.decode('utf-8', 'replace')}"
            )
            with open(st.name, encoding="utf-8") as f:
                state = json.load(f)
        return out.splitlines(), state

    @property
    def sdk(self):
        return env.sdk

    def test_01_create_snapshot(self):
        out, st = self.example("01_create_snapshot.py")
        self.assertEqual(out, ["Snapshot created: my-checkpoint"])
        snap = self.sdk.get_snapshot("my-checkpoint")
        self.assertEqual(snap.snapshot_type, SnapshotType.FULL)
        self.assertEqual(snap.vm_id, st["vm"]["vm_id"])
        # "By default, the VM stays paused after a snapshot."
        self.assertEqual(self.sdk.get(snap.vm_id).status, VMState.PAUSED)
        type(self).vm_a = snap.vm_id

    def test_02_resume_source(self):
        # The page's alternative to example 01's snapshot line: a running
        # vm, the id free. A marker shows later what a restore brings back.
        vm = SmolVM.from_id(self.vm_a)
        vm.start()
        self.assertTrue(vm.run("echo restored-marker > /root/marker").ok)
        self.sdk.delete_snapshot("my-checkpoint")
        out, st = self.example("02_resume_source.py", vm=self.vm_a)
        self.assertEqual(out, [])
        self.assertEqual(st["snapshot"]["snapshot_id"], "my-checkpoint")
        # "VM is still running — you can continue using it"
        self.assertEqual(st["vm"]["status"], "running")
        self.assertEqual((st["result"]["ok"], st["result"]["output"]), (True, "still running"))
        self.assertTrue(vm.run("echo changed-after-snapshot > /root/marker").ok)

    def test_03_diff_snapshot(self):
        out, st = self.example("03_diff_snapshot.py")
        self.assertEqual(out, ["SnapshotType.DIFF"])
        self.assertEqual(self.sdk.get_snapshot("nightly-checkpoint").snapshot_type, SnapshotType.DIFF)
        type(self).vm_b = st["vm"]["vm_id"]

    def test_04_snapshot_type_enum(self):
        out, st = self.example("04_snapshot_type_enum.py", vm=self.vm_a)
        self.assertEqual(st["snapshot"]["snapshot_type"], "diff")
        # "If you omit snapshot_id, SmolVM generates one automatically"
        self.assertTrue(st["snapshot"]["snapshot_id"].startswith("snap-" + self.vm_a + "-"), st)
        type(self).auto_id = st["snapshot"]["snapshot_id"]

    def test_05_qemu_disk_snapshot(self):
        out, st = self.example("05_qemu_disk_snapshot.py")
        self.assertEqual(self.sdk.get_snapshot("cold-boot-checkpoint").snapshot_type, SnapshotType.DISK)
        # the restored sandbox booted fresh from the saved disk and runs
        self.assertEqual(st["vm"]["status"], "running")
        self.assertTrue(st["result"]["ok"], st)
        self.assertTrue(st["result"]["output"].startswith("Python 3"), st)

    def test_06_restore(self):
        out, st = self.example("06_restore.py")
        self.assertEqual(out[:2], [f"Restored VM: {self.vm_a}", "Status: VMState.RUNNING"])
        self.assertEqual(st["vm"], {"vm_id": self.vm_a, "status": "running"})
        # "The VM is back exactly where it was": the file as it was at the
        # snapshot, not as changed after it.
        marker = SmolVM.from_id(self.vm_a).run("cat /root/marker")
        self.assertEqual(marker.output, "restored-marker")

    def test_07_restore_once_then_force(self):
        # "A snapshot can only be restored once by default."
        with self.assertRaises(SnapshotAlreadyRestoredError) as cm:
            SmolVM.from_snapshot("my-checkpoint", resume_vm=True)
        self.assertEqual(cm.exception.code, "snapshot_already_restored")
        self.assertIn("force", cm.exception.recovery)
        out, st = self.example("07_restore_force.py", fragment=True)
        self.assertEqual(st["vm"], {"vm_id": self.vm_a, "status": "running"})
        self.assertGreaterEqual(self.sdk.get_snapshot("my-checkpoint").restore_count, 2)

    def test_08_list_snapshots(self):
        out, _ = self.example("08_list_snapshots.py")
        self.assertIn(f"my-checkpoint  vm={self.vm_a}  restored=True", out)
        self.assertIn(f"nightly-checkpoint  vm={self.vm_b}  restored=False", out)
        ids = {line.split()[0] for line in out}
        self.assertTrue({"my-checkpoint", "nightly-checkpoint", "cold-boot-checkpoint", self.auto_id} <= ids, out)

    def test_09_list_filter(self):
        _, st = self.example("09_list_filter.py", sdk=True)
        self.assertEqual(st["snapshots"], [])  # no sandbox is called my-vm
        mine = {s.snapshot_id for s in self.sdk.list_snapshots(vm_id=self.vm_a)}
        self.assertEqual(mine, {"my-checkpoint", self.auto_id})

    def test_10_error_handling(self):
        # Run before the delete example: my-checkpoint still exists.
        out, _ = self.example("12_error_handling.py", vm=self.vm_b)
        self.assertEqual(out, ["A snapshot with this ID already exists", "Snapshot not found"])

    def test_11_delete_snapshot(self):
        # "You cannot delete a snapshot while a restored VM from that
        # snapshot is still running."
        with self.assertRaises(SnapshotInUseError):
            self.sdk.delete_snapshot("my-checkpoint")
        SmolVM.from_id(self.vm_a).stop()
        out, _ = self.example("10_delete_snapshot.py")
        self.assertEqual(out, [])
        with self.assertRaises(SnapshotNotFoundError):
            self.sdk.get_snapshot("my-checkpoint")
        self.assertNotIn("my-checkpoint", {s.snapshot_id for s in self.sdk.list_snapshots()})

    def test_12_checkpoint_and_retry(self):
        out, st = self.example("11_checkpoint_and_retry.py")
        self.assertEqual(out, ["Experiment failed — rolling back", "42"])
        self.assertEqual(st["result"]["output"], "42")


if __name__ == "__main__":
    unittest.main()
