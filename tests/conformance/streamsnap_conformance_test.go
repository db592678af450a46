//go:build linux
// +build linux

// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, containerd 1.6)
// against the streamsnap binary, talking to it exactly like containerd
// talks to a proxy snapshotter plugin: gRPC over a unix socket through
// github.com/containerd/containerd/snapshots/proxy.
//
// Modes (selected by environment):
//
//	STREAMSNAP_BIN=/path/to/streamsnap      run the suite against streamsnap
//	CONFORMANCE_BASELINE=overlayfs          run the suite against containerd's
//	                                        own overlayfs snapshotter in-process
//
// Optional environment:
//
//	STREAMSNAP_EXTRA_ARGS   extra args appended to `serve ...` (split on spaces),
//	                        e.g. "--config /dev/null"
//	STREAMSNAP_LOG_DIR      directory where each server instance's stdout/stderr
//	                        is kept (default: not kept beyond the test case)
//	STREAMSNAP_START_TIMEOUT  how long to wait for the socket (default 20s)
//	STREAMSNAP_RPC_TIMEOUT    per-unary-RPC deadline (default 60s, 0 = none)
//	CONFORMANCE_LOG_TAIL    server log lines echoed into the test log on
//	                        cleanup (default 40; always echoed in full if the
//	                        server misbehaved on shutdown)
//
// Must run as root (the suite mounts the returned mounts).
package conformance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

const snapshotterName = "streamsnap"

// backend returns the snapshotter factory selected by the environment.
func backend(t *testing.T) (string, testsuite.SnapshotterFunc) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the snapshotter conformance suite mounts filesystems and must run as root")
	}

	switch baseline := os.Getenv("CONFORMANCE_BASELINE"); baseline {
	case "":
	case "overlayfs", "overlay":
		t.Logf("baseline mode: containerd %s snapshotter, in-process", baseline)
		return "OverlayBaseline", newOverlayBaseline
	default:
		t.Fatalf("unknown CONFORMANCE_BASELINE=%q (supported: overlayfs)", baseline)
	}

	bin := os.Getenv("STREAMSNAP_BIN")
	if bin == "" {
		t.Fatal("STREAMSNAP_BIN is not set (or set CONFORMANCE_BASELINE=overlayfs)")
	}
	abs, err := exec.LookPath(bin)
	if err != nil {
		t.Fatalf("STREAMSNAP_BIN=%q is not an executable: %v", bin, err)
	}
	if abs, err = filepath.Abs(abs); err != nil {
		t.Fatal(err)
	}
	t.Logf("streamsnap mode: %s", abs)
	return "Streamsnap", newStreamsnap(abs)
}

// TestConformance is containerd 1.6's snapshots/testsuite, unmodified.
func TestConformance(t *testing.T) {
	name, fn := backend(t)
	testsuite.SnapshotterSuite(t, name, fn)
}

// --- baseline -------------------------------------------------------------

func newOverlayBaseline(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sn, err := overlay.NewSnapshotter(root)
	if err != nil {
		return nil, nil, err
	}
	return sn, func() error {
		err := sn.Close()
		if uerr := unmountUnder(ctx, root); err == nil {
			err = uerr
		}
		return err
	}, nil
}

// --- streamsnap over gRPC -------------------------------------------------

func envDuration(name string, def time.Duration) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	if d, err := time.ParseDuration(v); err == nil {
		return d
	}
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second
	}
	return def
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if n > 0 && len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines omitted)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

