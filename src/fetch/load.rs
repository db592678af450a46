//! The miss path of a [`Fetcher`]: chunks no cache held, from the disk cache's
//! entries, else fetched as coalesced range requests, decoded and verified on
//! the blocking pool, answered, then written to the disk cache.

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

    /// One range request for a run of chunks; each is decoded and verified,
    /// and a run with a bad chunk is fetched once more before failing. Readers
    /// get their answers first; the disk cache is written after.
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
        let mut results: Vec<Fetched> = Vec::new();
        for attempt in 0..2 {
            let data = match self
                .fetch_range_from(start, end - start, &urgency, cause, attempt > 0)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    results = run.iter().map(|_| Err(e.clone())).collect();
                    break;
                }
            };
            // A blocking task per batch of about `DECODE_BATCH` blob bytes: a
            // run's large chunks inflate and hash on as many cores as there
            // are, and a run of many small ones does not wake a thread each.
            let ids: Vec<ChunkId> = run.iter().map(|l| *l.key()).collect();
            let me = &*self;
            let batches = futures::future::join_all(decode_batches(chunks, &ids).map(|batch| {
                let (this, held) = (Arc::clone(&self), data.clone());
                async move {
                    let n = batch.len();
                    tokio::task::spawn_blocking(move || {
                        batch
                            .iter()
                            .map(|&id| this.decode_in(&held, start, id))
                            .collect::<Vec<_>>()
                    })
                    .await
                    .unwrap_or_else(|e| {
                        (0..n)
                            .map(|_| Err(me.corrupt(start, format!("decoder panicked: {e}"))))
                            .collect()
                    })
                }
            }))
            .await;
            results = batches.into_iter().flatten().collect();
            if !results.iter().any(|r| matches!(r, Err(FetchError::Corrupt { .. }))) {
                self.tap.offer(start, &data);
                break;
            }
            if attempt == 0 {
                warn!(layer = %self.layer, offset = start, len = end - start, "chunk failed verification, fetching once more (from the registry, not a mirror)");
            }
        }
        let mut keep = Vec::with_capacity(run.len());
        for (lead, r) in run.into_iter().zip(results) {
            if let Err(e) = &r {
                warn!(error = %e, "chunk read failed");
            }
            self.answer_fetched(lead, r, &urgency, &mut keep);
        }
        self.store(node, keep).await;
    }

    /// Chunk `id` decoded and verified from `data`, the blob bytes from `start`.
    fn decode_in(&self, data: &Bytes, start: u64, id: ChunkId) -> Fetched {
        let c = &self.index.chunks[id as usize];
        let from = (c.blob_offset - start) as usize;
        let raw = data.slice(from..from + c.blob_len as usize);
        decode::decode(c, &raw)
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

/// Blob bytes one decoding task takes at least (but for a run's last batch).
const DECODE_BATCH: u64 = 1 << 20;

/// `ids` in order, cut into batches of at least [`DECODE_BATCH`] blob bytes.
pub(super) fn decode_batches<'a>(chunks: &'a [Chunk], ids: &'a [ChunkId]) -> impl Iterator<Item = Vec<ChunkId>> + 'a {
    let mut rest = ids;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .position(|&id| {
                bytes += chunks[id as usize].blob_len;
                bytes >= DECODE_BATCH
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
