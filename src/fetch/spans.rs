//! Chunks of gzip-indexed layers: each is a slice of its span's output, so
//! they are loaded by span (one shared fetch, one inflate, one digest check
//! per span, the output kept in the memory cache for the span's other files).

use super::{Answer, FetchError, Fetcher};
use crate::cache::ChunkKey;
use crate::index::{ChunkId, Encoding, NodeId};
use crate::metrics::Cause;
use bytes::Bytes;
use futures::future::FutureExt;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::warn;

/// `inner_offset` of memory-cache keys that hold a whole decoded span.
const SPAN_KEY: u64 = u64::MAX;

impl Fetcher {
    /// Chunks of a gzip-indexed layer are slices of their span's output; a
    /// span is fetched and inflated once however many files it holds.
    pub(super) async fn load_spans(
        self: Arc<Self>,
        node: Option<NodeId>,
        missing: Vec<(ChunkId, Answer)>,
        cause: Cause,
    ) {
        let mut by_span: BTreeMap<u32, Vec<(ChunkId, Answer)>> = BTreeMap::new();
        for (id, tx) in missing {
            let c = &self.index.chunks[id as usize];
            match c.encoding {
                Encoding::Span(s) => by_span.entry(s).or_default().push((id, tx)),
                _ => {
                    let e = self.corrupt(c.blob_offset, "not a span chunk in a gzip-indexed layer".into());
                    self.finish(id, tx, Err(e));
                }
            }
        }
        let groups = by_span.into_iter().map(|(s, group)| {
            let this = Arc::clone(&self);
            async move {
                let span = this.span(s, cause).await;
                let mut keep = Vec::with_capacity(group.len());
                for (id, tx) in group {
                    let c = &this.index.chunks[id as usize];
                    let (from, to) = (c.inner_offset as usize, (c.inner_offset + c.len) as usize);
                    let r = span.clone().and_then(|out| match out.get(from..to) {
                        Some(_) => Ok(out.slice(from..to)),
                        None => Err(this.corrupt(
                            c.blob_offset,
                            format!("span holds {} bytes, chunk ends at {to}", out.len()),
                        )),
                    });
                    if let Ok(b) = &r {
                        keep.push((id, b.clone()));
                    }
                    this.finish(id, tx, r);
                }
                this.store(node, keep).await;
            }
        });
        futures::future::join_all(groups).await;
    }

    /// The verified output of span `s`: memory cache, else one shared fetch.
    async fn span(self: &Arc<Self>, s: u32, cause: Cause) -> Result<Bytes, FetchError> {
        let key = self.span_key(s);
        if let Some(b) = self.mem.get(&key) {
            return Ok(b);
        }
        let fut = self
            .span_inflight
            .lock()
            .entry(s)
            .or_insert_with(|| {
                let this = Arc::clone(self);
                async move {
                    let r = this.fetch_span(s, cause).await;
                    if let Ok(b) = &r {
                        this.mem.put(this.span_key(s), b.clone());
                    }
                    this.span_inflight.lock().remove(&s);
                    r
                }
                .boxed()
                .shared()
            })
            .clone();
        fut.await
    }

    fn span_key(&self, s: u32) -> ChunkKey {
        let offset = self
            .index
            .spans
            .as_ref()
            .and_then(|sp| sp.get(s))
            .map_or(0, |sp| sp.blob_offset);
        ChunkKey {
            layer: self.layer.clone(),
            blob_offset: offset,
            inner_offset: SPAN_KEY,
        }
    }

    /// Fetches span `s` with one range request, inflates it from its
    /// checkpoint and checks its digest; a bad span is fetched once more.
    async fn fetch_span(self: &Arc<Self>, s: u32, cause: Cause) -> Result<Bytes, FetchError> {
        let Some(spans) = self.index.spans.clone() else {
            return Err(self.corrupt(0, "layer has no gzip index spans".into()));
        };
        let sp = spans
            .get(s)
            .cloned()
            .ok_or_else(|| self.corrupt(0, format!("no span {s}")))?;
        let mut reason = String::new();
        for attempt in 0..2 {
            let data = self.source.read(&self.layer, sp.blob_offset, sp.blob_len).await?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes_fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.metrics.fetched(cause, data.len() as u64);
            let spans = Arc::clone(&spans);
            match tokio::task::spawn_blocking(move || spans.decode(s, &data)).await {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(r)) => reason = r.to_string(),
                Err(e) => reason = format!("decoder panicked: {e}"),
            }
            if attempt == 0 {
                warn!(layer = %self.layer, span = s, %reason, "span failed verification, fetching once more");
            }
        }
        Err(self.corrupt(sp.blob_offset, reason))
    }
}
