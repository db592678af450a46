//! Prefetch hints: what start-up is known to read, fetched before it asks;
//! and [`background`] fill of the rest.
//! Landmarks: an eStargz layer may put the files start-up reads first and
//! mark their end with `.prefetch.landmark` (`.no.prefetch.landmark`: no such
//! set); those files are fetched, in layer order, before the layer is
//! reported mounted, for at most a configured time.

pub mod background;
pub mod profile;
#[cfg(test)]
mod tests;

use crate::fetch::Fetcher;
use crate::metrics::Cause;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What a landmark prefetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefetched {
    pub files: usize,
    pub bytes: u64,
    /// Everything arrived within the time allowed (else it goes on in the background).
    pub complete: bool,
}

/// What a start-up profile did for a layer when it was opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProfileUse {
    /// None was used or recorded (replay off without a known profile, or no manifest digest).
    #[default]
    None,
    /// None was known: the layer's start-up reads were recorded.
    Recorded,
    /// Its ranges of the layer were fetched before the mount was reported
    /// (`complete`: all of them in time; the rest went on in the background).
    Replayed { chunks: usize, complete: bool },
}

/// Fetches the layer's landmark files at prefetch priority, waiting at most
/// `timeout`; what is still in flight then completes in the background.
pub async fn landmarks(fetcher: &Arc<Fetcher>, timeout: Duration) -> Prefetched {
    let index = fetcher.index();
    let ids: Vec<u32> = index
        .prefetch
        .iter()
        .filter_map(|&n| index.node(n))
        .flat_map(|n| n.first_chunk..n.first_chunk + n.chunk_count)
        .collect();
    let bytes = ids.iter().map(|&id| index.chunks[id as usize].len).sum();
    let files = index.prefetch.len();
    if ids.is_empty() || timeout.is_zero() {
        return Prefetched {
            files,
            bytes: 0,
            complete: ids.is_empty(),
        };
    }
    let started = Instant::now();
    let this = Arc::clone(fetcher);
    // Spawned: on timeout the fetch goes on and fills the cache.
    let task = tokio::spawn(async move { this.chunks(None, ids, Cause::Prefetch).await.map(|_| ()) });
    let complete = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(Ok(()))) => true,
        Ok(Ok(Err(e))) => {
            warn!(layer = %fetcher.layer(), error = %e, "landmark prefetch failed; reads fetch on demand");
            false
        }
        Ok(Err(e)) => {
            warn!(layer = %fetcher.layer(), error = %e, "landmark prefetch task failed");
            false
        }
        Err(_) => false,
    };
    info!(
        layer = %fetcher.layer(),
        files,
        bytes,
        complete,
        ms = started.elapsed().as_millis() as u64,
        "landmark files prefetched"
    );
    Prefetched { files, bytes, complete }
}
