//! End to end with containerd 2.1 (unpacked from Debian unstable by scripts/install-deps.sh) and
//! the system's runc: streamsnap as its proxy snapshotter behind a version-3 config, a real
//! registry, and the three ways images arrive there: `ctr-remote image rpull`, `streamsnap pull`
//! and CRI's PullImage, which 2.1 runs through its transfer service.
mod common;
use common::cri::{sandbox_config, Cri};
use common::image::build_pause_image;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

struct Env {
    registry: Registry,
    serve: ServeProcess,
    containerd: Containerd,
    work: tempfile::TempDir,
}

/// Registry, `streamsnap serve` and a containerd 2.1 using it; `cri` enables CRI with a pause
/// image `pause` from that registry.
fn start(cri: bool) -> Env {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let sandbox_image = cri.then(|| {
        let pause = build_pause_image(&work.path().join("pause"));
        push(&pause, &registry, Format::Gzip)
    });
    let serve = ServeProcess::start(&work.path().join("streamsnap"));
    let containerd = Containerd::start(ContainerdOpts {
        release: Release::V2_1,
        streamsnap_socket: Some(serve.socket.clone()),
        enable_cri: cri,
        sandbox_image,
        plain_http_registries: vec![registry.addr()],
        restrict_oom_score_adj: cri,
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
    let image = build_runnable_image(&env.work.path().join("image"), weights_mib);
    push(&image, &env.registry, Format::Estargz)
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
    let env = start(false);
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
fn streamsnap_pull_on_containerd_2_1_is_lazy_and_the_container_runs() {
    let started = Instant::now();
    let env = start(false);
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
    let started = Instant::now();
    let env = start(true);
    let reference = push_runnable(&env, 64);
    let cri = Cri::connect(&env.containerd);
    let mark = env.registry.mark();
    let image_id = cri.pull_image(&reference);
    assert_lazy(&env, &reference, mark, "after CRI PullImage");
    let log = std::fs::read_to_string(env.containerd.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("using transfer service") && l.contains(&reference)),
        "containerd did not pull {reference} through its transfer service:\n{}",
        common::tail(&log, 40)
    );
    assert!(env.serve.log().contains("layer served lazily"), "{}", env.serve.log());

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
fn removing_an_image_on_containerd_2_1_lets_gc_remove_its_snapshots_unmount_its_layers_and_release_cache() {
    let started = Instant::now();
    let env = start(false);
    let reference = push_runnable(&env, 16);
    env.containerd.rpull(&reference);
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

/// FUSE mounts at or below `dir`.
fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(dir.to_str().unwrap()) && l.contains(" fuse"))
        .map(str::to_string)
        .collect()
}
