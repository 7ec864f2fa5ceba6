"""Delete every sandbox of the test data dir through the daemon (the Go
driver runs this after the test modules: the seed page's examples leave
their sandboxes, as the page does). Exits non-zero when one could not be
deleted."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smolvm import SmolVMManager, _client  # noqa: E402


def main() -> int:
    sdk = SmolVMManager()
    failed = 0
    for info in sdk.list_vms():
        try:
            sdk.delete(info.vm_id)
        except Exception as e:  # noqa: BLE001 - reported, the others still go
            print(f"cleanup: deleting {info.vm_id}: {e}", file=sys.stderr)
            failed += 1
    left = sdk.list_vms()
    if left:
        print(f"cleanup: still listed: {[i.vm_id for i in left]}", file=sys.stderr)
    return 1 if failed or left else 0


if __name__ == "__main__":
    if not _client.find_binary():
        sys.exit("cleanup: no smolvm binary (SMOLVM_BIN)")
    sys.exit(main())
