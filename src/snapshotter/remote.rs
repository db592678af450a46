//! The remote-layer handshake: when containerd prepares a layer's snapshot
//! with labels naming its image and digest, mount the layer lazily as the
//! committed target snapshot, so containerd skips download and unpack.

use super::{RemoteLayer, SnapshotError, Snapshots};
use crate::digest::Digest;
use crate::fs::LayerFs;
use crate::layer::{self, Fallback, Layer, LayerContext};
use crate::registry::{Platform, Reference, ResolvedImage};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Weak};
use tracing::{info, warn};

/// Name of the committed snapshot containerd wants (the layer's chain id).
pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
const IMAGE_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/remote/stargz.reference",
];
const LAYER_LABELS: [&str; 2] = [
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
];
const MANIFEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Marks snapshots we serve lazily (stargz-snapshotter sets the same).
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// What a Prepare asks to be served lazily.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub image: Reference,
    pub layer: Digest,
    pub manifest: Option<Digest>,
}

/// Lazily mounted layers, by snapshot id, and the layers behind them.
pub struct RemoteLayers {
    ctx: LayerContext,
    platform: Platform,
    runtime: tokio::runtime::Handle,
    /// Mount sessions by snapshot id, each with the layer it serves.
    sessions: Mutex<HashMap<u64, (fuser::BackgroundSession, Arc<Layer>)>>,
    layers: Mutex<HashMap<Digest, Weak<Layer>>>,
    manifests: tokio::sync::Mutex<HashMap<String, ResolvedImage>>,
}

impl RemoteLayers {
    pub fn new(ctx: LayerContext, platform: Platform, runtime: tokio::runtime::Handle) -> Self {
        Self {
            ctx,
            platform,
            runtime,
            sessions: Mutex::default(),
            layers: Mutex::default(),
            manifests: Default::default(),
        }
    }

    /// Reads the labels of either family (CRI's or ctr-remote's).
    pub fn target(labels: &BTreeMap<String, String>) -> Option<Target> {
        let name = labels.get(TARGET_REF)?.clone();
        let image = IMAGE_LABELS.iter().find_map(|k| labels.get(*k))?.parse().ok()?;
        let layer = LAYER_LABELS.iter().find_map(|k| labels.get(*k))?.parse().ok()?;
        let manifest = labels.get(MANIFEST_LABEL).and_then(|d| d.parse().ok());
        Some(Target {
            name,
            image,
            layer,
            manifest,
        })
    }

    async fn resolve(&self, target: &Target) -> Result<ResolvedImage, SnapshotError> {
        let image = match &target.manifest {
            Some(d) => target.image.with_digest(d.clone()),
            None => target.image.clone(),
        };
        let key = image.to_string();
        let mut cache = self.manifests.lock().await;
        if let Some(r) = cache.get(&key) {
            if r.layers.iter().any(|l| l.digest == target.layer) {
                return Ok(r.clone());
            }
        }
        let resolved = self
            .ctx
            .registry
            .resolve(&image, &self.platform)
            .await
            .map_err(|e| SnapshotError::Internal(e.to_string()))?;
        cache.insert(key, resolved.clone());
        Ok(resolved)
    }

    /// One open layer per digest, shared by every snapshot that shows it.
    async fn open_layer(
        &self,
        image: &Reference,
        resolved: &ResolvedImage,
        digest: &Digest,
    ) -> Result<Arc<Layer>, SnapshotError> {
        if let Some(l) = self.layers.lock().get(digest).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let desc = resolved
            .layers
            .iter()
            .find(|l| &l.digest == digest)
            .ok_or_else(|| SnapshotError::NotFound(format!("layer {digest} in the manifest of {image}")))?;
        let layer = layer::open(&self.ctx, &resolved.reference, desc, Fallback::Refuse)
            .await
            .map_err(|e| SnapshotError::Internal(e.to_string()))?;
        let layer = Arc::new(layer);
        self.layers.lock().insert(digest.clone(), Arc::downgrade(&layer));
        Ok(layer)
    }

