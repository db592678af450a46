//! Nothing streamsnap mounts or caches is reachable by an unprivileged host
//! user, while setuid binaries and device nodes inside containers behave as
//! with overlayfs (design.md section 11; containerd's own snapshotters made the
//! same promise after CVE-2021-41103).
mod common;
use common::image::build_privileged_image;
use common::*;
use std::path::{Path, PathBuf};

/// Runs as root in the container, then as `nobody`: the setuid binary, a write
/// to the device node, the root-only file.
const SCRIPT: &str = "su -s /bin/sh nobody -c /bin/euid; \
    echo hi > /devices/null && echo device-ok; \
    su -s /bin/sh nobody -c 'cat /etc/secret' 2>/dev/null || echo secret-denied-to-nobody; \
    cat /etc/secret";

struct Env {
    serve: ServeProcess,
    containerd: Containerd,
    reference: String,
    _registry: Registry,
    _work: tempfile::TempDir,
}

/// A lazily pulled image with setuid-root binaries, device nodes and a 0600
/// file, under a work dir any user may traverse (as /var/lib is), so that only
/// streamsnap's own modes stand between host users and its state.
fn lazily_pulled_privileged_image() -> Env {
    require_root();
    require_tool("setpriv");
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    fsutil::chmod(work.path(), 0o755);
    let root = work.path().join("streamsnap");
    std::fs::create_dir_all(&root).unwrap();
    fsutil::chmod(&root, 0o755);
    let serve = ServeProcess::start(&root);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let image = build_privileged_image(&work.path().join("image"));
    let reference = push(&image, &registry, Format::Estargz);
    containerd.rpull(&reference);
    Env {
        serve,
        containerd,
        reference,
        _registry: registry,
        _work: work,
    }
}

/// (mount point, per-mount options, superblock options) of every layer streamsnap mounted.
fn layer_mounts() -> Vec<(PathBuf, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let ours = right.get(1).is_some_and(|source| source.starts_with("streamsnap:"));
            ours.then(|| {
                (
                    PathBuf::from(unescape_mountinfo(left[4])),
                    left[5].to_string(),
                    right.get(2).unwrap_or(&"").to_string(),
                )
            })
        })
        .collect()
}

/// Which of `paths` uid 65534 can open (a directory is listed, a file read).
fn reachable_by_nobody(paths: &[PathBuf]) -> Vec<String> {
    let script = r#"for p in "$@"; do if [ -d "$p" ]; then ls "$p" >/dev/null 2>&1 && echo "$p"; else cat "$p" >/dev/null 2>&1 && echo "$p"; fi; done; true"#;
    let out = run(std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .args(paths));
    out.lines().map(str::to_string).collect()
}

/// Every path under `dir`, not descending into the `skip` mount points.
fn all_paths_under(dir: &Path, skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() && !out[i].is_symlink() && !skip.contains(&out[i]) {
            for e in std::fs::read_dir(&out[i]).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

#[test]
fn setuid_binaries_and_devices_in_a_container_behave_as_with_overlayfs() {
    let env = lazily_pulled_privileged_image();
    let flags = ["--allow-new-privs"];
    let lazy = env
        .containerd
        .run_script_with(&flags, "streamsnap", &env.reference, "lazy", SCRIPT);
    env.containerd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &env.reference,
    ]);
    let overlay = env
        .containerd
        .run_script_with(&flags, "overlayfs", &env.reference, "overlay", SCRIPT);
    assert_eq!(lazy, overlay);
    assert_eq!(
        lazy,
        "uid=65534 euid=0\ndevice-ok\nsecret-denied-to-nobody\ntop secret\n"
    );
}

#[test]
fn a_host_user_reaches_neither_layer_mounts_nor_cached_bytes() {
    let env = lazily_pulled_privileged_image();
    // The container reads the secret: its bytes are now in the cache too.
    let out = env
        .containerd
        .run_script("streamsnap", &env.reference, "reader", "cat /etc/secret");
    assert_eq!(out, "top secret\n");
    let mounts = layer_mounts();
    assert!(!mounts.is_empty(), "no streamsnap layer mounts");
    for (point, options, super_options) in &mounts {
        let flags: Vec<&str> = options.split(',').collect();
        assert!(
            flags.contains(&"nosuid") && flags.contains(&"nodev"),
            "{}: {options}",
            point.display()
        );
        assert!(
            !super_options.contains("allow_other"),
            "{}: {super_options}",
            point.display()
        );
    }
    let points: Vec<PathBuf> = mounts.iter().map(|(p, _, _)| p.clone()).collect();
    let state = all_paths_under(&env.serve.root.join("state"), &points);
    let cached = state.iter().filter(|p| p.is_file()).count();
    assert!(cached > 0, "nothing cached under the state dir");
    let mut targets = state;
    for (point, _, _) in &mounts {
        targets.push(point.clone());
        targets.push(point.join("etc/secret"));
        targets.push(point.join("bin/euid"));
    }
    assert_eq!(reachable_by_nobody(&targets), Vec::<String>::new());
}
