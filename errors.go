package ech

import "errors"

// Sentinel errors. Errors returned by this package wrap one of these, so
// callers can test for them with [errors.Is]. Error strings never contain
// key material, and of a decrypted ClientHelloInner at most the codepoint of
// an offending extension.
//
// The alert sentinels correspond to the TLS alerts that [NewConn] (for the
// first ClientHello) or [Conn.Read] (for a second ClientHello after a
// HelloRetryRequest) sends to the client before returning the error
// (RFC 8446, Section 6; RFC 9849, Sections 7 and 7.1).
var (
	// ErrDecodeError reports a malformed record, ClientHello or extension
	// (alert decode_error).
	ErrDecodeError = errors.New("ech: decode error")
	// ErrIllegalParameter reports a well-formed message that breaks a rule
	// of RFC 9849 (alert illegal_parameter).
	ErrIllegalParameter = errors.New("ech: illegal parameter")
	// ErrMissingExtension reports a second ClientHello without the ECH
	// extension after ECH was accepted (alert missing_extension).
	ErrMissingExtension = errors.New("ech: missing extension")
	// ErrDecryptError reports a second ClientHello that does not decrypt
	// after ECH was accepted (alert decrypt_error).
	ErrDecryptError = errors.New("ech: decrypt error")
	// ErrUnexpectedMessage reports a record of another type inside a
	// fragmented ClientHello, or a ClientHello that does not end at a
	// record boundary (alert unexpected_message, RFC 8446, Section 5.1).
	ErrUnexpectedMessage = errors.New("ech: unexpected message")
	// ErrRecordOverflow reports a record longer than 2^14 bytes, or 2^14+256
	// once protected (alert record_overflow, RFC 8446, Section 5.1).
	ErrRecordOverflow = errors.New("ech: record overflow")

	// ErrHelloTooLarge reports a ClientHello larger than the configured
	// limit (see [WithMaxHelloSize]); the client gets a decode_error alert.
	ErrHelloTooLarge = errors.New("ech: ClientHello too large")
	// ErrNotTLS reports a first record that is not a TLS handshake record
	// carrying a ClientHello; the client gets an unexpected_message alert
	// (RFC 8446, Section 6.2: "an inappropriate message").
	ErrNotTLS = errors.New("ech: not a TLS ClientHello")

	// ErrMalformedConfig reports an ECHConfig or ECHConfigList that does not
	// parse or breaks a length or content rule of RFC 9849, Section 4.
	ErrMalformedConfig = errors.New("ech: malformed ECHConfig")
	// ErrUnsupportedVersion reports an ECHConfig version other than 0xfe0d.
	ErrUnsupportedVersion = errors.New("ech: unsupported ECHConfig version")
	// ErrInvalidPublicName reports a public_name that is not a valid LDH DNS
	// name, or that is an IP address (RFC 9849, Section 4).
	ErrInvalidPublicName = errors.New("ech: invalid public_name")
	// ErrUnsupportedAlgorithm reports an HPKE KEM, KDF or AEAD this package
	// does not implement or that is not valid for ECH.
	ErrUnsupportedAlgorithm = errors.New("ech: unsupported HPKE algorithm")
	// ErrInvalidKey reports a private key that does not parse for its KEM or
	// does not match the public key of its ECHConfig.
	ErrInvalidKey = errors.New("ech: invalid key")
	// ErrMalformedPEM reports an ECH PEM file (RFC 9934) that does not hold
	// exactly one ECHCONFIG block and at most one PRIVATE KEY block.
	ErrMalformedPEM = errors.New("ech: malformed ECH PEM file")
	// ErrNoKeys reports an empty key set where keys are required, and a
	// call of [NewConn] with neither [WithKeySet] nor [WithKeys].
	ErrNoKeys = errors.New("ech: no keys")
)

// HelloError is the error of [NewConn] for a ClientHello it refused (or
// could not read), with what it had learned of the hello by then, for logs
// and metrics. It wraps the error that says why, which wraps one of the
// sentinels above.
type HelloError struct {
	// Err is the reason the hello was refused.
	Err error
	// Parsed reports whether the ClientHelloOuter parsed; when it did not,
	// the fields below are zero because nothing is known.
	Parsed bool
	// ECHPresented reports whether the ClientHelloOuter carried an
	// encrypted_client_hello extension.
	ECHPresented bool
	// OuterServerName is the server_name of the ClientHelloOuter, the
	// name the client sent in the clear.
	OuterServerName string
}

// Error returns the reason the hello was refused.
func (e *HelloError) Error() string { return e.Err.Error() }

// Unwrap returns the reason the hello was refused.
func (e *HelloError) Unwrap() error { return e.Err }
