//! CRI's `runtime.v1.ImageService` on a socket of ours (`[cri] proxy_address`,
//! kubelet's `--image-service-endpoint`), in front of containerd: every call is
//! passed on as it came (HTTP/2 frames re-sent, the messages' bytes untouched:
//! methods newer than our proto included), and containerd's answer comes back
//! as it was, status and message included. Only `PullImage` is also read: its
//! `auth` goes to [`PullAuths`] for the layers of that image before the call is
//! passed on (containerd prepares the layers inside the pull), and is kept if
//! the pull succeeded. Nothing here can fail a call containerd would answer:
//! a request we cannot read, or a secret we cannot keep, is logged and passed on.

use crate::credentials::{normalize_host, PullAuths, Secret};
use crate::proto::cri::{AuthConfig, PullImageRequest, PullImageResponse};
use crate::registry::Reference;
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::transport::{Channel, Endpoint, Uri};
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

const SERVICE: &str = "/runtime.v1.ImageService/";
const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
/// Most bytes of a PullImage request or answer read whole: gRPC's default message limit.
const MAX_MESSAGE: usize = 4 << 20;

/// The proxy: containerd's channel, where pull secrets go, and what to do after a pull.
pub struct CriProxy {
    containerd: Channel,
    containerd_address: PathBuf,
    auths: Arc<PullAuths>,
    /// Run (on the blocking pool) after a pull with a secret succeeded: drops
    /// the secret again when no lazily served layer came of it.
    after_pull: Arc<dyn Fn() + Send + Sync>,
}

impl CriProxy {
    /// A proxy to containerd at `containerd_address` (connected on first use,
    /// and again after containerd restarts).
    pub fn new(containerd_address: &Path, auths: Arc<PullAuths>, after_pull: Arc<dyn Fn() + Send + Sync>) -> Self {
        let path = containerd_address.to_path_buf();
        // The URI is a placeholder: the connector always dials the unix socket.
        let containerd =
            Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }));
        Self {
            containerd,
            containerd_address: containerd_address.to_path_buf(),
            auths,
            after_pull,
        }
    }

    /// Serves HTTP/2 connections from `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "CRI proxy: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = Arc::clone(&self);
            let service = hyper::service::service_fn(move |req| {
                let this = Arc::clone(&this);
                async move { Ok::<_, Infallible>(this.handle(req).await) }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(error = %e, "CRI proxy connection ended");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        if !path.starts_with(SERVICE) {
            // kubelet asks containerd's own socket for RuntimeService.
            return status(tonic::Status::unimplemented(format!(
                "{path}: this socket serves runtime.v1.ImageService only (streamsnap's CRI proxy)"
            )));
        }
        if path == PULL_IMAGE {
            return self.pull(req).await;
        }
        self.forward(req.map(Body::new)).await
    }

    async fn forward(&self, req: Request<Body>) -> Response<Body> {
        match self.containerd.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(e) => status(tonic::Status::unavailable(format!(
                "streamsnap's CRI proxy cannot reach containerd at {}: {e}",
                self.containerd_address.display()
            ))),
        }
    }

    /// PullImage: the request is read whole (it is small), its auth taken,
    /// then passed on; the answer is read whole (small too) to learn whether
    /// the pull succeeded, and passed back as it came.
    async fn pull(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_MESSAGE).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return status(tonic::Status::resource_exhausted(format!(
                    "reading the PullImage request (at most {MAX_MESSAGE} bytes): {e}"
                )))
            }
        };
        let pulling = self.begin(&body);
        let resp = self
            .forward(Request::from_parts(parts, Body::new(Full::new(body))))
            .await;
        let Some((pulling, image)) = pulling else {
            return resp;
        };
        let (parts, body) = resp.into_parts();
        let answer = match Limited::new(body, MAX_MESSAGE).collect().await {
            Ok(a) => a,
            Err(e) => {
                self.auths.end(pulling, false);
                return status(tonic::Status::unavailable(format!(
                    "reading containerd's PullImage answer for {image}: {e}"
                )));
            }
        };
        let trailers = answer.trailers().cloned();
        let data = answer.to_bytes();
        let outcome = trailers
            .as_ref()
            .and_then(tonic::Status::from_header_map)
            .or_else(|| tonic::Status::from_header_map(&parts.headers));
        match &outcome {
            Some(s) if s.code() == tonic::Code::Ok => {
                let image_ref = frame(&data)
                    .and_then(|m| PullImageResponse::decode(m).ok())
                    .map(|r| r.image_ref)
                    .unwrap_or_default();
                info!(image = %image, image_ref, "pulled with a pull secret: kept for the image's lazily served layers");
                self.auths.end(pulling, true);
                let after = Arc::clone(&self.after_pull);
                tokio::task::spawn_blocking(move || after());
            }
            other => {
                let (code, message) = other
                    .as_ref()
                    .map_or((tonic::Code::Unknown, ""), |s| (s.code(), s.message()));
                warn!(
                    registry = %image.registry,
                    code = ?code,
                    "PullImage of {image} with the pull secret of {image} failed in containerd: {message}; the pull secret is not kept"
                );
                self.auths.end(pulling, false);
            }
        }
        // The same frames: the message (none in a trailers-only error answer), then the trailers.
        let frames: Vec<Result<_, Infallible>> = (!data.is_empty())
            .then(|| Frame::data(data))
            .into_iter()
            .chain(trailers.map(Frame::trailers))
            .map(Ok)
            .collect();
        Response::from_parts(parts, Body::new(StreamBody::new(futures::stream::iter(frames))))
    }

    /// Reads a PullImage request's image and auth; a pull with a usable auth
    /// starts answering for the image now.
    fn begin(&self, body: &[u8]) -> Option<(crate::credentials::pull::Pulling, Reference)> {
        let Some(msg) = frame(body) else {
            debug!("PullImage request not read (compressed or not one message): passed on as it is");
            return None;
        };
        let req = match PullImageRequest::decode(msg) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "PullImage request not understood: passed on as it is");
                return None;
            }
        };
        let name = req.image.map(|i| i.image).unwrap_or_default();
        let auth = req.auth?;
        let image: Reference = match name.parse() {
            // containerd names an image without tag or digest `:latest` in its layers' labels.
            Ok(Reference {
                tag: None,
                digest: None,
                registry,
                repository,
            }) => Reference {
                tag: Some("latest".into()),
                digest: None,
                registry,
                repository,
            },
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "PullImage of an image streamsnap cannot name: its pull secret is not used");
                return None;
            }
        };
        let secret = secret(&auth, &image.registry)?;
        Some((self.auths.begin(image.key(), secret), image))
    }
}

