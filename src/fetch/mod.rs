//! Chunk fetching for one layer: caches first, one in-flight request per
//! chunk (concurrent readers share it), neighbouring missing chunks coalesced
//! into one range request, decoding and verification off the async workers.

pub mod decode;
mod source;
mod spans;

pub use source::BlobSource;

use crate::cache::{ChunkKey, DiskCache, FileSlot, MemCache};
use crate::digest::Digest;
use crate::index::{Chunk, ChunkId, LayerIndex, NodeId};
use crate::metrics::{Cause, Lookup, Metrics};
use crate::prefetch::profile::Recorder;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::warn;

/// Largest single range request when coalescing chunks.
const MAX_REQUEST: u64 = 16 << 20;
/// Gap between chunks still worth fetching in one request.
const MAX_GAP: u64 = 64 << 10;
/// How far ahead of a sequential reader chunks are fetched.
const READ_AHEAD: u64 = 32 << 20;
/// Smallest file worth a whole-file cache entry (kernel passthrough); smaller
/// ones are served from the page cache after one read anyway.
const WHOLE_FILE_MIN: u64 = 1 << 20;

/// A read that cannot be served with verified bytes.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("layer {layer}: fetching blob bytes {offset}+{len}: {message}")]
    Source {
        layer: Digest,
        offset: u64,
        len: u64,
        message: String,
    },
    #[error("layer {layer}: chunk at blob offset {offset}: {reason}")]
    Corrupt { layer: Digest, offset: u64, reason: String },
    #[error("layer {layer}: no such file node {node}")]
    NoNode { layer: Digest, node: NodeId },
}

/// Counters for tests, logs and metrics.
#[derive(Default, Debug)]
pub struct FetchStats {
    pub bytes_fetched: AtomicU64,
    pub requests: AtomicU64,
    pub chunks_from_disk: AtomicU64,
    pub chunks_from_memory: AtomicU64,
}

type ChunkFuture = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;
type Answer = tokio::sync::oneshot::Sender<Result<Bytes, FetchError>>;

/// Serves file bytes of one layer.
pub struct Fetcher {
    layer: Digest,
    index: Arc<LayerIndex>,
    source: BlobSource,
    disk: Arc<DiskCache>,
    mem: Arc<MemCache>,
    inflight: Mutex<HashMap<ChunkId, ChunkFuture>>,
    /// Spans being fetched (gzip-indexed layers), shared by their chunks.
    span_inflight: Mutex<HashMap<u32, ChunkFuture>>,
    /// Per file: (last chunk read, chunks already asked for up to), to spot sequential readers.
    sequential: Mutex<HashMap<NodeId, (ChunkId, ChunkId)>>,
    pub stats: FetchStats,
    metrics: Arc<Metrics>,
    /// Records reads into the image's start-up profile while one is recorded.
    recorder: std::sync::OnceLock<Arc<Recorder>>,
}

