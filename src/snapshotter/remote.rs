//! The remote-layer handshake: when containerd prepares a layer's snapshot
//! with labels naming its image and digest, mount the layer lazily as the
//! committed target snapshot, so containerd skips download and unpack.

mod restart;
mod status;

use restart::{keeper_name, HeldMount, Remount, RemountState};
pub use status::DaemonStatus;

use super::{RemoteLayer, SnapshotError, Snapshots};
use crate::credentials::{ImageKey, PullAuths};
use crate::digest::Digest;
use crate::flight::{Abandoned, Flights};
use crate::fs::{BackingRecord, LayerFs, MountedLayer};
use crate::layer::{self, Fallback, Layer, LayerContext, LayerError};
use crate::lifecycle::Keeper;
use crate::registry::{Platform, Reference, RegistryError, ResolvedImage};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
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
/// containerd's limit on one label's key and value together.
const MAX_LABEL: usize = 4096;
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

/// How long a resolved manifest is believed (by digest it never changes; by tag it may).
const MANIFEST_KEPT_FOR: Duration = Duration::from_secs(600);
/// Resolved images remembered.
const MANIFESTS_KEPT: usize = 256;

/// Why a layer cannot be served lazily (containerd then unpacks it).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("resolving image {image}: {source}")]
    Resolve {
        image: String,
        #[source]
        source: Arc<RegistryError>,
    },
    #[error("image {image}: layer {layer} is not in its manifest")]
    NotInManifest { image: String, layer: Digest },
    #[error(transparent)]
    Layer(#[from] Box<LayerError>),
    #[error("mounting layer {layer} at {path}: {source}")]
    Mount {
        layer: Digest,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {name}: stored layer record is unreadable: {reason}")]
    BadRecord { name: String, reason: String },
    #[error("layer {layer}: {source}")]
    Abandoned {
        layer: Digest,
        #[source]
        source: Abandoned,
    },
    #[error("image {image}: layer {layer} (snapshot {name}) cannot be served since the restart: {source}")]
    NotServed {
        image: String,
        layer: String,
        name: String,
        #[source]
        source: Arc<RemoteError>,
    },
    #[error("image {image}: layer {layer} (snapshot {name}) is still being mounted again after the restart")]
    StillMounting { image: String, layer: String, name: String },
}

impl RemoteError {
    /// A layer that was served before a restart and is not (yet) again: containerd may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RemoteError::NotServed { .. } | RemoteError::StillMounting { .. })
    }

    /// The image or layer is not in the registry (as opposed to a failure that may pass).
    pub fn is_not_found(&self) -> bool {
        match self {
            RemoteError::Resolve { source, .. } => matches!(**source, RegistryError::NotFound { .. }),
            RemoteError::NotInManifest { .. } => true,
            RemoteError::Layer(e) => matches!(
                **e,
                LayerError::Registry {
                    source: RegistryError::NotFound { .. },
                    ..
                }
            ),
            _ => false,
        }
    }
}

type Opened = Result<Arc<Layer>, Arc<RemoteError>>;
type Resolved = Result<ResolvedImage, Arc<RegistryError>>;

/// Lazily mounted layers, by snapshot id, and the layers behind them.
pub struct RemoteLayers {
    ctx: LayerContext,
    platform: Platform,
    runtime: tokio::runtime::Handle,
    /// Mounts by snapshot id, each with the layer it serves.
    mounts: Mutex<HashMap<u64, (MountedLayer, Arc<Layer>)>>,
    /// Open layers, shared by every snapshot that shows them.
    layers: Mutex<HashMap<Digest, Weak<Layer>>>,
    /// Layer opens under way: one per digest however many Prepares ask.
    opening: Flights<Digest, Opened>,
    /// Resolved images by reference (with manifest digest when known).
    manifests: Flights<String, Resolved>,
    /// Snapshots not mounted since the restart, by id.
    remounts: Mutex<HashMap<u64, Remount>>,
    /// Holds every mount's descriptor across restarts (`lifecycle`), if it runs.
    keeper: Option<Arc<Keeper>>,
    /// The CRI pulls' own auth, kept while a snapshot of their image is left.
    pull_auths: Option<Arc<PullAuths>>,
}

impl RemoteLayers {
    pub fn new(
        ctx: LayerContext,
        platform: Platform,
        runtime: tokio::runtime::Handle,
        keeper: Option<Arc<Keeper>>,
    ) -> Self {
        Self {
            keeper,
            pull_auths: None,
            ctx,
            platform,
            runtime,
            mounts: Mutex::default(),
            layers: Mutex::default(),
            opening: Flights::new(),
            remounts: Mutex::default(),
            manifests: Flights::caching(NonZeroUsize::new(MANIFESTS_KEPT).expect("non-zero"), |r| {
                r.is_ok().then_some(MANIFEST_KEPT_FOR)
            }),
        }
    }

