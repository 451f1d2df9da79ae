package browsertest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// loadTimeout bounds one browser run: start, page load, screenshot, exit.
// A run that passes is stopped long before (see run.load).
const loadTimeout = 90 * time.Second

// browser is a browser the test drives headless.
type browser struct {
	name  string     // "chromium" or "firefox", also the first label of its test names
	bin   string     // the Debian package's program
	relay netip.Addr // where its observer listens
	// setup prepares what all runs share; it may add cleanups to t.
	setup func(t *testing.T, e *env) (runner, error)
}

// runner loads one page in a fresh profile and writes a screenshot.
type runner func(ctx context.Context, t *testing.T, url, shot, logFile string) error

var browsers = []browser{
	{name: "chromium", bin: "chromium", relay: netip.MustParseAddr("127.80.1.1"), setup: setupChromium},
	{name: "firefox", bin: "firefox-esr", relay: netip.MustParseAddr("127.80.1.2"), setup: setupFirefox},
}

// chromiumPolicy is the managed policy file of Debian's chromium package.
// It is the only file the test writes outside temporary directories; its
// name marks it as ours, and a later run replaces one left by a crash.
const chromiumPolicy = "/etc/chromium/policies/managed/echkit-browsertest.json"

// setupChromium installs the DoH policy and an NSS database trusting the
// test CA in a HOME of its own (Chromium on Linux reads $HOME/.pki/nssdb).
//
// Chromium takes DoH settings from managed policies only: DnsOverHttpsMode
// "secure" (DoH only, no fallback to the system resolver) and
// DnsOverHttpsTemplates (without a {?dns} variable the template is queried
// by POST; Firefox uses GET: both paths of the DoH server see a browser).
// The template names the DoH server by its address, so no /etc/hosts entry
// is needed. BuiltInDnsClientEnabled is left out: DoH always uses the
// built-in client (so says the policy's documentation, and the test passes
// with it set to false).
func setupChromium(t *testing.T, e *env) (runner, error) {
	policy, err := json.Marshal(map[string]any{
		"DnsOverHttpsMode":      "secure",
		"DnsOverHttpsTemplates": "https://" + dohAddr.String() + dohPath,
	})
	require.NoError(t, err)
	if err := installFile(t, chromiumPolicy, policy); err != nil {
		return nil, err
	}
	home := t.TempDir()
	nssdb := filepath.Join(home, ".pki", "nssdb")
	if err := trustCA(t.Context(), nssdb, e.caPEM); err != nil {
		return nil, err
	}
	return func(ctx context.Context, t *testing.T, url, shot, logFile string) error {
		profile := t.TempDir()
		cmd := exec.CommandContext(ctx, "chromium",
			"--headless=new",
			"--no-sandbox", // root
			"--disable-gpu",
			"--no-first-run",
			"--no-default-browser-check",
			"--disable-background-networking",
			"--disable-component-update",
			"--disable-sync",
			"--user-data-dir="+profile,
			"--window-size=800,600",
			"--screenshot="+shot,
			url)
		if x := os.Getenv(chromiumArgsEnv); x != "" {
			cmd.Args = append(cmd.Args[:len(cmd.Args)-1], append(strings.Fields(x), url)...)
		}
		cmd.Env = browserEnv(home)
		return runBrowser(ctx, cmd, profile, logFile)
	}, nil
}

// chromiumArgsEnv names an environment variable of extra Chromium flags,
// for debugging: ECH_BROWSERTEST_CHROMIUM_ARGS="--log-net-log=/tmp/net.json
// --net-log-capture-mode=Everything" records what its network stack did.
const chromiumArgsEnv = "ECH_BROWSERTEST_CHROMIUM_ARGS"

// firefoxPrefsEnv names an environment variable of extra user.js lines
// for Firefox, for debugging: they come last, so they override the test's.
const firefoxPrefsEnv = "ECH_BROWSERTEST_FIREFOX_PREFS"

