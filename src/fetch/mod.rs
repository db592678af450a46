//! Chunk fetching for one layer: caches first, one flight per chunk
//! (concurrent readers share it), neighbouring missing chunks coalesced into
//! one range request admitted by the node's [`Scheduler`] at the urgency of
//! its cause, decoding and verification on the blocking pool.
//!
//! Submodules: `ahead` (read-ahead and neighbours), `load` (the miss path:
//! disk cache, range requests, decode, store), `body` (a range request's
//! body, read as it arrives), `source` (the [`RangeSource`] seam: registry,
//! local file), `sched` (priorities), `observe` (the [`ReadObserver`] seam),
//! `spans` (gzip-indexed layers), `decode` (chunk bytes to file bytes),
//! `testing` (an in-process source that injects faults).

mod ahead;
mod body;
mod complete;
pub mod decode;
mod load;
mod observe;
mod sched;
mod source;
mod spans;
mod tap;
pub mod testing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compressed;

pub use ahead::READ_AHEAD;
pub use complete::{CompleteError, Proof};
pub use observe::ReadObserver;
pub use sched::{Scheduler, Urgency, LOW_BUDGET, MAX_IN_FLIGHT};
pub use source::{FileSource, RangeSource, RegistrySource, SourceError};
pub use tap::BlobHash;

use crate::cache::{ChunkKey, DiskCache, FileEntry, FileSlot, MemCache};
use crate::digest::Digest;
use crate::flight::{Abandoned, Claim, Flights, Lead};
use crate::index::{Chunk, ChunkId, LayerIndex, NodeId};
use crate::metrics::{Cause, Lookup, Metrics};
use bytes::{Bytes, BytesMut};
use futures::future::FutureExt;
use observe::ObserverSlot;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::{error, warn};

/// Largest single range request when coalescing chunks.
pub const MAX_REQUEST: u64 = 4 << 20;
/// Gap between chunks still worth fetching in one request.
const MAX_GAP: u64 = 64 << 10;
/// Smallest file worth a whole-file cache entry (kernel passthrough); smaller
/// ones are served from the page cache after one read anyway.
const WHOLE_FILE_MIN: u64 = 1 << 20;

/// A read that cannot be served with verified bytes.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("layer {layer}: fetching blob bytes {offset}+{len}: {source}")]
    Source {
        layer: Digest,
        offset: u64,
        len: u64,
        #[source]
        source: Arc<SourceError>,
    },
    #[error("layer {layer}: chunk at blob offset {offset}: {reason}")]
    Corrupt { layer: Digest, offset: u64, reason: String },
    #[error("layer {layer}: no such file node {node}")]
    NoNode { layer: Digest, node: NodeId },
    #[error("layer {layer}: file {path}: no answer from the source within the {deadline:?} read deadline")]
    Deadline {
        layer: Digest,
        path: String,
        deadline: Duration,
    },
    #[error("layer {layer} is quarantined: {reason}")]
    Quarantined { layer: Digest, reason: String },
    #[error("layer {layer}: chunk at blob offset {offset}: {source}")]
    Abandoned {
        layer: Digest,
        offset: u64,
        #[source]
        source: Abandoned,
    },
}

impl FetchError {
    /// The layer's blob is gone from its source: retrying will not help.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FetchError::Source { source, .. } if source.is_not_found())
    }
}

/// Counters for tests, logs and metrics.
#[derive(Default, Debug)]
pub struct FetchStats {
    pub bytes_fetched: AtomicU64,
    pub requests: AtomicU64,
    pub chunks_from_disk: AtomicU64,
    pub chunks_from_memory: AtomicU64,
}

/// Default of [`Services::read_deadline`] (`[fetch] read_deadline`).
pub const READ_DEADLINE: Duration = Duration::from_secs(60);

