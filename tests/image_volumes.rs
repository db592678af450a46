//! Model weights as Kubernetes image volumes (KEP-4639), driven the way the kubelet drives them:
//! CRI PullImage of the model image, then CreateContainer with `Mount.image`. containerd 2.1
//! prepares the volume through the runtime's snapshotter, so with streamsnap as that snapshotter
//! the model streams: a container reading one file fetches that file's bytes, not the image.
mod common;
use ::streamsnap::proto::cri::{ImageSpec, Mount};
use common::cri::{sandbox_config, Cri};
use common::image::{build_model_image, build_pause_image, ModelFile};
use common::*;
use std::time::Instant;

const MIB: u64 = 1 << 20;

/// A 1 GiB model: a tokenizer read at start, then four weight shards.
const MODEL: [(&str, u64, u64); 5] = [
    ("tokenizer.bin", 16, 1),
    ("shard-1-of-4.bin", 252, 2),
    ("shard-2-of-4.bin", 252, 3),
    ("shard-3-of-4.bin", 252, 4),
    ("shard-4-of-4.bin", 252, 5),
];

/// The image volume as the kubelet sends it: the image id PullImage returned, read-only.
fn model_volume(image_id: &str) -> Mount {
    Mount {
        container_path: "/models".into(),
        readonly: true,
        image: Some(ImageSpec {
            image: image_id.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `sha256sum` line of `file` as mounted at /models.
fn sum_line(file: &ModelFile) -> String {
    format!("{}  /models/{}", file.sha256, file.path.trim_start_matches(""))
}

#[test]
fn a_1_gib_model_image_volume_on_containerd_2_1_streams_one_file_at_start_then_all_of_it() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let pause = push(&build_pause_image(&work.path().join("pause")), &registry, Format::Gzip);
    let runner = push(
        &build_runnable_image(&work.path().join("runner"), 1),
        &registry,
        Format::Estargz,
    );
    let (model_image, model) = build_model_image(&work.path().join("model"), &MODEL);
    let reference = push(&model_image, &registry, Format::Estargz);
    std::fs::remove_dir_all(work.path().join("model")).unwrap();

    let serve = ServeProcess::start(&work.path().join("streamsnap"));
    let containerd = Containerd::start(ContainerdOpts {
        release: Release::V2_1,
        streamsnap_socket: Some(serve.socket.clone()),
        enable_cri: true,
        sandbox_image: Some(pause),
        plain_http_registries: vec![registry.addr()],
        restrict_oom_score_adj: true,
        ..Default::default()
    });
    let cri = Cri::connect(&containerd);
    let runner_id = cri.pull_image(&runner);
    let (total, digests) = registry.layers(&reference);
    let mark = registry.mark();
    let pulled = Instant::now();
    let model_id = cri.pull_image(&reference);
    let pull_time = pulled.elapsed();
    let at_pull = registry.layer_bytes_served_since(&digests, mark);

    let log_dir = work.path().join("pod-logs");
    std::fs::create_dir_all(&log_dir).unwrap();
    let sandbox = sandbox_config(&log_dir);
    let pod = cri.run_pod(&sandbox);

    // Start-up: one file.
    let tokenizer = &model[0];
    let started = Instant::now();
    let (code, out) = cri.run_to_exit_with(
        &pod.id,
        &sandbox,
        &runner_id,
        "start",
        &["/bin/sha256sum", "/models/tokenizer.bin"],
        vec![model_volume(&model_id)],
    );
    let start_time = started.elapsed();
    assert_eq!(code, 0, "--- container log ---\n{out}");
    assert!(out.contains(&sum_line(tokenizer)), "{out}");
    let at_start = registry.layer_bytes_served_since(&digests, mark);

    // Then every file, as a server loading its weights does.
    let started = Instant::now();
    let mut command = vec!["/bin/sha256sum".to_string()];
    command.extend(
        model
            .iter()
            .map(|f| format!("/models/{}", f.path.trim_start_matches(""))),
    );
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let (code, out) = cri.run_to_exit_with(
        &pod.id,
        &sandbox,
        &runner_id,
        "load",
        &command,
        vec![model_volume(&model_id)],
    );
    let load_time = started.elapsed();
    assert_eq!(code, 0, "--- container log ---\n{out}");
    for file in &model {
        assert!(out.contains(&sum_line(file)), "{} wrong or missing:\n{out}", file.path);
    }
    let at_load = registry.layer_bytes_served_since(&digests, mark);
    drop(pod);

    let model_bytes: u64 = model.iter().map(|f| f.size).sum();
    eprintln!(
        "image volume, {model_bytes} bytes of model in {total} layer bytes:\n  \
         PullImage {pull_time:.2?}: {at_pull} bytes served\n  \
         start (read tokenizer.bin, {} bytes) {start_time:.2?}: {at_start} bytes served ({:.2}% of the image)\n  \
         load (read all) {load_time:.2?}: {at_load} bytes served ({:.4}x the layer size, {:.0} MB/s)",
        tokenizer.size,
        at_start as f64 * 100.0 / total as f64,
        at_load as f64 / total as f64,
        (at_load - at_start) as f64 / load_time.as_secs_f64() / 1e6,
    );
    assert!(
        serve.log().contains("layer served lazily"),
        "the model was not served lazily:\n{}",
        tail(&serve.log(), 40)
    );
    // Start-up fetched the file it read (eStargz starts each file on a chunk of its own) and the
    // TOC, nothing of the shards.
    assert!(
        at_start >= tokenizer.size && at_start <= tokenizer.size + 2 * MIB,
        "start-up read {} bytes of the model but the registry served {at_start}",
        tokenizer.size
    );
    // Loading read everything once.
    assert!(
        at_load >= model_bytes && at_load <= total + total / 100,
        "loading the model served {at_load} bytes for a {total}-byte layer"
    );
}
