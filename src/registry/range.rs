//! Blob range reads, the hot path: from the first endpoint (mirror or
//! registry) that serves the range, inside the one retry policy. A whole-blob
//! answer (200) is waited out while a pull-through cache fills
//! ([`super::cold`]), or read through to the offset.

use super::body;
use super::client::Access;
use super::cold::{Turn, SMALL_BLOB};
use super::endpoints::Endpoint;
use super::hosts::Capabilities;
use super::mirror::Job;
use super::retry::Failure;
use super::{Reference, Registry, RegistryError};
use crate::digest::Digest;
use body::Streamed;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

const OP: &str = "reading blob range";
/// Pieces of a range in flight between the connection and its reader.
const SINK_DEPTH: usize = 16;

/// How one attempt was answered.
enum Answer {
    /// Every byte was sent (or the receiver is gone).
    Done,
    /// The whole blob, dropped unread: ask again on the blob's next turn.
    Cold,
}

/// A range read's request and where its bytes go.
#[derive(Clone, Copy)]
struct Want<'a> {
    repo: &'a Reference,
    digest: &'a Digest,
    offset: u64,
    len: u64,
    tx: &'a RangeSink,
    /// Bytes sent so far, over all attempts.
    sent: &'a AtomicU64,
}

/// Which endpoints a range read may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeFrom {
    /// Mirrors first, then the registry (or its `server`).
    Any,
    /// Only the last endpoint (the registry or its `server`): for a range
    /// whose bytes failed verification once, so a lying or corrupt mirror
    /// cannot fail the read.
    Server,
}

/// Where a streamed range read sends the blob's bytes, in order.
pub type RangeSink = mpsc::Sender<Bytes>;

impl Registry {
    /// Reads `len` bytes at `offset` of a blob; exactly those bytes or an error.
    /// Request and body are one attempt of the client's one retry policy: a
    /// stalled or truncated body is retried on a new connection (at the next
    /// endpoint when a mirror failed), within the deadline.
    pub async fn read_blob_range(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        self.read_blob_range_from(repo, digest, offset, len, RangeFrom::Any)
            .await
    }

    /// [`Self::read_blob_range`] from the endpoints `from` allows.
    pub async fn read_blob_range_from(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        from: RangeFrom,
    ) -> Result<Bytes, RegistryError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(SINK_DEPTH);
        let collect = async move {
            let mut out = BytesMut::with_capacity(len.min(64 << 20) as usize);
            while let Some(piece) = rx.recv().await {
                out.extend_from_slice(&piece);
            }
            out.freeze()
        };
        let (streamed, out) = tokio::join!(self.stream_blob_range(repo, digest, offset, len, from, tx), collect);
        streamed.map(|()| out)
    }

    /// Sends `len` bytes at `offset` of a blob to `tx`, in order, as they
    /// arrive: exactly those bytes, then `Ok`, or an error after some of
    /// them. An attempt that fails part-way is retried from the first byte
    /// not yet sent, so a reader of the sink sees one stream. Ends early,
    /// with `Ok`, when the sink's receiver is dropped.
    pub async fn stream_blob_range(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
        from: RangeFrom,
        tx: RangeSink,
    ) -> Result<(), RegistryError> {
        if len == 0 {
            return Ok(());
        }
        offset.checked_add(len - 1).ok_or_else(|| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason: "range runs past 2^64".into(),
        })?;
        let object = digest.to_string();
        // Cold blobs are known by registry, repository and digest, whichever endpoint answered.
        let key = format!("{}/v2/{}/blobs/{digest}", repo.registry, repo.repository);
        let sent = AtomicU64::new(0);
        let want = Want {
            repo,
            digest,
            offset,
            len,
            tx: &tx,
            sent: &sent,
        };
        loop {
            let turn = self.cold.turn(&key).await;
            let turn = &turn;
            let job = Job {
                op: OP,
                repo,
                caps: Capabilities::PULL,
                object: &object,
            };
            let want = &want;
            let one = |ep: Arc<Endpoint>| async move { self.range_once(want, &ep, turn).await };
            let answer = match from {
                RangeFrom::Any => self.across(job, self.retry, one).await?,
                RangeFrom::Server => {
                    let ep = self.origin(repo);
                    let url = ep.base(&repo.repository);
                    self.retry.run(OP, &url, |_| one(Arc::clone(&ep))).await?
                }
            };
            match answer {
                Answer::Done => return Ok(()),
                Answer::Cold => debug!(%digest, offset, len, "whole blob answered to a range read; waiting for ranges"),
            }
        }
    }

    /// One range request at `ep` for the bytes of `want` not yet sent, and its body.
    async fn range_once(&self, want: &Want<'_>, ep: &Endpoint, turn: &Turn<'_>) -> Result<Answer, Failure> {
        let Want {
            repo,
            digest,
            offset,
            len,
            ..
        } = *want;
        let bad = |reason: String| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason,
        };
        let done = want.sent.load(Ordering::Relaxed);
        let (from, rest) = (offset + done, len - done);
        let range = HeaderValue::from_str(&format!("bytes={from}-{}", from + rest - 1)).expect("ascii range");
        let url = ep.url(&repo.repository, &format!("blobs/{digest}"));
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, range);
        let resp = self
            .send_once(OP, repo, ep, Access::Pull, Method::GET, &url, headers, None)
            .await?;
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = content_range_start(resp.headers());
                if start != Some(from) {
                    return Err(bad(format!("server answered Content-Range start {start:?}")).into());
                }
                turn.ranges();
                0
            }
            // The whole blob: a filling cache's answer (wait for ranges) or a
            // registry without range support (skip to the offset).
            StatusCode::OK => {
                let size = resp.content_length().unwrap_or(u64::MAX);
                if offset + len > SMALL_BLOB && turn.whole(size, self.opts.cold_blob_wait) {
                    return Ok(Answer::Cold);
                }
                from
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(bad("range not satisfiable: the blob is shorter".into()).into())
            }
            s => return Err(bad(format!("unexpected status {s}")).into()),
        };
        let truncated = |got: u64, why: String| {
            let got = done + got;
            warn!(%digest, offset, len, got, host = %ep.host, "blob range read {why}");
            Failure::retry(bad(format!("truncated: body {why} after {got} of {len} bytes")))
        };
        match body::stream_range(resp, skip, rest, self.stall(), want.tx, want.sent).await {
            Ok(Streamed::Complete) => {
                self.endpoint_metrics.served(&ep.host, rest);
                Ok(Answer::Done)
            }
            Ok(Streamed::Dropped) => Ok(Answer::Done),
            Ok(Streamed::Short(got)) => Err(truncated(got, "ended".into())),
            Err((got, e)) => Err(truncated(got, format!("failed ({e})"))),
        }
    }
}

fn content_range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_start_parses() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_RANGE, HeaderValue::from_static("bytes 10-19/100"));
        assert_eq!(content_range_start(&h), Some(10));
    }
}
