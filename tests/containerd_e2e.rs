//! End to end with real containerd 1.6 (streamsnap as a proxy snapshotter),
//! real runc and a real registry, all started by the tests.
mod common;
use common::*;

struct Env {
    registry: Registry,
    serve: Option<ServeProcess>,
    containerd: Containerd,
    work: tempfile::TempDir,
}

fn start() -> Env {
    start_with(&[])
}

/// Registry, `streamsnap serve EXTRA…` and a containerd using it.
fn start_with(extra: &[&str]) -> Env {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let serve = ServeProcess::start_with(&work.path().join("streamsnap"), extra);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    Env {
        registry,
        serve: Some(serve),
        containerd,
        work,
    }
}

#[test]
fn rpull_of_an_estargz_image_runs_lazily_and_survives_a_restart() {
    let mut env = start();
    let image = build_runnable_image(&env.work.path().join("image"), 64);
    let reference = push(&image, &env.registry, Format::Estargz);
    let (total, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    rpull(&env, &reference);
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "c1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    let served = env.registry.layer_bytes_served_since(&digests, mark);
    eprintln!(
        "layers {total} bytes; registry served {served} ({:.1}%)",
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 5 < total,
        "registry served {served} of {total} layer bytes (not lazy)"
    );
    let log = env.serve.as_ref().unwrap().log();
    assert!(log.contains("layer served lazily"), "{log}");

    // (e) restart the daemon: the image still runs, its snapshots intact.
    let before = env.containerd.ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"]);
    env.serve.take().unwrap().stop();
    env.serve = Some(ServeProcess::start(&env.work.path().join("streamsnap")));
    // containerd reconnects to the proxy plugin with gRPC's backoff.
    let mut after = String::new();
    wait_until(
        std::time::Duration::from_secs(60),
        "containerd to reconnect to streamsnap",
        || match env
            .containerd
            .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
        {
            Ok(out) => {
                after = out;
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(before, after);
    let out = env.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "c2",
        "/bin/sh",
        "-c",
        "cat /etc/greeting; head -c 1000000 /models/weights.bin | wc -c",
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["hello", "from", "streamsnap", "1000000"]
    );
}

#[test]
fn a_plain_gzip_image_is_unpacked_normally_and_runs() {
    let env = start();
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
        .run_script("streamsnap", &reference, "g1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    assert!(!env.serve.as_ref().unwrap().log().contains("layer served lazily"));
}

#[test]
fn rpull_of_an_indexed_plain_gzip_image_runs_lazily() {
    // The index is published next to the image: this node opts into referrers.
    let env = start_with(&["--trust-referrers"]);
    let image = build_runnable_image(&env.work.path().join("image"), 64);
    let reference = push(&image, &env.registry, Format::Gzip);
    // Published next to the image; the daemon's own index cache stays empty.
    index_image(
        &reference,
        &env.work.path().join("indexer"),
        &["--push", "--min-layer-size", "0"],
    );
    let (total, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    rpull(&env, &reference);
    let out = env
        .containerd
        .run_script("streamsnap", &reference, "gi1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    let served = env.registry.layer_bytes_served_since(&digests, mark);
    eprintln!("layers {total} bytes; registry served {served}");
    let log = env.serve.as_ref().unwrap().log();
    assert!(
        served * 5 < total,
        "registry served {served} of {total} layer bytes (not lazy)\n{log}"
    );
    assert_eq!(
        log.matches("layer indexed format=GzipIndex").count(),
        digests.len(),
        "{log}"
    );
    let out = env.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "gi2",
        "/bin/sh",
        "-c",
        "sha256sum /models/weights.bin",
    ]);
    // The same bytes as build_runnable_image wrote (64 MiB, seed 11).
    let expected = env.work.path().join("weights-expected");
    write_random_file(&expected, 64 << 20, 11);
    let want = common::tree::file_sha256(&expected);
    assert_eq!(out.split_whitespace().next(), Some(want.as_str()), "{out}");
}

#[test]
fn rpull_of_an_unindexed_plain_gzip_image_indexes_it_on_first_use_from_one_download_and_runs_across_a_restart() {
    let mut env = start_with(&["--build-index-on-first-use"]);
    let image = build_runnable_image(&env.work.path().join("image"), 16);
    let reference = push(&image, &env.registry, Format::Gzip);
    let (total, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    rpull(&env, &reference);
    let out = env.containerd.run_script(
        "streamsnap",
        &reference,
        "fu1",
        "cat /etc/greeting; sha256sum /models/weights.bin",
    );
    let log = env.serve.as_ref().unwrap().log();
    let expected = env.work.path().join("weights-expected");
    write_random_file(&expected, 16 << 20, 11);
    let want = common::tree::file_sha256(&expected);
    assert_eq!(
        out.split_whitespace().take(2).collect::<Vec<_>>(),
        vec!["hello", "from"],
        "{out}\n{log}"
    );
    assert!(out.contains(&want), "{out}");
    assert_eq!(
        log.matches("layer indexed on first use").count(),
        digests.len(),
        "{log}"
    );
    assert_eq!(
        log.matches("layer indexed format=Unpacked").count(),
        digests.len(),
        "{log}"
    );
    // containerd fetched nothing itself: each blob went over the wire once, to streamsnap.
    assert_eq!(env.registry.layer_bytes_served_since(&digests, mark), total, "{log}");

    // A restart serves the layers again from their kept tars, asking the registry for nothing.
    let mark = env.registry.mark();
    env.serve.take().unwrap().stop();
    env.serve = Some(ServeProcess::start_with(
        &env.work.path().join("streamsnap"),
        &["--build-index-on-first-use"],
    ));
    wait_until(
        std::time::Duration::from_secs(60),
        "containerd to reconnect to streamsnap",
        || {
            env.containerd
                .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
                .is_ok()
        },
    );
    let again = env
        .containerd
        .run_script("streamsnap", &reference, "fu2", "sha256sum /models/weights.bin");
    let log = env.serve.as_ref().unwrap().log();
    assert!(again.contains(&want), "{again}\n{log}");
    assert!(!log.contains("layer indexed on first use"), "{log}");
    assert_eq!(env.registry.layer_bytes_served_since(&digests, mark), 0, "{log}");
}

#[test]
fn removing_the_image_removes_snapshots_unmounts_layers_and_releases_cache() {
    let env = start();
    let image = build_runnable_image(&env.work.path().join("image"), 16);
    let reference = push(&image, &env.registry, Format::Estargz);
    rpull(&env, &reference);
    let out = env.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "c1",
        "/bin/sh",
        "-c",
        "cat /models/weights.bin | wc -c",
    ]);
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    let root = &env.serve.as_ref().unwrap().root;
    let cache = root.join("state/cache");
    assert!(!fuse_mounts_under(root).is_empty());
    assert!(std::fs::read_dir(&cache).unwrap().count() > 0, "nothing cached");

    env.containerd.ctr(&["image", "rm", "--sync", &reference]);
    wait_until(
        std::time::Duration::from_secs(60),
        "containerd's GC to remove streamsnap's snapshots",
        || {
            env.containerd
                .ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
                .lines()
                .count()
                <= 1
        },
    );
    wait_until(std::time::Duration::from_secs(30), "layer mounts to go", || {
        fuse_mounts_under(root).is_empty()
    });
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "cache still holds {left:?}");
}

fn rpull(env: &Env, reference: &str) {
    env.containerd.rpull(reference);
}

fn streamsnap_pull(env: &Env, reference: &str) -> String {
    common::run(
        std::process::Command::new(common::streamsnap::binary())
            .args(["pull", "--address"])
            .arg(env.containerd.socket())
            .args(["--namespace", env.containerd.namespace(), reference]),
    )
}

#[test]
fn streamsnap_pull_then_ctr_run_works_lazily() {
    let env = start();
    let image = build_runnable_image(&env.work.path().join("image"), 32);
    let reference = push(&image, &env.registry, Format::Estargz);
    let (total, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    let out = streamsnap_pull(&env, &reference);
    assert!(
        out.contains(&format!("{} layers served lazily, 0 unpacked", digests.len())),
        "{out}"
    );
    let run = env
        .containerd
        .run_script("streamsnap", &reference, "p1", "cat /etc/greeting");
    assert_eq!(run.trim(), "hello from streamsnap");
    let served = env.registry.layer_bytes_served_since(&digests, mark);
    assert!(served * 5 < total, "registry served {served} of {total} layer bytes");
}

#[test]
fn streamsnap_pull_of_a_plain_gzip_image_unpacks_through_containerd() {
    let env = start();
    let image = build_runnable_image(&env.work.path().join("image"), 2);
    let reference = push(&image, &env.registry, Format::Gzip);
    let (_, digests) = env.registry.layers(&reference);
    let out = streamsnap_pull(&env, &reference);
    assert!(
        out.contains(&format!("0 layers served lazily, {} unpacked", digests.len())),
        "{out}"
    );
    let run = env
        .containerd
        .run_script("streamsnap", &reference, "p2", "cat /etc/greeting");
    assert_eq!(run.trim(), "hello from streamsnap");
}

/// One sample's value from an OpenMetrics exposition, 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_count_fetches_lookups_reads_and_layer_mounts() {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = start_with(&["--metrics-address", &addr]);
    let image = build_runnable_image(&env.work.path().join("image"), 8);
    let reference = push(&image, &env.registry, Format::Estargz);
    let (_, digests) = env.registry.layers(&reference);
    let mark = env.registry.mark();
    let scrape = || run(std::process::Command::new("curl").args(["-sSf", &format!("http://{addr}/metrics")]));
    rpull(&env, &reference);
    for name in ["m1", "m2"] {
        let out = env
            .containerd
            .run_script("streamsnap", &reference, name, "cat /etc/greeting");
        assert_eq!(out.trim(), "hello from streamsnap");
        // So that the second container's reads reach streamsnap, not the page cache.
        run_sh("echo 3 > /proc/sys/vm/drop_caches");
    }
    let text = scrape();
    let on_demand = sample(&text, "streamsnap_fetched_bytes_total{cause=\"on_demand\"}");
    let served = env.registry.layer_bytes_served_since(&digests, mark) as f64;
    assert!(
        on_demand > 0.0 && on_demand <= served,
        "on-demand {on_demand}, registry served {served}:\n{text}"
    );
    assert_eq!(
        sample(&text, "streamsnap_layer_mount_seconds_count"),
        digests.len() as f64,
        "{text}"
    );
    assert!(sample(&text, "streamsnap_fuse_read_seconds_count") > 0.0, "{text}");
    assert!(
        sample(&text, "streamsnap_chunk_lookups_total{result=\"miss\"}") > 0.0,
        "{text}"
    );
    // The second container found what the first one fetched.
    let hits = sample(&text, "streamsnap_chunk_lookups_total{result=\"memory_hit\"}")
        + sample(&text, "streamsnap_chunk_lookups_total{result=\"disk_hit\"}");
    assert!(hits > 0.0, "{text}");
}
