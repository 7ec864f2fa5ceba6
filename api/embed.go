// Package api holds the HTTP API's contract, api/openapi.yaml (OpenAPI
// 3.1), embedded, and serves it as JSON (GET /openapi.json).
package api

import (
	_ "embed"
	"encoding/json"
	"sync"

	"gopkg.in/yaml.v3"
)

// YAML is api/openapi.yaml as written.
//
//go:embed openapi.yaml
var YAML []byte

var asJSON = sync.OnceValue(func() []byte {
	var doc any
	if err := yaml.Unmarshal(YAML, &doc); err != nil {
		panic("api/openapi.yaml: " + err.Error()) // caught by TestSpecLoads
	}
	b, err := json.Marshal(doc)
	if err != nil {
		panic("api/openapi.yaml as JSON: " + err.Error())
	}
	return b
})

// JSON is the spec as JSON.
func JSON() []byte { return asJSON() }