func newStreamsnap(bin string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (_ snapshots.Snapshotter, _ func() error, retErr error) {
		state := filepath.Join(root, "state")
		sock := filepath.Join(root, "streamsnap.sock")
		if len(sock) >= 108 {
			return nil, nil, fmt.Errorf("socket path %q is too long for a unix socket (%d bytes); use a shorter TMPDIR", sock, len(sock))
		}

		args := []string{"serve", "--root", state, "--address", sock}
		if extra := strings.Fields(os.Getenv("STREAMSNAP_EXTRA_ARGS")); len(extra) > 0 {
			args = append(args, extra...)
		}
		cmd := exec.Command(bin, args...)
		cmd.Dir = root
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Setpgid:   true,            // so that we can kill stragglers as a group
			Pdeathsig: syscall.SIGKILL, // never outlive the test binary
		}
		// Server stdout+stderr go straight to a file (not a pipe), so that
		// cmd.Wait never blocks on grandchildren holding the pipe open.
		logPath := filepath.Join(filepath.Dir(root), "streamsnap.log")
		if dir := os.Getenv("STREAMSNAP_LOG_DIR"); dir != "" {
			if err := os.MkdirAll(dir, 0755); err != nil {
				return nil, nil, err
			}
			logPath = filepath.Join(dir, filepath.Base(filepath.Dir(root))+".log") // snapshot-suite-Streamsnap-NNN.log
		}
		logFile, err := os.Create(logPath)
		if err != nil {
			return nil, nil, err
		}
		defer logFile.Close() // the child has its own copy of the fd
		cmd.Stdout = logFile
		cmd.Stderr = logFile
		output := func() string {
			b, _ := os.ReadFile(logPath)
			return string(b)
		}

		log.G(ctx).Infof("starting %s %s", bin, strings.Join(args, " "))
		log.G(ctx).Infof("server log: %s", logPath)
		if err := cmd.Start(); err != nil {
			return nil, nil, fmt.Errorf("failed to start %s: %w", bin, err)
		}

		exited := make(chan struct{})
		var waitErr error
		go func() {
			waitErr = cmd.Wait()
			close(exited)
		}()

		var conn *grpc.ClientConn
		grace := 10 * time.Second
		stop := func() error {
			var errs []string
			if conn != nil {
				if err := conn.Close(); err != nil {
					errs = append(errs, fmt.Sprintf("closing grpc connection: %v", err))
				}
			}
			dumpAll := false
			select {
			case <-exited:
				errs = append(errs, fmt.Sprintf("streamsnap exited before shutdown was requested: %v", describeExit(waitErr)))
				dumpAll = true
			default:
				_ = cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
					if st := exitStatus(waitErr); st != "" {
						errs = append(errs, "streamsnap did not exit cleanly on SIGTERM: "+st)
						dumpAll = true
					}
				case <-time.After(grace):
					errs = append(errs, fmt.Sprintf("streamsnap did not exit within %s of SIGTERM; sent SIGKILL", grace))
					_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
					<-exited
					dumpAll = true
				}
			}
			// Any stragglers in the process group.
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)

			n := 40
			if v, err := strconv.Atoi(os.Getenv("CONFORMANCE_LOG_TAIL")); err == nil {
				n = v
			}
			if out := output(); out != "" && (dumpAll || n > 0) {
				if dumpAll {
					n = 0
				}
				for _, line := range strings.Split(tail(out, n), "\n") {
					log.G(ctx).Info("streamsnap| " + line)
				}
			}

			if err := unmountUnder(ctx, root); err != nil {
				errs = append(errs, err.Error())
			}
			if len(errs) > 0 {
				return errors.New(strings.Join(errs, "; "))
			}
			return nil
		}
		defer func() {
			if retErr != nil {
				grace = 2 * time.Second
				if err := stop(); err != nil {
					retErr = fmt.Errorf("%w (cleanup: %v)", retErr, err)
				}
			}
		}()

		// Wait for the socket to show up (or the process to die).
		startTimeout := envDuration("STREAMSNAP_START_TIMEOUT", 20*time.Second)
		deadline := time.Now().Add(startTimeout)
		for {
			if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
				break
			}
			select {
			case <-exited:
				return nil, nil, fmt.Errorf("streamsnap exited before creating %s: %v (its output is logged above)", sock, describeExit(waitErr))
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				return nil, nil, fmt.Errorf("timed out after %s waiting for socket %s", startTimeout, sock)
			}
		}

		// Dial like containerd 1.6 dials proxy plugins
		// (services/server/server.go: proxyClients.getClient), plus a
		// blocking dial with timeout.
		backoffConfig := backoff.DefaultConfig
		backoffConfig.MaxDelay = 3 * time.Second
		gopts := []grpc.DialOption{
			grpc.WithInsecure(),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
			grpc.WithContextDialer(dialer.ContextDialer),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
			grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
			grpc.WithBlock(),
			grpc.FailOnNonTempDialError(true),
			grpc.WithReturnConnectionError(),
		}
		if rpcTimeout := envDuration("STREAMSNAP_RPC_TIMEOUT", 60*time.Second); rpcTimeout > 0 {
			gopts = append(gopts, grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
				defer cancel()
				return invoker(ctx, method, req, reply, cc, opts...)
			}))
		}
		dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		c, err := grpc.DialContext(dialCtx, dialer.DialAddress(sock), gopts...)
		if err != nil {
			return nil, nil, fmt.Errorf("failed to dial %s: %w", sock, err)
		}
		conn = c

		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)
		var once sync.Once
		var stopErr error
		return sn, func() error {
			once.Do(func() { stopErr = stop() })
			return stopErr
		}, nil
	}
}

func describeExit(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// exitStatus returns "" for a clean shutdown (exit 0, or terminated by the
// SIGTERM we sent), otherwise a description.
func exitStatus(err error) string {
	if err == nil {
		return ""
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return ""
		}
	}
	return err.Error()
}

// unmountUnder lazily unmounts every mount at or below root, deepest first.
// Leftovers are logged; failing to unmount is an error.
func unmountUnder(ctx context.Context, root string) error {
	real, err := filepath.EvalSymlinks(root)
	if err != nil {
		if os.IsNotExist(err) {
			return nil
		}
		real = root
	}
	var errs []string
	for pass := 0; pass < 3; pass++ {
		mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(real))
		if err != nil {
			return fmt.Errorf("reading mountinfo: %w", err)
		}
		if len(mounts) == 0 {
			break
		}
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
		errs = errs[:0]
		for _, m := range mounts {
			log.G(ctx).Warnf("lazily unmounting leftover mount %s (%s)", m.Mountpoint, m.FSType)
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
				errs = append(errs, fmt.Sprintf("unmount %s: %v", m.Mountpoint, err))
			}
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}
