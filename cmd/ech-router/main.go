// Command ech-router is a deployable split-mode ECH client-facing server: it
// listens on one or more addresses, decrypts each ClientHello with the keys
// of a directory of RFC 9934 PEM files, and routes the connection by its
// inner name and ALPN, either passing the TLS stream through to an
// ECH-aware backend or terminating TLS and forwarding plaintext (with an
// optional PROXY protocol v2 header) to a backend that knows nothing of ECH.
// It serves the public name itself, with retry configs for clients whose
// ECH did not decrypt and the current ECHConfigList at
// /.well-known/origin-svcb.
//
// Usage:
//
//	ech-router -config router.json        run
//	ech-router -check -config router.json check the file and the files it names, and exit
//	ech-router -version                   print the module version and VCS revision
//
// SIGHUP reloads the keys and certificates (as the keys.reload interval
// does); SIGTERM or SIGINT shuts down gracefully. See
// chatmail.json for a configuration and the README for its settings, and
// ech-router.service for a systemd unit that runs it without root.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/echkit/ech/internal/cli"
	"github.com/echkit/ech/internal/sysmonhold"
	"github.com/echkit/ech/router"
)

func main() {
	os.Exit(cli.Run("ech-router", os.Args[1:], os.Stdout, os.Stderr, run))
}

// run runs the router with args until SIGTERM or SIGINT, logging to stderr.
func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ech-router", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "router.json", "configuration `file`")
	check := fs.Bool("check", false, "check the configuration file and the files it names, and exit")
	logFormat := fs.String("log", "text", "log `format`: text or json")
	version := fs.Bool("version", false, "print the version and exit")
	hold := fs.Bool("hold-processor", true, "give the Go runtime one processor more, parked, so that its monitor thread does not poll every 20 µs each time the router wakes from idle (Linux; see the README)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *version {
		fmt.Fprintln(stdout, cli.Version("ech-router"))
		return nil
	}
	if fs.NArg() > 0 {
		// "ech-router -check router.json" would otherwise check ./router.json.
		fs.Usage()
		return cli.Usagef("unexpected argument %q: the configuration file is given by -config", fs.Arg(0))
	}
	var h slog.Handler
	switch *logFormat {
	case "json":
		h = slog.NewJSONHandler(stderr, nil)
	case "text":
		h = slog.NewTextHandler(stderr, nil)
	default:
		return cli.Usagef("-log %q: want text or json", *logFormat)
	}

	cfg, err := router.LoadConfig(*configPath)
	if err != nil {
		return err
	}
	if *check {
		if err := router.CheckFiles(cfg); err != nil {
			return fmt.Errorf("%s: missing files:\n%v", *configPath, err)
		}
		// Load the keys and certificates as a start would, quietly.
		if _, err := router.New(cfg, slog.New(slog.DiscardHandler)); err != nil {
			return fmt.Errorf("%s: %v", *configPath, err)
		}
		fmt.Fprintf(stdout, "%s: ok\n", *configPath)
		return nil
	}
	if *hold {
		sysmonhold.Start()
	}
	logger := slog.New(h)
	srv, err := router.New(cfg, logger)
	if err != nil {
		logger.Error("cannot start", slog.String("error", err.Error()))
		return errors.New("cannot start")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{}, 1)
	go func() { // until run returns and stop cancels ctx
		for {
			select {
			case <-hup:
			case <-ctx.Done():
				return
			}
			logger.Info("SIGHUP: reloading keys and certificates")
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()
	if err := srv.Run(ctx, reload); err != nil {
		logger.Error("stopped", slog.String("error", err.Error()))
		return errors.New("stopped on error")
	}
	return nil
}
