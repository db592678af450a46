//! The miss path of a [`Fetcher`]: chunks no cache held, from the disk cache's
//! entries, else fetched as coalesced range requests, decoded and verified on
//! the blocking pool, answered, then written to the disk cache.

use super::body::Body;
use super::*;

impl Fetcher {
    /// Loads chunks this task leads: disk cache, then coalesced range requests.
    pub(super) async fn load(
        self: Arc<Self>,
        node: Option<NodeId>,
        mine: Vec<ChunkLead>,
        cause: Cause,
        urgency: Arc<Urgency>,
    ) {
        let this = Arc::clone(&self);
        let ids: Vec<ChunkId> = mine.iter().map(|l| *l.key()).collect();
        let ids_len = ids.len();
        let from_disk =
            tokio::task::spawn_blocking(move || ids.iter().map(|&id| this.cached_chunk(node, id)).collect::<Vec<_>>())
                .await
                .unwrap_or_default();
        let mut missing = Vec::new();
        for (i, lead) in mine.into_iter().enumerate() {
            match from_disk.get(i).cloned().flatten() {
                Some(b) => {
                    self.stats.chunks_from_disk.fetch_add(1, Ordering::Relaxed);
                    self.finish(lead, Ok(b), &urgency);
                }
                None => missing.push(lead),
            }
        }
        if cause == Cause::OnDemand {
            self.node
                .metrics
                .lookups(Lookup::DiskHit, (ids_len - missing.len()) as u64);
            self.node.metrics.lookups(Lookup::Miss, missing.len() as u64);
        }
        if self.index.spans.is_some() {
            return self.load_spans(node, missing, cause, urgency).await;
        }
        let runs = coalesce(&self.index.chunks, missing, |l| *l.key());
        futures::future::join_all(
            runs.into_iter()
                .map(|run| self.clone().fetch_run(node, run, cause, Arc::clone(&urgency))),
        )
        .await;
    }

    /// A chunk from the disk cache, verified (blocking); a corrupt one is dropped.
    pub(super) fn cached_chunk(&self, node: Option<NodeId>, id: ChunkId) -> Option<Bytes> {
        let key = self.key(id);
        let c = &self.index.chunks[id as usize];
        let slot = self.slot(node, id);
        let data = match slot {
            Some(slot) => self.node.disk.get_in_file(&self.layer, slot, c.len)?,
            None => self.node.disk.get(&key)?,
        };
        match decode::verify(c, &data) {
            Ok(()) => Some(Bytes::from(data)),
            Err(reason) => {
                warn!(layer = %self.layer, offset = key.blob_offset, %reason, "dropping corrupt cached chunk");
                match slot {
                    Some(slot) => self.node.disk.remove_in_file(&self.layer, slot),
                    None => self.node.disk.remove(&key),
                }
                None
            }
        }
    }

    /// One range request for a run of chunks, decoded as it arrives: on a
    /// blocking thread, each chunk's decoder reads the body's pieces as the
    /// connection delivers them, and the chunk is verified and answered as
    /// soon as its last byte is in. Chunks that fail verification are
    /// fetched once more before failing. Readers get their answers first;
    /// the disk cache is written after.
    async fn fetch_run(
        self: Arc<Self>,
        node: Option<NodeId>,
        run: Vec<ChunkLead>,
        cause: Cause,
        urgency: Arc<Urgency>,
    ) {
        let chunks = &self.index.chunks;
        let start = chunks[*run[0].key() as usize].blob_offset;
        let end = run
            .iter()
            .map(|l| chunks[*l.key() as usize].blob_offset + chunks[*l.key() as usize].blob_len)
            .max()
            .unwrap_or(start);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(RUN_PIECES);
        let fetch = self.fetch_range_into(start, end - start, &urgency, cause, tx);
        let (this, urg) = (Arc::clone(&self), Arc::clone(&urgency));
        let assemble = tokio::task::spawn_blocking(move || this.assemble(Body::new(rx, start), run, end, &urg));
        let (fetched, assembled) = tokio::join!(fetch, assemble);
        let Ok(Assembled {
            mut keep,
            bad,
            left,
            got,
        }) = assembled
        else {
            // The assembly panicked: its leads were dropped, which answers their readers.
            error!(layer = %self.layer, offset = start, "decoding a range request's chunks panicked");
            return;
        };
        let failed = match fetched {
            Err(e) => Some(e),
            Ok(()) if got != end - start => Some(self.source_error(start, end - start, SourceError::Short { got })),
            Ok(()) => None,
        };
        // Chunks whose bytes never arrived.
        for lead in left {
            let e = failed
                .clone()
                .unwrap_or_else(|| self.abandoned(chunks[*lead.key() as usize].blob_offset));
            warn!(error = %e, "chunk read failed");
            self.finish(lead, Err(e), &urgency);
        }
        if !bad.is_empty() {
            warn!(layer = %self.layer, offset = start, len = end - start, chunks = bad.len(), "chunks failed verification, fetching them once more (from the registry, not a mirror)");
            self.fetch_again(bad, &urgency, cause, &mut keep).await;
        }
        self.store(node, keep).await;
    }

