//! Prefetch hints: eStargz landmarks put by `ctr-remote` in front of the files
//! start-up reads are honoured before a layer is reported mounted.
mod common;
use common::*;

/// Converts the pushed gzip image to eStargz with `ctr-remote`, placing
/// `record` (paths in the image) first, followed by `.prefetch.landmark`
/// (an empty record: `.no.prefetch.landmark`); pushes it as `tag`.
fn estargz_with_landmark(image: &OciImage, registry: &Registry, record: &[&str], tag: &str) -> String {
    let gz = push(image, registry, Format::Gzip);
    let out = format!("{}:{tag}", gz.rsplit_once(':').unwrap().0);
    let ctd = Containerd::start(ContainerdOpts::default());
    ctd.ctr(&["content", "fetch", "--plain-http", &gz]);
    let mut args = vec!["images", "convert", "--oci", "--estargz"];
    let record_file = ctd.scratch_dir().join("record.json");
    if !record.is_empty() {
        let lines: Vec<String> = record.iter().map(|p| format!("{{\"path\":\"{p}\"}}")).collect();
        std::fs::write(&record_file, lines.join("\n") + "\n").unwrap();
        args.extend(["--estargz-record-in", record_file.to_str().unwrap()]);
    }
    args.extend([gz.as_str(), out.as_str()]);
    ctd.ctr_remote(&args);
    ctd.push_image(&out);
    out
}

#[test]
fn landmark_files_arrive_before_the_mount_is_ready() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = estargz_with_landmark(&image, &registry, &["/etc/greeting", "/bin/busybox"], "landmark");
    let (_, layers) = registry.layers(&reference);
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    let log = mount.log();
    assert!(
        log.contains("landmark files prefetched") && log.contains("complete=true"),
        "{log}"
    );
    let mark = registry.mark();
    let greeting = std::fs::read_to_string(mount.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    let busybox = std::fs::read(mount.mountpoint.join("bin/busybox")).unwrap();
    assert_eq!(busybox, std::fs::read("/bin/busybox").unwrap());
    let fetched = registry.layer_bytes_served_since(&layers, mark);
    assert_eq!(fetched, 0, "start-up files were fetched on demand:\n{}", mount.log());
    mount.stop();
}

#[test]
fn no_prefetch_landmark_means_no_prefetch() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = estargz_with_landmark(&image, &registry, &[], "nolandmark");
    let (_, layers) = registry.layers(&reference);
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    assert!(!mount.log().contains("landmark files prefetched"), "{}", mount.log());
    let mark = registry.mark();
    std::fs::read(mount.mountpoint.join("etc/greeting")).unwrap();
    assert!(registry.layer_bytes_served_since(&layers, mark) > 0);
    mount.stop();
}

/// A registry holding the runnable image (`weights_mib` of weights) as
/// eStargz: (registry, work dir, reference, layer digests).
fn runnable_estargz(weights_mib: u64) -> (Registry, tempfile::TempDir, String, Vec<String>) {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), weights_mib);
    let reference = push(&image, &registry, Format::Estargz);
    let (_, layers) = registry.layers(&reference);
    (registry, work, reference, layers)
}

#[test]
fn background_fill_completes_the_layers_and_the_container_runs_without_the_registry() {
    let (registry, work, reference, layers) = runnable_estargz(32);
    let serve = ServeProcess::start_with(
        &work.path().join("streamsnap"),
        &["--background-fill", "--background-fill-delay", "0"],
    );
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    containerd.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "streamsnap",
        &reference,
    ]);
    let out = containerd.run_script("streamsnap", &reference, "bf1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    wait_for_log(|| serve.log(), "background fill complete", layers.len());
    let log = serve.log();
    assert_eq!(log.matches("proof=LayerDigest").count(), layers.len(), "{log}");
    // Hashing the compressed blobs cost each layer little beyond its size:
    // what start-up read before the fill came again, nothing else did.
    for l in registry.manifest(&reference)["layers"].as_array().unwrap() {
        let (digest, size) = (l["digest"].as_str().unwrap(), l["size"].as_u64().unwrap());
        let served = registry.bytes_served_for_blob(digest);
        eprintln!("layer {digest}: {size} bytes, registry served {served}");
        assert!(served <= size + size / 10 + (64 << 10), "{digest}: {served} of {size}");
    }
    // The registry goes away: every byte of the image is on the node.
    drop(registry);
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "bf2",
        "/bin/sh",
        "-c",
        "sha256sum /models/weights.bin; ls -R / | wc -l",
    ]);
    let expected = work.path().join("weights-expected");
    write_random_file(&expected, 32 << 20, 11);
    let want = common::tree::file_sha256(&expected);
    assert_eq!(
        out.split_whitespace().next(),
        Some(want.as_str()),
        "{out}\n{}",
        serve.log()
    );
    assert!(!serve.log().contains("chunk read failed"), "{}", serve.log());
}

