//go:build !linux

package echquic

import "net"

// batchConn is empty: datagrams are forwarded one at a time.
type batchConn struct{}

func newBatchConn(*flow) *batchConn { return nil }

func (p *Proxy) serveBatches(udp *net.UDPConn) error { return p.serveEach(udp, udp) }

func (p *Proxy) readBackendBatches(f *flow) { p.readBackend(f) }
