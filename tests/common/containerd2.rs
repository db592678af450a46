//! containerd 2.1, unpacked from Debian unstable by scripts/install-deps.sh into a cache directory
//! (never installed over the system's 1.6), started with a version-3 config. The system's runc
//! 1.1.5 runs its containers (unstable's runc needs a newer glibc than Debian 12's).
use super::containerd::{Containerd, ContainerdOpts};
use std::path::PathBuf;

/// Where scripts/install-deps.sh unpacks containerd 2.1 (`STREAMSNAP_CONTAINERD2_DIR` overrides).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("STREAMSNAP_CONTAINERD2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/streamsnap/containerd2"))
}

/// containerd 2.1's `bin/` (containerd, its shim, its ctr); panics naming what is missing.
pub fn bin_dir() -> PathBuf {
    let bin = cache_dir().join("root/usr/bin");
    for tool in ["containerd", "containerd-shim-runc-v2", "ctr"] {
        assert!(
            bin.join(tool).is_file(),
            "containerd 2.1's {tool} not found at {}: run scripts/install-deps.sh (it unpacks Debian \
             unstable's containerd there)",
            bin.join(tool).display()
        );
    }
    let out = super::run(std::process::Command::new(bin.join("containerd")).arg("--version"));
    assert!(
        out.split_whitespace().any(|w| w.starts_with("2.")),
        "{} is not containerd 2.x: {out}",
        bin.join("containerd").display()
    );
    bin
}

/// Starts containerd 2.1 with its own root, state and sockets in a fresh TempDir.
pub fn start(opts: ContainerdOpts) -> Containerd {
    super::require_root();
    for tool in ["runc", "ctr-remote"] {
        super::require_tool(tool);
    }
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("containerd2-")
        .tempdir()
        .expect("tempdir");
    let cfg = config(dir.path(), &opts) + &super::containerd::proxy_plugins(&opts.proxy_snapshotters);
    Containerd::spawn(dir, &cfg, Some(bin), opts.namespace)
}

/// The version-3 config: private paths, the streamsnap proxy plugin with the export that makes
/// the transfer service's unpacker pass layer labels, the transfer service unpacking into
/// streamsnap, and (with CRI) the 2.x CRI keys.
fn config(d: &std::path::Path, opts: &ContainerdOpts) -> String {
    let socket = d.join("containerd.sock");
    // NRI listens on a fixed host path: off, so parallel test containerds never share it.
    let mut disabled = vec!["io.containerd.nri.v1.nri"];
    if !opts.enable_cri {
        disabled.extend([
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
        ]);
    }
    let disabled: Vec<String> = disabled.iter().map(|p| format!("'{p}'")).collect();
    let hosts = d.join("certs.d");
    let mut cfg = format!(
        "version = 3\nroot = '{root}'\nstate = '{state}'\ndisabled_plugins = [{disabled}]\n\
         [grpc]\n  address = '{sock}'\n[ttrpc]\n  address = '{sock}.ttrpc'\n\
         [debug]\n  address = '{dbg}'\n  level = '{lvl}'\n[metrics]\n  address = ''\n\
         [plugins.'io.containerd.internal.v1.opt']\n  path = '{opt}'\n\
         [plugins.'io.containerd.transfer.v1.local']\n  config_path = '{hosts}'\n",
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = socket.display(),
        dbg = d.join("debug.sock").display(),
        opt = d.join("opt").display(),
        hosts = hosts.display(),
        lvl = opts.log_level,
        disabled = disabled.join(", "),
    );
    if opts.parallel_pull {
        // 2.1's fastest pull: several layers at once, each fetched as parallel 8 MiB ranges.
        cfg += "  max_concurrent_downloads = 8\n  concurrent_layer_fetch_buffer = 8388608\n";
    }
    if let Some(s) = &opts.streamsnap_socket {
        cfg += &format!(
            "[proxy_plugins.streamsnap]\n  type = 'snapshot'\n  address = '{}'\n  \
             [proxy_plugins.streamsnap.exports]\n    enable_remote_snapshot_annotations = 'true'\n",
            s.display()
        );
        // The transfer service (2.x `ctr image pull`, CRI's PullImage) unpacks only into the
        // snapshotters listed here; a list replaces the overlayfs default, which without its
        // entry fails ("no unpack platforms defined"). Platform "linux" means this machine's arch.
        for snapshotter in ["streamsnap", "overlayfs"] {
            cfg += &format!(
                "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = 'linux'\n  \
                 snapshotter = '{snapshotter}'\n"
            );
        }
    }
    if opts.enable_cri {
        cfg += "[plugins.'io.containerd.grpc.v1.cri']\n  stream_server_address = '127.0.0.1'\n  \
                stream_server_port = '0'\n";
        cfg += &format!(
            "[plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = {}\n",
            opts.restrict_oom_score_adj
        );
        cfg += "[plugins.'io.containerd.cri.v1.images']\n";
        // No `disable_snapshot_annotations = false` here: on 2.1 that key sends CRI pulls back to
        // the local `client.Pull()` path. The transfer service passes layer labels to proxy
        // snapshotters that export `enable_remote_snapshot_annotations` (above) instead.
        if opts.streamsnap_socket.is_some() {
            cfg += "  snapshotter = 'streamsnap'\n";
        }
        if opts.cri_local_pull {
            cfg += "  disable_snapshot_annotations = false\n";
        }
        cfg += &format!(
            "[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{}'\n",
            hosts.display()
        );
        if let Some(img) = &opts.sandbox_image {
            cfg += &format!("[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = '{img}'\n");
        }
    }
    // Plain-HTTP registries as hosts.toml files (2.x dropped CRI's `registry.mirrors`).
    for host in &opts.plain_http_registries {
        let dir = hosts.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!("server = 'http://{host}'\n[host.'http://{host}']\n  capabilities = ['pull', 'resolve']\n"),
        )
        .unwrap();
    }
    cfg
}