impl Fetcher {
    pub fn new(
        layer: Digest,
        index: Arc<LayerIndex>,
        source: BlobSource,
        disk: Arc<DiskCache>,
        mem: Arc<MemCache>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        disk.pin(&layer);
        Arc::new(Self {
            layer,
            index,
            source,
            disk,
            mem,
            inflight: Mutex::default(),
            span_inflight: Mutex::default(),
            sequential: Mutex::default(),
            stats: FetchStats::default(),
            metrics,
            recorder: std::sync::OnceLock::new(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn layer(&self) -> &Digest {
        &self.layer
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Reads up to `size` bytes of file `node` at `offset` (short only at end of file).
    pub async fn read(self: &Arc<Self>, node: NodeId, offset: u64, size: u32) -> Result<Bytes, FetchError> {
        let n = self.index.node(node).ok_or_else(|| FetchError::NoNode {
            layer: self.layer.clone(),
            node,
        })?;
        let end = offset.saturating_add(size as u64).min(n.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        if let Some(r) = self.recorder.get() {
            r.record(&self.layer, node, offset, end - offset);
        }
        let ids = self.index.chunks_for_range(node, offset, end - offset);
        if let BlobSource::Local(_) = &self.source {
            return self.read_local(ids, offset, end).await;
        }
        self.read_ahead(node, ids.clone());
        self.metrics.read_waiting(true);
        let parts = self.chunks(Some(node), ids.clone(), Cause::OnDemand).await;
        self.metrics.read_waiting(false);
        let parts = parts?;
        let mut pieces = ids.zip(parts).map(|(id, data)| {
            let c = &self.index.chunks[id as usize];
            let from = offset.max(c.file_offset) - c.file_offset;
            let to = end.min(c.file_offset + c.len) - c.file_offset;
            data.slice(from as usize..to as usize)
        });
        if pieces.len() == 1 {
            return Ok(pieces.next().expect("one piece"));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        pieces.for_each(|p| out.extend_from_slice(&p));
        Ok(out.freeze())
    }

    /// A reader that continues where its last read ended gets the following
    /// chunks (up to `READ_AHEAD` bytes) fetched in the background, so a
    /// sequential scan of a large file keeps several requests in flight.
    fn read_ahead(self: &Arc<Self>, node: NodeId, ids: Range<ChunkId>) {
        let Some(n) = self.index.node(node) else { return };
        let file_end = n.first_chunk + n.chunk_count;
        let ahead = {
            let mut seq = self.sequential.lock();
            // A first read is not yet a pattern: partial reads of big files stay cheap.
            let (sequential, asked) = match seq.get(&node) {
                Some(&(last, asked)) => (ids.start == last || ids.start == last + 1, asked),
                None => (false, 0),
            };
            let mut end = ids.end;
            let mut bytes = 0;
            while sequential && end < file_end && bytes < READ_AHEAD {
                bytes += self.index.chunks[end as usize].len;
                end += 1;
            }
            let from = ids.end.max(asked);
            seq.insert(node, (ids.end - 1, end.max(asked)));
            if seq.len() > 4096 {
                seq.clear(); // bounded: forgetting only costs read-ahead
            }
            from..end
        };
        if !ahead.is_empty() {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let _ = this.chunks(Some(node), ahead, Cause::ReadAhead).await;
            });
        }
    }

    /// Records this layer's reads into a start-up profile (the first recorder stays).
    pub fn set_recorder(&self, recorder: Arc<Recorder>) {
        let _ = self.recorder.set(recorder);
    }

    /// Is chunk `id` in the disk cache? (Cheap: nothing is read.)
    pub fn is_cached(&self, id: ChunkId) -> bool {
        match self.slot(None, id) {
            Some(slot) => self.disk.has_in_file(&self.layer, slot),
            None => self.disk.has(&self.key(id)),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.source, BlobSource::Local(_))
    }

    pub fn disk(&self) -> &Arc<DiskCache> {
        &self.disk
    }

    /// The whole-file cache entry of `node`, for the kernel to read directly.
    pub fn cached_file(&self, node: NodeId) -> Option<PathBuf> {
        match self.source {
            BlobSource::Local(_) => None,
            _ => self.disk.file(&self.layer, node),
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
                .source
                .read(&self.layer, c.blob_offset + (from - c.file_offset), to - from)
                .await?;
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// Decoded, verified bytes of each chunk in `ids`, in order.
    /// `node` is the file they belong to (its whole-file entry may hold them;
    /// `None`: each chunk's own file);
    /// `cause` is what fetched bytes are counted as.
    pub async fn chunks(
        self: &Arc<Self>,
        node: Option<NodeId>,
        ids: impl IntoIterator<Item = ChunkId>,
        cause: Cause,
    ) -> Result<Vec<Bytes>, FetchError> {
        let mut futures = Vec::new();
        let mut mine = Vec::new();
        let mut mem_hits = 0;
        {
            let mut inflight = self.inflight.lock();
            for id in ids {
                if let Some(b) = self.mem.get(&self.key(id)) {
                    self.stats.chunks_from_memory.fetch_add(1, Ordering::Relaxed);
                    mem_hits += 1;
                    futures.push(futures::future::ready(Ok(b)).boxed().shared());
                    continue;
                }
                if let Some(f) = inflight.get(&id) {
                    futures.push(f.clone());
                    continue;
                }
                let (tx, rx) = tokio::sync::oneshot::channel::<Result<Bytes, FetchError>>();
                let layer = self.layer.clone();
                let offset = self.index.chunks[id as usize].blob_offset;
                let fut = async move {
                    rx.await.unwrap_or_else(|_| {
                        Err(FetchError::Source {
                            layer,
                            offset,
                            len: 0,
                            message: "fetch task ended without an answer".into(),
                        })
                    })
                }
                .boxed()
                .shared();
                inflight.insert(id, fut.clone());
                futures.push(fut);
                mine.push((id, tx));
            }
        }
        if cause == Cause::OnDemand {
            self.metrics.lookups(Lookup::MemoryHit, mem_hits);
        }
        if !mine.is_empty() {
            // A task of its own: the fetch finishes (and fills the caches) even
            // if the reader that started it goes away.
            let this = Arc::clone(self);
            tokio::spawn(async move { this.load(node, mine, cause).await });
        }
        futures::future::try_join_all(futures).await
    }

    fn key(&self, id: ChunkId) -> ChunkKey {
        let c = &self.index.chunks[id as usize];
        ChunkKey {
            layer: self.layer.clone(),
            blob_offset: c.blob_offset,
            inner_offset: c.inner_offset,
        }
    }

    fn finish(&self, id: ChunkId, tx: Answer, result: Result<Bytes, FetchError>) {
        if let Ok(b) = &result {
            self.mem.put(self.key(id), b.clone());
        }
        self.inflight.lock().remove(&id);
        let _ = tx.send(result);
    }

    /// Loads chunks this task owns: disk cache, then coalesced range requests.
    async fn load(self: Arc<Self>, node: Option<NodeId>, mine: Vec<(ChunkId, Answer)>, cause: Cause) {
        let this = Arc::clone(&self);
        let ids: Vec<ChunkId> = mine.iter().map(|(id, _)| *id).collect();
        let ids_len = ids.len();
        let from_disk = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|&id| {
                    let key = this.key(id);
                    let c = &this.index.chunks[id as usize];
                    let slot = this.slot(node, id);
                    let data = match slot {
                        Some(slot) => this.disk.get_in_file(&this.layer, slot, c.len)?,
                        None => this.disk.get(&key)?,
                    };
                    match decode::verify(c, &data) {
                        Ok(()) => Some(Bytes::from(data)),
                        Err(reason) => {
                            warn!(layer = %this.layer, offset = key.blob_offset, %reason, "dropping corrupt cached chunk");
                            match slot {
                                Some(slot) => this.disk.remove_in_file(&this.layer, slot),
                                None => this.disk.remove(&key),
                            }
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut missing = Vec::new();
        for (i, (id, tx)) in mine.into_iter().enumerate() {
            match from_disk.get(i).cloned().flatten() {
                Some(b) => {
                    self.stats.chunks_from_disk.fetch_add(1, Ordering::Relaxed);
                    self.finish(id, tx, Ok(b));
                }
                None => missing.push((id, tx)),
            }
        }
        if cause == Cause::OnDemand {
            self.metrics.lookups(Lookup::DiskHit, (ids_len - missing.len()) as u64);
            self.metrics.lookups(Lookup::Miss, missing.len() as u64);
        }
        if self.index.spans.is_some() {
            return self.load_spans(node, missing, cause).await;
        }
        let runs = coalesce(&self.index.chunks, missing);
        futures::future::join_all(runs.into_iter().map(|run| self.clone().fetch_run(node, run, cause))).await;
    }

    /// One range request for a run of chunks; each is decoded and verified,
    /// and a run with a bad chunk is fetched once more before failing. Readers
    /// get their answers first; the disk cache is written after.
    async fn fetch_run(self: Arc<Self>, node: Option<NodeId>, run: Vec<(ChunkId, Answer)>, cause: Cause) {
        let chunks = &self.index.chunks;
        let start = chunks[run[0].0 as usize].blob_offset;
        let end = run
            .iter()
            .map(|(id, _)| chunks[*id as usize].blob_offset + chunks[*id as usize].blob_len)
            .max()
            .unwrap_or(start);
        let mut results: Vec<Result<Bytes, FetchError>> = Vec::new();
        for attempt in 0..2 {
            results.clear();
            let data = match self.source.read(&self.layer, start, end - start).await {
                Ok(d) => d,
                Err(e) => {
                    results = run.iter().map(|_| Err(e.clone())).collect();
                    break;
                }
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes_fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.metrics.fetched(cause, data.len() as u64);
            let this = Arc::clone(&self);
            let ids: Vec<ChunkId> = run.iter().map(|(id, _)| *id).collect();
            results = tokio::task::spawn_blocking(move || {
                ids.iter()
                    .map(|&id| {
                        let c = &this.index.chunks[id as usize];
                        let raw =
                            data.slice((c.blob_offset - start) as usize..(c.blob_offset + c.blob_len - start) as usize);
                        let decoded = decode::decode(c, &raw)
                            .and_then(|d| decode::verify(c, &d).map(|()| d))
                            .map_err(|reason| FetchError::Corrupt {
                                layer: this.layer.clone(),
                                offset: c.blob_offset,
                                reason: reason.to_string(),
                            })?;
                        Ok(decoded)
                    })
                    .collect()
            })
            .await
            .unwrap_or_else(|e| {
                vec![Err(FetchError::Corrupt {
                    layer: self.layer.clone(),
                    offset: start,
                    reason: format!("decoder panicked: {e}"),
                })]
            });
            let corrupt = results.iter().any(|r| matches!(r, Err(FetchError::Corrupt { .. })));
            if !corrupt {
                break;
            }
            if attempt == 0 {
                warn!(layer = %self.layer, offset = start, len = end - start, "chunk failed verification, fetching once more");
            }
        }
        let mut keep = Vec::with_capacity(run.len());
        for (i, (id, tx)) in run.into_iter().enumerate() {
            let r = results.get(i).cloned().unwrap_or_else(|| {
                Err(FetchError::Corrupt {
                    layer: self.layer.clone(),
                    offset: start,
                    reason: "no result".into(),
                })
            });
            match &r {
                Ok(b) => keep.push((id, b.clone())),
                Err(e) => warn!(error = %e, "chunk read failed"),
            }
            self.finish(id, tx, r);
        }
        self.store(node, keep).await;
    }

    /// Writes fetched chunks to the disk cache (after their readers have them).
    async fn store(self: &Arc<Self>, node: Option<NodeId>, keep: Vec<(ChunkId, Bytes)>) {
        if keep.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            for (id, data) in keep {
                let stored = match this.slot(node, id) {
                    Some(slot) => this.disk.put_in_file(&this.layer, slot, &data),
                    None => this.disk.put(&this.key(id), &data),
                };
                if let Err(e) = stored {
                    warn!(layer = %this.layer, error = %e, "cannot write chunk to the disk cache");
                }
            }
        })
        .await;
    }

    fn corrupt(&self, offset: u64, reason: String) -> FetchError {
        FetchError::Corrupt {
            layer: self.layer.clone(),
            offset,
            reason,
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.disk.unpin(&self.layer);
    }
}

/// Groups chunks (in id order) into runs that one range request can serve.
fn coalesce<T>(chunks: &[Chunk], mut ids: Vec<(ChunkId, T)>) -> Vec<Vec<(ChunkId, T)>> {
    ids.sort_by_key(|(id, _)| chunks[*id as usize].blob_offset);
    let mut runs: Vec<Vec<(ChunkId, T)>> = Vec::new();
    let mut run_start = 0;
    let mut run_end = 0;
    for (id, t) in ids {
        let c = &chunks[id as usize];
        let extends = match runs.last() {
            Some(_) => {
                c.blob_offset <= run_end + MAX_GAP
                    && (c.blob_offset + c.blob_len).max(run_end) - run_start <= MAX_REQUEST
            }
            None => false,
        };
        if extends {
            run_end = run_end.max(c.blob_offset + c.blob_len);
            runs.last_mut().expect("a run").push((id, t));
        } else {
            run_start = c.blob_offset;
            run_end = c.blob_offset + c.blob_len;
            runs.push(vec![(id, t)]);
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Encoding;

    fn chunk(blob_offset: u64, blob_len: u64) -> Chunk {
        Chunk {
            file_offset: 0,
            len: blob_len,
            blob_offset,
            blob_len,
            inner_offset: 0,
            encoding: Encoding::Raw,
            digest: None,
        }
    }

    #[test]
    fn neighbours_coalesce_and_distant_chunks_do_not() {
        let chunks = vec![chunk(0, 100), chunk(100, 100), chunk(10 << 20, 100)];
        let runs = coalesce(&chunks, vec![(0, ()), (1, ()), (2, ())]);
        let ids: Vec<Vec<ChunkId>> = runs.iter().map(|r| r.iter().map(|(i, _)| *i).collect()).collect();
        assert_eq!(ids, vec![vec![0, 1], vec![2]]);
    }

    #[test]
    fn runs_stay_under_the_request_limit() {
        let chunks: Vec<Chunk> = (0..8).map(|i| chunk(i * (4 << 20), 4 << 20)).collect();
        let runs = coalesce(&chunks, (0..8).map(|i| (i, ())).collect());
        assert_eq!(runs.len(), 2);
    }
}
