//! Pull secrets through streamsnap's CRI ImageService proxy (`serve --cri-proxy-address`), as
//! kubelet uses it with `--image-service-endpoint`: ImageService calls go to the proxy socket,
//! RuntimeService calls to containerd 2.1's own. The image lives in a `docker-registry` that
//! wants alice's password (htpasswd); neither containerd nor streamsnap knows any credentials
//! but what the PullImage request carries. The sandbox ("pause") image comes from an open
//! registry on the same storage, through which the test also pushes.
mod common;
use ::streamsnap::proto::cri::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest, RemoveImageRequest,
};
use common::cri::{sandbox_config, Cri};
use common::image::{build_files_image, build_pause_image};
use common::registry::htpasswd;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-for-cri";
/// A second user of the same registry, for a second image.
const OTHER_USER: &str = "bob";
const OTHER_PASSWORD: &str = "bobs-own-s3cret";
/// MiB of incompressible weights in the image (start-up never reads them).
const WEIGHTS_MIB: u64 = 32;

struct Env {
    open: Registry,
    private: Registry,
    /// The image, named at the private registry.
    reference: String,
    /// The same image, named at the open registry (which the test's curl may read).
    open_reference: String,
    serve: Option<ServeProcess>,
    containerd: Containerd,
    work: tempfile::TempDir,
}

impl Env {
    fn proxy_socket(&self) -> PathBuf {
        self.work.path().join("cri.sock")
    }

    fn serve_root(&self) -> PathBuf {
        self.work.path().join("streamsnap")
    }

    fn serve(&self) -> &ServeProcess {
        self.serve.as_ref().expect("streamsnap serve runs")
    }

