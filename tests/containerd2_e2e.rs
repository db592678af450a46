//! End to end with containerd 2.1 (unpacked from Debian unstable by scripts/install-deps.sh) and
//! the system's runc: streamsnap as its proxy snapshotter behind a version-3 config, a real
//! registry, and the three ways images arrive there: `ctr-remote image rpull`, `streamsnap pull`
//! and CRI's PullImage, which 2.1 runs through its transfer service.
mod common;
use common::cri::{sandbox_config, Cri};
use common::image::build_pause_image;
use common::*;
use std::time::{Duration, Instant};

struct Env {
    registry: Registry,
    serve: ServeProcess,
    containerd: Containerd,
    work: tempfile::TempDir,
}

/// How the containerd under test runs CRI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CriPull {
    /// CRI disabled.
    Off,
    /// CRI on, pulling through 2.1's transfer service (the default).
    TransferService,
    /// CRI on with `disable_snapshot_annotations = false`, which makes 2.1 pull with `client.Pull()`.
    LocalPull,
}

/// Registry, `streamsnap serve` and a containerd 2.1 using it; with CRI, its pause image comes from
/// that registry.
fn start(cri: CriPull) -> Env {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let enable_cri = cri != CriPull::Off;
    let sandbox_image = enable_cri.then(|| {
        let pause = build_pause_image(&work.path().join("pause"));
        push(&pause, &registry, Format::Gzip)
    });
    // Indexes of plain gzip images come from a repository the operator lists (trusted).
    let serve = ServeProcess::start_with(
        &work.path().join("streamsnap"),
        &["--index-repo", &index_repo(&registry)],
    );
    let containerd = Containerd::start(ContainerdOpts {
        release: Release::V2_1,
        streamsnap_socket: Some(serve.socket.clone()),
        enable_cri,
        sandbox_image,
        plain_http_registries: vec![registry.addr()],
        restrict_oom_score_adj: enable_cri,
        cri_local_pull: cri == CriPull::LocalPull,
        log_level: "debug".into(),
        ..Default::default()
    });
    Env {
        registry,
        serve,
        containerd,
        work,
    }
}

/// Pushes a runnable eStargz image with `weights_mib` MiB of weights; returns its reference.
fn push_runnable(env: &Env, weights_mib: u64) -> String {
    push_runnable_as(env, weights_mib, Format::Estargz)
}

/// The index repository `streamsnap serve` is told to trust.
fn index_repo(registry: &Registry) -> String {
    format!("{}/indexes/shared", registry.addr())
}

/// Pushes a runnable image in `format`; a plain gzip one gets its index published to the
/// trusted index repository.
fn push_runnable_as(env: &Env, weights_mib: u64, format: Format) -> String {
    let image = build_runnable_image(&env.work.path().join("image"), weights_mib);
    let reference = push(&image, &env.registry, format);
    if format == Format::Gzip {
        index_image(
            &reference,
            &env.work.path().join("indexer"),
            &["--index-repo", &index_repo(&env.registry), "--min-layer-size", "0"],
        );
    }
    reference
}

/// Asserts the registry served under a fifth of the image's layer bytes since `mark`.
fn assert_lazy(env: &Env, reference: &str, mark: u64, when: &str) {
    let (total, digests) = env.registry.layers(reference);
    let served = env.registry.layer_bytes_served_since(&digests, mark);
    eprintln!(
        "{when}: layers {total} bytes, registry served {served} ({:.1}%)",
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 5 < total,
        "{when}: registry served {served} of {total} layer bytes of {reference} (not lazy)"
    );
}

fn containerd_version(env: &Env) -> String {
    env.containerd.ctr(&["version"])
}

