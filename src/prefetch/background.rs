//! Background fill: once a layer is mounted (and a short delay has passed),
//! the rest of it is fetched into the disk cache at `background` priority, so
//! that within minutes the node no longer needs the registry. The fetch
//! scheduler starts its requests only when nothing more urgent is in flight;
//! the fill keeps under a bandwidth cap, and stops rather than thrash when the
//! cache bound cannot hold the layer next to the other mounted layers' data.
//! A fill that caches every chunk ends with the fetcher's completion check
//! (`Fetcher::check_complete`): a layer whose content does not match its
//! digest is quarantined. A compressed blob is hashed in blob order while the
//! fill fetches it, so its chunks are fetched in that order too; bytes that
//! reads cached before the fill began are fetched again for the hash (the
//! start-up set: a few percent of the layer).

use crate::fetch::{CompleteError, Fetcher, Proof};
use crate::index::ChunkId;
use crate::metrics::Cause;
use parking_lot::Mutex;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Blob bytes asked for at once.
const BATCH: u64 = 8 << 20;
/// Longest wait for the fill's last cache writes.
const WRITES_LAND: Duration = Duration::from_secs(30);
/// How often a fill waiting for its last cache writes looks again.
const WRITES_POLL: Duration = Duration::from_millis(100);

/// Per-node settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FillConfig {
    pub enabled: bool,
    /// Wait this long after the mount before starting.
    pub delay: Duration,
    /// Blob bytes per second at most (`None`: as fast as the link allows).
    pub rate: Option<u64>,
}

impl Default for FillConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            delay: Duration::from_secs(5),
            rate: None,
        }
    }
}

/// From the config file's `[background_fill]` section.
impl From<&crate::config::BackgroundFill> for FillConfig {
    fn from(c: &crate::config::BackgroundFill) -> Self {
        Self {
            enabled: c.enabled,
            delay: c.delay.into(),
            rate: c.rate.map(|r| r.as_u64()),
        }
    }
}

/// The layer a fill completes: named in its log lines; `size` (the blob's,
/// from the manifest) bounds the completion check.
#[derive(Clone, Debug)]
pub struct Target {
    pub image: String,
    pub size: u64,
}

/// How a fill ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillEnd {
    /// Every chunk is in the disk cache and passed the completion check
    /// (`proof` says what it proved); `chunks` and `bytes` were fetched by
    /// the fill itself.
    Complete { chunks: usize, bytes: u64, proof: Proof },
    /// The filled content does not match the layer digest: reads of the layer fail.
    Quarantined(String),
    /// The layer was unmounted first.
    Unmounted,
    /// The cache bound is below what the mounted layers need.
    CacheTooSmall,
    /// The registry failed; on-demand reads still work as before.
    Failed(String),
}

/// Where a layer's fill is (`streamsnap status` shows it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FillPhase {
    /// No fill: disabled, or the layer is local.
    #[default]
    Off,
    /// Waiting for its delay after the mount.
    Waiting,
    Running,
    Ended(FillEnd),
}

/// A fill's phase, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct FillState(Mutex<FillPhase>);

impl FillState {
    pub fn phase(&self) -> FillPhase {
        self.0.lock().clone()
    }

    fn set(&self, phase: FillPhase) {
        *self.0.lock() = phase;
    }
}

/// Starts filling the layer behind `fetcher` (held weakly: unmounting the
/// layer ends the fill).
pub fn spawn(fetcher: &Arc<Fetcher>, cfg: FillConfig, target: Target) -> Option<tokio::task::JoinHandle<FillEnd>> {
    spawn_reporting(fetcher, cfg, target, Arc::default())
}