#[test]
fn background_fill_stops_instead_of_thrashing_a_cache_smaller_than_the_layer() {
    let (registry, work, reference, layers) = runnable_estargz(32);
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &[
            "--cache-size",
            "8MiB",
            "--background-fill",
            "--background-fill-delay",
            "0",
        ],
    );
    wait_for_log(|| mount.log(), "background fill", layers.len());
    let log = mount.log();
    assert!(log.contains("background fill stopped"), "{log}");
    // The weights layer was never fetched beyond what fits.
    let weights = layers.last().unwrap();
    assert!(registry.bytes_served_for_blob(weights) < 8 << 20, "{log}");
    let greeting = std::fs::read_to_string(mount.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    mount.stop();
}

/// One sample's value from a daemon's metrics, 0 if absent.
fn metric(addr: &str, name: &str) -> f64 {
    let text = common::run(std::process::Command::new("curl").args(["-sSf", &format!("http://{addr}/metrics")]));
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const ON_DEMAND: &str = "streamsnap_fetched_bytes_total{cause=\"on_demand\"}";
const PREFETCH: &str = "streamsnap_fetched_bytes_total{cause=\"prefetch\"}";
/// What the container does at start-up: a few files, and the head of the weights.
const START_UP: &str = "cat /etc/greeting; head -c 3000000 /models/weights.bin | wc -c";

/// `streamsnap serve` (state under `dir`) with metrics, and a containerd using it.
fn node(dir: &std::path::Path, extra: &[&str]) -> (ServeProcess, Containerd, String) {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let mut args = vec!["--metrics-address", addr.as_str(), "--profile-quiet", "2"];
    args.extend(extra);
    let serve = ServeProcess::start_with(dir, &args);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    (serve, containerd, addr)
}

fn start_up(containerd: &Containerd, reference: &str, name: &str) -> String {
    containerd.rpull(reference);
    containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        reference,
        name,
        "/bin/sh",
        "-c",
        START_UP,
    ])
}

#[test]
fn a_profile_recorded_pushed_and_replayed_serves_start_up_from_cache() {
    let (_registry, work, reference, _) = runnable_estargz(64);

    // First node: records the start-up and publishes the profile by itself.
    let first = work.path().join("first");
    let (serve, containerd, addr) = node(&first, &["--profile-push"]);
    let out = start_up(&containerd, &reference, "p1");
    assert!(
        out.contains("hello from streamsnap") && out.contains("3000000"),
        "{out}"
    );
    assert!(metric(&addr, ON_DEMAND) > 0.0);
    wait_for_log(|| serve.log(), "start-up profile published", 1);
    let show = common::run(
        std::process::Command::new(common::streamsnap::binary())
            .args(["profile", "show", "--state-dir"])
            .arg(first.join("state"))
            .arg(&reference),
    );
    assert!(
        show.contains("/etc/greeting") && show.contains("/models/weights.bin 0+"),
        "{show}"
    );
    common::run(
        std::process::Command::new(common::streamsnap::binary())
            .args(["profile", "push", "--state-dir"])
            .arg(first.join("state"))
            .arg(&reference),
    );
    drop(containerd);
    serve.stop();

    // Second node, empty cache: the profile comes from the registry (as a
    // referrer, which this node opts into) and is replayed before the
    // container starts; none of its reads wait on the registry.
    let (serve, containerd, addr) = node(&work.path().join("second"), &["--trust-referrers"]);
    let out = start_up(&containerd, &reference, "p2");
    assert!(
        out.contains("hello from streamsnap") && out.contains("3000000"),
        "{out}"
    );
    let log = serve.log();
    assert!(
        log.contains("start-up profile fetched") && log.contains("start-up profile replayed"),
        "{log}"
    );
    assert!(metric(&addr, PREFETCH) > 0.0, "{log}");
    assert_eq!(
        metric(&addr, ON_DEMAND),
        0.0,
        "start-up reads were fetched on demand:\n{log}"
    );
}
