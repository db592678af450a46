//! A small blocking CRI v1 client (our own subset of the CRI proto, `streamsnap::proto::cri`) over
//! containerd's gRPC socket, driving pods the way the kubelet would: host-network sandboxes (no
//! CNI), containers run to exit, their CRI logs read back.
use super::containerd::Containerd;
use ::streamsnap::proto::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, AuthConfig,
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// Every CRI call must answer within this (a pull of a lazy image takes well under a second).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// A blocking CRI client over containerd's gRPC unix socket (which serves CRI too).
pub struct Cri {
    pub rt: tokio::runtime::Runtime,
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    /// containerd's log, whose tail goes into every failure message.
    containerd_log: PathBuf,
}

impl Cri {
    pub fn connect(containerd: &Containerd) -> Cri {
        Self::connect_images_at(containerd, containerd.socket())
    }

    /// RuntimeService at containerd's socket, ImageService at `images` (a CRI proxy's socket,
    /// as kubelet's `--image-service-endpoint` splits them).
    pub fn connect_images_at(containerd: &Containerd, images: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let runtime = channel(&rt, containerd.socket());
        let images = channel(&rt, images);
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(runtime),
            images: ImageServiceClient::new(images),
            containerd_log: containerd.log_path().to_path_buf(),
        }
    }

    /// Runs one RPC to completion; panics with the gRPC status (and `what`) on error or timeout.
    pub fn call<T>(&self, what: &str, fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> T {
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

/// A gRPC channel over the unix socket at `socket`.
pub fn channel(rt: &tokio::runtime::Runtime, socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    rt.block_on(
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
    .unwrap_or_else(|e| panic!("connect to CRI at {}: {e}", socket.display()))
}

/// Stops and removes the pod sandbox on the way out (also when an assertion fails),
/// so no shim or container outlives the test's containerd.
pub struct SandboxGuard<'a> {
    pub cri: &'a Cri,
    pub id: String,
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

pub fn sandbox_config(log_directory: &Path) -> PodSandboxConfig {
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

impl Cri {
    /// RunPodSandbox with `config`; the guard stops and removes the pod when dropped.
    pub fn run_pod(&self, config: &PodSandboxConfig) -> SandboxGuard<'_> {
        let pod = self.call(
            "RunPodSandbox",
            self.runtime.clone().run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        );
        SandboxGuard {
            cri: self,
            id: pod.pod_sandbox_id,
        }
    }

    /// PullImage of `reference`; returns the image id (`sha256:…`).
    pub fn pull_image(&self, reference: &str) -> String {
        let pulled = self.call(
            &format!("PullImage {reference}"),
            self.images.clone().pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            }),
        );
        assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
        pulled.image_ref
    }

    /// PullImage of `reference` with kubelet's `auth`; the image id, or containerd's error.
    pub fn try_pull_image_with(&self, reference: &str, auth: AuthConfig) -> Result<String, tonic::Status> {
        let mut images = self.images.clone();
        let call = images.pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: reference.to_string(),
                ..Default::default()
            }),
            auth: Some(auth),
            sandbox_config: None,
        });
        match self
            .rt
            .block_on(async { tokio::time::timeout(RPC_TIMEOUT, call).await })
        {
            Ok(r) => r.map(|r| r.into_inner().image_ref),
            Err(_) => panic!(
                "CRI PullImage {reference} timed out after {RPC_TIMEOUT:?}\n{}",
                self.log_tail()
            ),
        }
    }

    /// Creates container `name` from `image` in pod `pod` running `command`, starts it and waits
    /// (60 s at most) for it to exit; returns its exit code and its CRI log (`<time> stdout F line`).
    pub fn run_to_exit(
        &self,
        pod: &str,
        sandbox: &PodSandboxConfig,
        image: &str,
        name: &str,
        command: &[&str],
    ) -> (i32, String) {
        self.run_to_exit_with(pod, sandbox, image, name, command, Vec::new())
    }

    /// [`Cri::run_to_exit`] with `mounts` (as the kubelet passes volumes, image volumes included).
    pub fn run_to_exit_with(
        &self,
        pod: &str,
        sandbox: &PodSandboxConfig,
        image: &str,
        name: &str,
        command: &[&str],
        mounts: Vec<Mount>,
    ) -> (i32, String) {
        let created = self.call(
            &format!("CreateContainer {name}"),
            self.runtime.clone().create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|c| c.to_string()).collect(),
                    mounts,
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox.clone()),
            }),
        );
        self.call(
            &format!("StartContainer {name}"),
            self.runtime.clone().start_container(StartContainerRequest {
                container_id: created.container_id.clone(),
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let st = self
                .call(
                    &format!("ContainerStatus {name}"),
                    self.runtime.clone().container_status(ContainerStatusRequest {
                        container_id: created.container_id.clone(),
                        verbose: false,
                    }),
                )
                .status
                .expect("ContainerStatus without status");
            if st.state == ContainerState::ContainerExited as i32 {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "container {name} did not exit within 60 s: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = Path::new(&sandbox.log_directory).join(format!("{name}.log"));
        let output = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
        (status.exit_code, output)
    }
}
