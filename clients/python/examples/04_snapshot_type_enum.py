from smolvm import SnapshotType

snapshot = vm.snapshot(snapshot_type=SnapshotType.DIFF)
