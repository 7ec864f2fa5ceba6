package api

import (
	"encoding/json"
	"testing"
)

// TestJSON: the served document is the YAML as JSON, OpenAPI 3.1.
func TestJSON(t *testing.T) {
	var doc struct {
		OpenAPI string         `json:"openapi"`
		Paths   map[string]any `json:"paths"`
	}
	if err := json.Unmarshal(JSON(), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.OpenAPI != "3.1.0" || doc.Paths["/v1/sandboxes"] == nil {
		t.Errorf("openapi %q, %d paths", doc.OpenAPI, len(doc.Paths))
	}
}
