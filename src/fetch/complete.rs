//! The check that ends a layer's background fill, and quarantine.
//!
//! Every chunk is read back from the disk cache and verified as on any disk
//! read (its chunk digest where the format has one, and the cache's own seal);
//! then the whole blob must hash to the layer digest. Where the blob holds the
//! chunks' bytes as they are (uncompressed tar), the cached chunks are hashed
//! in order with the bytes between them (tar headers, padding) fetched at
//! background priority. Compressed blobs were hashed in order while the fill
//! fetched them (`tap`). A mismatch means the registry served wrong bytes that
//! no chunk digest caught: the layer is quarantined. A proven layer is
//! recorded in the disk cache, so a later fill (after a restart) re-checks its
//! chunks but does not fetch or hash the blob again.

use super::{BlobHash, ChunkId, FetchError, Fetcher, Urgency, MAX_GAP, MAX_REQUEST};
use crate::digest::Digest;
use crate::index::Encoding;
use crate::metrics::Cause;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::ops::Range;
use std::sync::Arc;
use tracing::{error, warn};

/// Cached bytes read and hashed per blocking task.
const BATCH: u64 = 16 << 20;

/// What the completion check proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The blob hashes to the layer digest.
    LayerDigest,
    /// An earlier check on this node hashed the blob to the layer digest,
    /// and every cached chunk passed its checks now.
    Recorded,
}

/// Why a filled layer is not proven complete.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("layer {layer}: chunk at blob offset {offset} is no longer in the cache or fails its check")]
    Missing { layer: Digest, offset: u64 },
    #[error("layer {layer}: chunks overlap at blob offset {offset}")]
    Overlap { layer: Digest, offset: u64 },
    #[error("layer {layer}: content hashes to {got}")]
    Mismatch { layer: Digest, got: Digest },
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

/// A piece of the blob, in blob order: bytes between chunks, or (the tail of) a chunk.
enum Piece {
    Gap(Range<u64>),
    Chunk(ChunkId),
}

impl Fetcher {
    /// Marks the layer as serving wrong bytes: from now on every read of it
    /// fails, nothing is handed to passthrough, and its cached bytes go.
    pub fn quarantine(&self, image: &str, reason: &str) {
        if self.quarantined.set(reason.to_string()).is_err() {
            return;
        }
        self.node.metrics.quarantined();
        self.node.disk.remove_layer(&self.layer);
        error!(%image, layer = %self.layer, %reason, "layer quarantined: its reads fail from now on");
    }

    /// Why the layer is quarantined, if it is.
    pub fn quarantined(&self) -> Option<&str> {
        self.quarantined.get().map(String::as_str)
    }

