// Package browsertest holds an end-to-end test in which real browsers,
// Chromium and Firefox ESR, reach hidden names through the split-mode
// router (package router): they learn ECH configs from HTTPS records over
// DNS-over-HTTPS, send ECH (or GREASE ECH), follow HelloRetryRequests and
// retry configs, and the test asserts what the backends and the router saw.
//
// The test needs root (it listens on port 443 of 127.80.0.x addresses and
// writes a Chromium policy file under /etc/chromium/policies/managed) and the
// Debian packages chromium, firefox-esr and libnss3-tools; without them it
// skips, saying so. Run it with:
//
//	sudo apt-get install chromium firefox-esr libnss3-tools
//	sudo env PATH="$PATH" go test -count=1 -v ./internal/browsertest/
//
// The package has no code outside its tests.
package browsertest
