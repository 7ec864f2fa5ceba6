package fcapi_test

// Schema test: every request body the client can send is captured on the
// wire and validated against the Firecracker swagger definition kept in
// testdata/firecracker-api.yaml (a copy of the v1.16 API contract). The
// validator is strict where Firecracker is (its serde types reject unknown
// fields), so a misspelled json tag fails this test; the negative cases at
// the bottom prove it.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/smolvm-go/smolvm/internal/fcapi"
	"github.com/smolvm-go/smolvm/internal/fcapi/fctest"
)

// swagger is the parsed API definition.
type swagger struct {
	paths       map[string]any
	definitions map[string]any
}

func loadSwagger(t *testing.T) *swagger {
	t.Helper()
	data, err := os.ReadFile("testdata/firecracker-api.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("parse swagger: %v", err)
	}
	sw := &swagger{paths: asMap(doc["paths"]), definitions: asMap(doc["definitions"])}
	if len(sw.paths) == 0 || len(sw.definitions) == 0 {
		t.Fatal("swagger file has no paths or definitions")
	}
	return sw
}

// asMap accepts both mapping shapes yaml.v3 produces.
func asMap(v any) map[string]any {
	switch m := v.(type) {
	case map[string]any:
		return m
	case map[any]any:
		out := make(map[string]any, len(m))
		for k, v := range m {
			out[fmt.Sprint(k)] = v
		}
		return out
	}
	return nil
}

// route finds the swagger path template matching a concrete path, and the
// path parameters it binds.
func (sw *swagger) route(path string) (tmpl string, params map[string]string, ok bool) {
	for p := range sw.paths {
		re := "^" + regexp.MustCompile(`\\\{([a-z_]+)\\\}`).ReplaceAllString(regexp.QuoteMeta(p), `(?P<$1>[^/]+)`) + "$"
		m := regexp.MustCompile(re).FindStringSubmatch(path)
		if m == nil {
			continue
		}
		params = map[string]string{}
		for i, name := range regexp.MustCompile(re).SubexpNames() {
			if name != "" {
				params[name] = m[i]
			}
		}
		return p, params, true
	}
	return "", nil, false
}

// bodySchema returns the schema of the body parameter of path+method.
func (sw *swagger) bodySchema(tmpl, method string) (map[string]any, bool) {
	op := asMap(asMap(sw.paths[tmpl])[strings.ToLower(method)])
	if op == nil {
		return nil, false
	}
	params, _ := op["parameters"].([]any)
	for _, p := range params {
		pm := asMap(p)
		if pm["in"] == "body" {
			return asMap(pm["schema"]), true
		}
	}
	return nil, true
}

func (sw *swagger) resolve(s map[string]any) (map[string]any, error) {
	for {
		ref, ok := s["$ref"].(string)
		if !ok {
			return s, nil
		}
		name, ok := strings.CutPrefix(ref, "#/definitions/")
		if !ok {
			return nil, fmt.Errorf("unsupported $ref %q", ref)
		}
		def := asMap(sw.definitions[name])
		if def == nil {
			return nil, fmt.Errorf("dangling $ref %q", ref)
		}
		s = def
	}
}

// validate checks a decoded JSON value (json.Number for numbers) against a
// schema and returns every violation, each prefixed with its JSON path.
func (sw *swagger) validate(at string, schema map[string]any, v any) []string {
	s, err := sw.resolve(schema)
	if err != nil {
		return []string{at + ": " + err.Error()}
	}
	var errs []string
	bad := func(f string, a ...any) { errs = append(errs, at+": "+fmt.Sprintf(f, a...)) }

	typ, _ := s["type"].(string)
	if typ == "" && s["properties"] != nil {
		typ = "object"
	}
	switch typ {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			bad("want object, got %T", v)
			return errs
		}
		reqd, _ := s["required"].([]any)
		for _, r := range reqd {
			if _, ok := obj[r.(string)]; !ok {
				bad("required field %q missing", r)
			}
		}
		props := asMap(s["properties"])
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if ps, ok := props[k]; ok {
				errs = append(errs, sw.validate(at+"."+k, asMap(ps), obj[k])...)
				continue
			}
			// Firecracker deserializes with deny_unknown_fields: a field
			// not in the schema is an error unless additionalProperties
			// explicitly allows it.
			switch ap := s["additionalProperties"].(type) {
			case bool:
				if !ap {
					bad("unknown field %q", k)
				}
			case nil:
				bad("unknown field %q", k)
			default:
				errs = append(errs, sw.validate(at+"."+k, asMap(ap), obj[k])...)
			}
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			bad("want array, got %T", v)
			return errs
		}
		for i, e := range arr {
			errs = append(errs, sw.validate(fmt.Sprintf("%s[%d]", at, i), asMap(s["items"]), e)...)
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			bad("want string, got %T", v)
			return errs
		}
		if enum, ok := s["enum"].([]any); ok {
			found := false
			for _, e := range enum {
				if fmt.Sprint(e) == str {
					found = true
				}
			}
			if !found {
				bad("value %q not in enum %v", str, enum)
			}
		}
	case "integer":
		n, ok := v.(json.Number)
		if !ok {
			bad("want integer, got %T", v)
			return errs
		}
		i, err := n.Int64()
		if err != nil {
			bad("want integer, got %s", n)
			return errs
		}
		if m, ok := s["minimum"].(int); ok && i < int64(m) {
			bad("%d below minimum %d", i, m)
		}
		if m, ok := s["maximum"].(int); ok && i > int64(m) {
			bad("%d above maximum %d", i, m)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			bad("want boolean, got %T", v)
		}
	default:
		bad("schema without a supported type: %v", s)
	}
	return errs
}

