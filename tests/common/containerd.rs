//! A private containerd (root, state, sockets in a TempDir) plus ground-truth unpacking via overlayfs:
//! the system's 1.6 by default, or 2.1 from the cache directory that scripts/install-deps.sh fills
//! (see `containerd2.rs`).
use super::{require_tool, run_output, terminate, umount_all_under, wait_until};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Which containerd a test starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The system's containerd 1.6 (Debian 12), configured with a version-2 config.
    System1_6,
    /// containerd 2.1 unpacked from Debian unstable by scripts/install-deps.sh, version-3 config.
    V2_1,
}

/// Options for `Containerd::start`.
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// Which containerd to run (default the system's 1.6).
    pub release: Release,
    /// If set, registers `[proxy_plugins.streamsnap]` (type "snapshot") at this gRPC socket.
    pub streamsnap_socket: Option<PathBuf>,
    /// Keep the CRI plugin enabled (disabled by default to start fast and quietly).
    pub enable_cri: bool,
    /// Namespace used by `ctr`/`ctr_remote` (default "streamsnap-test").
    pub namespace: String,
    /// containerd log level (default "info").
    pub log_level: String,
    /// With `enable_cri`: CRI's `sandbox_image` (2.1: `pinned_images.sandbox`), the pod "pause"
    /// image; None keeps containerd's default.
    pub sandbox_image: Option<String>,
    /// With `enable_cri`: registries (`host:port`) CRI reaches over plain HTTP, as
    /// `registry.mirrors."HOST".endpoint = ["http://HOST"]` (2.1: a `hosts.toml` per host under
    /// `config_path`, for CRI and the transfer service) (default none).
    pub plain_http_registries: Vec<String>,
    /// With `enable_cri`: CRI's `restrict_oom_score_adj` (cap containers' oom_score_adj at containerd's own),
    /// needed where even root cannot lower oom_score_adj (this VM: writing -998 fails), default false.
    pub restrict_oom_score_adj: bool,
    /// containerd 2.1 with `enable_cri`: also set CRI's `disable_snapshot_annotations = false` (what
    /// 1.6 and 2.0 need for remote snapshotters), which makes 2.1's CRI pull through
    /// `client.Pull()` instead of its transfer service (default false).
    pub cri_local_pull: bool,
    /// Other proxy snapshotters, `(name, socket)`, e.g. the stargz snapshotter of the benchmark.
    pub proxy_snapshotters: Vec<(String, PathBuf)>,
    /// containerd 2.1: the transfer service pulls several layers at once, each in parallel
    /// ranges (its fastest pull; 1.6 has no such setting) (default false).
    pub parallel_pull: bool,
}

impl Default for ContainerdOpts {
    fn default() -> Self {
        ContainerdOpts {
            release: Release::System1_6,
            streamsnap_socket: None,
            enable_cri: false,
            namespace: "streamsnap-test".into(),
            log_level: "info".into(),
            sandbox_image: None,
            plain_http_registries: Vec::new(),
            restrict_oom_score_adj: false,
            cri_local_pull: false,
            proxy_snapshotters: Vec::new(),
            parallel_pull: false,
        }
    }
}

/// A running private containerd; killed on Drop, then every mount under its directory is lazily unmounted.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    namespace: String,
    log_path: PathBuf,
    dir: tempfile::TempDir,
    /// containerd 2.1's `bin/` (its own `ctr` and shim); None for the system's 1.6.
    bin_dir: Option<PathBuf>,
}