/// What every fetcher of the node shares.
#[derive(Clone)]
pub struct Services {
    pub disk: Arc<DiskCache>,
    pub mem: Arc<MemCache>,
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    /// Longest wait of one file read for its chunks; then it fails (EIO).
    pub read_deadline: Duration,
    /// Bytes fetched ahead of a sequential reader, held in memory until read.
    pub read_ahead: u64,
}

impl Services {
    pub fn new(disk: Arc<DiskCache>, mem: Arc<MemCache>, metrics: Arc<Metrics>) -> Self {
        Self {
            disk,
            mem,
            scheduler: Scheduler::new(Arc::clone(&metrics)),
            metrics,
            read_deadline: READ_DEADLINE,
            read_ahead: ahead::READ_AHEAD,
        }
    }

    pub fn with_read_deadline(mut self, deadline: Duration) -> Self {
        self.read_deadline = deadline;
        self
    }

    pub fn with_read_ahead(mut self, bytes: u64) -> Self {
        self.read_ahead = bytes;
        self
    }
}

type Fetched = Result<Bytes, FetchError>;
/// Flights of chunks or spans; joiners get the urgency to raise.
type FetchFlights<K> = Flights<K, Fetched, Arc<Urgency>>;
type ChunkLead = Lead<ChunkId, Fetched, Arc<Urgency>>;

/// Serves file bytes of one layer.
pub struct Fetcher {
    layer: Digest,
    index: Arc<LayerIndex>,
    source: Arc<dyn RangeSource>,
    node: Services,
    chunk_flights: FetchFlights<ChunkId>,
    /// Spans being fetched (gzip-indexed layers), shared by their chunks.
    span_flights: FetchFlights<u32>,
    /// Per file: (last chunk read, chunks already asked for up to), to spot sequential readers.
    sequential: Mutex<HashMap<NodeId, (ChunkId, ChunkId)>>,
    pub stats: FetchStats,
    observer: ObserverSlot,
    /// Where checks of cached files left by an earlier run go (off the FUSE threads).
    runtime: Option<tokio::runtime::Handle>,
    /// Why the layer is known to serve wrong bytes (`complete`): every read fails.
    quarantined: OnceLock<String>,
    /// Verified fetched bytes, held while the fill hashes the blob (`tap`).
    tap: tap::Tap,
    /// Fetched chunks from their answer until `store` has written them: a
    /// reader in between finds them here rather than fetching them again.
    landing: Mutex<HashMap<ChunkId, Bytes>>,
    /// Bytes readers have had of each chunk not yet read whole (`hold_unread`);
    /// at most one entry per chunk of the index.
    unread: Mutex<HashMap<ChunkId, u64>>,
}

