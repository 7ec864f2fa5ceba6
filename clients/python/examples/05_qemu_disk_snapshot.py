from smolvm import SmolVM, SnapshotType

vm = SmolVM(backend="qemu")
vm.start()
vm.run("apk add python3")

# Fast, lightweight snapshot — disk only, no RAM
snapshot = vm.snapshot(
    snapshot_id="cold-boot-checkpoint",
    snapshot_type=SnapshotType.DISK,
)

# Later — restoring boots the sandbox fresh from the saved disk
vm = SmolVM.from_snapshot("cold-boot-checkpoint", resume_vm=True)
result = vm.run("python3 --version")  # python3 is already installed
