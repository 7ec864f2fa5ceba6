package firecracker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// tapName derives the VM's TAP device name from its id (IFNAMSIZ allows 15
// characters): "fc" + 13 hex digits of sha256(id).
func tapName(id string) string {
	h := sha256.Sum256([]byte(id))
	return "fc" + hex.EncodeToString(h[:])[:13]
}

// guestMAC is spec.MAC, or a locally administered unicast MAC derived from
// the id.
func guestMAC(spec backend.Spec) string {
	if spec.MAC != "" {
		return spec.MAC
	}
	h := sha256.Sum256([]byte("mac:" + spec.ID))
	return fmt.Sprintf("06:%02x:%02x:%02x:%02x:%02x", h[0], h[1], h[2], h[3], h[4])
}

// setupTAP creates and brings up the VM's TAP device with `ip tuntap`. It
// needs root; without root it returns "" and notes in the VM log that the
// VM runs without a network.
func setupTAP(ctx context.Context, spec backend.Spec) (string, error) {
	if os.Geteuid() != 0 {
		noteLog(spec.Dir, "network requested but not running as root: no TAP device, the VM has no network")
		return "", nil
	}
	name := tapName(spec.ID)
	_ = runIP(ctx, "link", "del", name) // a leftover from a crashed run
	if err := runIP(ctx, "tuntap", "add", "dev", name, "mode", "tap"); err != nil {
		return "", err
	}
	if err := runIP(ctx, "link", "set", "dev", name, "up"); err != nil {
		_ = runIP(ctx, "link", "del", name)
		return "", err
	}
	noteLog(spec.Dir, "network: TAP "+name+" attached as "+IfaceID+" (no host address or NAT configured)")
	return name, nil
}

// removeTAP deletes the VM's TAP device, if any (root only).
func removeTAP(spec backend.Spec) {
	if os.Geteuid() != 0 {
		return
	}
	name := tapName(spec.ID)
	if _, err := os.Stat("/sys/class/net/" + name); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = runIP(ctx, "link", "del", name)
}

func runIP(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// noteLog appends a "smolvm:" line to DIR/firecracker.log.
func noteLog(dir, msg string) {
	f, err := os.OpenFile(filepath.Join(dir, logName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "smolvm: %s\n", msg)
}
