//! Unmodified gzip images (umoci-built, pushed by skopeo, never converted)
//! served lazily through a checkpoint index made by `streamsnap index`.
mod common;
use common::image::build_big_layer_image;
use common::*;
use std::time::Duration;

/// The mount's log line for a layer served through a gzip index.
const SERVED_BY_INDEX: &str = "layer indexed format=GzipIndex";

#[test]
fn an_indexed_gzip_image_mounts_equal_to_containerds_unpack() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_feature_image(&work.path().join("image"), 64 << 20);
    let reference = push(&image, &registry, Format::Gzip);
    // Every layer, however small, so that every entry kind goes through the index.
    let out = index_image(
        &reference,
        &work.path().join("indexer"),
        &["--push", "--min-layer-size", "0"],
    );
    assert!(out.contains("published"), "{out}");
    let containerd = Containerd::start(ContainerdOpts::default());
    let truth = containerd_unpack(&containerd, &reference, &work.path().join("truth"));
    // A fresh state dir: the index must come from the registry (fallback tag),
    // which this node trusts only because it opts in.
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--trust-referrers"],
    );
    let diffs = compare_trees(&mount.mountpoint, truth.path(), CompareOpts::stargz_artefacts());
    let log = mount.stop();
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}\n{log}",
        diffs.len(),
        diffs.join("\n")
    );
    let (_, layers) = registry.layers(&reference);
    assert_eq!(log.matches(SERVED_BY_INDEX).count(), layers.len(), "{log}");
    assert!(!log.contains("Downloaded"), "{log}");
}

#[test]
fn one_small_file_of_a_500_mib_gzip_layer_costs_one_span_and_the_index_is_small() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let big = build_big_layer_image(&work.path().join("image"), 500);
    let reference = push(&big.image, &registry, Format::Gzip);
    let (layer_size, layers) = registry.layers(&reference);
    let out = index_image(&reference, &work.path().join("indexer"), &["--push"]);
    let index_file = work
        .path()
        .join("indexer/indexes")
        .join(format!("{}.trusted.gzindex", layers[0].trim_start_matches("sha256:")));
    let index_size = std::fs::metadata(&index_file).unwrap().len();
    eprintln!(
        "{out}layer {layer_size} bytes, index {index_size} bytes ({:.3}%)",
        index_size as f64 * 100.0 / layer_size as f64
    );
    assert!(
        index_size * 50 < layer_size,
        "index {index_size} is not under 2% of {layer_size}"
    );

    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--trust-referrers"],
    );
    for (path, content) in big.before.iter().chain(&big.after).take(3) {
        let mark = registry.mark();
        let got = std::fs::read(mount.mountpoint.join(path)).unwrap();
        assert!(got == *content, "{path} differs");
        let fetched = registry.bytes_served_for_blob_since(&layers[0], mark);
        eprintln!("{path}: {fetched} layer bytes fetched");
        assert!(fetched < 8 << 20, "{path}: fetched {fetched} layer bytes");
    }
    let log = mount.stop();
    assert!(log.contains(SERVED_BY_INDEX), "{log}");
}

#[test]
fn an_index_repository_serves_images_their_users_cannot_write_to() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = push(&image, &registry, Format::Gzip);
    let repo = format!("{}/indexes/shared", registry.addr());
    index_image(&reference, &work.path().join("indexer"), &["--index-repo", &repo]);
    let (_, layers) = registry.layers(&reference);
    // The weights layer is indexed (the busybox layer is under the minimum size).
    let tag = format!("{repo}:gzindex-{}", layers.last().unwrap().replace(':', "-"));
    assert!(registry.has_manifest(&tag), "{tag} missing");
    // Without the repository configured, the weights layer is downloaded whole.
    let plain = MountProcess::start(&reference, &work.path().join("s1"), &work.path().join("m1"), &[]);
    let plain_log = plain.stop();
    assert!(!plain_log.contains(SERVED_BY_INDEX), "{plain_log}");
    let mark = registry.mark();
    let mount = MountProcess::start(
        &reference,
        &work.path().join("s2"),
        &work.path().join("m2"),
        &["--index-repo", &repo],
    );
    let greeting = std::fs::read_to_string(mount.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    let log = mount.stop();
    assert!(
        log.contains(SERVED_BY_INDEX) && log.contains("gzip index fetched"),
        "{log}"
    );
    let weights = layers.last().unwrap();
    let fetched = registry.bytes_served_for_blob_since(weights, mark);
    assert!(fetched < 1 << 20, "weights layer: {fetched} bytes fetched");
}

