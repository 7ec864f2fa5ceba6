package cli

import (
	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fixtext"
)

// The fix words live in internal/fixtext (shared with the HTTP API); these
// are the CLI's names for them.
var fixWords = fixtext.Words

func usageFix(words string) smolvm.Fix { return fixtext.UsageFix(words) }

func renderFix(f smolvm.Fix) string { return fixtext.Render(f) }

func fixText(err error) string { return fixtext.Text(err) }
