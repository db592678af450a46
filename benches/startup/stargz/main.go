// containerd-stargz-grpc for the start-up benchmark's stargz baseline.
//
// Debian ships the stargz snapshotter's library (golang-github-containerd-stargz-snapshotter-dev)
// but not the daemon's main package, so this is a minimal one of our own: it reads the same TOML
// config as upstream's daemon, serves containerd's snapshots API on a unix socket, and takes
// registry credentials from docker's config.json. Built in GOPATH mode against Debian's sources
// by benches/startup/build-stargz.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/pelletier/go-toml"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve")
	configPath := flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "TOML config (optional)")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "state directory")
	flag.Parse()
	if err := run(*address, *configPath, *root); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(address, configPath, root string) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var config service.Config
	if data, err := os.ReadFile(configPath); err == nil {
		if err := toml.Unmarshal(data, &config); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	} else if !os.IsNotExist(err) {
		return fmt.Errorf("config %s: %w", configPath, err)
	}

	creds := []resolver.Credential{dockerconfig.NewDockerconfigKeychain(ctx)}
	sn, err := service.NewStargzSnapshotterService(ctx, root, &config, service.WithCredsFuncs(creds...))
	if err != nil {
		return fmt.Errorf("snapshotter at %s: %w", root, err)
	}
	defer sn.Close()

	if err := os.MkdirAll(filepath.Dir(address), 0700); err != nil {
		return err
	}
	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", address, err)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		rpc.GracefulStop()
	}()
	return rpc.Serve(listener)
}
