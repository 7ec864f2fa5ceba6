vm = SmolVM.from_snapshot("my-checkpoint", resume_vm=True, force=True)
