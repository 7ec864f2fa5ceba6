package smolvm_test

import (
	"context"
	"errors"
	"fmt"
	"log"

	"github.com/smolvm-go/smolvm"
)

// The README's quick start: create a VM from the default image, run a
// command, and reconnect to it by name.
func Example() {
	ctx := context.Background()
	vm, err := smolvm.New(ctx, smolvm.Config{Name: "my-vm"}) // debian, 512 MiB, 1 vCPU, network on
	if err != nil {
		log.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		log.Fatal(err)
	}
	res, err := vm.Run(ctx, "python3 -c 'print(6*7)'")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(res.ExitCode, res.OK(), res.Output())
	vm.Close() // releases handles; the VM keeps running

	vm, err = smolvm.Open(ctx, "my-vm") // e.g. from another process
	if err != nil {
		log.Fatal(err)
	}
	res, _ = vm.Run(ctx, "echo $((1+1)) >&2; exit 3") // a non-zero exit is a result, not an error
	fmt.Println(res.ExitCode, res.Stderr)
	vm.Delete(ctx)
	vm.Close()
	// Output:
	// 0 true 42
	// 3 2
}

// Checkpoint before a risky step, and roll back when it fails: the seed
// page's "checkpoint and retry".
func Example_checkpointAndRetry() {
	ctx := context.Background()
	vm, err := smolvm.New(ctx, smolvm.Config{Name: "agent-sandbox", Image: "busybox"})
	if err != nil {
		log.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		log.Fatal(err)
	}
	vm.Run(ctx, "echo configured > /root/state")

	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "before-experiment"}) // the VM stays paused
	if err != nil {
		log.Fatal(err)
	}
	vm.Close()

	vm, err = smolvm.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true})
	if err != nil {
		log.Fatal(err)
	}
	res, _ := vm.Run(ctx, "rm /root/state && exit 1")
	if !res.OK() {
		fmt.Println("experiment failed, rolling back")
		vm.Stop(ctx)
		vm.Delete(ctx)
		vm.Close()
		vm, err = smolvm.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true, Force: true})
		if err != nil {
			log.Fatal(err)
		}
		res, _ = vm.Run(ctx, "cat /root/state")
		fmt.Println(res.Output())
	}
	vm.Delete(ctx)
	vm.Close()

	m, _ := smolvm.NewManager(ctx, smolvm.Options{})
	defer m.Close()
	_, err = m.FromSnapshot(ctx, "missing-snapshot", smolvm.RestoreOptions{})
	fmt.Println(errors.Is(err, smolvm.ErrSnapshotNotFound))
	m.DeleteSnapshot(ctx, snap.ID)
	// Output:
	// experiment failed, rolling back
	// configured
	// true
}
