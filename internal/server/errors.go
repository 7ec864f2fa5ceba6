package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fixtext"
)

// Error codes the API adds to the SDK's (smolvm.ErrorCode).
const (
	codeNotFound         = "not_found"
	codeMethodNotAllowed = "method_not_allowed"
	codeInvalidRequest   = "invalid_request"
	codeTooLarge         = "request_too_large"
	codeUnauthorized     = "unauthorized"
	codeTimeout          = "timeout"
	codeUnavailable      = "unavailable"
	codeTooMany          = "too_many_requests"
)

// apiError is an error the API itself raises (not the SDK's): a code and a
// message, and the status it maps to by code.
type apiError struct {
	code, msg string
}

func (e *apiError) Error() string { return e.msg }

func errCode(code, msg string) error { return &apiError{code: code, msg: msg} }

// ErrorBody is the one error shape: every non-2xx response is
// {"error": ErrorDetail}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail: code is smolvm.ErrorCode's (or the API's own), recovery the
// CLI's words for the fix (the same text as `--json`), fix the typed fix.
type ErrorDetail struct {
	Code     string   `json:"code"`
	Message  string   `json:"message"`
	Recovery string   `json:"recovery,omitempty"`
	Fix      *FixBody `json:"fix,omitempty"`
}

// FixBody is a smolvm.Fix as JSON.
type FixBody struct {
	Action string            `json:"action"`
	Args   map[string]string `json:"args,omitempty"`
}

// detail turns any error into the error shape and its HTTP status.
func detail(err error) (ErrorDetail, int) {
	var ae *apiError
	if errors.As(err, &ae) {
		return ErrorDetail{Code: ae.code, Message: ae.msg}, statusOf(ae.code)
	}
	code := smolvm.ErrorCode(err)
	if code == "error" {
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			code = codeTimeout
		case errors.Is(err, context.Canceled):
			code = "canceled"
		}
	}
	d := ErrorDetail{Code: code, Message: message(err), Recovery: fixtext.Text(err)}
	if f, ok := smolvm.FixOf(err); ok && !f.IsZero() {
		d.Fix = &FixBody{Action: string(f.Action), Args: f.Args}
	}
	return d, statusOf(code)
}

func message(err error) string {
	var e *smolvm.Error
	if errors.As(err, &e) {
		return e.Message
	}
	return err.Error()
}

// statusOf is the HTTP status of an error code (api12.md).
func statusOf(code string) int {
	switch code {
	case "vm_not_found", "snapshot_not_found", "template_not_found", "remote_not_found", codeNotFound:
		return http.StatusNotFound
	case "vm_exists", "snapshot_exists", "snapshot_in_use", "snapshot_already_restored", "vm_not_running", "host_incompatible", "remote_exists":
		return http.StatusConflict
	case "invalid_config", "invalid_id", codeInvalidRequest:
		return http.StatusUnprocessableEntity
	case codeTooLarge:
		return http.StatusRequestEntityTooLarge
	case codeTooMany:
		return http.StatusTooManyRequests
	case codeUnauthorized:
		return http.StatusUnauthorized
	case codeMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case "image_not_built", "unsupported", codeUnavailable:
		return http.StatusServiceUnavailable
	case codeTimeout:
		return http.StatusGatewayTimeout
	case "remote_auth", "remote_unreachable": // a restore or fork pulling from the daemon's remote store
		return http.StatusBadGateway
	case "no_space":
		return http.StatusInsufficientStorage
	case "canceled":
		return 499 // the client went away; nobody reads it
	}
	return http.StatusInternalServerError
}

// writeError writes err in the one error shape.
func writeError(w http.ResponseWriter, err error) {
	d, status := detail(err)
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="smolvm"`)
	}
	writeJSON(w, status, ErrorBody{Error: d})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
