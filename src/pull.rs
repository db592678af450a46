//! `streamsnap pull`: pulls an image through containerd's own API (for users of
//! plain containerd), preparing each layer with the labels that make
//! streamsnap serve it lazily, so `ctr run --snapshotter streamsnap` starts it.
//! Layers that cannot be served lazily are fetched into containerd's content
//! store and applied by containerd's diff service, as `ctr pull` would.

use crate::digest::Digest;
use crate::proto::containerd::services::content::v1 as content;
use crate::proto::containerd::services::diff::v1 as diff;
use crate::proto::containerd::services::images::v1 as images;
use crate::proto::containerd::services::leases::v1 as leases;
use crate::proto::containerd::services::snapshots::v1 as snapshots;
use crate::proto::containerd::types;
use crate::registry::{BodyLimit, LayerDescriptor, Platform, Reference, Registry, RegistryError, ResolvedImage};
use crate::snapshotter::remote::TARGET_REF;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::info;

/// Where and how to pull.
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    pub namespace: String,
    pub platform: Platform,
    /// Snapshotter name containerd knows streamsnap by.
    pub snapshotter: String,
    /// Where each layer shows its progress.
    pub progress: crate::progress::Progress,
}

/// A pull that failed; names the image and the step.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image {image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error("image {image}: {step}: containerd answered {code:?}: {message}")]
    Containerd {
        image: String,
        step: String,
        code: Code,
        message: String,
    },
    #[error("image {image}: {reason}")]
    Image { image: String, reason: String },
    #[error("connecting to containerd at {address}: {reason}")]
    Connect { address: PathBuf, reason: String },
}

/// What the pull did, layer by layer.
#[derive(Debug, Default)]
pub struct PullReport {
    pub lazy_layers: usize,
    pub unpacked_layers: usize,
}

