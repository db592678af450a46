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
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, RANGE};
use reqwest::{Method, StatusCode};
use std::sync::Arc;
use tracing::{debug, warn};

/// How one attempt was answered.
enum Answer {
    Bytes(Bytes),
    /// The whole blob, dropped unread: ask again on the blob's next turn.
    Cold,
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
        const OP: &str = "reading blob range";
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = offset.checked_add(len - 1).ok_or_else(|| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason: "range runs past 2^64".into(),
        })?;
        let range = HeaderValue::from_str(&format!("bytes={offset}-{last}")).expect("ascii range");
        let object = digest.to_string();
        // Cold blobs are known by registry, repository and digest, whichever endpoint answered.
        let key = format!("{}/v2/{}/blobs/{digest}", repo.registry, repo.repository);
        loop {
            let turn = self.cold.turn(&key).await;
            let turn = &turn;
            let job = Job {
                op: OP,
                repo,
                caps: Capabilities::PULL,
                object: &object,
            };
            let one = |ep: Arc<Endpoint>| {
                let range = range.clone();
                async move { self.range_once(repo, digest, &ep, offset, len, range, turn).await }
            };
            let answer = match from {
                RangeFrom::Any => self.across(job, self.retry, one).await?,
                RangeFrom::Server => {
                    let ep = self.origin(repo);
                    let url = ep.base(&repo.repository);
                    self.retry.run(OP, &url, |_| one(Arc::clone(&ep))).await?
                }
            };
            match answer {
                Answer::Bytes(b) => return Ok(b),
                Answer::Cold => debug!(%digest, offset, len, "whole blob answered to a range read; waiting for ranges"),
            }
        }
    }

    /// One range request at `ep` and its body.
    #[allow(clippy::too_many_arguments)]
    async fn range_once(
        &self,
        repo: &Reference,
        digest: &Digest,
        ep: &Endpoint,
        offset: u64,
        len: u64,
        range: HeaderValue,
        turn: &Turn<'_>,
    ) -> Result<Answer, Failure> {
        const OP: &str = "reading blob range";
        let bad = |reason: String| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason,
        };
        let url = ep.url(&repo.repository, &format!("blobs/{digest}"));
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, range);
        let resp = self
            .send_once(OP, repo, ep, Access::Pull, Method::GET, &url, headers, None)
            .await?;
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let start = content_range_start(resp.headers());
                if start != Some(offset) {
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
                offset
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(bad("range not satisfiable: the blob is shorter".into()).into())
            }
            s => return Err(bad(format!("unexpected status {s}")).into()),
        };
        match body::read_range(resp, skip, len, self.stall()).await {
            Ok(b) if b.len() as u64 == len => {
                self.endpoint_metrics.served(&ep.host, len);
                Ok(Answer::Bytes(b))
            }
            Ok(b) => {
                warn!(%digest, offset, len, got = b.len(), host = %ep.host, "short blob range read");
                Err(Failure::retry(bad(format!(
                    "truncated: body ended after {} of {len} bytes",
                    b.len()
                ))))
            }
            Err((got, e)) => {
                warn!(%digest, offset, len, got, host = %ep.host, error = %e, "blob range read failed");
                Err(Failure::retry(bad(format!(
                    "truncated: body failed after {got} of {len} bytes ({e})"
                ))))
            }
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
