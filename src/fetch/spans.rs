//! Chunks of gzip-indexed layers: each is a slice of its span's output, so
//! they are loaded by span (one shared flight, one inflate, one digest check
//! per span, the output kept in the memory cache for the span's other files).

use super::{ChunkLead, FetchError, Fetched, Fetcher, Urgency};
use crate::cache::ChunkKey;
use crate::flight::Claim;
use crate::index::{ChunkId, Encoding, NodeId};
use crate::metrics::Cause;
use std::collections::BTreeMap;
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
        missing: Vec<ChunkLead>,
        cause: Cause,
        urgency: Arc<Urgency>,
    ) {
        let mut by_span: BTreeMap<u32, Vec<ChunkLead>> = BTreeMap::new();
        for lead in missing {
            let c = &self.index.chunks[*lead.key() as usize];
            match c.encoding {
                Encoding::Span(s) => by_span.entry(s).or_default().push(lead),
                _ => {
                    let e = self.corrupt(c.blob_offset, "not a span chunk in a gzip-indexed layer".into());
                    self.finish(lead, Err(e), &urgency);
                }
            }
        }
        let groups = by_span.into_iter().map(|(s, group)| {
            let (this, urgency) = (Arc::clone(&self), Arc::clone(&urgency));
            async move {
                let span = this.span(s, cause, Arc::clone(&urgency)).await;
                let mut keep: Vec<(ChunkId, _)> = Vec::with_capacity(group.len());
                for lead in group {
                    let c = &this.index.chunks[*lead.key() as usize];
                    let (from, to) = (c.inner_offset as usize, (c.inner_offset + c.len) as usize);
                    let r = span.clone().and_then(|out| match out.get(from..to) {
                        Some(_) => Ok(out.slice(from..to)),
                        None => Err(this.corrupt(
                            c.blob_offset,
                            format!("span holds {} bytes, chunk ends at {to}", out.len()),
                        )),
                    });
                    this.answer_fetched(lead, r, &urgency, &mut keep);
                }
                this.store(node, keep).await;
            }
        });
        futures::future::join_all(groups).await;
    }

    /// The verified output of span `s`: memory cache, else one shared flight.
    async fn span(self: &Arc<Self>, s: u32, cause: Cause, urgency: Arc<Urgency>) -> Fetched {
        let key = self.span_key(s);
        if let Some(b) = self.node.mem.get(&key) {
            return Ok(b);
        }
        let flight = match self.span_flights.claim(&s, || Arc::clone(&urgency)) {
            Claim::Done(v) => return v,
            Claim::Joined(flight, theirs) => {
                if theirs.raise(cause) {
                    self.node.scheduler.raised();
                }
                flight
            }
            Claim::Lead(lead) => {
                let flight = lead.flight();
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let r = this.fetch_span(s, cause, &urgency).await;
                    if let Ok(b) = &r {
                        this.node.mem.put(this.span_key(s), b.clone());
                    }
                    lead.finish(r);
                });
                flight
            }
        };
        let offset = self.span_key(s).blob_offset;
        flight.await.unwrap_or_else(|| Err(self.abandoned(offset)))
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
    async fn fetch_span(self: &Arc<Self>, s: u32, cause: Cause, urgency: &Arc<Urgency>) -> Fetched {
        let Some(spans) = self.index.spans.clone() else {
            return Err(self.corrupt(0, "layer has no gzip index spans".into()));
        };
        let sp = spans
            .get(s)
            .cloned()
            .ok_or_else(|| self.corrupt(0, format!("no span {s}")))?;
        let mut reason = String::new();
        for attempt in 0..2 {
            let again = attempt > 0;
            let data = self
                .fetch_range_from(sp.blob_offset, sp.blob_len, urgency, cause, again)
                .await?;
            let (spans, held) = (Arc::clone(&spans), data.clone());
            match tokio::task::spawn_blocking(move || spans.decode(s, &held)).await {
                Ok(Ok(out)) => {
                    self.tap.offer(sp.blob_offset, &data);
                    return Ok(out);
                }
                Ok(Err(r)) => reason = r.to_string(),
                Err(e) => reason = format!("decoder panicked: {e}"),
            }
            if attempt == 0 {
                warn!(layer = %self.layer, span = s, %reason, "span failed verification, fetching once more (from the registry, not a mirror)");
            }
        }
        Err(FetchError::Corrupt {
            layer: self.layer.clone(),
            offset: sp.blob_offset,
            reason,
        })
    }
}