    pub(super) fn refuse_quarantined(&self) -> Result<(), FetchError> {
        match self.quarantined.get() {
            Some(reason) => Err(FetchError::Quarantined {
                layer: self.layer.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Does the layer's blob have to be hashed in order as the fill fetches
    /// it (compressed, and not proven before)?
    pub fn hashes_while_filling(&self) -> bool {
        !self.blob_is_chunks() && !self.node.disk.is_proven(&self.layer)
    }

    /// Does the blob hold the chunks' bytes as they are (uncompressed tar)?
    fn blob_is_chunks(&self) -> bool {
        self.index.spans.is_none() && self.index.chunks.iter().all(|c| c.encoding == Encoding::Raw)
    }

    /// Checks a layer whose chunks are all cached (see the module doc);
    /// `blob_size` is the blob's size from the manifest, `hashed` what the
    /// fill hashed of a compressed blob (the rest is fetched to finish it).
    pub async fn check_complete(
        self: &Arc<Self>,
        blob_size: u64,
        hashed: Option<BlobHash>,
    ) -> Result<Proof, CompleteError> {
        let chunks = &self.index.chunks;
        let mut ids: Vec<ChunkId> = (0..chunks.len() as ChunkId).collect();
        ids.sort_by_key(|&id| (chunks[id as usize].blob_offset, chunks[id as usize].inner_offset));
        let recorded = self.node.disk.is_proven(&self.layer);
        if recorded || !self.blob_is_chunks() {
            for batch in self.batches(&ids) {
                let pieces = batch.into_iter().map(Piece::Chunk).collect();
                self.hash_pieces(pieces, Vec::new(), None).await?;
            }
            if recorded {
                return Ok(Proof::Recorded);
            }
            let hashed = hashed.unwrap_or_else(|| self.begin_blob_hash(blob_size));
            let got = self.finish_blob_hash(hashed).await?;
            return self.judge(got);
        }
        let pieces = self.pieces(&ids, blob_size)?;
        let requests = gap_requests(&pieces);
        let mut next_request = requests.iter().peekable();
        let mut fetched: Option<(Range<u64>, Bytes)> = None;
        let urgency = Urgency::new(Cause::Background);
        let mut hasher = Some(Sha256::new());
        let mut it = pieces.into_iter().peekable();
        while it.peek().is_some() {
            let (mut batch, mut gaps, mut bytes) = (Vec::new(), Vec::new(), 0u64);
            while let Some(p) = it.next_if(|_| bytes < BATCH) {
                match &p {
                    Piece::Gap(r) => {
                        if !fetched
                            .as_ref()
                            .is_some_and(|(f, _)| f.start <= r.start && r.end <= f.end)
                        {
                            let req = next_request.next().expect("every gap has its request").clone();
                            let data = self
                                .fetch_range(req.start, req.end - req.start, &urgency, Cause::Background)
                                .await?;
                            fetched = Some((req, data));
                        }
                        let (f, data) = fetched.as_ref().expect("just fetched");
                        gaps.push(data.slice((r.start - f.start) as usize..(r.end - f.start) as usize));
                        bytes += r.end - r.start;
                    }
                    Piece::Chunk(id) => bytes += chunks[*id as usize].len,
                }
                batch.push(p);
            }
            hasher = Some(self.hash_pieces(batch, gaps, hasher.take()).await?.expect("a hasher"));
        }
        self.judge(Digest::from_hasher(hasher.expect("a hasher")))
    }

    /// The blob hashed to `got`: proven (and recorded) or a mismatch.
    fn judge(&self, got: Digest) -> Result<Proof, CompleteError> {
        if got != self.layer {
            return Err(CompleteError::Mismatch {
                layer: self.layer.clone(),
                got,
            });
        }
        if let Err(e) = self.node.disk.mark_proven(&self.layer) {
            warn!(layer = %self.layer, error = %e, "cannot record the proven layer in the disk cache");
        }
        Ok(Proof::LayerDigest)
    }

    /// Chunk ids in runs of about `BATCH` bytes.
    fn batches(&self, ids: &[ChunkId]) -> Vec<Vec<ChunkId>> {
        let mut out: Vec<Vec<ChunkId>> = vec![Vec::new()];
        let mut bytes = 0;
        for &id in ids {
            if bytes >= BATCH {
                out.push(Vec::new());
                bytes = 0;
            }
            bytes += self.index.chunks[id as usize].len;
            out.last_mut().expect("a batch").push(id);
        }
        out
    }

    /// The blob as gaps and chunks, in order (`ids` sorted by blob offset).
    fn pieces(&self, ids: &[ChunkId], blob_size: u64) -> Result<Vec<Piece>, CompleteError> {
        let mut pieces = Vec::new();
        let mut pos = 0u64;
        for &id in ids {
            let c = &self.index.chunks[id as usize];
            let end = c.blob_offset.saturating_add(c.len);
            if c.blob_offset > pos {
                push_gap(&mut pieces, pos..c.blob_offset);
            } else if c.blob_offset < pos {
                // Bytes already hashed (a chunk shared by two files) are hashed
                // once; a partial overlap is no tar layer.
                if end <= pos {
                    continue;
                }
                return Err(CompleteError::Overlap {
                    layer: self.layer.clone(),
                    offset: c.blob_offset,
                });
            }
            pieces.push(Piece::Chunk(id));
            pos = end;
        }
        if blob_size > pos {
            push_gap(&mut pieces, pos..blob_size);
        }
        Ok(pieces)
    }

    /// Reads the chunks among `pieces` from the disk cache (verified) and
    /// feeds them and the `gaps` bytes, in order, to `hasher` (on the blocking pool).
    async fn hash_pieces(
        self: &Arc<Self>,
        pieces: Vec<Piece>,
        gaps: Vec<Bytes>,
        mut hasher: Option<Sha256>,
    ) -> Result<Option<Sha256>, CompleteError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut gaps = gaps.into_iter();
            for p in pieces {
                let bytes = match p {
                    Piece::Gap(_) => gaps.next().expect("one buffer per gap"),
                    Piece::Chunk(id) => this.cached_chunk(None, id).ok_or_else(|| CompleteError::Missing {
                        layer: this.layer.clone(),
                        offset: this.index.chunks[id as usize].blob_offset,
                    })?,
                };
                if let Some(h) = hasher.as_mut() {
                    h.update(&bytes);
                }
            }
            Ok(hasher)
        })
        .await
        .unwrap_or_else(|e| {
            Err(CompleteError::Fetch(
                self.corrupt(0, format!("completion check panicked: {e}")),
            ))
        })
    }
}

/// A gap as pieces of at most one request each (a long one is no tar header,
/// but a manifest may claim any size).
fn push_gap(pieces: &mut Vec<Piece>, gap: Range<u64>) {
    let mut at = gap.start;
    while at < gap.end {
        let end = gap.end.min(at.saturating_add(MAX_REQUEST));
        pieces.push(Piece::Gap(at..end));
        at = end;
    }
}

/// Range requests that cover every gap: neighbours within `MAX_GAP` share
/// one, up to `MAX_REQUEST` bytes (headers of small files come in few requests).
fn gap_requests(pieces: &[Piece]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for p in pieces {
        let Piece::Gap(g) = p else { continue };
        match out.last_mut() {
            Some(r) if g.start <= r.end.saturating_add(MAX_GAP) && g.end - r.start <= MAX_REQUEST => r.end = g.end,
            _ => out.push(g.clone()),
        }
    }
    out
}