    /// Where the daemon keeps pull secrets.
    fn kept_secrets(&self) -> Vec<PathBuf> {
        let dir = self.serve_root().join("state/credentials/pull");
        std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn cri(&self) -> Cri {
        Cri::connect_images_at(&self.containerd, &self.proxy_socket())
    }

    /// Asserts the private registry served under a fifth of the image's layer bytes since `mark`.
    fn assert_lazy(&self, mark: u64, when: &str) {
        let (total, digests) = self.open.layers(&self.open_reference);
        let served = self.private.layer_bytes_served_since(&digests, mark);
        eprintln!(
            "{when}: layers {total} bytes, registry served {served} ({:.2}%)",
            served as f64 * 100.0 / total as f64
        );
        assert!(
            served * 5 < total,
            "{when}: registry served {served} of {total} layer bytes (not lazy)"
        );
    }
}

/// `streamsnap serve` with the CRI proxy in front of containerd (reached through a symlink made
/// once containerd runs), and no docker config of its own.
fn start_serve(work: &Path) -> ServeProcess {
    let no_docker = work.join("no-docker-config");
    std::fs::create_dir_all(&no_docker).unwrap();
    let (proxy, containerd) = (work.join("cri.sock"), work.join("containerd.sock"));
    let serve = ServeProcess::start_env(
        &work.join("streamsnap"),
        &[
            "--cri-proxy-address",
            proxy.to_str().unwrap(),
            "--cri-containerd-address",
            containerd.to_str().unwrap(),
        ],
        &[("DOCKER_CONFIG", &no_docker)],
    );
    wait_until(Duration::from_secs(30), "the CRI proxy socket", || proxy.exists());
    serve
}

fn start() -> Env {
    start_on(Release::V2_1)
}

fn start_on(release: Release) -> Env {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let open = Registry::start_with(RegistryOpts {
        storage: Some(storage.clone()),
        ..Default::default()
    });
    let users = work.path().join("htpasswd");
    htpasswd(&users, &[(USER, PASSWORD), (OTHER_USER, OTHER_PASSWORD)]);
    let private = Registry::start_with(RegistryOpts {
        storage: Some(storage),
        htpasswd: Some(users),
        ..Default::default()
    });
    let pause = push(&build_pause_image(&work.path().join("pause")), &open, Format::Gzip);
    let image = build_runnable_image(&work.path().join("image"), WEIGHTS_MIB);
    let open_reference = push(&image, &open, Format::Estargz);
    let reference = open_reference.replacen(&open.addr(), &private.addr(), 1);
    let serve = start_serve(work.path());
    let containerd = Containerd::start(ContainerdOpts {
        release,
        streamsnap_socket: Some(serve.socket.clone()),
        enable_cri: true,
        sandbox_image: Some(pause),
        plain_http_registries: vec![open.addr(), private.addr()],
        restrict_oom_score_adj: true,
        log_level: "debug".into(),
        ..Default::default()
    });
    std::os::unix::fs::symlink(containerd.socket(), work.path().join("containerd.sock")).unwrap();
    Env {
        open,
        private,
        reference,
        open_reference,
        serve: Some(serve),
        containerd,
        work,
    }
}

fn alice(password: &str) -> AuthConfig {
    AuthConfig {
        username: USER.into(),
        password: password.into(),
        ..Default::default()
    }
}

/// The sha256 of the image's weights file, as `build_runnable_image` wrote it (seed 11).
fn weights_sha256(work: &Path) -> String {
    let expected = work.join("weights-expected");
    write_random_file(&expected, WEIGHTS_MIB << 20, 11);
    let sum = common::tree::file_sha256(&expected);
    std::fs::remove_file(&expected).unwrap();
    sum
}

/// Runs `script` in a new container of `image_id` in a host-network pod; returns its stdout lines.
fn run_in_pod(env: &Env, cri: &Cri, pod: &str, name: &str, image_id: &str, script: &str) -> String {
    let sandbox = sandbox_config(&env.work.path().join("pod-logs"));
    let (code, log) = cri.run_to_exit(pod, &sandbox, image_id, name, &["/bin/sh", "-c", script]);
    assert_eq!(code, 0, "--- container log ---\n{log}");
    log.lines()
        .filter_map(|l| l.split_once(" stdout F ").map(|(_, out)| out.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_pull_with_auth_through_the_proxy_is_lazy_and_its_pod_container_reads_the_weights() {
    pull_with_auth_is_lazy_and_a_pod_container_reads_the_weights(Release::V2_1);
}

#[test]
fn on_containerd_1_6_too_a_pull_with_auth_through_the_proxy_is_lazy_and_its_container_reads_the_weights() {
    pull_with_auth_is_lazy_and_a_pod_container_reads_the_weights(Release::System1_6);
}

fn pull_with_auth_is_lazy_and_a_pod_container_reads_the_weights(release: Release) {
    let env = start_on(release);
    let cri = env.cri();
    let mark = env.private.mark();
    let image_id = cri
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("PullImage through the proxy: {s:?}\n{}", env.serve().log()));
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    env.assert_lazy(mark, "after PullImage");
    wait_for_log(|| env.serve().log(), "pulled with a pull secret", 1);
    let log = env.serve().log();
    assert!(log.matches("layer served lazily").count() >= 2, "{log}");
    assert_eq!(env.kept_secrets().len(), 1, "{:?}", env.kept_secrets());

    let logs = env.work.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = cri.run_pod(&sandbox_config(&logs));
    let out = run_in_pod(
        &env,
        &cri,
        &pod.id,
        "reader",
        &image_id,
        "sha256sum /models/weights.bin",
    );
    assert_eq!(
        out.split_whitespace().next(),
        Some(weights_sha256(env.work.path()).as_str()),
        "{out}"
    );
    assert!(!env.serve().log().contains(PASSWORD), "the password reached the log");
}

#[test]
fn after_a_crash_and_restart_the_kept_pull_secret_lets_a_new_container_read_bytes_not_fetched_before() {
    restart_keeps_reading(ServeProcess::kill);
}

#[test]
fn after_a_sigterm_and_a_new_daemon_the_kept_pull_secret_lets_a_new_container_read_bytes_not_fetched_before() {
    restart_keeps_reading(|serve| {
        serve.stop_for_upgrade();
    });
}

/// Pull and a first container, `stop` the daemon, start a new one on the same root: a new
/// container reads the whole weights file, which the first never read.
fn restart_keeps_reading(stop: impl FnOnce(ServeProcess)) {
    let mut env = start();
    let cri = env.cri();
    let image_id = cri
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("PullImage through the proxy: {s:?}\n{}", env.serve().log()));
    let logs = env.work.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = cri.run_pod(&sandbox_config(&logs));
    let out = run_in_pod(&env, &cri, &pod.id, "first", &image_id, "cat /etc/greeting");
    assert_eq!(out, "hello from streamsnap");
    let mark = env.private.mark();

    // The next daemon on the same root has only what the first one kept on disk.
    stop(env.serve.take().unwrap());
    // A killed daemon leaves its socket files; the test waits for the new ones.
    for socket in ["streamsnap/streamsnap.sock", "cri.sock"] {
        let _ = std::fs::remove_file(env.work.path().join(socket));
    }
    env.serve = Some(start_serve(env.work.path()));
    let out = run_in_pod(
        &env,
        &cri,
        &pod.id,
        "after-restart",
        &image_id,
        "sha256sum /models/weights.bin",
    );
    assert_eq!(
        out.split_whitespace().next(),
        Some(weights_sha256(env.work.path()).as_str()),
        "{out}\n{}",
        env.serve().log()
    );
    let (_, digests) = env.open.layers(&env.open_reference);
    let served = env.private.layer_bytes_served_since(&digests, mark);
    eprintln!("after the restart the registry served {served} layer bytes to the new daemon");
    assert!(
        served >= WEIGHTS_MIB << 20,
        "the weights were not fetched after the restart: {served} bytes"
    );
}

#[test]
fn a_wrong_password_fails_the_pull_and_the_log_names_registry_and_pull_secret_but_not_the_password() {
    let env = start();
    let cri = env.cri();
    let wrong = "not-the-password-42";
    let err = cri
        .try_pull_image_with(&env.reference, alice(wrong))
        .expect_err("a pull with a wrong password succeeded");
    eprintln!("PullImage answered {:?}: {}", err.code(), err.message());
    assert_ne!(err.code(), tonic::Code::Ok);
    // The daemon's log reaches the test through a pipe: wait for the line.
    wait_for_log(|| env.serve().log(), "the pull secret is not kept", 1);
    let log = env.serve().log();
    for word in [
        env.private.addr(),
        format!("pull secret of {}", env.reference),
        "the pull secret is not kept".to_string(),
    ] {
        assert!(log.contains(&word), "log lacks {word:?}:\n{log}");
    }
    assert!(!log.contains(wrong), "the password reached the log:\n{log}");
    assert!(env.kept_secrets().is_empty(), "{:?}", env.kept_secrets());
}

#[test]
fn other_image_service_calls_pass_through_unchanged() {
    let env = start();
    let proxied = env.cri();
    let direct = Cri::connect(&env.containerd);
    let image_id = proxied
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    let spec = |image: &str| ImageSpec {
        image: image.into(),
        ..Default::default()
    };
    let status = |cri: &Cri, image: &str| {
        cri.call(
            "ImageStatus",
            cri.images.clone().image_status(ImageStatusRequest {
                image: Some(spec(image)),
                verbose: true,
            }),
        )
    };
    let list = |cri: &Cri| {
        cri.call(
            "ListImages",
            cri.images.clone().list_images(ListImagesRequest::default()),
        )
    };
    let fs = |cri: &Cri| cri.call("ImageFsInfo", cri.images.clone().image_fs_info(ImageFsInfoRequest {}));

    let through = status(&proxied, &env.reference);
    assert_eq!(through, status(&direct, &env.reference));
    assert_eq!(through.image.as_ref().map(|i| i.id.as_str()), Some(image_id.as_str()));
    assert_eq!(list(&proxied), list(&direct));
    assert!(list(&proxied).images.iter().any(|i| i.id == image_id));
    let (a, b) = (fs(&proxied), fs(&direct));
    assert_eq!(a.image_filesystems.len(), b.image_filesystems.len());
    // containerd's own errors come back as they are (code and message).
    let missing = format!("{}/no/such:image", env.open.addr());
    let via = proxied
        .try_pull_image_with(&missing, AuthConfig::default())
        .unwrap_err();
    let at = direct.try_pull_image_with(&missing, AuthConfig::default()).unwrap_err();
    eprintln!("a missing image: {:?} {}", via.code(), via.message());
    assert_eq!((via.code(), via.message()), (at.code(), at.message()));
    // RuntimeService is containerd's: the proxy refuses it, naming what it serves.
    let runtime = ::streamsnap::proto::cri::runtime_service_client::RuntimeServiceClient::new(common::cri::channel(
        &proxied.rt,
        &env.proxy_socket(),
    ));
    let refused = proxied
        .rt
        .block_on(
            runtime
                .clone()
                .version(::streamsnap::proto::cri::VersionRequest::default()),
        )
        .expect_err("the proxy answered RuntimeService");
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    proxied.call(
        "RemoveImage",
        proxied.images.clone().remove_image(RemoveImageRequest {
            image: Some(spec(&image_id)),
        }),
    );
    assert!(status(&direct, &env.reference).image.is_none());
}

#[test]
fn the_pull_secret_is_gone_from_disk_once_the_image_is_removed_and_gc_ran() {
    let env = start();
    let cri = env.cri();
    let image_id = cri
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    let kept = env.kept_secrets();
    assert_eq!(kept.len(), 1, "{kept:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept[0]).unwrap().permissions().mode() & 0o777, 0o600);
    cri.call(
        "RemoveImage",
        cri.images.clone().remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: image_id,
                ..Default::default()
            }),
        }),
    );
    wait_until(Duration::from_secs(60), "the pull secret to be dropped", || {
        env.kept_secrets().is_empty()
    });
    wait_for_log(|| env.serve().log(), "its pull secret is dropped", 1);
}