func decodeJSON(t *testing.T, b []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("body %q is not JSON: %v", b, err)
	}
	return v
}

// schemaServer answers every request the way Firecracker documents it:
// 204 for PUT/PATCH, JSON bodies for the GETs we use.
func schemaServer() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/":
			fctest.WriteJSON(w, 200, map[string]string{"app_name": "Firecracker", "id": "vm-1", "state": "Running", "vmm_version": "1.16.0"})
		case r.Method == http.MethodGet && r.URL.Path == "/version":
			fctest.WriteJSON(w, 200, map[string]string{"firecracker_version": "1.16.0"})
		case r.Method == http.MethodGet && r.URL.Path == "/machine-config":
			fctest.WriteJSON(w, 200, map[string]any{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false, "huge_pages": "None"})
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	})
}

// sendEverything calls every client method once with realistic values.
// allMethods below must list exactly what it sends.
func sendEverything(t *testing.T, c *fcapi.Client) {
	t.Helper()
	ctx := context.Background()
	burst := int64(1 << 20)
	rl := &fcapi.RateLimiter{
		Bandwidth: &fcapi.TokenBucket{Size: 10 << 20, OneTimeBurst: &burst, RefillTime: 100},
		Ops:       &fcapi.TokenBucket{Size: 1000, RefillTime: 1000},
	}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	must("logger", c.PutLogger(ctx, fcapi.Logger{LogPath: "/run/vm/fc.log", Level: fcapi.LogInfo, ShowLevel: true, ShowLogOrigin: true, Module: "api_server::request"}))
	must("metrics", c.PutMetrics(ctx, fcapi.Metrics{MetricsPath: "/run/vm/metrics.fifo"}))
	must("boot-source", c.PutBootSource(ctx, fcapi.BootSource{
		KernelImagePath: "/images/vmlinux",
		InitrdPath:      "/images/initramfs.cpio",
		BootArgs:        "console=ttyS0 reboot=k panic=1 pci=off smol.root=/dev/vda",
	}))
	must("machine-config", c.PutMachineConfig(ctx, fcapi.MachineConfig{VCPUCount: 2, MemSizeMiB: 512, TrackDirtyPages: false, SMT: true, HugePages: fcapi.HugePagesNone}))
	must("drive", c.PutDrive(ctx, fcapi.Drive{
		DriveID: "rootfs", PathOnHost: "rootfs", IsRootDevice: false, IsReadOnly: false,
		PartUUID: "0eaa91a0-01", CacheType: fcapi.CacheWriteback, IOEngine: fcapi.IOEngineSync, RateLimiter: rl,
	}))
	must("network", c.PutNetworkInterface(ctx, fcapi.NetworkInterface{
		IfaceID: "eth0", HostDevName: "fc-0123456789ab", GuestMAC: "06:00:ac:10:00:02", MTU: 1500,
		RxRateLimiter: rl, TxRateLimiter: &fcapi.RateLimiter{Bandwidth: &fcapi.TokenBucket{Size: 1, RefillTime: 1}},
	}))
	must("vsock", c.PutVsock(ctx, fcapi.Vsock{GuestCID: 3, UDSPath: "/run/vm/vsock.sock"}))
	must("start", c.StartInstance(ctx))
	must("flush", c.Action(ctx, fcapi.ActionFlushMetrics))
	must("ctrl-alt-del", c.Action(ctx, fcapi.ActionSendCtrlAltDel))
	must("pause", c.Pause(ctx))
	must("snapshot full", c.CreateSnapshot(ctx, fcapi.SnapshotCreate{SnapshotType: fcapi.SnapshotFull, SnapshotPath: "/snap/vmstate", MemFilePath: "/snap/memory"}))
	must("snapshot diff", c.CreateSnapshot(ctx, fcapi.SnapshotCreate{SnapshotType: fcapi.SnapshotDiff, SnapshotPath: "/snap/vmstate", MemFilePath: "/snap/memory"}))
	must("resume", c.Resume(ctx))
	must("patch drive", c.PatchDrive(ctx, fcapi.PartialDrive{DriveID: "rootfs", PathOnHost: "/vms/b/disk.raw", RateLimiter: rl}))
	must("load", c.LoadSnapshot(ctx, fcapi.SnapshotLoad{
		SnapshotPath:     "/snap/vmstate",
		MemBackend:       &fcapi.MemoryBackend{BackendType: fcapi.MemBackendFile, BackendPath: "/snap/memory"},
		TrackDirtyPages:  true,
		ResumeVM:         true,
		NetworkOverrides: []fcapi.NetworkOverride{{IfaceID: "eth0", HostDevName: "fc-ba9876543210"}},
		VsockOverride:    &fcapi.VsockOverride{UDSPath: "/run/vm2/vsock.sock"},
		ClockRealtime:    true,
		HugePages:        fcapi.HugePagesSnapshot,
	}))
	must("load uffd minimal", c.LoadSnapshot(ctx, fcapi.SnapshotLoad{
		SnapshotPath: "/snap/vmstate",
		MemBackend:   &fcapi.MemoryBackend{BackendType: fcapi.MemBackendUffd, BackendPath: "/run/uffd.sock"},
	}))
	info, err := c.InstanceInfo(ctx)
	must("instance info", err)
	if info.State != fcapi.StateRunning || info.ID != "vm-1" || info.AppName != "Firecracker" || info.VMMVersion != "1.16.0" {
		t.Errorf("InstanceInfo decoded as %+v", info)
	}
	v, err := c.Version(ctx)
	must("version", err)
	if v != "1.16.0" {
		t.Errorf("Version = %q", v)
	}
	mc, err := c.GetMachineConfig(ctx)
	must("get machine-config", err)
	if mc.VCPUCount != 2 || mc.MemSizeMiB != 256 {
		t.Errorf("GetMachineConfig decoded as %+v", mc)
	}
}

