//! gRPC adapter: containerd's `Snapshots` service over [`Snapshots`], plus the
//! remote-layer handshake in Prepare. Translates types and errors, nothing more.

use super::remote::RemoteLayers;
use super::{Info, Kind, Mount, SnapshotError, Snapshots};
use crate::proto::containerd::services::snapshots::v1 as api;
use crate::proto::containerd::types;
use api::snapshots_server::Snapshots as SnapshotsApi;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

pub use api::snapshots_server::SnapshotsServer;

/// The service containerd talks to.
pub struct Service {
    snapshots: Arc<Snapshots>,
    remote: Arc<RemoteLayers>,
}

impl Service {
    pub fn new(snapshots: Arc<Snapshots>, remote: Arc<RemoteLayers>) -> Self {
        Self { snapshots, remote }
    }

    /// Runs blocking snapshot work off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshots) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, Status> {
        let s = Arc::clone(&self.snapshots);
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?
            .map_err(to_status)
    }

    /// Waits for the layers under snapshot `key` (itself included) that are not
    /// mounted since a restart; an unknown key is left to the operation to report.
    async fn served(&self, key: &str) -> Result<(), Status> {
        let key = key.to_string();
        if key.is_empty() {
            return Ok(());
        }
        let Ok(ids) = self.blocking(move |s| s.chain_ids(&key)).await else {
            return Ok(());
        };
        self.remote
            .wait_served(&self.snapshots, &ids)
            .await
            .map_err(|e| to_status(SnapshotError::Remote(Arc::new(e))))
    }
}

/// The gRPC codes containerd's errdefs expects.
pub fn to_status(e: SnapshotError) -> Status {
    match e {
        SnapshotError::NotFound(m) => Status::not_found(format!("{m}: not found")),
        SnapshotError::AlreadyExists(m) => Status::already_exists(format!("{m}: already exists")),
        SnapshotError::FailedPrecondition(m) => Status::failed_precondition(m),
        SnapshotError::InvalidArgument(m) => Status::invalid_argument(m),
        SnapshotError::Internal(m) => Status::internal(m),
        SnapshotError::Remote(e) if e.is_not_found() => Status::not_found(e.to_string()),
        SnapshotError::Remote(e) if e.is_unavailable() => Status::unavailable(e.to_string()),
        SnapshotError::Remote(e) => Status::internal(e.to_string()),
    }
}

fn mounts(m: Vec<Mount>) -> Vec<types::Mount> {
    m.into_iter()
        .map(|m| types::Mount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(ns: i128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn to_api(i: Info) -> api::Info {
    let kind = match i.kind {
        Kind::View => api::Kind::View,
        Kind::Active => api::Kind::Active,
        Kind::Committed => api::Kind::Committed,
    };
    api::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: kind as i32,
        created_at: Some(timestamp(i.created_ns)),
        updated_at: Some(timestamp(i.updated_ns)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn futures::Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotsApi for Service {
    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, parent = %req.get_ref().parent))]
    async fn prepare(
        &self,
        req: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        if let Some(target) = RemoteLayers::target(&labels) {
            match self
                .remote
                .prepare_lazy(&self.snapshots, &target, &r.parent, &labels)
                .await
            {
                Ok(()) => {
                    info!(snapshot = %target.name, layer = %target.layer, "layer served lazily");
                    return Err(Status::already_exists(format!(
                        "target snapshot {}: already exists",
                        target.name
                    )));
                }
                Err(SnapshotError::AlreadyExists(m)) => return Err(Status::already_exists(m)),
                // Anything else: answer as a normal snapshotter, containerd unpacks the layer.
                Err(e) => warn!(layer = %target.layer, error = %e, "cannot serve layer lazily, falling back to unpack"),
            }
        }
        self.served(&r.parent).await?;
        let m = self.blocking(move |s| s.prepare(&r.key, &r.parent, labels)).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(
        &self,
        req: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        self.served(&r.parent).await?;
        let m = self
            .blocking(move |s| s.view(&r.key, &r.parent, r.labels.into_iter().collect()))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(&self, req: Request<api::MountsRequest>) -> Result<Response<api::MountsResponse>, Status> {
        let key = req.into_inner().key;
        self.served(&key).await?;
        let m = self.blocking(move |s| s.mounts(&key)).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, req: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.blocking(move |s| s.commit(&r.name, &r.key, r.labels.into_iter().collect()))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        let rec = self.blocking(move |s| s.remove(&key)).await?;
        if rec.remote.is_some() {
            let (remote, snapshots) = (Arc::clone(&self.remote), Arc::clone(&self.snapshots));
            tokio::task::spawn_blocking(move || {
                remote.release(rec.id);
                snapshots.forget_dir(rec.id);
                remote.drop_unused_pull_auths(&snapshots);
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let info = self.blocking(move |s| s.stat(&key)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = Info {
            name: info.name,
            parent: None,
            kind: Kind::Active,
            created_ns: 0,
            updated_ns: 0,
            labels: info.labels.into_iter().collect(),
        };
        let out = self.blocking(move |s| s.update(&info, &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api(out)),
        }))
    }

    type ListStream = ListStream;

    async fn list(&self, req: Request<api::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let filters = req.into_inner().filters;
        let infos = self.blocking(move |s| s.list(&filters)).await?;
        debug!(count = infos.len(), "list");
        // Batches keep each message well under gRPC's size limit.
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().cloned().map(to_api).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(&self, req: Request<api::UsageRequest>) -> Result<Response<api::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let (size, inodes) = self.blocking(move |s| s.usage(&key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _req: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