impl Fetcher {
    pub fn new(layer: Digest, index: Arc<LayerIndex>, source: Arc<dyn RangeSource>, node: &Services) -> Arc<Self> {
        node.disk.pin(&layer);
        Arc::new(Self {
            layer,
            index,
            source,
            node: node.clone(),
            chunk_flights: Flights::new(),
            span_flights: Flights::new(),
            sequential: Mutex::default(),
            stats: FetchStats::default(),
            observer: ObserverSlot::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            quarantined: OnceLock::new(),
            tap: tap::Tap::default(),
            landing: Mutex::default(),
            unread: Mutex::default(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.node.metrics
    }

    pub fn layer(&self) -> &Digest {
        &self.layer
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Tells `observer` of every read from now on (replacing any other).
    pub fn attach(&self, observer: Arc<dyn ReadObserver>) {
        self.observer.attach(observer);
    }

    /// Stops telling `observer` (if it is the one attached).
    pub fn detach(&self, observer: &Arc<dyn ReadObserver>) {
        self.observer.detach(observer);
    }

    /// Is an observer attached?
    pub fn is_observed(&self) -> bool {
        self.observer.is_attached()
    }

    /// Reads up to `size` bytes of file `node` at `offset` (short only at end of file).
    pub async fn read(self: &Arc<Self>, node: NodeId, offset: u64, size: u32) -> Result<Bytes, FetchError> {
        self.refuse_quarantined()?;
        let n = self.index.node(node).ok_or_else(|| FetchError::NoNode {
            layer: self.layer.clone(),
            node,
        })?;
        let end = offset.saturating_add(size as u64).min(n.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        self.observer.notify(&self.layer, node, offset, end - offset);
        let ids = self.index.chunks_for_range(node, offset, end - offset);
        if self.source.is_local() {
            return self.read_local(ids, offset, end).await;
        }
        self.read_ahead(node, ids.clone());
        if offset == 0 {
            self.neighbours(node, ids.clone());
        }
        // The fetch goes on in its own task (and ends by the registry's own
        // deadline); the reader stops waiting here.
        let deadline = self.node.read_deadline;
        let waited = tokio::time::timeout(deadline, self.chunks(Some(node), ids.clone(), Cause::OnDemand)).await;
        let parts = match waited {
            // The registry's own deadline (the same length) may end the wait first.
            Ok(Err(FetchError::Source { source, .. })) if source.is_deadline() => None,
            Ok(parts) => Some(parts?),
            Err(_) => None,
        };
        let Some(parts) = parts else {
            let path = self.index.path_of(node);
            error!(image = %self.source.origin(), layer = %self.layer, path = %path, ?deadline, "read deadline passed, answering EIO");
            return Err(FetchError::Deadline {
                layer: self.layer.clone(),
                path,
                deadline,
            });
        };
        let mut pieces = ids.zip(parts).map(|(id, data)| {
            let c = &self.index.chunks[id as usize];
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.len) - c.file_offset;
            self.hold_unread(id, to - from, &data);
            data.slice(from as usize..to as usize)
        });
        if pieces.len() == 1 {
            return Ok(pieces.next().expect("one piece"));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        pieces.for_each(|p| out.extend_from_slice(&p));
        Ok(out.freeze())
    }

    /// Memory holds a chunk until its readers have had all its bytes: a
    /// sequential reader takes a chunk in several kernel reads (in any order:
    /// the kernel reads ahead in parallel), and without this each later one
    /// would load it from the disk cache and hash it again. Then the kernel's
    /// page cache holds the bytes and memory lets go.
    fn hold_unread(&self, id: ChunkId, delivered: u64, data: &Bytes) {
        let key = self.key(id);
        let mut unread = self.unread.lock();
        let had = unread.entry(id).or_insert(0);
        *had = had.saturating_add(delivered);
        if *had >= self.index.chunks[id as usize].len {
            unread.remove(&id);
            drop(self.node.mem.take(&key));
        } else {
            self.node.mem.put(key, data.clone());
        }
    }

    /// Is chunk `id` in the disk cache? (Cheap: nothing is read.)
    pub fn is_cached(&self, id: ChunkId) -> bool {
        match self.slot(None, id) {
            Some(slot) => self.node.disk.has_in_file(&self.layer, slot),
            None => self.node.disk.has(&self.key(id)),
        }
    }

    pub fn is_local(&self) -> bool {
        self.source.is_local()
    }

    pub fn disk(&self) -> &Arc<DiskCache> {
        &self.node.disk
    }

    /// The whole-file cache entry of `node`, for the kernel to read directly.
    /// An entry left by an earlier run is checked first, in the background
    /// (the kernel's reads of it are not checked): until then, `None`.
    pub fn cached_file(&self, node: NodeId) -> Option<PathBuf> {
        if self.source.is_local() || self.quarantined().is_some() {
            return None;
        }
        match self.node.disk.file(&self.layer, node) {
            FileEntry::Ready(path) => Some(path),
            FileEntry::Absent => None,
            FileEntry::Unchecked => {
                if let Some(rt) = self
                    .runtime
                    .as_ref()
                    .filter(|_| self.node.disk.claim_check(&self.layer, node))
                {
                    let (disk, layer) = (Arc::clone(&self.node.disk), self.layer.clone());
                    drop(rt.spawn_blocking(move || disk.check_file(&layer, node)));
                }
                None
            }
        }
    }

    /// Where the disk cache keeps chunk `id` of `node`: inside the node's file
    /// entry when the file is large (so it can become a passthrough file).
    fn slot(&self, node: Option<NodeId>, id: ChunkId) -> Option<FileSlot> {
        let node = node.or_else(|| self.index.node_of_chunk(id))?;
        let n = self.index.node(node)?;
        let own = (n.first_chunk..n.first_chunk + n.chunk_count).contains(&id);
        (n.size >= WHOLE_FILE_MIN && own).then(|| FileSlot {
            node,
            file_size: n.size,
            chunk_count: n.chunk_count,
            chunk_index: id - n.first_chunk,
            file_offset: self.index.chunks[id as usize].file_offset,
        })
    }

    /// Layers downloaded whole are plain local files: read the range directly.
    async fn read_local(&self, ids: Range<ChunkId>, offset: u64, end: u64) -> Result<Bytes, FetchError> {
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for id in ids {
            let c = &self.index.chunks[id as usize];
            let from = offset.max(c.file_offset);
            let to = end.min(c.file_offset + c.len);
            let data = self
                .read_source(c.blob_offset + (from - c.file_offset), to - from, false)
                .await?;
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Exactly `len` bytes at `offset` of the blob, or a source error;
    /// `again`: the range failed verification once (the source avoids mirrors).
    async fn read_source(&self, offset: u64, len: u64, again: bool) -> Result<Bytes, FetchError> {
        let err = |source| self.source_error(offset, len, source);
        let read = match again {
            false => self.source.read(offset, len),
            true => self.source.read_again(offset, len),
        };
        let data = read.await.map_err(err)?;
        if data.len() as u64 != len {
            return Err(err(SourceError::Short { got: data.len() as u64 }));
        }
        Ok(data)
    }

    /// A remote range read streamed to `tx`, admitted by the scheduler at
    /// `urgency` (and holding its admission until the body ends), counted as `cause`.
    async fn fetch_range_into(
        &self,
        offset: u64,
        len: u64,
        urgency: &Arc<Urgency>,
        cause: Cause,
        tx: crate::registry::RangeSink,
    ) -> Result<(), FetchError> {
        let _permit = self.node.scheduler.admit(urgency, len).await;
        self.source
            .read_into(offset, len, tx)
            .await
            .map_err(|e| self.source_error(offset, len, e))?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
        self.node.metrics.fetched(cause, len);
        Ok(())
    }

    fn source_error(&self, offset: u64, len: u64, source: SourceError) -> FetchError {
        FetchError::Source {
            layer: self.layer.clone(),
            offset,
            len,
            source: Arc::new(source),
        }
    }

    /// A remote range read, admitted by the scheduler at `urgency`, counted as `cause`.
    async fn fetch_range(&self, offset: u64, len: u64, urgency: &Arc<Urgency>, cause: Cause) -> Fetched {
        self.fetch_range_from(offset, len, urgency, cause, false).await
    }

    /// [`Self::fetch_range`]; `again` after the range failed verification.
    async fn fetch_range_from(
        &self,
        offset: u64,
        len: u64,
        urgency: &Arc<Urgency>,
        cause: Cause,
        again: bool,
    ) -> Fetched {
        let _permit = self.node.scheduler.admit(urgency, len).await;
        let data = self.read_source(offset, len, again).await?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
        self.node.metrics.fetched(cause, len);
        Ok(data)
    }

    /// Decoded, verified bytes of each chunk in `ids`, in order.
    /// `node` is the file they belong to (its whole-file entry may hold them;
    /// `None`: each chunk's own file); `cause` is what fetched bytes are
    /// counted as, and how urgently they are fetched.
    pub async fn chunks(
        self: &Arc<Self>,
        node: Option<NodeId>,
        ids: impl IntoIterator<Item = ChunkId>,
        cause: Cause,
    ) -> Result<Vec<Bytes>, FetchError> {
        self.refuse_quarantined()?;
        let urgency = Urgency::new(cause);
        let mut waits = Vec::new();
        let mut wanted = Vec::new();
        let mut mine = Vec::new();
        let mut mem_hits = 0;
        for id in ids {
            wanted.push(id);
            let held = self
                .node
                .mem
                .get(&self.key(id))
                .or_else(|| self.landing.lock().get(&id).cloned());
            if let Some(b) = held {
                self.stats.chunks_from_memory.fetch_add(1, Ordering::Relaxed);
                mem_hits += 1;
                waits.push(futures::future::ready(Some(Ok(b))).boxed().shared());
                continue;
            }
            match self.chunk_flights.claim(&id, || Arc::clone(&urgency)) {
                Claim::Done(v) => waits.push(futures::future::ready(Some(v)).boxed().shared()),
                Claim::Joined(flight, theirs) => {
                    if theirs.raise(cause) {
                        self.node.scheduler.raised();
                    }
                    waits.push(flight);
                }
                Claim::Lead(lead) => {
                    waits.push(lead.flight());
                    mine.push(lead);
                }
            }
        }
        if cause == Cause::OnDemand {
            self.node.metrics.lookups(Lookup::MemoryHit, mem_hits);
        }
        if !mine.is_empty() {
            // A task of its own: the fetch finishes (and fills the caches) even
            // if the reader that started it goes away.
            let this = Arc::clone(self);
            tokio::spawn(async move { this.load(node, mine, cause, urgency).await });
        }
        let answers = futures::future::join_all(waits).await;
        answers
            .into_iter()
            .zip(wanted)
            .map(|(a, id)| a.unwrap_or_else(|| Err(self.abandoned(self.index.chunks[id as usize].blob_offset))))
            .collect()
    }

    fn key(&self, id: ChunkId) -> ChunkKey {
        let c = &self.index.chunks[id as usize];
        ChunkKey {
            layer: self.layer.clone(),
            blob_offset: c.blob_offset,
            inner_offset: c.inner_offset,
        }
    }

    /// Answers the flight of a chunk this task fetched; its good bytes wait
    /// in `landing` (and in `keep`) until `store` has written them.
    fn answer_fetched(&self, lead: ChunkLead, result: Fetched, urgency: &Urgency, keep: &mut Vec<(ChunkId, Bytes)>) {
        if let Ok(b) = &result {
            self.landing.lock().insert(*lead.key(), b.clone());
            keep.push((*lead.key(), b.clone()));
        }
        self.finish(lead, result, urgency);
    }

    /// Answers a chunk's flight. Bytes fetched ahead of a sequential reader
    /// wait in memory until it reads them; bytes a reader waits for go
    /// straight to it (and to the disk cache), so memory holds only what is
    /// still unread. Small files fetched beside a cold one (`neighbours`) go
    /// to the disk cache only: many are never read (they held about 12 MB of the
    /// daemon's memory after the start-up benchmark), and a read of one
    /// hashes a few KiB again.
    fn finish(&self, lead: ChunkLead, result: Fetched, urgency: &Urgency) {
        if let Ok(b) = &result {
            if urgency.get() == Cause::ReadAhead && !self.of_small_file(*lead.key()) {
                self.node.mem.put(self.key(*lead.key()), b.clone());
            }
        }
        lead.finish(result);
    }

    fn corrupt(&self, offset: u64, reason: String) -> FetchError {
        FetchError::Corrupt {
            layer: self.layer.clone(),
            offset,
            reason,
        }
    }

    fn abandoned(&self, offset: u64) -> FetchError {
        FetchError::Abandoned {
            layer: self.layer.clone(),
            offset,
            source: Abandoned,
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.node.disk.unpin(&self.layer);
    }
}