#[test]
fn ctr_remote_rpull_on_containerd_2_1_is_lazy_and_ctr_run_works() {
    let started = Instant::now();
    let env = start(CriPull::Off);
    assert!(
        containerd_version(&env).contains("Version:  2.1"),
        "{}",
        containerd_version(&env)
    );
    let reference = push_runnable(&env, 64);
    let mark = env.registry.mark();
    env.containerd.rpull(&reference);
    assert_lazy(&env, &reference, mark, "after rpull");
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "r1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    assert_lazy(&env, &reference, mark, "after ctr run");
    assert!(env.serve.log().contains("layer served lazily"), "{}", env.serve.log());
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn ctr_image_pull_on_containerd_2_1_is_lazy_through_the_transfer_service_and_ctr_run_works() {
    let started = Instant::now();
    let env = start(CriPull::Off);
    let reference = push_runnable(&env, 64);
    let mark = env.registry.mark();
    // 2.x's `ctr image pull` hands the pull to the transfer service (`--local` would not).
    env.containerd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "streamsnap",
        &reference,
    ]);
    assert_lazy(&env, &reference, mark, "after ctr image pull");
    // The unpack ran inside containerd (its transfer service), not in the ctr client.
    let log = std::fs::read_to_string(env.containerd.log_path()).unwrap();
    assert!(
        log.contains("msg=\"image unpacked\""),
        "containerd did not unpack {reference} itself (no transfer service pull):\n{}",
        common::tail(&log, 40)
    );
    assert!(env.serve.log().contains("layer served lazily"), "{}", env.serve.log());
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "t1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    assert_lazy(&env, &reference, mark, "after ctr run");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn an_unindexed_plain_gzip_image_pulled_through_the_transfer_service_is_unpacked_normally_and_runs() {
    let started = Instant::now();
    let env = start(CriPull::Off);
    let image = build_runnable_image(&env.work.path().join("image"), 4);
    let reference = push(&image, &env.registry, Format::Gzip);
    env.containerd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "streamsnap",
        &reference,
    ]);
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "u1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    assert!(!env.serve.log().contains("layer served lazily"), "{}", env.serve.log());
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn streamsnap_pull_on_containerd_2_1_is_lazy_and_the_container_runs() {
    let started = Instant::now();
    let env = start(CriPull::Off);
    let reference = push_runnable(&env, 64);
    let (_, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    let out = common::run(
        std::process::Command::new(common::streamsnap::binary())
            .args(["pull", "--address"])
            .arg(env.containerd.socket())
            .args(["--namespace", env.containerd.namespace(), &reference]),
    );
    assert!(
        out.contains(&format!("{} layers served lazily, 0 unpacked", digests.len())),
        "{out}"
    );
    assert_lazy(&env, &reference, mark, "after streamsnap pull");
    let run = env
        .containerd
        .run_script("streamsnap", &reference, "p1", "cat /etc/greeting");
    assert_eq!(run.trim(), "hello from streamsnap");
    assert_lazy(&env, &reference, mark, "after ctr run");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn cri_pull_on_containerd_2_1_is_lazy_through_the_transfer_service_and_a_pod_container_runs() {
    cri_pull_is_lazy_and_a_pod_container_runs(CriPull::TransferService, Format::Estargz);
}

#[test]
fn cri_pull_of_an_indexed_plain_gzip_image_on_containerd_2_1_is_lazy_and_a_pod_container_runs() {
    cri_pull_is_lazy_and_a_pod_container_runs(CriPull::TransferService, Format::Gzip);
}

#[test]
fn cri_pull_on_containerd_2_1_with_snapshot_annotations_enabled_is_lazy_through_client_pull() {
    cri_pull_is_lazy_and_a_pod_container_runs(CriPull::LocalPull, Format::Estargz);
}

/// CRI PullImage of a runnable image in `format` serves its layers lazily along the `how` path,
/// and a container of a host-network pod runs from it still lazily.
fn cri_pull_is_lazy_and_a_pod_container_runs(how: CriPull, format: Format) {
    let started = Instant::now();
    let env = start(how);
    let reference = push_runnable_as(&env, 64, format);
    let cri = Cri::connect(&env.containerd);
    let mark = env.registry.mark();
    let image_id = cri.pull_image(&reference);
    assert_lazy(&env, &reference, mark, "after CRI PullImage");
    let path = match how {
        CriPull::LocalPull => "using client.Pull()",
        _ => "using transfer service",
    };
    let log = std::fs::read_to_string(env.containerd.log_path()).unwrap();
    assert!(
        log.lines().any(|l| l.contains(path) && l.contains(&reference)),
        "containerd did not pull {reference} {path}:\n{}",
        common::tail(&log, 40)
    );
    let served_lazily = env.serve.log().matches("layer served lazily").count();
    assert!(served_lazily >= 2, "{}", env.serve.log());

    let log_dir = env.work.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let sandbox = sandbox_config(&log_dir);
    let pod = cri.run_pod(&sandbox);
    let (exit_code, output) = cri.run_to_exit(&pod.id, &sandbox, &image_id, "greeter", &["/bin/cat", "/etc/greeting"]);
    assert_eq!(exit_code, 0, "--- container log ---\n{output}");
    assert!(output.contains("stdout F hello from streamsnap"), "{output}");
    assert_lazy(&env, &reference, mark, "after the pod's container ran");
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn image_rm_after_rpull_on_containerd_2_1_lets_gc_remove_snapshots_layer_mounts_and_cache() {
    gc_removes_layers_after_image_rm(|env, reference| {
        env.containerd.rpull(reference);
    });
}

#[test]
fn image_rm_after_a_transfer_service_pull_on_containerd_2_1_lets_gc_remove_snapshots_layer_mounts_and_cache() {
    gc_removes_layers_after_image_rm(|env, reference| {
        env.containerd.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "streamsnap",
            reference,
        ]);
    });
}

/// After `pull` and a container that reads all its weights, `ctr image rm --sync` lets containerd
/// 2.1's GC remove streamsnap's snapshots, and streamsnap unmounts the layers and drops their cache.
fn gc_removes_layers_after_image_rm(pull: impl Fn(&Env, &str)) {
    let started = Instant::now();
    let env = start(CriPull::Off);
    let reference = push_runnable(&env, 16);
    pull(&env, &reference);
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "g1", "cat /models/weights.bin | wc -c");
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    let root = &env.serve.root;
    let cache = root.join("state/cache");
    assert!(
        !fuse_mounts_under(root).is_empty(),
        "no layer mounted under {}",
        root.display()
    );
    assert!(
        std::fs::read_dir(&cache).unwrap().count() > 0,
        "nothing cached in {}",
        cache.display()
    );

    env.containerd.ctr(&["image", "rm", "--sync", &reference]);
    wait_until(
        Duration::from_secs(60),
        "containerd 2.1's GC to remove streamsnap's snapshots",
        || {
            env.containerd
                .ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
                .lines()
                .count()
                <= 1
        },
    );
    wait_until(Duration::from_secs(30), "streamsnap's layer mounts to go", || {
        fuse_mounts_under(root).is_empty()
    });
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "cache still holds {left:?}");
    eprintln!("took {:?}", started.elapsed());
}