impl Containerd {
    /// Writes a config (version 2 for 1.6, version 3 for 2.1) into a fresh TempDir, starts
    /// containerd and waits for its gRPC socket.
    pub fn start(opts: ContainerdOpts) -> Containerd {
        if opts.release == Release::V2_1 {
            return super::containerd2::start(opts);
        }
        super::require_root();
        for t in ["containerd", "ctr", "ctr-remote"] {
            require_tool(t);
        }
        let dir = tempfile::Builder::new()
            .prefix("containerd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let mut cfg = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{disabled}\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{dbg}\"\n  level = \"{lvl}\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            dbg = d.join("debug.sock").display(),
            opt = d.join("opt").display(),
            lvl = opts.log_level,
            disabled = if opts.enable_cri {
                "disabled_plugins = []".to_string()
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]".to_string()
            },
        );
        if opts.enable_cri {
            cfg += "[plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n";
            if let Some(img) = &opts.sandbox_image {
                cfg += &format!("  sandbox_image = \"{img}\"\n");
            }
            if opts.restrict_oom_score_adj {
                cfg += "  restrict_oom_score_adj = true\n";
            }
            if opts.streamsnap_socket.is_some() {
                cfg += "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"streamsnap\"\n  disable_snapshot_annotations = false\n";
            }
            for host in &opts.plain_http_registries {
                cfg += &format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{host}\"]\n  endpoint = [\"http://{host}\"]\n"
                );
            }
        }
        if let Some(s) = &opts.streamsnap_socket {
            cfg += &format!(
                "[proxy_plugins.streamsnap]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                s.display()
            );
        }
        cfg += &proxy_plugins(&opts.proxy_snapshotters);
        Containerd::spawn(dir, &cfg, None, opts.namespace)
    }

    /// Starts `release` with the caller's whole `config`, whose paths (root, state, sockets) point
    /// into `dir`; its gRPC address must be `dir/containerd.sock`.
    pub fn start_with_config(release: Release, dir: tempfile::TempDir, config: &str) -> Containerd {
        super::require_root();
        let bin_dir = (release == Release::V2_1).then(super::containerd2::bin_dir);
        Containerd::spawn(dir, config, bin_dir, ContainerdOpts::default().namespace)
    }

    /// Writes `config` into `dir`, runs containerd (from `bin_dir` if set, with `bin_dir` first on
    /// PATH so it finds its own shim) and waits until `ctr version` answers on its socket.
    pub(super) fn spawn(
        dir: tempfile::TempDir,
        config: &str,
        bin_dir: Option<PathBuf>,
        namespace: String,
    ) -> Containerd {
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = d.join("containerd.log");
        let log = File::create(&log_path).unwrap();
        let mut command = Command::new(tool_path(bin_dir.as_deref(), "containerd"));
        if let Some(bin) = &bin_dir {
            command.env("PATH", path_with_first(bin));
        }
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .env_remove("CONTAINERD_ADDRESS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut exited = None;
        wait_until(Duration::from_secs(30), "containerd socket", || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            socket.exists()
                && run_output(
                    Command::new(tool_path(bin_dir.as_deref(), "ctr"))
                        .arg("--address")
                        .arg(&socket)
                        .arg("version"),
                )
                .status
                .success()
        });
        if let Some(st) = exited {
            panic!(
                "containerd exited with {st}; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        Containerd {
            child,
            socket,
            namespace,
            log_path,
            dir,
            bin_dir,
        }
    }

    /// The containerd gRPC socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace `ctr`/`ctr_remote` operate in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's root directory (content store, snapshotters' data).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The generated config.toml.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// containerd's log file (stdout+stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A scratch directory owned by this instance, cleaned (and unmounted) with it.
    pub fn scratch_dir(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs `ctr --address SOCK --namespace NS ARGS…`; returns stdout, panics with stderr on failure.
    pub fn ctr(&self, args: &[&str]) -> String {
        self.tool("ctr", args)
    }

    /// Same as `ctr`, but with stargz-snapshotter's `ctr-remote` (convert --estargz/--zstdchunked, rpull…).
    pub fn ctr_remote(&self, args: &[&str]) -> String {
        self.tool("ctr-remote", args)
    }

    /// `ctr-remote images push --plain-http REFERENCE`, once more if it fails: under load the
    /// converter's push sometimes ends in "rpc error: code = Internal desc = unexpected EOF"
    /// before any layer is sent (containerd logs nothing); the push is idempotent.
    pub fn push_image(&self, reference: &str) {
        let args = ["images", "push", "--plain-http", reference];
        let out = run_output(&mut self.command("ctr-remote", &args));
        if !out.status.success() {
            eprintln!(
                "ctr-remote push {reference} failed, pushing again: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.ctr_remote(&args);
        }
    }

    /// `ctr-remote image rpull` with streamsnap's labels, as stargz-snapshotter users do.
    pub fn rpull(&self, reference: &str) -> String {
        self.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "streamsnap",
            reference,
        ])
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER REFERENCE ID sh -c "SCRIPT; echo MARK"`: the
    /// container's stdout, mark removed. The mark tells a command that printed nothing (a
    /// failure of the snapshotter under test) from stdout that ctr lost: ctr's FIFO copy can drop
    /// a short-lived task's whole output, and then the run is repeated once under a new id.
    pub fn run_script(&self, snapshotter: &str, reference: &str, id: &str, script: &str) -> String {
        self.run_script_with(&[], snapshotter, reference, id, script)
    }

    /// `run_script` with extra `ctr run` flags.
    pub fn run_script_with(
        &self,
        flags: &[&str],
        snapshotter: &str,
        reference: &str,
        id: &str,
        script: &str,
    ) -> String {
        const MARK: &str = "--ctr-run-done--";
        let script = format!("{script}; echo {MARK}");
        for attempt in ["", "-again"] {
            let id = format!("{id}{attempt}");
            let mut args = vec!["run", "--rm", "--snapshotter", snapshotter];
            args.extend(flags);
            args.extend([reference, &id, "/bin/sh", "-c", &script]);
            let out = self.ctr(&args);
            if let Some(printed) = out.strip_suffix(&format!("{MARK}\n")) {
                return printed.to_string();
            }
            assert!(out.is_empty(), "ctr run {id}: output without its end mark: {out:?}");
            eprintln!("ctr run {id}: stdout lost by ctr (not even the end mark arrived); running again");
        }
        panic!("ctr run {id}: stdout lost twice");
    }

    /// Like `ctr` but returns Err(stderr) instead of panicking (for tests expecting failure).
    pub fn try_ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = run_output(&mut self.command("ctr", args));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `TOOL --address SOCK --namespace NS ARGS…`, for callers that stream the output themselves.
    /// With containerd 2.1, `ctr` is 2.1's own (found first on PATH, as the shim is).
    pub fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tool_path(self.bin_dir.as_deref(), tool));
        if let Some(bin) = &self.bin_dir {
            c.env("PATH", path_with_first(bin));
        }
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        c.env_remove("CONTAINERD_SNAPSHOTTER")
            .env_remove("CONTAINERD_NAMESPACE");
        c
    }

    fn tool(&self, tool: &str, args: &[&str]) -> String {
        let mut c = self.command(tool, args);
        let out = run_output(&mut c);
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            panic!(
                "{tool} {:?} failed ({})\n--- stderr ---\n{}\n--- stdout ---\n{}\n--- containerd log tail ---\n{}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
                super::tail(&log, 15)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `bin_dir/tool` when that exists, else `tool` (looked up on PATH).
/// `[proxy_plugins.NAME]` tables (same keys in config versions 2 and 3).
pub(super) fn proxy_plugins(plugins: &[(String, PathBuf)]) -> String {
    plugins
        .iter()
        .map(|(name, socket)| {
            format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            )
        })
        .collect()
}

fn tool_path(bin_dir: Option<&Path>, tool: &str) -> PathBuf {
    match bin_dir.map(|b| b.join(tool)) {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from(tool),
    }
}

/// This process's PATH with `dir` in front.
fn path_with_first(dir: &Path) -> std::ffi::OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&rest))).unwrap()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            eprintln!("--- containerd log tail ---\n{}", super::tail(&log, 30));
        }
        umount_all_under(self.dir.path());
    }
}

/// A read-only view of an image mounted by `ctr images mount`; unmounted (and its snapshot/lease removed) on Drop.
pub struct MountedImage<'a> {
    containerd: &'a Containerd,
    target: PathBuf,
    /// The image reference that was pulled and mounted.
    pub image_ref: String,
}

impl MountedImage<'_> {
    /// The directory where the image's merged rootfs is visible.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for MountedImage<'_> {
    fn drop(&mut self) {
        let t = self.target.to_string_lossy().into_owned();
        if self.containerd.try_ctr(&["images", "unmount", "--rm", &t]).is_err() {
            umount_all_under(&self.target);
        }
    }
}

/// Ground truth: `ctr image pull --plain-http` with the overlayfs snapshotter, then `ctr images mount`
/// (read-only view, key = target path, held by a 24 h lease that unmount --rm removes) at `target`.
pub fn containerd_unpack<'a>(containerd: &'a Containerd, image_ref: &str, target: &Path) -> MountedImage<'a> {
    std::fs::create_dir_all(target).unwrap();
    let target = std::fs::canonicalize(target).unwrap();
    let t = target.to_string_lossy().into_owned();
    containerd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        image_ref,
    ]);
    containerd.ctr(&[
        "images",
        "mount",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        image_ref,
        &t,
    ]);
    MountedImage {
        containerd,
        target,
        image_ref: image_ref.to_string(),
    }
}
