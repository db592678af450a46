//! After a restart: every lazily served snapshot of the store is mounted again
//! while the socket serves, from the layer's record when it has one; a mount
//! whose connection the descriptor keeper held is answered again, not mounted
//! anew. Until then, requests that need the layer wait (or are told why not).

use super::{RemoteError, RemoteLayers, Target};
use crate::digest::{Digest, DigestError};
use crate::fs::InitRecord;
use crate::layer::{self, Layer};
use crate::registry::{Reference, ReferenceError};
use crate::snapshotter::{RemoteLayer, Snapshots};
use futures::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{info, warn};

/// Lazily served snapshots mounted again at once after a restart.
const REMOUNTS_AT_ONCE: usize = 8;
/// How long a request needing a layer waits for its re-mount before it is told to retry.
const REMOUNT_WAIT: Duration = Duration::from_secs(60);

/// A lazily served snapshot of the store that is not mounted since the restart.
pub(super) struct Remount {
    pub(super) name: String,
    pub(super) record: RemoteLayer,
    pub(super) state: RemountState,
    /// The mount's connection, kept by the keeper across the restart: answered again, not mounted anew.
    pub(super) held: Option<HeldMount>,
}

/// A live mount's descriptor from the keeper, and what its kernel offered at FUSE_INIT.
pub(super) struct HeldMount {
    pub(super) fd: std::os::fd::OwnedFd,
    pub(super) init: InitRecord,
    pub(super) at: PathBuf,
}

/// A snapshot's name at the keeper.
pub(super) fn keeper_name(id: u64) -> String {
    format!("snapshot-{id}")
}

pub(super) enum RemountState {
    /// An attempt is under way; its sender is dropped when it ends.
    Pending(tokio::sync::watch::Receiver<()>),
    /// The last attempt failed; the next request that needs the layer tries again.
    Failed(Arc<RemoteError>),
}

impl RemoteLayers {
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

    pub(super) fn forget_held(&self, id: u64) {
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
}
