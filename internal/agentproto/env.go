package agentproto

// ValidEnvName reports whether k may name a persisted environment variable
// (set_env): a shell identifier, letters, digits and '_', not starting with
// a digit. The agent writes persisted variables into a profile script as
// `export K=...`, so nothing else is accepted. The host checks the same
// rule when a VM is configured, so a bad name fails there, not at boot.
func ValidEnvName(k string) bool {
	if k == "" {
		return false
	}
	for i, c := range k {
		switch {
		case c == '_', c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
