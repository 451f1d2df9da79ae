package echclient

import (
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/echkit/ech"
	"github.com/echkit/ech/echtest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseWellKnown(t *testing.T) {
	list, err := echtest.NewKeySet(t, "public.example").ConfigList()
	require.NoError(t, err)
	b64 := list.String()
	tests := []struct {
		name string
		body string
		ok   bool
	}{
		// The router's document (draft-ietf-tls-wkech-12's shape).
		{"router document", `{"regeninterval":3600,"endpoints":[{"priority":1,"params":{"ech":"` + b64 + `"}}]}`, true},
		{"generic key5", `{"endpoints":[{"params":{"key5":"` + b64 + `"}}]}`, true},
		{"first endpoint without ech", `{"endpoints":[{"params":{"alpn":["h2"]}},{"params":{"ech":"` + b64 + `"}}]}`, true},
		{"base64 alone", b64 + "\n", true},
		{"no endpoints", `{"endpoints":[]}`, false},
		{"no ech parameter", `{"endpoints":[{"params":{"alpn":["h2"]}}]}`, false},
		{"ech not a string", `{"endpoints":[{"params":{"ech":5}}]}`, false},
		{"ech not base64", `{"endpoints":[{"params":{"ech":"%%%"}}]}`, false},
		{"ech not a config list", `{"endpoints":[{"params":{"ech":"AAAA"}}]}`, false},
		{"broken JSON", `{"endpoints":[`, false},
		{"empty", ``, false},
		{"HTML", `<html>not found</html>`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseWellKnown([]byte(tc.body))
			if !tc.ok {
				require.ErrorIs(t, err, ErrNoECHConfig)
				assert.True(t, strings.HasPrefix(err.Error(), "echclient: "), "%q", err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, list, got)
		})
	}
}

func TestFetchConfigList(t *testing.T) {
	list, err := echtest.NewKeySet(t, "public.example").ConfigList()
	require.NoError(t, err)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case WellKnownPath:
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(`{"endpoints":[{"priority":1,"params":{"ech":"` + list.String() + `"}}]}`))
		case "/ech-config-list":
			w.Write([]byte(list.String()))
		case "/huge":
			w.Write([]byte(strings.Repeat("A", maxWellKnownSize+4)))
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	hc := srv.Client()

	for _, path := range []string{WellKnownPath, "/ech-config-list"} {
		got, err := FetchConfigList(t.Context(), hc, srv.URL+path)
		require.NoError(t, err, path)
		assert.Equal(t, list, got, path)
	}
	_, err = FetchConfigList(t.Context(), hc, srv.URL+"/missing")
	require.ErrorIs(t, err, ErrNoECHConfig)
	assert.Contains(t, err.Error(), "404")
	_, err = FetchConfigList(t.Context(), hc, srv.URL+"/huge")
	require.ErrorIs(t, err, ErrNoECHConfig)
	assert.Contains(t, err.Error(), "more than")
	_, err = FetchConfigList(t.Context(), nil, srv.URL+WellKnownPath)
	require.Error(t, err, "the default client does not trust the test server")
}

func FuzzParseWellKnown(f *testing.F) {
	list, err := echtest.NewKeySet(f, "public.example").ConfigList()
	require.NoError(f, err)
	f.Add([]byte(`{"regeninterval":3600,"endpoints":[{"priority":1,"params":{"ech":"` + list.String() + `"}}]}`))
	f.Add([]byte(list.String()))
	f.Add([]byte(`{"endpoints":[{"params":{"key5":"AAAA"}}]}`))
	f.Add([]byte(base64.StdEncoding.EncodeToString([]byte{0, 4, 0xfe, 0x0d, 0, 0})))
	f.Fuzz(func(t *testing.T, body []byte) {
		l, err := ParseWellKnown(body)
		if err != nil {
			require.ErrorIs(t, err, ErrNoECHConfig)
			return
		}
		_, err = ech.ParseConfigList(l)
		require.NoError(t, err, "a returned list parses")
	})
}
