snapshots = sdk.list_snapshots(vm_id="my-vm")
