package server

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/smolvm-go/smolvm/api"
)

// validator checks requests against api/openapi.yaml (kin-openapi) before
// a handler runs: path and query parameters, and JSON bodies. Streamed
// bodies (files, exec stdin) are not read here.
type validator struct {
	doc    *openapi3.T
	router routers.Router
}

// LoadSpec loads and validates api/openapi.yaml.
func LoadSpec(ctx context.Context) (*openapi3.T, error) {
	doc, err := openapi3.NewLoader().LoadFromData(api.YAML)
	if err != nil {
		return nil, err
	}
	if err := doc.Validate(ctx); err != nil {
		return nil, err
	}
	return doc, nil
}

func newValidator() (*validator, error) {
	doc, err := LoadSpec(context.Background())
	if err != nil {
		return nil, err
	}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		return nil, err
	}
	return &validator{doc: doc, router: router}, nil
}

// request validates r; the error is invalid_request (or request_too_large).
func (v *validator) request(r *http.Request) error {
	route, params, err := v.router.FindRoute(r)
	if err != nil {
		return nil // the mux answers 404/405
	}
	in := &openapi3filter.RequestValidationInput{Request: r, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, MultiError: false}}
	if rawBody(r) || !isJSON(r.Header.Get("Content-Type")) {
		in.Options.ExcludeRequestBody = true
	}
	err = openapi3filter.ValidateRequest(r.Context(), in)
	if err == nil {
		return nil
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errCode(codeTooLarge, "request body too large")
	}
	var re *openapi3filter.RequestError
	if errors.As(err, &re) {
		msg := re.Error()
		if i := strings.Index(msg, "\nSchema:"); i > 0 {
			msg = msg[:i]
		}
		if re.Parameter != nil && re.Parameter.In == "path" && re.Parameter.Name == "id" {
			return errCode("invalid_id", msg) // as the SDK's validators say it
		}
		return errCode(codeInvalidRequest, msg)
	}
	return errCode(codeInvalidRequest, err.Error())
}
