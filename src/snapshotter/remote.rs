//! The remote-layer handshake: when containerd prepares a layer's snapshot
//! with labels naming its image and digest, mount the layer lazily as the
//! committed target snapshot, so containerd skips download and unpack.

mod status;

pub use status::DaemonStatus;

use super::{RemoteLayer, SnapshotError, Snapshots};
use crate::digest::{Digest, DigestError};
use crate::flight::{Abandoned, Flights};
use crate::fs::{InitRecord, LayerFs, MountedLayer};
use crate::layer::{self, Fallback, Layer, LayerContext, LayerError};
use crate::lifecycle::Keeper;
use crate::registry::{Platform, Reference, ReferenceError, RegistryError, ResolvedImage};
use futures::StreamExt;
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

/// Lazily served snapshots mounted again at once after a restart.
const REMOUNTS_AT_ONCE: usize = 8;
/// How long a request needing a layer waits for its re-mount before it is told to retry.
const REMOUNT_WAIT: Duration = Duration::from_secs(60);

/// A lazily served snapshot of the store that is not mounted since the restart.
struct Remount {
    name: String,
    record: RemoteLayer,
    state: RemountState,
    /// The mount's connection, kept by the keeper across the restart: answered again, not mounted anew.
    held: Option<HeldMount>,
}

/// A live mount's descriptor from the keeper, and what its kernel offered at FUSE_INIT.
struct HeldMount {
    fd: std::os::fd::OwnedFd,
    init: InitRecord,
    at: PathBuf,
}

/// A snapshot's name at the keeper.
fn keeper_name(id: u64) -> String {
    format!("snapshot-{id}")
}

