#!/bin/sh
# Runs in the DaemonSet's pod (privileged, hostPID): puts streamsnap on the
# host and starts it as a systemd unit through nsenter, then stays as a
# watcher whose probes ask the daemon's /healthz and /readyz. Never stops the
# host unit: pod deletion, restarts and rollouts leave the daemon running; a
# rollout with a new binary restarts it (an upgrade the mounts survive).
set -eu
# Where the host's directories are mounted, the binary shipped in the image,
# and the ConfigMap's files (tests point these elsewhere).
host=${HOST_ROOT:-/host}
binary=${STREAMSNAP_BINARY:-/usr/local/bin/streamsnap}
files=${HOST_FILES:-/etc/streamsnap-host}
on_host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }

test -c /dev/fuse || { echo "no /dev/fuse on this node" >&2; exit 1; }

# Replaced by rename: a running daemon keeps its binary until the restart below.
mkdir -p "$host/opt/streamsnap/bin" "$host/etc/streamsnap"
upgrade=no
if [ -e "$host/opt/streamsnap/bin/streamsnap" ] && ! cmp -s "$binary" "$host/opt/streamsnap/bin/streamsnap"; then
  upgrade=yes
fi
cp "$binary" "$host/opt/streamsnap/bin/.streamsnap.new"
chmod 0755 "$host/opt/streamsnap/bin/.streamsnap.new"
mv -f "$host/opt/streamsnap/bin/.streamsnap.new" "$host/opt/streamsnap/bin/streamsnap"
cp "$files/config.toml" "$host/etc/streamsnap/.config.toml.new"
mv -f "$host/etc/streamsnap/.config.toml.new" "$host/etc/streamsnap/config.toml"
cp "$files/streamsnap.service" "$host/etc/systemd/system/.streamsnap.service.new"
mv -f "$host/etc/systemd/system/.streamsnap.service.new" "$host/etc/systemd/system/streamsnap.service"

on_host systemctl daemon-reload
# Starts the daemon if it is not running; a running one is left alone, unless
# this pod brings a new binary: then it is restarted, and the new daemon takes
# the layer mounts over from the descriptor keeper (running containers notice
# a pause, no error).
on_host systemctl enable --now streamsnap.service
if [ "$upgrade" = yes ]; then
  on_host systemctl restart streamsnap.service
fi
# containerd's proxy plugin entry (restarts containerd only when it changed).
on_host /opt/streamsnap/bin/streamsnap install --containerd-config "${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"

echo "streamsnap installed and running on the host; watching"
trap 'kill "$nap" 2>/dev/null; exit 0' TERM INT
while :; do
  sleep 3600 &
  nap=$!
  wait "$nap" || true
done