#[test]
fn the_same_pull_with_auth_straight_to_containerd_is_not_lazy() {
    // What the proxy is for: containerd uses the auth for manifest and config only, streamsnap
    // has none, so every layer falls back to containerd's own download and unpack.
    let env = start();
    let direct = Cri::connect(&env.containerd);
    let mark = env.private.mark();
    direct
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    let (total, digests) = env.open.layers(&env.open_reference);
    let served = env.private.layer_bytes_served_since(&digests, mark);
    eprintln!("without the proxy: layers {total} bytes, registry served {served}");
    assert!(served >= total, "served {served} of {total}");
    assert!(
        !env.serve().log().contains("layer served lazily"),
        "{}",
        env.serve().log()
    );
    assert!(env.kept_secrets().is_empty());
}

#[test]
fn two_images_pulled_with_two_users_secrets_are_both_lazy_and_each_keeps_its_own() {
    let env = start();
    let cri = env.cri();
    // A second image (other layers, another repository), pulled with bob's secret in kubelet's
    // other form: `auth` (base64 of user:password) and the registry it is for.
    let (other_open, other_reference) = push_other(&env);
    let mark = env.private.mark();
    cri.try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    let bob = AuthConfig {
        auth: base64_of(&format!("{OTHER_USER}:{OTHER_PASSWORD}")),
        server_address: format!("http://{}", env.private.addr()),
        ..Default::default()
    };
    cri.try_pull_image_with(&other_reference, bob)
        .unwrap_or_else(|s| panic!("{s:?}"));
    env.assert_lazy(mark, "after both pulls (first image)");
    let (total, digests) = env.open.layers(&other_open);
    let served = env.private.layer_bytes_served_since(&digests, mark);
    eprintln!("second image: layers {total} bytes, registry served {served}");
    assert!(served * 5 < total, "second image not lazy: {served} of {total}");
    wait_for_log(|| env.serve().log(), "layer served lazily", 4);
    let log = env.serve().log();
    // One kept secret per image, each with its own user.
    let kept: Vec<serde_json::Value> = env
        .kept_secrets()
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    let user_of = |repository: &str| {
        kept.iter()
            .find(|k| {
                k["image"]["repository"]
                    .as_str()
                    .is_some_and(|r| r.ends_with(repository))
            })
            .map(|k| k["secret"]["username"].as_str().unwrap().to_string())
    };
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(user_of("/run").as_deref(), Some(USER));
    assert_eq!(user_of("/files").as_deref(), Some(OTHER_USER));
    assert!(!log.contains(OTHER_PASSWORD) && !log.contains(PASSWORD));
}