/// Like [`spawn`], keeping `state` up to date.
pub fn spawn_reporting(
    fetcher: &Arc<Fetcher>,
    cfg: FillConfig,
    target: Target,
    state: Arc<FillState>,
) -> Option<tokio::task::JoinHandle<FillEnd>> {
    if !cfg.enabled || fetcher.is_local() {
        return None;
    }
    state.set(FillPhase::Waiting);
    let weak = Arc::downgrade(fetcher);
    let layer = fetcher.layer().to_string();
    Some(tokio::spawn(async move {
        let end = fill(weak.clone(), &cfg, &target, &state).await;
        state.set(FillPhase::Ended(end.clone()));
        let image = &target.image;
        match &end {
            FillEnd::Complete { chunks, bytes, proof } => {
                info!(%image, %layer, chunks, bytes, ?proof, "background fill complete")
            }
            // The fetcher logged it, naming image and layer, when it quarantined the layer.
            FillEnd::Quarantined(_) => {}
            FillEnd::Unmounted => {}
            FillEnd::CacheTooSmall => {
                warn!(%layer, "background fill stopped: the cache bound is below what the mounted layers need")
            }
            FillEnd::Failed(e) => warn!(%image, %layer, error = %e, "background fill stopped"),
        }
        end
    }))
}

async fn fill(weak: Weak<Fetcher>, cfg: &FillConfig, target: &Target, state: &FillState) -> FillEnd {
    tokio::time::sleep(cfg.delay).await;
    state.set(FillPhase::Running);
    let (ids, evictions_at_start) = {
        let Some(f) = weak.upgrade() else {
            return FillEnd::Unmounted;
        };
        let index = f.index();
        let mut ids: Vec<ChunkId> = (0..index.chunks.len() as ChunkId).collect();
        ids.sort_by_key(|&id| {
            (
                index.chunks[id as usize].blob_offset,
                index.chunks[id as usize].inner_offset,
            )
        });
        // Data of unmounted layers gives way; that of other mounted layers does not.
        let room = f
            .disk()
            .limit()
            .saturating_sub(f.disk().mounted_bytes_except(f.layer()));
        if index.content_bytes() > room {
            return FillEnd::CacheTooSmall;
        }
        (ids, f.disk().evictions_in_use())
    };
    // A compressed blob is hashed in order as the fill goes (`Fetcher::hash_blob_to`).
    let mut hash = match weak.upgrade() {
        Some(f) if f.hashes_while_filling() => Some(f.begin_blob_hash(target.size)),
        Some(_) => None,
        None => return FillEnd::Unmounted,
    };
    let started = Instant::now();
    let (mut chunks, mut fetched) = (0usize, 0u64);
    let mut pos = 0;
    while pos < ids.len() {
        let Some(f) = weak.upgrade() else {
            return FillEnd::Unmounted;
        };
        if f.disk().evictions_in_use() > evictions_at_start {
            return FillEnd::CacheTooSmall;
        }
        // The next batch of chunks not yet cached, in blob order.
        let index = f.index();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while pos < ids.len() && bytes < BATCH {
            let id = ids[pos];
            pos += 1;
            if !f.is_cached(id) {
                bytes += index.chunks[id as usize].blob_len;
                batch.push(id);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        if let Some(h) = hash.as_mut() {
            let first = index.chunks[batch[0] as usize].blob_offset;
            if let Err(e) = f.hash_blob_to(h, first).await {
                return FillEnd::Failed(format!("hashing the blob: {e}"));
            }
        }
        if let Err(e) = f.chunks(None, batch, Cause::Background).await {
            return FillEnd::Failed(e.to_string());
        }
        drop(f);
        chunks += n;
        fetched += bytes;
        if let Some(rate) = cfg.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    // Readers (and this fill) get chunks before the disk cache has written
    // them: give the last writes time to land before checking.
    let deadline = Instant::now() + WRITES_LAND;
    loop {
        let Some(f) = weak.upgrade() else {
            return FillEnd::Unmounted;
        };
        if ids.iter().all(|&id| f.is_cached(id)) {
            return match f.check_complete(target.size, hash.take()).await {
                Ok(proof) => FillEnd::Complete {
                    chunks,
                    bytes: fetched,
                    proof,
                },
                Err(e @ CompleteError::Mismatch { .. }) => {
                    f.quarantine(&target.image, &e.to_string());
                    FillEnd::Quarantined(e.to_string())
                }
                Err(e) => FillEnd::Failed(format!("completion check: {e}")),
            };
        }
        if Instant::now() > deadline || f.disk().evictions_in_use() > evictions_at_start {
            return FillEnd::CacheTooSmall;
        }
        drop(f);
        tokio::time::sleep(WRITES_POLL).await;
    }
}
