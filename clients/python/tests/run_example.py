"""Run one example file of ../examples unchanged, in this process, as a
script (__main__), and report what it left behind.

The seed page's fragments use names from the examples before them; the
test gives them those through the environment: SMOLVM_EXAMPLE_VM=<vm id>
binds ``vm`` to SmolVM.from_id(<vm id>), SMOLVM_EXAMPLE_SDK=1 binds ``sdk``
to an entered SmolVMManager(), and SMOLVM_EXAMPLE_IMPORTS=1 adds what the
page imported before (SmolVM, SmolVMManager, SnapshotType). Nothing else is
added. After the file ran, the names vm, result, snapshot and
snapshots (when it set them) are written as JSON to the file named by
SMOLVM_EXAMPLE_STATE. An exception from the example fails the run (exit 1,
traceback on stderr), as it would for a user.

Usage: python3 tests/run_example.py examples/NAME.py
"""

import json
import os
import runpy
import sys


def _describe(ns):
    out = {}
    vm = ns.get("vm")
    if vm is not None and hasattr(vm, "vm_id"):
        out["vm"] = {"vm_id": vm.vm_id, "status": vm.status.value}
    r = ns.get("result")
    if r is not None and hasattr(r, "exit_code"):
        out["result"] = {"ok": r.ok, "exit_code": r.exit_code, "output": r.output, "stderr": r.stderr}
    s = ns.get("snapshot")
    if s is not None and hasattr(s, "snapshot_id"):
        out["snapshot"] = {"snapshot_id": s.snapshot_id, "vm_id": s.vm_id, "snapshot_type": s.snapshot_type.value}
    ss = ns.get("snapshots")
    if isinstance(ss, list):
        out["snapshots"] = [x.snapshot_id for x in ss]
    return out


def main():
    path = sys.argv[1]
    init = {}
    if os.environ.get("SMOLVM_EXAMPLE_IMPORTS"):
        from smolvm import SmolVM, SmolVMManager, SnapshotType

        init.update(SmolVM=SmolVM, SmolVMManager=SmolVMManager, SnapshotType=SnapshotType)
    if os.environ.get("SMOLVM_EXAMPLE_VM"):
        from smolvm import SmolVM

        init["vm"] = SmolVM.from_id(os.environ["SMOLVM_EXAMPLE_VM"])
    if os.environ.get("SMOLVM_EXAMPLE_SDK"):
        from smolvm import SmolVMManager

        init["sdk"] = SmolVMManager().__enter__()
    ns = runpy.run_path(path, init_globals=init, run_name="__main__")
    state = os.environ.get("SMOLVM_EXAMPLE_STATE")
    if state:
        with open(state, "w", encoding="utf-8") as f:
            json.dump(_describe(ns), f)


if __name__ == "__main__":
    main()