    fn mount(&self, layer: &Arc<Layer>, id: u64, at: &Path) -> Result<(), SnapshotError> {
        if crate::overlay::is_mountpoint(at) {
            // A mount left by a daemon that died: its FUSE connection is gone.
            let _ = crate::overlay::unmount(at, true);
        }
        let fs = LayerFs::new(Arc::clone(&layer.fetcher), self.runtime.clone());
        let session = fs.mount(at, &layer.digest.hex()[..12]).map_err(|e| {
            SnapshotError::Internal(format!("mounting layer {} at {}: {e}", layer.digest, at.display()))
        })?;
        self.sessions.lock().insert(id, (session, Arc::clone(layer)));
        Ok(())
    }

    /// Serves `target` lazily as a committed snapshot; any error means
    /// "let containerd unpack it" except AlreadyExists.
    pub async fn prepare_lazy(
        self: &Arc<Self>,
        snapshots: &Arc<Snapshots>,
        target: &Target,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        if snapshots.stat(&target.name).is_ok() {
            return Err(SnapshotError::AlreadyExists(format!("target snapshot {}", target.name)));
        }
        let started = std::time::Instant::now();
        let resolved = self.resolve(target).await?;
        let layer = self.open_layer(&target.image, &resolved, &target.layer).await?;
        let mut labels = labels.clone();
        labels.insert(REMOTE_LABEL.into(), "remote snapshot".into());
        let remote = RemoteLayer {
            image: resolved.reference.to_string(),
            layer: target.layer.to_string(),
        };
        let (this, snaps, name, parent) = (
            Arc::clone(self),
            Arc::clone(snapshots),
            target.name.clone(),
            parent.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            let mut mounted_id = None;
            let result = snaps.commit_remote(&name, &parent, labels, remote, |fs| {
                let id = fs
                    .parent()
                    .and_then(|d| d.file_name())
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                mounted_id = Some(id);
                this.mount(&layer, id, fs)
            });
            match &result {
                Ok(()) => this.ctx.metrics.layer_mounted(started.elapsed()),
                // The record was not stored: undo the mount.
                Err(_) => {
                    if let Some(id) = mounted_id {
                        this.release(id);
                    }
                }
            }
            result
        })
        .await
        .map_err(|e| SnapshotError::Internal(e.to_string()))?
    }

    /// Mounts again every lazily served snapshot in the store (after a restart).
    pub async fn remount_all(self: &Arc<Self>, snapshots: &Arc<Snapshots>) {
        let records = match snapshots.records() {
            Ok(r) => r,
            Err(e) => return warn!(error = %e, "cannot list snapshots to re-mount"),
        };
        for (name, rec) in records {
            let Some(remote) = rec.remote.clone() else { continue };
            let result = async {
                let image: Reference = remote
                    .image
                    .parse()
                    .map_err(|e: crate::registry::ReferenceError| SnapshotError::Internal(e.to_string()))?;
                let digest: Digest = remote
                    .layer
                    .parse()
                    .map_err(|e: crate::digest::DigestError| SnapshotError::Internal(e.to_string()))?;
                let target = Target {
                    name: name.clone(),
                    image: image.clone(),
                    layer: digest.clone(),
                    manifest: image.digest.clone(),
                };
                let resolved = self.resolve(&target).await?;
                let layer = self.open_layer(&image, &resolved, &digest).await?;
                let (this, fs) = (Arc::clone(self), snapshots.fs_path(rec.id));
                tokio::task::spawn_blocking(move || this.mount(&layer, rec.id, &fs))
                    .await
                    .map_err(|e| SnapshotError::Internal(e.to_string()))?
            }
            .await;
            match result {
                Ok(()) => info!(snapshot = %name, layer = %remote.layer, "re-mounted lazy layer"),
                Err(e) => warn!(snapshot = %name, layer = %remote.layer, error = %e, "cannot re-mount lazy layer"),
            }
        }
    }

    /// Unmounts the layer behind a removed snapshot; the layer's cached
    /// chunks go too once no snapshot shows it any more.
    pub fn release(&self, id: u64) {
        let removed = self.sessions.lock().remove(&id);
        if let Some((session, layer)) = removed {
            drop(session);
            let still_used = self.sessions.lock().values().any(|(_, l)| l.digest == layer.digest);
            if !still_used {
                self.ctx.disk.remove_layer(&layer.digest);
                info!(layer = %layer.digest, "layer unmounted and its cache released");
            }
        }
        self.layers.lock().retain(|_, l| l.strong_count() > 0);
    }

    /// Unmounts everything (shutdown).
    pub fn release_all(&self) {
        let sessions: Vec<_> = self.sessions.lock().drain().collect();
        drop(sessions);
    }
}