    /// Pull secrets to drop when the last snapshot of their image goes.
    pub fn with_pull_auths(mut self, auths: Arc<PullAuths>) -> Self {
        self.pull_auths = Some(auths);
        self
    }

    /// Drops the pull secrets of images no lazily served snapshot shows any
    /// more (after a Remove, a pull, and at start). Blocking: reads the store.
    pub fn drop_unused_pull_auths(&self, snapshots: &Snapshots) {
        let Some(auths) = &self.pull_auths else { return };
        match snapshots.records() {
            Ok(records) => {
                let images: Vec<ImageKey> = records
                    .iter()
                    .filter_map(|(_, r)| r.remote.as_ref()?.image.parse::<Reference>().ok())
                    .map(|r| r.key())
                    .collect();
                auths.retain_used(&images);
            }
            Err(e) => warn!(error = %e, "pull secrets not checked against the snapshots left"),
        }
    }

    /// Reads the labels of either family (CRI's or ctr-remote's). A label
    /// over containerd's own size limit (key and value, 4096 bytes) is not
    /// one containerd sent: the snapshot is then not served lazily.
    pub fn target(labels: &BTreeMap<String, String>) -> Option<Target> {
        let get = |k: &str| labels.get(k).filter(|v| k.len() + v.len() <= MAX_LABEL);
        let name = get(TARGET_REF)?.clone();
        let image = IMAGE_LABELS.iter().find_map(|k| get(k))?.parse().ok()?;
        let layer = LAYER_LABELS.iter().find_map(|k| get(k))?.parse().ok()?;
        let manifest = get(MANIFEST_LABEL).and_then(|d| d.parse().ok());
        Some(Target {
            name,
            image,
            layer,
            manifest,
        })
    }

    /// The image's manifest, resolved once and shared; resolved again when
    /// the kept one does not list the layer (a tag that moved).
    async fn resolve(self: &Arc<Self>, target: &Target) -> Result<ResolvedImage, RemoteError> {
        let image = match &target.manifest {
            Some(d) => target.image.with_digest(d.clone()),
            None => target.image.clone(),
        };
        let key = image.to_string();
        let mut retried = false;
        loop {
            let (this, img) = (Arc::clone(self), image.clone());
            let resolve =
                move || async move { this.ctx.registry.resolve(&img, &this.platform).await.map_err(Arc::new) };
            let resolved = self
                .manifests
                .run(key.clone(), resolve)
                .await
                .map_err(|source| RemoteError::Abandoned {
                    layer: target.layer.clone(),
                    source,
                })?
                .map_err(|source| RemoteError::Resolve {
                    image: key.clone(),
                    source,
                })?;
            if retried || resolved.layers.iter().any(|l| l.digest == target.layer) {
                return Ok(resolved);
            }
            self.manifests.forget(&key);
            retried = true;
        }
    }

    /// One open layer per digest, shared by every snapshot that shows it;
    /// concurrent Prepares of the same layer share one open.
    async fn open_layer(
        self: &Arc<Self>,
        resolved: &ResolvedImage,
        digest: &Digest,
    ) -> Result<Arc<Layer>, RemoteError> {
        if let Some(l) = self.layers.lock().get(digest).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let desc = resolved
            .layers
            .iter()
            .find(|l| &l.digest == digest)
            .cloned()
            .ok_or_else(|| RemoteError::NotInManifest {
                image: resolved.reference.to_string(),
                layer: digest.clone(),
            })?;
        let (this, image, d) = (Arc::clone(self), resolved.reference.clone(), digest.clone());
        let open = move || async move {
            let layer = Arc::new(
                layer::open(&this.ctx, &image, &desc, Fallback::Refuse)
                    .await
                    .map_err(|e| Arc::new(Box::new(e).into()))?,
            );
            this.layers.lock().insert(d, Arc::downgrade(&layer));
            Ok(layer)
        };
        match self.opening.run(digest.clone(), open).await {
            Ok(opened) => opened.map_err(|e| match Arc::try_unwrap(e) {
                Ok(e) => e,
                // Shared by concurrent Prepares: each gets the message.
                Err(e) => RemoteError::Layer(Box::new(LayerError::Other {
                    image: resolved.reference.to_string(),
                    layer: digest.clone(),
                    reason: e.to_string(),
                })),
            }),
            Err(source) => Err(RemoteError::Abandoned {
                layer: digest.clone(),
                source,
            }),
        }
    }

