package fcapi

// Exported for the external tests (package fcapi_test), which can use
// fctest (it imports fcapi).

// FaultBody is faultBody.
type FaultBody = faultBody

// IsVsockConn reports whether c is the connection DialVsock returns.
func IsVsockConn(c any) bool { _, ok := c.(*vsockConn); return ok }
