from smolvm import SmolVM

vm = SmolVM()
vm.start()

# Space-saving snapshot — stores only what changed since the base image
snapshot = vm.snapshot(
    snapshot_id="nightly-checkpoint",
    snapshot_type="diff",
)
print(snapshot.snapshot_type)  # SnapshotType.DIFF

vm.close()
