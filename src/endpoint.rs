//! The daemon's HTTP endpoint (`--metrics-address`): `GET /metrics` (OpenMetrics),
//! `/healthz` (the process answers), `/readyz` (containerd is served and every
//! snapshot of the store is mounted again) and `/status` (the [`NodeStatus`] as JSON).
//! The snapshotter plugs in as a [`StatusSource`] once its socket serves.

use crate::metrics::Metrics;
use crate::status::NodeStatus;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::{info, warn};

/// What the snapshotter tells the endpoint.
pub trait StatusSource: Send + Sync {
    /// The node's status document.
    fn status(&self) -> NodeStatus;
    /// Why the daemon is not ready (`None`: ready).
    fn not_ready(&self) -> Option<String>;
}

/// What the endpoint serves: the metrics from the start; the status once the socket serves.
pub struct Endpoint {
    metrics: Arc<Metrics>,
    source: OnceLock<Arc<dyn StatusSource>>,
}

impl Endpoint {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            source: OnceLock::new(),
        })
    }

    /// The snapshotter serves containerd: from now on readiness and status come from `source`.
    pub fn serving(&self, source: Arc<dyn StatusSource>) {
        let _ = self.source.set(source);
    }

    fn respond(&self, path: &str) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        let source = self.source.get();
        match path {
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match source.map(|s| s.not_ready()) {
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not serving containerd yet\n".into(),
                ),
                Some(Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
                Some(None) => (StatusCode::OK, TEXT, "ready\n".into()),
            },
            "/status" => match source {
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not serving containerd yet\n".into(),
                ),
                Some(s) => match serde_json::to_string_pretty(&s.status()) {
                    Ok(json) => (StatusCode::OK, "application/json", json),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        format!("encoding the status: {e}\n"),
                    ),
                },
            },
            _ => (
                StatusCode::NOT_FOUND,
                TEXT,
                "try /metrics, /healthz, /readyz or /status\n".into(),
            ),
        }
    }
}

/// Serves `endpoint` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Arc<Endpoint>) {
    info!(address = ?listener.local_addr().ok(), "serving metrics, health and status");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let endpoint = Arc::clone(&endpoint);
                async move {
                    // The status walks the snapshot store: off the async threads.
                    let path = req.uri().path().to_string();
                    let answer = tokio::task::spawn_blocking(move || endpoint.respond(&path)).await;
                    let (status, ctype, body) =
                        answer.unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")));
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts"),
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                warn!(%peer, error = %e, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::CacheUse;

    struct Fixed(Option<String>);

    impl StatusSource for Fixed {
        fn status(&self) -> NodeStatus {
            NodeStatus {
                ready: self.0.is_none(),
                cache: CacheUse {
                    used_bytes: 0,
                    limit_bytes: 1,
                },
                images: Vec::new(),
            }
        }
        fn not_ready(&self) -> Option<String> {
            self.0.clone()
        }
    }

    #[test]
    fn healthy_at_once_ready_only_once_serving_and_remounted() {
        let e = Endpoint::new(Metrics::new());
        assert_eq!(e.respond("/healthz").0, StatusCode::OK);
        assert_eq!(e.respond("/readyz").0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.respond("/status").0, StatusCode::SERVICE_UNAVAILABLE);
        e.serving(Arc::new(Fixed(Some("2 snapshots still being mounted again".into()))));
        let (code, _, body) = e.respond("/readyz");
        assert_eq!(
            (code, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "2 snapshots still being mounted again\n"
            )
        );
        let ready = Endpoint::new(Metrics::new());
        ready.serving(Arc::new(Fixed(None)));
        assert_eq!(ready.respond("/readyz").0, StatusCode::OK);
        let (code, ctype, body) = ready.respond("/status");
        assert_eq!((code, ctype), (StatusCode::OK, "application/json"));
        assert!(serde_json::from_str::<NodeStatus>(&body).unwrap().ready);
        assert!(ready.respond("/metrics").2.contains("streamsnap_fuse_read_seconds"));
    }
}
