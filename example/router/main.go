// Command router is a deployable split-mode ECH client-facing server: it
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
//	router -config router.json       run
//	router -check -config router.json check the file and the files it names, and exit
//
// SIGHUP reloads the keys and certificates (as the keys.reload interval
// does); SIGTERM or SIGINT shuts down gracefully. See
// chatmail.json for a configuration and the README for its settings.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/echkit/ech/internal/router"
)

func main() {
	configPath := flag.String("config", "router.json", "configuration `file`")
	check := flag.Bool("check", false, "check the configuration file and the files it names, and exit")
	logFormat := flag.String("log", "text", "log format: text or json")
	flag.Parse()
	if flag.NArg() > 0 {
		// "router -check router.json" would otherwise check ./router.json.
		fmt.Fprintf(os.Stderr, "router: unexpected argument %q: the configuration file is given by -config\n", flag.Arg(0))
		flag.Usage()
		os.Exit(2)
	}

	cfg, err := router.LoadConfig(*configPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if *check {
		if err := router.CheckFiles(cfg); err != nil {
			fmt.Fprintf(os.Stderr, "%s: missing files:\n%v\n", *configPath, err)
			os.Exit(1)
		}
		// Load the keys and certificates as a start would, quietly.
		if _, err := router.New(cfg, slog.New(slog.DiscardHandler)); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", *configPath, err)
			os.Exit(1)
		}
		fmt.Printf("%s: ok\n", *configPath)
		return
	}
	var h slog.Handler
	switch *logFormat {
	case "json":
		h = slog.NewJSONHandler(os.Stderr, nil)
	case "text":
		h = slog.NewTextHandler(os.Stderr, nil)
	default:
		fmt.Fprintf(os.Stderr, "router: -log %q: want text or json\n", *logFormat)
		os.Exit(2)
	}
	logger := slog.New(h)

	srv, err := router.New(cfg, logger)
	if err != nil {
		logger.Error("cannot start", slog.String("error", err.Error()))
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			logger.Info("SIGHUP: reloading keys and certificates")
			select {
			case reload <- struct{}{}:
			default:
			}
		}
	}()
	if err := srv.Run(ctx, reload); err != nil {
		logger.Error("stopped", slog.String("error", err.Error()))
		os.Exit(1)
	}
}
