package ech

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
)

// alert is a TLS alert description (RFC 8446, Section 6), of the alerts the
// client-facing server sends.
type alert uint8

const (
	alertUnexpectedMessage alert = 10
	alertRecordOverflow    alert = 22
	alertIllegalParameter  alert = 47
	alertDecodeError       alert = 50
	alertDecryptError      alert = 51
	alertInternalError     alert = 80
	alertMissingExtension  alert = 109
)

// alertLevelFatal is the level of every alert sent (RFC 8446, Section 6).
const alertLevelFatal uint8 = 2

// String returns the alert's name in RFC 8446.
func (a alert) String() string {
	switch a {
	case alertUnexpectedMessage:
		return "unexpected_message"
	case alertRecordOverflow:
		return "record_overflow"
	case alertIllegalParameter:
		return "illegal_parameter"
	case alertDecodeError:
		return "decode_error"
	case alertDecryptError:
		return "decrypt_error"
	case alertInternalError:
		return "internal_error"
	case alertMissingExtension:
		return "missing_extension"
	}
	return fmt.Sprintf("alert(%d)", uint8(a))
}

// alertFor returns the alert that tells the peer about err, and false for
// errors the peer is not told about (I/O errors, cancellation).
func alertFor(err error) (alert, bool) {
	switch {
	case errors.Is(err, ErrIllegalParameter):
		return alertIllegalParameter, true
	case errors.Is(err, ErrDecodeError), errors.Is(err, ErrHelloTooLarge):
		return alertDecodeError, true
	case errors.Is(err, ErrMissingExtension):
		return alertMissingExtension, true
	case errors.Is(err, ErrDecryptError):
		return alertDecryptError, true
	case errors.Is(err, ErrNotTLS), errors.Is(err, ErrUnexpectedMessage):
		return alertUnexpectedMessage, true
	case errors.Is(err, ErrRecordOverflow):
		return alertRecordOverflow, true
	case errors.Is(err, ErrInvalidKey), errors.Is(err, ErrMalformedConfig),
		errors.Is(err, ErrUnsupportedAlgorithm), errors.Is(err, ErrInvalidPublicName):
		return alertInternalError, true
	}
	return 0, false
}

// alertError is an error the peer was told about with an alert. Besides
// its sentinel it matches [tls.AlertError] with [errors.As], as the errors
// of crypto/tls do, so that code handling those handles it.
type alertError struct {
	err   error
	alert alert
}

func (e *alertError) Error() string { return e.err.Error() }
func (e *alertError) Unwrap() error { return e.err }

// As sets a *[tls.AlertError] target to the alert sent.
func (e *alertError) As(target any) bool {
	if t, ok := target.(*tls.AlertError); ok {
		*t = tls.AlertError(e.alert)
		return true
	}
	return false
}

// sendAlert writes to w the alert for err, if the peer is to be told, and
// returns err, then also matching [tls.AlertError].
func sendAlert(w io.Writer, err error) error {
	a, ok := alertFor(err)
	if !ok {
		return err
	}
	// The record version is TLS 1.2's, as before the version is negotiated.
	w.Write([]byte{recordTypeAlert, 3, 3, 0, 2, alertLevelFatal, byte(a)})
	return &alertError{err: err, alert: a}
}