/// The message of a one-message gRPC body (uncompressed: kubelet does not compress).
fn frame(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    let (len, msg) = rest.split_first_chunk::<4>()?;
    let whole = msg.len() == u32::from_be_bytes(*len) as usize;
    (compressed == 0 && whole).then_some(msg)
}

/// What containerd itself would use of `auth` for `registry` (its CRI's
/// `ParseAuth` order: user name, identity token, `auth`), else a registry
/// token; nothing when the auth names another server.
fn secret(auth: &AuthConfig, registry: &str) -> Option<Secret> {
    if !auth.server_address.is_empty() && normalize_host(&auth.server_address) != registry {
        return None;
    }
    if !auth.username.is_empty() {
        return Some(Secret::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.identity_token.is_empty() {
        return Some(Secret::IdentityToken(auth.identity_token.clone()));
    }
    if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        return Some(Secret::Basic {
            username: user.to_string(),
            password: pass.to_string(),
        });
    }
    (!auth.registry_token.is_empty()).then(|| Secret::RegistryToken(auth.registry_token.clone()))
}

fn status(s: tonic::Status) -> Response<Body> {
    s.into_http()
}

/// Stops the proxy when dropped.
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `address` (0660, replacing a stale socket) and serves `proxy` on it until the result is dropped.
pub fn start(address: &Path, proxy: CriProxy) -> std::io::Result<Serving> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(address)?;
    std::fs::set_permissions(address, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    info!(address = %address.display(), containerd = %proxy.containerd_address.display(), "serving CRI ImageService (proxy to containerd)");
    Ok(Serving(tokio::spawn(Arc::new(proxy).serve(listener))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cri::image_service_client::ImageServiceClient;

    /// A PullImage of `image` with alice's password.
    fn alice_pulls(image: String) -> PullImageRequest {
        PullImageRequest {
            image: Some(crate::proto::cri::ImageSpec {
                image,
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: "alice".into(),
                password: "pw".into(),
                ..auth()
            }),
            sandbox_config: None,
        }
    }

    fn auth() -> AuthConfig {
        AuthConfig::default()
    }

    #[test]
    fn auth_fields_become_secrets_in_containerds_order() {
        let a = AuthConfig {
            username: "alice".into(),
            password: "pw".into(),
            identity_token: "id".into(),
            ..auth()
        };
        assert!(
            matches!(secret(&a, "r.test"), Some(Secret::Basic { username, password }) if username == "alice" && password == "pw")
        );
        let a = AuthConfig {
            auth: "YWxpY2U6czNjcmV0".into(),
            ..auth()
        };
        assert!(matches!(secret(&a, "r.test"), Some(Secret::Basic { password, .. }) if password == "s3cret"));
        let a = AuthConfig {
            identity_token: "id".into(),
            registry_token: "rt".into(),
            ..auth()
        };
        assert!(matches!(secret(&a, "r.test"), Some(Secret::IdentityToken(t)) if t == "id"));
        let a = AuthConfig {
            registry_token: "rt".into(),
            ..auth()
        };
        assert!(matches!(secret(&a, "r.test"), Some(Secret::RegistryToken(t)) if t == "rt"));
        assert!(secret(&auth(), "r.test").is_none());
    }

    #[test]
    fn an_auth_for_another_server_is_not_used() {
        let a = AuthConfig {
            username: "alice".into(),
            server_address: "https://other.test/v1/".into(),
            ..auth()
        };
        assert!(secret(&a, "r.test").is_none());
        let a = AuthConfig {
            server_address: "r.test".into(),
            ..a
        };
        assert!(secret(&a, "r.test").is_some());
        let a = AuthConfig {
            server_address: "https://index.docker.io/v1/".into(),
            ..a
        };
        assert!(secret(&a, "docker.io").is_some());
    }

    async fn client(socket: PathBuf) -> ImageServiceClient<Channel> {
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .unwrap();
        ImageServiceClient::new(channel)
    }

    #[tokio::test]
    async fn a_pull_request_over_the_message_limit_is_refused_unread_and_keeps_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let auths = Arc::new(PullAuths::open(&dir.path().join("pull")).unwrap());
        let proxy = CriProxy::new(
            &dir.path().join("no-containerd.sock"),
            Arc::clone(&auths),
            Arc::new(|| {}),
        );
        let socket = dir.path().join("cri.sock");
        let _serving = start(&socket, proxy).unwrap();
        let e = client(socket)
            .await
            .pull_image(alice_pulls(format!("r.test/{}:v1", "a".repeat(MAX_MESSAGE))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(auths.is_empty(), "an unread pull kept a secret");
    }

    #[tokio::test]
    async fn without_containerd_calls_fail_unavailable_naming_its_socket_and_keep_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let auths = Arc::new(PullAuths::open(&dir.path().join("pull")).unwrap());
        let containerd = dir.path().join("no-containerd.sock");
        let proxy = CriProxy::new(&containerd, Arc::clone(&auths), Arc::new(|| {}));
        let socket = dir.path().join("cri.sock");
        let _serving = start(&socket, proxy).unwrap();
        let mut images = client(socket).await;
        let e = images
            .image_fs_info(crate::proto::cri::ImageFsInfoRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains(&containerd.display().to_string()), "{e:?}");
        let e = images
            .pull_image(alice_pulls("r.test/app:v1".into()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(auths.is_empty(), "a failed pull kept its secret");
    }

    #[test]
    fn a_grpc_frame_is_read_only_when_whole_and_uncompressed() {
        let msg = PullImageResponse {
            image_ref: "sha256:ab".into(),
        }
        .encode_to_vec();
        let mut body = vec![0];
        body.extend((msg.len() as u32).to_be_bytes());
        body.extend(&msg);
        assert_eq!(frame(&body), Some(&msg[..]));
        body[0] = 1;
        assert_eq!(frame(&body), None);
        body[0] = 0;
        assert_eq!(frame(&body[..body.len() - 1]), None);
        assert_eq!(frame(&[]), None);
    }
}