// allMethods is every (method, path template) the client can send.
var allMethods = []string{
	"GET /", "GET /machine-config", "GET /version",
	"PATCH /drives/{drive_id}", "PATCH /vm",
	"PUT /actions", "PUT /boot-source", "PUT /drives/{drive_id}", "PUT /logger",
	"PUT /machine-config", "PUT /metrics", "PUT /network-interfaces/{iface_id}",
	"PUT /snapshot/create", "PUT /snapshot/load", "PUT /vsock",
}

func TestRequestBodiesMatchSchema(t *testing.T) {
	sw := loadSwagger(t)
	rec := &fctest.Recorder{Next: schemaServer()}
	c := fcapi.New(fctest.UnixServer(t, rec))
	defer c.Close()
	sendEverything(t, c)

	seen := map[string]bool{}
	for _, r := range rec.All() {
		tmpl, params, ok := sw.route(r.Path)
		if !ok {
			t.Errorf("%s: no such path in the API", r)
			continue
		}
		key := r.Method + " " + tmpl
		seen[key] = true
		schema, ok := sw.bodySchema(tmpl, r.Method)
		if !ok {
			t.Errorf("%s: method not defined for %s", r, tmpl)
			continue
		}
		if schema == nil {
			if len(r.Body) != 0 {
				t.Errorf("%s: sent a body %q but the operation takes none", r, r.Body)
			}
			continue
		}
		if len(r.Body) == 0 {
			t.Errorf("%s: no body sent but the operation takes %v", r, schema)
			continue
		}
		body := decodeJSON(t, r.Body)
		for _, e := range sw.validate("body", schema, body) {
			t.Errorf("%s: %s\n  body: %s", r, e, r.Body)
		}
		// Firecracker rejects a body whose id differs from the path's.
		obj, _ := body.(map[string]any)
		for name, val := range params {
			if got, ok := obj[name]; ok && got != val {
				t.Errorf("%s: path %s=%q but body %s=%v", r, name, val, name, got)
			}
		}
	}
	var got []string
	for k := range seen {
		got = append(got, k)
	}
	sort.Strings(got)
	want := slices.Clone(allMethods)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Errorf("operations sent:\n got %v\nwant %v", got, want)
	}
}