// firefoxPrefs are the user.js of a fresh Firefox profile, %q being the
// DoH server's URL and its address. network.trr.allow-rfc1918 is left
// out: ESR 153 takes the 127.80.0.x answers without it (the test passes
// with it false). network.dns.echconfig.enabled is needed: with it false,
// Firefox ignores the ech parameter and sends GREASE.
const firefoxPrefs = `// DoH only (TRR mode 3), to the test's server, found by its address.
user_pref("network.trr.mode", 3);
user_pref("network.trr.uri", %q);
user_pref("network.trr.bootstrapAddr", %q);
// No confirmation (an NS query for example.com, NXDOMAIN here): one state
// machine less between the browser and its first query.
user_pref("network.trr.confirmationNS", "skip");
// ECH configs from HTTPS records.
user_pref("network.dns.echconfig.enabled", true);
// No first-run pages, reporting or update checks.
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.aboutwelcome.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("app.normandy.enabled", false);
user_pref("app.update.auto", false);
user_pref("extensions.update.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.safebrowsing.downloads.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("browser.region.update.enabled", false);
`

// setupFirefox returns a runner that makes a fresh profile for each page:
// the test CA in its cert9.db, the prefs in its user.js.
func setupFirefox(t *testing.T, e *env) (runner, error) {
	home := t.TempDir()
	return func(ctx context.Context, t *testing.T, url, shot, logFile string) error {
		profile := t.TempDir()
		if err := trustCA(ctx, profile, e.caPEM); err != nil {
			return err
		}
		prefs := fmt.Sprintf(firefoxPrefs, "https://"+dohName+dohPath, dohAddr.String())
		if x := os.Getenv(firefoxPrefsEnv); x != "" {
			prefs += x + "\n"
		}
		if err := os.WriteFile(filepath.Join(profile, "user.js"), []byte(prefs), 0o600); err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, "firefox-esr",
			"--headless",
			"--no-remote",
			"--profile", profile,
			"--window-size=800,600",
			"--screenshot", shot,
			url)
		cmd.Env = append(browserEnv(home), "MOZ_HEADLESS=1")
		return runBrowser(ctx, cmd, profile, logFile)
	}, nil
}

// browserEnv is a small environment for a browser: its own HOME, no
// display, no proxy.
func browserEnv(home string) []string {
	return []string{
		"HOME=" + home,
		"PATH=" + os.Getenv("PATH"),
		"LANG=C.UTF-8",
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"XDG_CACHE_HOME=" + filepath.Join(home, ".cache"),
	}
}

// trustCA creates an NSS database in dir that trusts the CA in caPEM to
// issue server certificates.
func trustCA(ctx context.Context, dir, caPEM string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"-N", "-d", "sql:" + dir, "--empty-password"},
		{"-A", "-d", "sql:" + dir, "-n", "echkit browsertest CA", "-t", "C,,", "-i", caPEM},
	} {
		out, err := exec.CommandContext(ctx, "certutil", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("certutil %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// runBrowser runs cmd in a process group of its own, output to logFile,
// bounded by cmd's context, and kills whatever it leaves behind: the rest
// of its group, and any process whose command line names profile (its
// helpers may start groups of their own).
func runBrowser(ctx context.Context, cmd *exec.Cmd, profile, logFile string) error {
	out, err := os.Create(logFile)
	if err != nil {
		return err
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err = cmd.Run()
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	killNaming(profile)
	fmt.Fprintf(out, "\n[browsertest] %s exited after %v: %v\n", filepath.Base(cmd.Path), time.Since(start).Round(time.Millisecond), err)
	if ctx.Err() != nil {
		return fmt.Errorf("%s killed: %w", filepath.Base(cmd.Path), ctx.Err())
	}
	return err
}

// killNaming kills the processes whose command line contains marker, a
// path only processes this test started can name.
func killNaming(marker string) {
	entries, _ := os.ReadDir("/proc")
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(marker)) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// installFile writes data to path, creating its directories, and removes
// it (and the directories it created) when t ends.
func installFile(t *testing.T, path string, data []byte) error {
	var created []string
	for dir := filepath.Dir(path); ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(dir); err == nil || !errors.Is(err, os.ErrNotExist) {
			break
		}
		created = append(created, dir)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	t.Cleanup(func() {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("removing %s: %v", path, err)
		}
		for _, dir := range created { // innermost first
			os.Remove(dir)
		}
	})
	return os.WriteFile(path, data, 0o644)
}