    /// Decodes, verifies and answers the chunks of `run` (in blob order) from
    /// `body`, the blob bytes up to `end` (blocking: it waits for the body).
    /// A chunk alone in its decode batch is decoded straight from the body;
    /// a batch of small ones is gathered first, then decoded.
    fn assemble(self: &Arc<Self>, mut body: Body, run: Vec<ChunkLead>, end: u64, urgency: &Urgency) -> Assembled {
        let chunks = &self.index.chunks;
        let ids: Vec<ChunkId> = run.iter().map(|l| *l.key()).collect();
        let start = body.at();
        let mut leads: HashMap<ChunkId, ChunkLead> = run.into_iter().map(|l| (*l.key(), l)).collect();
        let batches: Vec<Vec<ChunkId>> = decode_batches(chunks, &ids).collect();
        // Batch k decodes from the blob bytes between its first chunk and the next batch's.
        let cuts = batches
            .iter()
            .skip(1)
            .map(|b| chunks[b[0] as usize].blob_offset)
            .chain(std::iter::once(end));
        let (mut keep, mut bad) = (Vec::with_capacity(ids.len()), Vec::new());
        for (batch, cut) in batches.iter().zip(cuts) {
            let base = body.at();
            if self.tap.is_open() {
                body.record();
            }
            let results: Vec<Fetched> = match &batch[..] {
                [id] if chunks[*id as usize].whole.is_none() => {
                    let c = &chunks[*id as usize];
                    let mut extent = body.extent(c.blob_len);
                    let decoded = self.verified(c, decode::decode_from(c, &mut extent));
                    let arrived = extent.finish() && body.skip_to(cut);
                    if !arrived && decoded.is_err() {
                        break; // cut short, not corrupt: answered with the fetch's error
                    }
                    vec![decoded]
                }
                _ => match body.read_bytes(cut - base) {
                    Some(data) => batch.iter().map(|&id| self.decode_in(&data, base, id)).collect(),
                    None => break,
                },
            };
            if let Some(recorded) = body.take_recorded().filter(|_| results.iter().all(Result::is_ok)) {
                self.tap.offer(base, &recorded);
            }
            for (id, r) in batch.iter().zip(results) {
                let Some(lead) = leads.remove(id) else { continue };
                match r {
                    Err(FetchError::Corrupt { .. }) => bad.push(lead),
                    r => self.answer_fetched(lead, r, urgency, &mut keep),
                }
            }
        }
        let got = body.drain() - start;
        Assembled {
            keep,
            bad,
            left: leads.into_values().collect(),
            got,
        }
    }

    /// The second and last attempt at chunks that failed verification: their
    /// ranges from the registry itself (not a mirror), whole, then answered.
    async fn fetch_again(
        self: &Arc<Self>,
        bad: Vec<ChunkLead>,
        urgency: &Arc<Urgency>,
        cause: Cause,
        keep: &mut Vec<(ChunkId, Bytes)>,
    ) {
        let chunks = &self.index.chunks;
        for run in coalesce(chunks, bad, |l| *l.key()) {
            let start = chunks[*run[0].key() as usize].blob_offset;
            let end = run
                .iter()
                .map(|l| chunks[*l.key() as usize].blob_offset + chunks[*l.key() as usize].blob_len)
                .max()
                .unwrap_or(start);
            let data = self.fetch_range_from(start, end - start, urgency, cause, true).await;
            let results: Vec<Fetched> = match data {
                Ok(data) => {
                    let ids: Vec<ChunkId> = run.iter().map(|l| *l.key()).collect();
                    let me = Arc::clone(self);
                    tokio::task::spawn_blocking(move || ids.iter().map(|&id| me.decode_in(&data, start, id)).collect())
                        .await
                        .unwrap_or_else(|e| {
                            run.iter()
                                .map(|_| Err(self.corrupt(start, format!("decoder panicked: {e}"))))
                                .collect()
                        })
                }
                Err(e) => run.iter().map(|_| Err(e.clone())).collect(),
            };
            for (lead, r) in run.into_iter().zip(results) {
                if let Err(e) = &r {
                    warn!(error = %e, "chunk read failed");
                }
                self.answer_fetched(lead, r, urgency, keep);
            }
        }
    }