#[derive(Clone)]
struct Headers {
    namespace: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    lease: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            req.metadata_mut().insert("containerd-lease", l.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Headers>;

/// A gRPC channel over the unix socket at `address` (containerd's, or a snapshotter's).
pub async fn connect(address: &Path) -> Result<Channel, PullError> {
    let path = address.to_path_buf();
    tonic::transport::Endpoint::try_from("http://containerd.sock")
        .map_err(|e| PullError::Connect {
            address: address.to_path_buf(),
            reason: e.to_string(),
        })?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| PullError::Connect {
            address: address.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Chain ids of a layer stack, as containerd names committed snapshots.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

struct Puller<'a> {
    image: &'a Reference,
    registry: &'a Registry,
    opts: &'a PullOptions,
    content: content::content_client::ContentClient<Svc>,
    snapshots: snapshots::snapshots_client::SnapshotsClient<Svc>,
    diff: diff::diff_client::DiffClient<Svc>,
}

impl Puller<'_> {
    fn err(&self, step: impl Into<String>) -> impl FnOnce(Status) -> PullError + '_ {
        let step = step.into();
        move |s| PullError::Containerd {
            image: self.image.to_string(),
            step,
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    async fn has_content(&mut self, digest: &Digest) -> bool {
        self.content
            .info(content::InfoRequest {
                digest: digest.to_string(),
            })
            .await
            .is_ok()
    }

    /// Writes a blob into containerd's content store (WRITE chunks, then COMMIT).
    async fn write_content(
        &mut self,
        digest: &Digest,
        data: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
        let total = data.len() as i64;
        let reference = format!("streamsnap-pull-{}", digest.hex());
        let mut reqs = Vec::new();
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            reqs.push(content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                offset: (i << 20) as i64,
                data: chunk.to_vec(),
                ..Default::default()
            });
        }
        reqs.push(content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: reference,
            total,
            expected: digest.to_string(),
            offset: total,
            labels,
            ..Default::default()
        });
        let step = format!("writing {digest} to the content store");
        match self.content.write(futures::stream::iter(reqs)).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                        Err(s) => return Err(self.err(step)(s)),
                    }
                }
            }
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(self.err(step)(s)),
        }
    }

    /// Prepares one layer's snapshot with the lazy labels; falls back to an unpack.
    async fn layer(
        &mut self,
        resolved: &ResolvedImage,
        index: usize,
        chain: &[Digest],
        report: &mut PullReport,
    ) -> Result<(), PullError> {
        let desc = &resolved.layers[index];
        let target = chain[index].to_string();
        let parent = if index == 0 {
            String::new()
        } else {
            chain[index - 1].to_string()
        };
        let sn = self.opts.snapshotter.clone();
        let stat = self
            .snapshots
            .stat(snapshots::StatSnapshotRequest {
                snapshotter: sn.clone(),
                key: target.clone(),
            })
            .await;
        if stat.is_ok() {
            return Ok(());
        }
        let later: Vec<String> = resolved.layers[index..].iter().map(|l| l.digest.to_string()).collect();
        let mut labels = HashMap::from([
            (TARGET_REF.to_string(), target.clone()),
            (
                "containerd.io/snapshot/cri.image-ref".to_string(),
                self.image.to_string(),
            ),
            (
                "containerd.io/snapshot/cri.manifest-digest".to_string(),
                resolved.manifest_digest.to_string(),
            ),
            (
                "containerd.io/snapshot/cri.layer-digest".to_string(),
                desc.digest.to_string(),
            ),
            (
                "containerd.io/snapshot/cri.image-layers".to_string(),
                truncate_list(&later, 4000),
            ),
        ]);
        for (k, v) in &desc.annotations {
            labels.insert(format!("containerd.io/snapshot/{k}"), v.clone());
        }
        let key = format!("extract-{} {target}", std::process::id());
        let task = self.opts.progress.layer(&desc.digest, desc.size);
        let prepared = self
            .snapshots
            .prepare(snapshots::PrepareSnapshotRequest {
                snapshotter: sn.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels,
            })
            .await;
        match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {
                report.lazy_layers += 1;
                task.finish("served lazily");
                info!(layer = %desc.digest, "layer served lazily");
                Ok(())
            }
            Err(s) => Err(self.err(format!("preparing layer {}", desc.digest))(s)),
            Ok(resp) => {
                let mounts = resp.into_inner().mounts;
                let applied = self.unpack(desc, mounts, &task).await;
                if let Err(e) = applied {
                    let _ = self
                        .snapshots
                        .remove(snapshots::RemoveSnapshotRequest { snapshotter: sn, key })
                        .await;
                    return Err(e);
                }
                self.snapshots
                    .commit(snapshots::CommitSnapshotRequest {
                        snapshotter: sn,
                        name: target,
                        key,
                        labels: HashMap::new(),
                    })
                    .await
                    .map_err(self.err(format!("committing layer {}", desc.digest)))?;
                report.unpacked_layers += 1;
                task.finish("unpacked by containerd");
                info!(layer = %desc.digest, "layer unpacked by containerd");
                Ok(())
            }
        }
    }

    /// Fetches a layer into the content store and has containerd apply it.
    async fn unpack(
        &mut self,
        desc: &LayerDescriptor,
        mounts: Vec<types::Mount>,
        task: &crate::progress::Task,
    ) -> Result<(), PullError> {
        if !self.has_content(&desc.digest).await {
            let blob = self
                .registry
                .read_blob(self.image, &desc.digest, BodyLimit::new("layer", desc.size))
                .await
                .map_err(|source| PullError::Registry {
                    image: self.image.to_string(),
                    source,
                })?;
            task.advance(blob.len() as u64);
            self.write_content(&desc.digest, blob.to_vec(), HashMap::new()).await?;
        }
        let d = types::Descriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.to_string(),
            size: desc.size as i64,
            annotations: HashMap::new(),
        };
        self.diff
            .apply(diff::ApplyRequest { diff: Some(d), mounts })
            .await
            .map_err(self.err(format!("applying layer {}", desc.digest)))?;
        Ok(())
    }
}