/// A second eStargz image (other layers, another repository); its names at the open and the
/// private registry.
fn push_other(env: &Env) -> (String, String) {
    let other = build_files_image(&env.work.path().join("other"), &[("data/other.bin", 8, 5)]);
    let open = push(&other, &env.open, Format::Estargz);
    let private = open.replacen(&env.open.addr(), &env.private.addr(), 1);
    (open, private)
}

#[test]
fn a_pull_secret_never_answers_for_another_image_of_the_same_registry() {
    let env = start();
    let (other_open, other_reference) = push_other(&env);
    env.cri()
        .try_pull_image_with(&env.reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    // The other image straight to containerd: streamsnap gets no secret for it, and alice's
    // (same registry) must not answer, so its layers fall back to containerd's unpack.
    let mark = env.private.mark();
    Cri::connect(&env.containerd)
        .try_pull_image_with(&other_reference, alice(PASSWORD))
        .unwrap_or_else(|s| panic!("{s:?}"));
    let (total, digests) = env.open.layers(&other_open);
    let served = env.private.layer_bytes_served_since(&digests, mark);
    eprintln!("the other image: layers {total} bytes, registry served {served}");
    assert!(
        served >= total,
        "the other image was served lazily: {served} of {total}"
    );
    wait_for_log(|| env.serve().log(), "no credentials", 1);
    assert_eq!(env.kept_secrets().len(), 1, "{:?}", env.kept_secrets());
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