    /// Chunk `id` decoded and verified from `data`, the blob bytes from `start`.
    fn decode_in(&self, data: &Bytes, start: u64, id: ChunkId) -> Fetched {
        let c = &self.index.chunks[id as usize];
        let from = (c.blob_offset - start) as usize;
        let raw = data.slice(from..from + c.blob_len as usize);
        self.verified(c, decode::decode(c, &raw))
    }

    /// Decoded bytes of chunk `c` checked against its digest; any failure is `Corrupt`.
    fn verified(&self, c: &Chunk, decoded: Result<Bytes, decode::DecodeError>) -> Fetched {
        decoded
            .and_then(|d| decode::verify(c, &d).map(|()| d))
            .map_err(|reason| self.corrupt(c.blob_offset, reason.to_string()))
    }

    /// Writes fetched chunks to the disk cache (after their readers have them).
    pub(super) async fn store(self: &Arc<Self>, node: Option<NodeId>, keep: Vec<(ChunkId, Bytes)>) {
        if keep.is_empty() {
            return;
        }
        let ids: Vec<ChunkId> = keep.iter().map(|(id, _)| *id).collect();
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            let mut small = Vec::new();
            for (id, data) in &keep {
                match this.slot(node, *id) {
                    Some(slot) => {
                        let c = &this.index.chunks[*id as usize];
                        // A chunk digest over exactly these bytes is their seal too.
                        let written = match c.digest.as_ref().filter(|_| c.whole.is_none()) {
                            Some(d) => this.node.disk.put_in_file_hashed(&this.layer, slot, data, d.to_bytes()),
                            None => this.node.disk.put_in_file(&this.layer, slot, data),
                        };
                        if let Err(e) = written {
                            warn!(layer = %this.layer, error = %e, "cannot write chunk to the disk cache");
                        }
                    }
                    None => small.push((this.key(*id), &data[..])),
                }
            }
            // One durable batch: a sync per small chunk would cost more than its write.
            if let Err(e) = this.node.disk.put_many(&small) {
                warn!(layer = %this.layer, error = %e, chunks = small.len(), "cannot write chunks to the disk cache");
            }
        })
        .await;
        let mut landing = self.landing.lock();
        for id in ids {
            landing.remove(&id);
        }
    }
}

/// What the assembly of a range request's chunks leaves: good chunks (for
/// the disk cache), leads of chunks that failed verification, leads of
/// chunks whose bytes never arrived, and how many body bytes came.
struct Assembled {
    keep: Vec<(ChunkId, Bytes)>,
    bad: Vec<ChunkLead>,
    left: Vec<ChunkLead>,
    got: u64,
}

/// Blob bytes one decoding task takes at least (but for a run's last batch).
const DECODE_BATCH: u64 = 1 << 20;
/// Body pieces waiting between a run's connection and its assembly.
const RUN_PIECES: usize = 16;

/// `ids` (in blob order) cut into batches of at least [`DECODE_BATCH`] blob
/// bytes, each cut where no chunk before it reaches past the next chunk's
/// start (chunks sharing a compressed member stay in one batch), so every
/// batch decodes from its own stretch of the blob.
pub(super) fn decode_batches<'a>(chunks: &'a [Chunk], ids: &'a [ChunkId]) -> impl Iterator<Item = Vec<ChunkId>> + 'a {
    let mut rest = ids;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut bytes, mut end) = (0, 0);
        let n = rest
            .iter()
            .enumerate()
            .position(|(i, &id)| {
                let c = &chunks[id as usize];
                bytes += c.blob_len;
                end = end.max(c.blob_offset + c.blob_len);
                let clear = rest
                    .get(i + 1)
                    .is_none_or(|&next| chunks[next as usize].blob_offset >= end);
                bytes >= DECODE_BATCH && clear
            })
            .map_or(rest.len(), |i| i + 1);
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch.to_vec())
    })
}

/// Groups chunks (in blob order) into runs that one range request can serve.
pub(super) fn coalesce<T>(chunks: &[Chunk], mut items: Vec<T>, id: impl Fn(&T) -> ChunkId) -> Vec<Vec<T>> {
    items.sort_by_key(|t| chunks[id(t) as usize].blob_offset);
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut run_start = 0;
    let mut run_end = 0;
    for t in items {
        let c = &chunks[id(&t) as usize];
        let extends = !runs.is_empty()
            && c.blob_offset <= run_end + MAX_GAP
            && (c.blob_offset + c.blob_len).max(run_end) - run_start <= MAX_REQUEST;
        if extends {
            run_end = run_end.max(c.blob_offset + c.blob_len);
            runs.last_mut().expect("a run").push(t);
        } else {
            run_start = c.blob_offset;
            run_end = c.blob_offset + c.blob_len;
            runs.push(vec![t]);
        }
    }
    runs
}
