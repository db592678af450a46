//! The Kubernetes path, end to end: a small CRI v1 client (our own subset of
//! the CRI proto, `streamsnap::proto::cri`) drives real containerd 1.6's CRI
//! plugin, configured with `snapshotter = "streamsnap"` and
//! `disable_snapshot_annotations = false`, the way the kubelet would: PullImage
//! of an eStargz image is served lazily, then a pod sandbox (host network, so no
//! CNI) and a container from that image run.
mod common;
use common::image::build_pause_image;
use common::*;

use ::streamsnap::proto::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, ContainerConfig,
    ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest, VersionRequest,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// Every CRI call must answer within this (a pull of a lazy image takes well under a second).
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// A blocking CRI client over containerd's gRPC unix socket (which serves CRI too).
struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// containerd's log, whose tail goes into every failure message.
    containerd_log: PathBuf,
}

impl Cri {
    fn connect(containerd: &Containerd) -> Cri {
        let socket = containerd.socket();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                // The URI is a placeholder: the connector always dials the unix socket.
                Endpoint::from_static("http://[::]:0").connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })),
            )
            .unwrap_or_else(|e| panic!("connect to CRI at {}: {e}", socket.display()));
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            containerd_log: containerd.log_path().to_path_buf(),
        }
    }

    /// Runs one RPC to completion; panics with the gRPC status (and `what`) on error or timeout.
    fn call<T>(&self, what: &str, fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> T {
        match self.rt.block_on(async { tokio::time::timeout(RPC_TIMEOUT, fut).await }) {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => panic!("CRI {what} failed: {status:?}\n{}", self.log_tail()),
            Err(_) => panic!("CRI {what} timed out after {RPC_TIMEOUT:?}\n{}", self.log_tail()),
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.containerd_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- containerd log tail ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// Stops and removes the pod sandbox on the way out (also when an assertion fails),
/// so no shim or container outlives the test's containerd.
struct SandboxGuard<'a> {
    cri: &'a Cri,
    id: String,
}

impl Drop for SandboxGuard<'_> {
    fn drop(&mut self) {
        let (mut runtime, id) = (self.cri.runtime.clone(), self.id.clone());
        let res = self.cri.rt.block_on(async move {
            tokio::time::timeout(RPC_TIMEOUT, async move {
                runtime
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await?;
                runtime
                    .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
            })
            .await
        });
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(status)) if std::thread::panicking() => eprintln!("sandbox cleanup failed: {status:?}"),
            Ok(Err(status)) => panic!("sandbox cleanup failed: {status:?}"),
            Err(_) => eprintln!("sandbox cleanup timed out"),
        }
    }
}

fn sandbox_config(log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "lazy-pod".into(),
            uid: "streamsnap-cri-e2e-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_directory.to_string_lossy().into_owned(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // hostNetwork: true, so the sandbox needs no CNI plugin.
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

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
    let pulled = cri.call(
        "PullImage",
        cri.images.clone().pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.clone(),
                ..Default::default()
            }),
            sandbox_config: None,
        }),
    );
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
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
    let pod = cri.call(
        "RunPodSandbox",
        cri.runtime.clone().run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        }),
    );
    let _guard = SandboxGuard {
        cri: &cri,
        id: pod.pod_sandbox_id.clone(),
    };
    let created = cri.call(
        "CreateContainer",
        cri.runtime.clone().create_container(CreateContainerRequest {
            pod_sandbox_id: pod.pod_sandbox_id.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "greeter".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: pulled.image_ref.clone(),
                    ..Default::default()
                }),
                command: vec!["/bin/cat".into(), "/etc/greeting".into()],
                log_path: "greeter.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        }),
    );
    cri.call(
        "StartContainer",
        cri.runtime.clone().start_container(StartContainerRequest {
            container_id: created.container_id.clone(),
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let st = cri
            .call(
                "ContainerStatus",
                cri.runtime.clone().container_status(ContainerStatusRequest {
                    container_id: created.container_id.clone(),
                    verbose: false,
                }),
            )
            .status
            .expect("ContainerStatus without status");
        if st.state == ContainerState::ContainerExited as i32 {
            break st;
        }
        assert!(Instant::now() < deadline, "container did not exit within 60 s: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let container_log: PathBuf = log_dir.join("greeter.log");
    let output =
        std::fs::read_to_string(&container_log).unwrap_or_else(|e| panic!("read {}: {e}", container_log.display()));
    assert_eq!(status.exit_code, 0, "{status:?}\n--- container log ---\n{output}");
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
