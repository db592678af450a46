//! Blob range reads: 206 answers checked against the asked offset, whole-blob
//! answers (200) waited out while a pull-through cache fills ([`super::cold`])
//! or read through to the offset.

use super::body;
use super::client::{content_range_start, Access, Registry};
use super::cold::{Turn, SMALL_BLOB};
use super::retry::Failure;
use super::{Reference, RegistryError};
use crate::digest::Digest;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, StatusCode};
use tracing::{debug, warn};

/// How one attempt was answered.
enum Answer {
    Bytes(Bytes),
    /// The whole blob, dropped unread: ask again on the blob's next turn.
    Cold,
}

impl Registry {
    /// Reads `len` bytes at `offset` of a blob; exactly those bytes or an error.
    /// Request and body are one attempt of the client's one retry policy: a
    /// stalled or truncated body is retried on a new connection, within the deadline.
    pub async fn read_blob_range(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
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
        let url = format!("{}/blobs/{digest}", self.base_url(repo));
        let range = HeaderValue::from_str(&format!("bytes={offset}-{last}")).expect("ascii range");
        loop {
            let turn = self.cold.turn(&url).await;
            match self
                .read_range_once(repo, digest, &url, &range, offset, len, &turn)
                .await?
            {
                Answer::Bytes(b) => return Ok(b),
                Answer::Cold => debug!(%digest, offset, len, "whole blob answered to a range read; waiting for ranges"),
            }
        }
    }

    /// One retried request for the range.
    #[allow(clippy::too_many_arguments)]
    async fn read_range_once(
        &self,
        repo: &Reference,
        digest: &Digest,
        url: &str,
        range: &HeaderValue,
        offset: u64,
        len: u64,
        turn: &Turn<'_>,
    ) -> Result<Answer, RegistryError> {
        const OP: &str = "reading blob range";
        let bad = |reason: String| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason,
        };
        self.retry
            .run(OP, url, |_| async move {
                let mut headers = HeaderMap::new();
                headers.insert(RANGE, range.clone());
                let resp = self
                    .send_once(OP, repo, Access::Pull, Method::GET, url, headers, None)
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
                    Ok(b) if b.len() as u64 == len => Ok(Answer::Bytes(b)),
                    Ok(b) => {
                        warn!(%digest, offset, len, got = b.len(), "short blob range read");
                        Err(Failure::retry(bad(format!(
                            "truncated: body ended after {} of {len} bytes",
                            b.len()
                        ))))
                    }
                    Err((got, e)) => {
                        warn!(%digest, offset, len, got, error = %e, "blob range read failed");
                        Err(Failure::retry(bad(format!(
                            "truncated: body failed after {got} of {len} bytes ({e})"
                        ))))
                    }
                }
            })
            .await
    }
}