fn truncate_list(items: &[String], max: usize) -> String {
    let mut out = String::new();
    for i in items {
        if out.len() + i.len() + 1 > max {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(i);
    }
    out
}

/// Pulls `image` into containerd with lazily served layers.
pub async fn pull(registry: &Registry, image: &Reference, opts: &PullOptions) -> Result<PullReport, PullError> {
    let name = image.to_string();
    let resolved = registry
        .resolve(image, &opts.platform)
        .await
        .map_err(|source| PullError::Registry {
            image: name.clone(),
            source,
        })?;
    let config = registry
        .read_blob(image, &resolved.config, BodyLimit::CONFIG)
        .await
        .map_err(|source| PullError::Registry {
            image: name.clone(),
            source,
        })?;
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    let cfg: Config = serde_json::from_slice(&config).map_err(|e| PullError::Image {
        image: name.clone(),
        reason: format!("image config {}: {e}", resolved.config),
    })?;
    if cfg.rootfs.diff_ids.len() != resolved.layers.len() {
        return Err(PullError::Image {
            image: name.clone(),
            reason: format!(
                "config lists {} diff ids for {} layers",
                cfg.rootfs.diff_ids.len(),
                resolved.layers.len()
            ),
        });
    }
    let chain = chain_ids(&cfg.rootfs.diff_ids);

    let channel = connect(&opts.address).await?;
    let namespace = opts.namespace.parse().map_err(|_| PullError::Image {
        image: name.clone(),
        reason: format!("invalid namespace {:?}", opts.namespace),
    })?;
    let headers = Headers { namespace, lease: None };
    let mut lease_client = leases::leases_client::LeasesClient::with_interceptor(channel.clone(), headers.clone());
    let expire =
        chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now() + std::time::Duration::from_secs(24 * 3600));
    let lease = lease_client
        .create(leases::CreateRequest {
            id: format!(
                "streamsnap-pull-{}-{}",
                std::process::id(),
                resolved.manifest_digest.hex()
            ),
            labels: HashMap::from([(
                "containerd.io/gc.expire".to_string(),
                expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )]),
        })
        .await
        .map_err(|s| PullError::Containerd {
            image: name.clone(),
            step: "creating a lease".into(),
            code: s.code(),
            message: s.message().to_string(),
        })?
        .into_inner()
        .lease
        .map(|l| l.id)
        .unwrap_or_default();
    let leased = Headers {
        lease: lease.parse().ok(),
        ..headers
    };
    let mut p = Puller {
        image,
        registry,
        opts,
        content: content::content_client::ContentClient::with_interceptor(channel.clone(), leased.clone()),
        snapshots: snapshots::snapshots_client::SnapshotsClient::with_interceptor(channel.clone(), leased.clone()),
        diff: diff::diff_client::DiffClient::with_interceptor(channel.clone(), leased.clone()),
    };
    let mut report = PullReport::default();
    let result = async {
        // Config first: it holds the GC reference that keeps the snapshots.
        let top = chain.last().map(|c| c.to_string()).unwrap_or_default();
        let config_labels = HashMap::from([(format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter), top)]);
        p.write_content(&resolved.config, config.to_vec(), config_labels)
            .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            resolved.config.to_string(),
        )]);
        for (i, l) in resolved.layers.iter().enumerate() {
            manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), l.digest.to_string());
        }
        p.write_content(&resolved.manifest_digest, resolved.manifest.clone(), manifest_labels)
            .await?;
        for i in 0..resolved.layers.len() {
            p.layer(&resolved, i, &chain, &mut report).await?;
        }
        let target = types::Descriptor {
            media_type: resolved.media_type.clone(),
            digest: resolved.manifest_digest.to_string(),
            size: resolved.manifest.len() as i64,
            annotations: HashMap::new(),
        };
        let record = images::Image {
            name: name.clone(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let mut images = images::images_client::ImagesClient::with_interceptor(channel.clone(), leased.clone());
        match images
            .create(images::CreateImageRequest {
                image: Some(record.clone()),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => images
                .update(images::UpdateImageRequest {
                    image: Some(record),
                    update_mask: None,
                })
                .await
                .map(|_| ())
                .map_err(p.err("updating the image record")),
            Err(s) => Err(p.err("creating the image record")(s)),
        }
    }
    .await;
    let _ = lease_client
        .delete(leases::DeleteRequest { id: lease, sync: false })
        .await;
    result.map(|()| report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        assert_eq!(chain[1], Digest::of(format!("{a} {b}").as_bytes()));
    }

    #[test]
    fn long_layer_lists_are_truncated_on_a_boundary() {
        let items: Vec<String> = (0..10).map(|i| format!("item{i}")).collect();
        assert_eq!(truncate_list(&items, 12), "item0,item1");
    }
}
