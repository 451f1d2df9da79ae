package echclient

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/echkit/ech"
)

// WellKnownPath is where a server publishes its ECH configs over HTTPS
// (draft-ietf-tls-wkech, Section 5), as the router does for its public name.
const WellKnownPath = "/.well-known/origin-svcb"

// maxWellKnownSize bounds a well-known document: one ECHConfigList of at
// most 64 KiB, in base64, for each of a few endpoints.
const maxWellKnownSize = 1 << 20

// WellKnown is the JSON document of draft-ietf-tls-wkech, Section 5.
type WellKnown struct {
	// RegenInterval is how often, in seconds, the publisher may change
	// its configs.
	RegenInterval int64 `json:"regeninterval"`
	// Endpoints are the ServiceMode HTTPS records to publish.
	Endpoints []WellKnownEndpoint `json:"endpoints"`
}

// WellKnownEndpoint is one element of [WellKnown.Endpoints]: a ServiceMode
// HTTPS record.
type WellKnownEndpoint struct {
	// Priority is the record's SvcPriority.
	Priority int `json:"priority"`
	// Params are the record's SvcParams, by name. The ech parameter holds
	// the base64 ECHConfigList (RFC 9848); "key5" is its generic name.
	Params map[string]json.RawMessage `json:"params"`
}

// ConfigList returns the ECHConfigList of the first endpoint that has one.
func (w *WellKnown) ConfigList() (ech.ConfigList, error) {
	for _, e := range w.Endpoints {
		for _, k := range []string{"ech", "key5"} {
			var s string
			if json.Unmarshal(e.Params[k], &s) == nil && s != "" {
				l, err := ech.ParseConfigListBase64(s)
				if err != nil {
					return nil, fmt.Errorf("%w: well-known endpoint: %w", ErrNoECHConfig, err)
				}
				return l, nil
			}
		}
	}
	return nil, fmt.Errorf("%w: no well-known endpoint has an ech parameter", ErrNoECHConfig)
}

// ParseWellKnown returns the ECHConfigList that body holds: the JSON
// document of draft-ietf-tls-wkech served at [WellKnownPath] (the list of
// its first endpoint with an ech parameter), or the list alone in base64,
// as the router serves it at /ech-config-list and as the ech parameter of
// an HTTPS record carries it. Errors wrap [ErrNoECHConfig].
func ParseWellKnown(body []byte) (ech.ConfigList, error) {
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) > 0 && trimmed[0] == '{' {
		var doc WellKnown
		if err := json.Unmarshal(trimmed, &doc); err != nil {
			return nil, fmt.Errorf("%w: well-known JSON: %v", ErrNoECHConfig, err)
		}
		return doc.ConfigList()
	}
	l, err := ech.ParseConfigListBase64(string(trimmed))
	if err != nil {
		return nil, fmt.Errorf("%w: neither well-known JSON nor a base64 list: %w", ErrNoECHConfig, err)
	}
	return l, nil
}

// FetchConfigList gets url with hc (nil means [http.DefaultClient]) and
// returns the ECHConfigList of the response, as [ParseWellKnown] reads it.
// It reads at most 1 MiB. The configs are only as trustworthy as the
// connection that fetched them: use https with a verified certificate.
func FetchConfigList(ctx context.Context, hc *http.Client, url string) (ech.ConfigList, error) {
	if hc == nil {
		hc = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("echclient: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("echclient: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: %s: %s", ErrNoECHConfig, url, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxWellKnownSize+1))
	if err != nil {
		return nil, fmt.Errorf("echclient: %s: %w", url, err)
	}
	if len(body) > maxWellKnownSize {
		return nil, fmt.Errorf("%w: %s: more than %d bytes", ErrNoECHConfig, url, maxWellKnownSize)
	}
	l, err := ParseWellKnown(body)
	if err != nil {
		return nil, fmt.Errorf("%w (%s)", err, url)
	}
	return l, nil
}
