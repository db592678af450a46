//! The Kubernetes path, end to end: a small CRI v1 client (`common::cri`, our own
//! subset of the CRI proto) drives real containerd 1.6's CRI
//! plugin, configured with `snapshotter = "streamsnap"` and
//! `disable_snapshot_annotations = false`, the way the kubelet would: PullImage
//! of an eStargz image is served lazily, then a pod sandbox (host network, so no
//! CNI) and a container from that image run.
mod common;
use common::image::build_pause_image;
use common::*;

use ::streamsnap::proto::cri::VersionRequest;
use common::cri::{sandbox_config, Cri};
use std::time::Instant;

#[test]
fn cri_pull_of_an_estargz_image_is_lazy_and_a_pod_container_from_it_runs() {
    pull_lazily_and_run_a_pod(Format::Estargz);
}

#[test]
fn cri_pull_of_an_indexed_plain_gzip_image_is_lazy_and_a_pod_container_from_it_runs() {
    pull_lazily_and_run_a_pod(Format::Gzip);
}

/// PullImage through CRI is lazy and a pod's container from the image runs;
/// a plain gzip image is indexed (and the index pushed) first.
fn pull_lazily_and_run_a_pod(format: Format) {
    require_root();
    let started = Instant::now();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 64);
    let reference = push(&image, &registry, format);
    if format == Format::Gzip {
        // Built on the node, into the daemon's own state dir: trusted.
        index_image(
            &reference,
            &work.path().join("streamsnap/state"),
            &["--min-layer-size", "0"],
        );
    }
    let pause = build_pause_image(&work.path().join("pause"));
    let pause_reference = push(&pause, &registry, Format::Gzip);
    let serve = ServeProcess::start(&work.path().join("streamsnap"));
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        enable_cri: true,
        sandbox_image: Some(pause_reference.clone()),
        plain_http_registries: vec![registry.addr()],
        // CRI gives sandboxes oom_score_adj -998; some VMs refuse even root lowering it.
        restrict_oom_score_adj: true,
        ..Default::default()
    });
    let cri = Cri::connect(&containerd);

    let version = cri.call(
        "Version",
        cri.runtime.clone().version(VersionRequest { version: "v1".into() }),
    );
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");

    // PullImage through CRI: containerd passes the cri.* labels, streamsnap mounts the layers remotely.
    let (total, digests) = registry.layers(&reference);
    let mark = registry.mark();
    let image_id = cri.pull_image(&reference);
    let served = registry.layer_bytes_served_since(&digests, mark);
    eprintln!(
        "layers {total} bytes; registry served {served} ({:.1}%) for the CRI pull",
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 5 < total,
        "registry served {served} of {total} layer bytes (not lazy)"
    );
    let log = serve.log();
    assert!(log.contains("layer served lazily"), "{log}");

    // A host-network pod sandbox (its pause image comes through streamsnap too) and a container.
    let log_dir = work.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let sandbox = sandbox_config(&log_dir);
    let pod = cri.run_pod(&sandbox);
    let (exit_code, output) = cri.run_to_exit(&pod.id, &sandbox, &image_id, "greeter", &["/bin/cat", "/etc/greeting"]);
    assert_eq!(exit_code, 0, "--- container log ---\n{output}");
    // CRI log format: `<RFC3339 time> stdout F hello from streamsnap`.
    assert!(output.contains("stdout F hello from streamsnap"), "{output}");
    // Running the container read a few files on demand, never the 64 MiB of weights.
    let served = registry.layer_bytes_served_since(&digests, mark);
    eprintln!(
        "registry served {served} layer bytes ({:.1}%) by the time the container exited",
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 5 < total,
        "registry served {served} of {total} layer bytes after the run (not lazy)"
    );
    eprintln!("CRI end to end took {:?}", started.elapsed());
}