enum RemountState {
    /// An attempt is under way; its sender is dropped when it ends.
    Pending(tokio::sync::watch::Receiver<()>),
    /// The last attempt failed; the next request that needs the layer tries again.
    Failed(Arc<RemoteError>),
}

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

    /// The layer opened again from its record (`layer::reopen`), shared like
    /// `open_layer`'s; `None` when it has no usable record.
    async fn reopen_layer(self: &Arc<Self>, digest: &Digest) -> Option<Arc<Layer>> {
        if let Some(l) = self.layers.lock().get(digest).and_then(Weak::upgrade) {
            return Some(l);
        }
        let (this, d) = (Arc::clone(self), digest.clone());
        let open = move || async move {
            let opened = layer::reopen(&this.ctx, &d).await;
            match opened {
                Some(Ok(layer)) => {
                    let layer = Arc::new(layer);
                    this.layers.lock().insert(d, Arc::downgrade(&layer));
                    Ok(layer)
                }
                Some(Err(e)) => Err(Arc::new(RemoteError::Layer(Box::new(e)))),
                None => Err(Arc::new(RemoteError::BadRecord {
                    name: d.to_string(),
                    reason: "no layer record".into(),
                })),
            }
        };
        match self.opening.run(digest.clone(), open).await {
            Ok(Ok(layer)) => Some(layer),
            Ok(Err(e)) => {
                info!(layer = %digest, error = %e, "layer not opened from its record: asking the registry");
                None
            }
            Err(_) => None,
        }
    }

    /// FUSE-mounts `layer` at `at` (blocking: the kernel answers FUSE_INIT
    /// first), or answers the mount there again when its connection was held
    /// across a restart; the keeper gets a copy of a new mount's descriptor.
    fn mount(&self, layer: &Arc<Layer>, id: u64, at: &Path, held: Option<HeldMount>) -> Result<(), RemoteError> {
        let fs = LayerFs::new(Arc::clone(&layer.fetcher), self.runtime.clone());
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

    /// After a restart: marks every lazily served snapshot of the store as not
    /// mounted (at once, so that no request sees its empty directory), then mounts
    /// them again in the background, a few at a time, while the socket serves.
    pub fn remount_all(self: &Arc<Self>, snapshots: &Arc<Snapshots>) -> tokio::task::JoinHandle<()> {
        let records = snapshots.records().unwrap_or_else(|e| {
            warn!(error = %e, "cannot list snapshots to re-mount");
            Vec::new()
        });
        // A crash between containerd's Remove and our release leaves a layer's chunks behind.
        let served: std::collections::HashSet<&str> = records
            .iter()
            .filter_map(|(_, rec)| rec.remote.as_ref().map(|r| r.layer.as_str()))
            .collect();
        for layer in self.ctx.fetch.disk.layers() {
            if !served.contains(layer.to_string().as_str()) {
                info!(layer = %layer, "dropping the cache of a layer no snapshot serves");
                self.ctx.fetch.disk.remove_layer(&layer);
            }
        }
        for layer in layer::record::recorded(&self.ctx.layers_dir) {
            if !served.contains(layer.to_string().as_str()) {
                layer::record::remove(&self.ctx.layers_dir, &layer);
            }
        }
        let mut held = self.held_mounts(snapshots);
        let attempts: Vec<_> = records
            .into_iter()
            .filter_map(|(name, rec)| {
                let record = rec.remote?;
                Some(self.start_remount(rec.id, name, record, held.remove(&rec.id)))
            })
            .collect();
        // Descriptors of mounts no record names any more (containerd removed them meanwhile).
        for id in held.into_keys() {
            self.forget_held(id);
        }
        let (this, snapshots) = (Arc::clone(self), Arc::clone(snapshots));
        tokio::spawn(async move {
            futures::stream::iter(attempts)
                .for_each_concurrent(REMOUNTS_AT_ONCE, |(id, done)| this.remount(&snapshots, id, done))
                .await;
        })
    }

    /// The keeper's descriptors of mounts still in place, by snapshot id.
    fn held_mounts(&self, snapshots: &Snapshots) -> HashMap<u64, HeldMount> {
        let Some(keeper) = &self.keeper else {
            return HashMap::new();
        };
        let held = keeper.held().unwrap_or_else(|e| {
            warn!(error = %e, "cannot take the mounts' descriptors back: layers are mounted anew");
            Vec::new()
        });
        let mut out = HashMap::new();
        for h in held {
            let id = h.name.strip_prefix("snapshot-").and_then(|n| n.parse::<u64>().ok());
            let live = id.is_some_and(|id| crate::overlay::mount_at(&snapshots.fs_path(id)).is_some());
            match (id, InitRecord::decode(&h.meta)) {
                (Some(id), Some(init)) if live => {
                    let at = snapshots.fs_path(id);
                    out.insert(id, HeldMount { fd: h.fd, init, at });
                }
                _ => {
                    if let Err(e) = keeper.forget(&h.name) {
                        warn!(name = %h.name, error = %e, "cannot drop a stale descriptor at the keeper");
                    }
                }
            }
        }
        info!(
            mounts = out.len(),
            "mounts held across the restart: their connections are answered again"
        );
        out
    }

    fn forget_held(&self, id: u64) {
        if let Some(k) = &self.keeper {
            if let Err(e) = k.forget(&keeper_name(id)) {
                warn!(snapshot_id = id, error = %e, "cannot drop a descriptor at the keeper");
            }
        }
    }

    /// Records snapshot `id` as being re-mounted; the attempt ends when the sender is dropped.
    fn start_remount(
        &self,
        id: u64,
        name: String,
        record: RemoteLayer,
        held: Option<HeldMount>,
    ) -> (u64, tokio::sync::watch::Sender<()>) {
        let (done, pending) = tokio::sync::watch::channel(());
        let state = RemountState::Pending(pending);
        self.remounts.lock().insert(
            id,
            Remount {
                name,
                record,
                state,
                held,
            },
        );
        (id, done)
    }

    /// One attempt to mount snapshot `id` again from its stored record.
    async fn remount(self: &Arc<Self>, snapshots: &Arc<Snapshots>, id: u64, done: tokio::sync::watch::Sender<()>) {
        let Some((name, stored)) = self
            .remounts
            .lock()
            .get(&id)
            .map(|r| (r.name.clone(), r.record.clone()))
        else {
            return;
        };
        let result = self.mount_stored(snapshots, &name, id, &stored).await;
        let mut remounts = self.remounts.lock();
        match result {
            Ok(()) if remounts.remove(&id).is_some() => {
                info!(snapshot = %name, image = %stored.image, layer = %stored.layer, "re-mounted lazy layer");
            }
            // Removed by containerd meanwhile.
            Ok(()) => {
                drop(remounts);
                self.release(id);
            }
            Err(e) => {
                warn!(snapshot = %name, image = %stored.image, layer = %stored.layer, error = %e,
                    "cannot re-mount lazy layer: containerd is told so until it can be");
                if let Some(r) = remounts.get_mut(&id) {
                    r.state = RemountState::Failed(Arc::new(e));
                }
            }
        }
        drop(done); // wakes the waiters, after the state is final
    }

    async fn mount_stored(
        self: &Arc<Self>,
        snapshots: &Arc<Snapshots>,
        name: &str,
        id: u64,
        stored: &RemoteLayer,
    ) -> Result<(), RemoteError> {
        let bad = |reason: String| RemoteError::BadRecord {
            name: name.to_string(),
            reason,
        };
        let image: Reference = stored.image.parse().map_err(|e: ReferenceError| bad(e.to_string()))?;
        let digest: Digest = stored.layer.parse().map_err(|e: DigestError| bad(e.to_string()))?;
        let target = Target {
            name: name.to_string(),
            image: image.clone(),
            layer: digest.clone(),
            manifest: image.digest.clone(),
        };
        // From the layer's record first: a reboot with the registry down still mounts it.
        let layer = match self.reopen_layer(&digest).await {
            Some(layer) => layer,
            None => {
                let resolved = self.resolve(&target).await?;
                self.open_layer(&resolved, &digest).await?
            }
        };
        // Taken only now: a failed open keeps the connection for the next attempt.
        let held = self.remounts.lock().get_mut(&id).and_then(|r| r.held.take());
        let (this, fs) = (Arc::clone(self), snapshots.fs_path(id));
        tokio::task::spawn_blocking(move || {
            let taken_over = held.is_some();
            match this.mount(&layer, id, &fs, held) {
                Err(e) if taken_over => {
                    warn!(layer = %layer.digest, error = %e, "cannot answer the held connection: mounting anew (open files of the old mount fail)");
                    this.mount(&layer, id, &fs, None)
                }
                done => done,
            }
        })
        .await
        .map_err(|e| bad(format!("mount task: {e}")))?
    }

    /// Waits until the snapshots `ids` are served: those not mounted since the restart
    /// are waited for (a failed one is tried once more). Containerd is never handed a
    /// layer's empty directory: it gets an error naming image and layer instead.
    pub async fn wait_served(self: &Arc<Self>, snapshots: &Arc<Snapshots>, ids: &[u64]) -> Result<(), RemoteError> {
        for &id in ids {
            let deadline = tokio::time::Instant::now() + REMOUNT_WAIT;
            let mut retried = false;
            loop {
                let (mut pending, retry) = {
                    let mut remounts = self.remounts.lock();
                    let Some(r) = remounts.get_mut(&id) else { break };
                    match &r.state {
                        RemountState::Pending(p) => (p.clone(), None),
                        RemountState::Failed(e) if retried => {
                            return Err(RemoteError::NotServed {
                                image: r.record.image.clone(),
                                layer: r.record.layer.clone(),
                                name: r.name.clone(),
                                source: Arc::clone(e),
                            })
                        }
                        RemountState::Failed(_) => {
                            let (done, pending) = tokio::sync::watch::channel(());
                            r.state = RemountState::Pending(pending.clone());
                            (pending, Some(done))
                        }
                    }
                };
                if let Some(done) = retry {
                    retried = true;
                    let (this, snapshots) = (Arc::clone(self), Arc::clone(snapshots));
                    tokio::spawn(async move { this.remount(&snapshots, id, done).await });
                }
                // Ends when the attempt's sender is dropped.
                if tokio::time::timeout_at(deadline, pending.changed()).await.is_err() {
                    let remounts = self.remounts.lock();
                    let Some(r) = remounts.get(&id) else { break };
                    return Err(RemoteError::StillMounting {
                        image: r.record.image.clone(),
                        layer: r.record.layer.clone(),
                        name: r.name.clone(),
                    });
                }
            }
        }
        Ok(())
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
