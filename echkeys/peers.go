package echkeys

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"

	"github.com/echkit/ech/echclient"
)

// checkPeers returns nil if every peer decrypts config: for each, it
// fetches the peer's /ech-config-list over a TLS connection that offers
// only config, with the public name as the inner server name. A peer that
// has the key accepts ECH and its public name's server answers; one that
// lacks it rejects ECH, which fails the handshake with a
// [tls.ECHRejectionError]. The error wraps [ErrPeer] and names the first
// peer that failed.
func (m *Manager) checkPeers(ctx context.Context, config []byte) error {
	list, err := configList(config)
	if err != nil {
		return err
	}
	base := m.PeerTLSConfig.Clone()
	if base == nil {
		base = new(tls.Config)
	}
	base.ServerName = m.PublicName
	base.MinVersion = tls.VersionTLS13 // crypto/tls offers ECH in TLS 1.3 only
	base.EncryptedClientHelloConfigList = list
	for _, url := range m.Peers {
		if err := m.checkPeer(ctx, base, url); err != nil {
			return fmt.Errorf("%w: config_id %d: %s: %w", ErrPeer, configID(config), url, err)
		}
	}
	return nil
}

// checkPeer fetches the config list at url over a connection made with cfg.
func (m *Manager) checkPeer(ctx context.Context, cfg *tls.Config, url string) error {
	ctx, cancel := context.WithTimeout(ctx, m.PeerTimeout)
	defer cancel()
	// A transport of its own: its connections offer this config only and
	// are not reused for another.
	tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	_, err := echclient.FetchConfigList(ctx, &http.Client{Transport: tr}, url)
	return err
}