// TestResponseTypesMatchSchema checks the json tags of the types we decode
// answers into (a misspelled tag there would silently decode to zero).
func TestResponseTypesMatchSchema(t *testing.T) {
	sw := loadSwagger(t)
	for _, tc := range []struct {
		def string
		v   any
	}{
		{"InstanceInfo", fcapi.InstanceInfo{AppName: "Firecracker", ID: "vm-1", State: fcapi.StatePaused, VMMVersion: "1.16.0"}},
		{"InstanceInfo", fcapi.InstanceInfo{AppName: "Firecracker", ID: "vm-1", State: fcapi.StateNotStarted, VMMVersion: "1.16.0"}},
		{"FirecrackerVersion", fcapi.FirecrackerVersion{FirecrackerVersion: "1.16.0"}},
		{"MachineConfiguration", fcapi.MachineConfig{VCPUCount: 1, MemSizeMiB: 128}},
		{"Error", fcapi.FaultBody{FaultMessage: "boom"}},
	} {
		b, _ := json.Marshal(tc.v)
		for _, e := range sw.validate(tc.def, map[string]any{"$ref": "#/definitions/" + tc.def}, decodeJSON(t, b)) {
			t.Errorf("%T: %s", tc.v, e)
		}
	}
}

// TestSchemaValidatorCatchesMistakes proves the validator fails on the
// mistakes it exists to catch: a misspelled tag (top level and nested), a
// wrong enum value, a wrong type, a value out of range.
func TestSchemaValidatorCatchesMistakes(t *testing.T) {
	sw := loadSwagger(t)
	type typoBootSource struct { // kernel_image_path misspelled
		KernelImagePath string `json:"kernel_imge_path"`
		BootArgs        string `json:"boot_args,omitempty"`
	}
	type typoOptional struct { // optional field misspelled
		KernelImagePath string `json:"kernel_image_path"`
		BootArgs        string `json:"boot_arg"`
	}
	type typoBackend struct {
		BackendType string `json:"backend_typ"`
		BackendPath string `json:"backend_path"`
	}
	type typoLoad struct {
		SnapshotPath string       `json:"snapshot_path"`
		MemBackend   *typoBackend `json:"mem_backend"`
	}
	type vcpuString struct {
		VCPUCount  string `json:"vcpu_count"`
		MemSizeMiB int    `json:"mem_size_mib"`
	}
	cases := []struct {
		name, def string
		v         any
		want      string
	}{
		{"misspelled required tag", "BootSource", typoBootSource{KernelImagePath: "/k"}, `unknown field "kernel_imge_path"`},
		{"misspelled required tag leaves it missing", "BootSource", typoBootSource{KernelImagePath: "/k"}, `required field "kernel_image_path" missing`},
		{"misspelled optional tag", "BootSource", typoOptional{KernelImagePath: "/k", BootArgs: "x"}, `unknown field "boot_arg"`},
		{"misspelled nested tag", "SnapshotLoadParams", typoLoad{SnapshotPath: "/s", MemBackend: &typoBackend{"File", "/m"}}, `body.mem_backend: unknown field "backend_typ"`},
		{"enum is case sensitive", "SnapshotCreateParams", fcapi.SnapshotCreate{SnapshotType: "full", SnapshotPath: "/s", MemFilePath: "/m"}, `not in enum`},
		{"wrong type", "MachineConfiguration", vcpuString{VCPUCount: "2", MemSizeMiB: 128}, `want integer`},
		{"below minimum", "Vsock", fcapi.Vsock{GuestCID: 2, UDSPath: "/v"}, `below minimum 3`},
		{"above maximum", "MachineConfiguration", fcapi.MachineConfig{VCPUCount: 33, MemSizeMiB: 128}, `above maximum 32`},
		{"missing required nested", "SnapshotLoadParams", map[string]any{"snapshot_path": "/s", "mem_backend": map[string]any{"backend_type": "File"}}, `body.mem_backend: required field "backend_path" missing`},
	}
	for _, tc := range cases {
		b, _ := json.Marshal(tc.v)
		errs := sw.validate("body", map[string]any{"$ref": "#/definitions/" + tc.def}, decodeJSON(t, b))
		if !strings.Contains(strings.Join(errs, "\n"), tc.want) {
			t.Errorf("%s: %s validated with errors %q, want one containing %q", tc.name, b, errs, tc.want)
		}
	}
	// And the positive twin of the first case passes.
	b, _ := json.Marshal(fcapi.BootSource{KernelImagePath: "/k", BootArgs: "x"})
	if errs := sw.validate("body", map[string]any{"$ref": "#/definitions/BootSource"}, decodeJSON(t, b)); len(errs) != 0 {
		t.Errorf("valid BootSource rejected: %v", errs)
	}
}