    /// FUSE-mounts `layer` at `at` (blocking: the kernel answers FUSE_INIT
    /// first), or answers the mount there again when its connection was held
    /// across a restart; the keeper gets a copy of a new mount's descriptor.
    fn mount(&self, layer: &Arc<Layer>, id: u64, at: &Path, held: Option<HeldMount>) -> Result<(), RemoteError> {
        // Beside the mountpoint, in the snapshot's directory: gone with it.
        let record = BackingRecord::new(at.with_file_name("passthrough"));
        let fs = LayerFs::new(Arc::clone(&layer.fetcher), self.runtime.clone()).with_backing_record(record);
        let mount_err = |source| RemoteError::Mount {
            layer: layer.digest.clone(),
            path: at.to_path_buf(),
            source,
        };
        let mounted = match held {
            Some(h) => fs.take_over(h.fd, h.init, &h.at).map_err(mount_err)?,
            None => {
                // A mount left by a daemon that died.
                crate::overlay::unmount_stale(at);
                let mounted = fs.mount(at, &layer.digest.hex()[..12]).map_err(mount_err)?;
                if let Some(k) = &self.keeper {
                    if let Err(e) = k.put(&keeper_name(id), mounted.device(), &mounted.init().encode()) {
                        warn!(layer = %layer.digest, error = %e, "the keeper did not take the mount: it will not outlive this process");
                    }
                }
                mounted
            }
        };
        self.mounts.lock().insert(id, (mounted, Arc::clone(layer)));
        Ok(())
    }

    /// Serves `target` lazily as a committed snapshot: an id is reserved,
    /// the layer mounted outside any transaction, then the record committed.
    /// Any error means "let containerd unpack it" except AlreadyExists.
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
        let resolved = self.resolve(target).await.map_err(remote)?;
        let layer = self.open_layer(&resolved, &target.layer).await.map_err(remote)?;
        let mut labels = labels.clone();
        labels.insert(REMOTE_LABEL.into(), "remote snapshot".into());
        let record = RemoteLayer {
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
            let id = snaps.reserve_remote(&name, &parent)?;
            let committed = this
                .mount(&layer, id, &snaps.fs_path(id), None)
                .map_err(remote)
                .and_then(|()| snaps.commit_remote(&name, &parent, id, labels, record));
            match &committed {
                Ok(()) => this.ctx.fetch.metrics.layer_mounted(started.elapsed()),
                // Not recorded (or not mounted): undo.
                Err(_) => {
                    this.release(id);
                    snaps.release_reserved(id);
                }
            }
            committed
        })
        .await
        .map_err(|e| SnapshotError::Internal(format!("preparing {}: {e}", target.name)))?
    }

    /// Unmounts the layer behind a removed snapshot; the layer's cached
    /// chunks go too once no snapshot shows it any more.
    pub fn release(&self, id: u64) {
        let held = self.remounts.lock().remove(&id).and_then(|r| r.held);
        let removed = self.mounts.lock().remove(&id);
        if held.is_some() || removed.is_some() {
            self.forget_held(id);
        }
        if let Some(h) = held {
            drop(h.fd);
            crate::overlay::unmount_stale(&h.at);
        }
        if let Some((mounted, layer)) = removed {
            drop(mounted);
            let still_used = self.mounts.lock().values().any(|(_, l)| l.digest == layer.digest);
            if !still_used {
                self.ctx.fetch.disk.remove_layer(&layer.digest);
                layer::record::remove(&self.ctx.layers_dir, &layer.digest);
                let _ = std::fs::remove_file(layer::download::tar_path(&self.ctx.layers_dir, &layer.digest));
                info!(layer = %layer.digest, "layer unmounted and its cache released");
            }
        }
        self.layers.lock().retain(|_, l| l.strong_count() > 0);
    }

    /// The daemon stops: with a keeper, every mount is left to it for the
    /// next daemon to answer (an upgrade; true); without one, everything is unmounted.
    pub fn stop(&self) -> bool {
        let mounts: Vec<_> = self.mounts.lock().drain().collect();
        if self.keeper.is_some() {
            info!(mounts = mounts.len(), "leaving the mounts to the descriptor keeper");
            mounts.into_iter().for_each(|(_, (m, _))| m.abandon());
            true
        } else {
            drop(mounts);
            false
        }
    }
}

fn remote(e: RemoteError) -> SnapshotError {
    SnapshotError::Remote(Arc::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(image: &str) -> BTreeMap<String, String> {
        [
            (TARGET_REF, "chain".to_string()),
            (IMAGE_LABELS[0], image.to_string()),
            (LAYER_LABELS[0], Digest::of(b"l").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn labels_over_containerds_size_limit_are_not_a_target() {
        assert!(RemoteLayers::target(&labels("registry.local/a:b")).is_some());
        let long = format!("registry.local/{}:b", "a".repeat(MAX_LABEL));
        assert!(RemoteLayers::target(&labels(&long)).is_none());
    }
}
