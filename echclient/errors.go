package echclient

import "errors"

// Sentinel errors. Errors returned by this package wrap one of these, so
// callers can test for them with [errors.Is]; a dial error may wrap two, such
// as [ErrECHRequired] and the reason ECH was not available.
var (
	// ErrInvalidHost reports a host that is not a DNS name: empty, too long,
	// with an empty or overlong label, or an IP address.
	ErrInvalidHost = errors.New("echclient: invalid host name")
	// ErrDNSFailure reports a DNS query that got no usable answer: a
	// network error, a timeout, or a response code other than NOERROR and
	// NXDOMAIN. The error also wraps the cause, such as
	// [context.DeadlineExceeded].
	ErrDNSFailure = errors.New("echclient: DNS query failed")
	// ErrMalformedResponse reports a DNS response that does not parse or
	// does not answer the question asked.
	ErrMalformedResponse = errors.New("echclient: malformed DNS response")
	// ErrMalformedRecord reports an HTTPS record whose RDATA or SvcParams
	// break the rules of RFC 9460 or RFC 9848. A client ignores such a
	// record; Lookup returns this error only when no other record is usable.
	ErrMalformedRecord = errors.New("echclient: malformed HTTPS record")
	// ErrAliasChain reports an AliasMode or CNAME chain that loops or is
	// longer than this package follows.
	ErrAliasChain = errors.New("echclient: alias chain too long")
	// ErrNoRecord reports a name with no usable ServiceMode HTTPS record:
	// no record at all, an AliasMode record with TargetName ".", or only
	// records with a mandatory parameter this package does not know.
	ErrNoRecord = errors.New("echclient: no HTTPS record")
	// ErrNoECHConfig reports HTTPS records without an ech parameter that
	// crypto/tls can use.
	ErrNoECHConfig = errors.New("echclient: no ECH config published")
	// ErrECHRequired reports a dial under [RequireECH] that would have
	// connected without ECH. The error also wraps the reason.
	ErrECHRequired = errors.New("echclient: ECH required")
	// ErrECHRejected reports a server that rejected ECH without retry
	// configs while ECH is required, or rejected the retry configs it had
	// sent. The error also wraps the [tls.ECHRejectionError].
	ErrECHRejected = errors.New("echclient: server rejected ECH")
)