#[test]
fn a_mismatched_or_corrupt_index_is_rejected_and_the_layer_falls_back() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = push(&image, &registry, Format::Gzip);
    let (_, layers) = registry.layers(&reference);
    let state = work.path().join("state");
    index_image(&reference, &state, &["--min-layer-size", "0"]);
    let index_of = |layer: &str| {
        state
            .join("indexes")
            .join(format!("{}.trusted.gzindex", layer.trim_start_matches("sha256:")))
    };
    let (first, last) = (index_of(&layers[0]), index_of(layers.last().unwrap()));
    // The weights layer gets the userland layer's index: mismatched.
    std::fs::copy(&first, &last).unwrap();
    // The userland layer's index gets a flipped byte in its meta section: corrupt.
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&first, &bytes).unwrap();
    let mount = MountProcess::start(&reference, &state, &work.path().join("mnt"), &[]);
    let greeting = std::fs::read_to_string(mount.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    let log = mount.stop();
    assert!(log.contains("gzip index rejected"), "{log}");
    assert!(log.contains("built for layer"), "mismatch named: {log}");
    assert!(!log.contains(SERVED_BY_INDEX), "{log}");
    assert!(!first.exists() && !last.exists(), "rejected indexes are dropped");
}

#[test]
fn wrong_span_bytes_from_the_registry_are_never_handed_out() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let big = build_big_layer_image(&work.path().join("image"), 8);
    let pushed = push(&big.image, &registry, Format::Gzip);
    index_image(&pushed, &work.path().join("indexer"), &["--push", "--span", "1MiB"]);
    let proxy = FaultProxy::start(&registry.addr());
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--trust-referrers"],
    );
    proxy.set("/blobs/", Fault::FlipByte);
    let (path, content) = &big.after[1];
    let err = std::fs::read(mount.mountpoint.join(path)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mount.log().contains("span failed verification"), "{}", mount.log());
    // Once the registry behaves, the same read succeeds: failures are not cached.
    proxy.clear();
    assert!(std::fs::read(mount.mountpoint.join(path)).unwrap() == *content);
    mount.stop();
}

#[test]
fn a_first_node_indexes_an_unindexed_gzip_image_from_one_download_and_publishes_it_for_the_next_node() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = push(&image, &registry, Format::Gzip);
    let (total, layers) = registry.layers(&reference);
    let repo = format!("{}/indexes/fleet", registry.addr());
    let first_use = ["--build-index-on-first-use", "--publish-index", repo.as_str()];

    let mark = registry.mark();
    let first = MountProcess::start(&reference, &work.path().join("s1"), &work.path().join("m1"), &first_use);
    let greeting = std::fs::read(first.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, b"hello from streamsnap\n", "{}", first.log());
    for layer in &layers {
        let tag = format!("{repo}:gzindex-{}", layer.replace(':', "-"));
        wait_until(Duration::from_secs(30), "the index is published", || {
            registry.has_manifest(&tag)
        });
    }
    let log = first.stop();
    assert_eq!(log.matches("layer indexed on first use").count(), layers.len(), "{log}");
    assert_eq!(
        log.matches("layer indexed format=Unpacked").count(),
        layers.len(),
        "{log}"
    );
    // One download per layer: every read after it is served from the tar it left.
    assert_eq!(registry.layer_bytes_served_since(&layers, mark), total, "{log}");

    let mark = registry.mark();
    let next = MountProcess::start(
        &reference,
        &work.path().join("s2"),
        &work.path().join("m2"),
        &["--index-repo", &repo],
    );
    let greeting = std::fs::read_to_string(next.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    let log = next.stop();
    assert_eq!(log.matches(SERVED_BY_INDEX).count(), layers.len(), "{log}");
    assert!(!log.contains("layer indexed on first use"), "{log}");
    let fetched = registry.bytes_served_for_blob_since(layers.last().unwrap(), mark);
    assert!(
        fetched < 1 << 20,
        "weights layer: {fetched} bytes fetched by the next node"
    );
}
