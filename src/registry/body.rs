//! Response bodies read under two bounds enforced while reading: a byte limit
//! per kind of object (a manifest is never 1 GiB, so one claiming to be is
//! refused before it is held) and a stall timer (a connection that delivers
//! no byte for `stall` is given up; reqwest's own read timeout is per socket
//! read and is reset by a server that trickles one byte at a time).

use bytes::{Bytes, BytesMut};
use reqwest::Response;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc::Sender;

/// The largest body accepted for one kind of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimit {
    /// What the body is, for errors ("manifest", "token response").
    pub what: &'static str,
    pub max: u64,
}

impl BodyLimit {
    /// Image manifests and indexes (the distribution spec suggests 4 MiB).
    pub const MANIFEST: Self = Self::new("manifest", 4 << 20);
    /// A referrers index.
    pub const REFERRERS: Self = Self::new("referrers index", 4 << 20);
    /// A token endpoint's JSON answer.
    pub const TOKEN: Self = Self::new("token response", 64 << 10);
    /// An image config blob (its history can be long).
    pub const CONFIG: Self = Self::new("image config", 16 << 20);
    /// A start-up profile artifact.
    pub const PROFILE: Self = Self::new("start-up profile", 16 << 20);
    /// The part of an error response kept for the message.
    pub const ERROR_TEXT: Self = Self::new("error response", 4 << 10);

    pub const fn new(what: &'static str, max: u64) -> Self {
        Self { what, max }
    }
}

/// A body that could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{what} is larger than its {max}-byte limit")]
    TooLarge { what: &'static str, max: u64 },
    #[error("no byte arrived for {0:?} (stalled connection)")]
    Stalled(Duration),
    #[error("connection failed after {got} bytes: {source}")]
    Transport {
        got: u64,
        #[source]
        source: reqwest::Error,
    },
}

/// The next piece of a body, or a stall after `stall` without one.
pub(super) async fn next_chunk(resp: &mut Response, stall: Duration, got: u64) -> Result<Option<Bytes>, BodyError> {
    match tokio::time::timeout(stall, resp.chunk()).await {
        Err(_) => Err(BodyError::Stalled(stall)),
        // reqwest's per-read timeout (also `stall`) may fire first.
        Ok(Err(e)) if e.is_timeout() => Err(BodyError::Stalled(stall)),
        // `without_url`: the URL may be a presigned one; callers name the object.
        Ok(Err(e)) => Err(BodyError::Transport {
            got,
            source: e.without_url(),
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

/// The whole body, refused as soon as it passes `limit` (before, when its
/// declared length already does).
pub(super) async fn read_limited(mut resp: Response, limit: BodyLimit, stall: Duration) -> Result<Bytes, BodyError> {
    let too_large = || BodyError::TooLarge {
        what: limit.what,
        max: limit.max,
    };
    if resp.content_length().is_some_and(|n| n > limit.max) {
        return Err(too_large());
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = next_chunk(&mut resp, stall, out.len() as u64).await? {
        let total = (out.len() as u64)
            .checked_add(chunk.len() as u64)
            .ok_or_else(too_large)?;
        if total > limit.max {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// At most the first `limit.max` bytes of an error body, as text for a message.
pub(super) async fn error_text(mut resp: Response, stall: Duration) -> String {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = next_chunk(&mut resp, stall, 0).await {
        let room = (BodyLimit::ERROR_TEXT.max as usize).saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a streamed range body ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Streamed {
    /// All `len` bytes went to the sink.
    Complete,
    /// The body ended after this many of them.
    Short(u64),
    /// The sink's receiver is gone: nobody wants the rest.
    Dropped,
}

/// Sends `len` bytes of a body, after dropping its first `skip`, to `tx` in
/// order as they arrive (hyper's own buffers, no copy), adding each piece to
/// `delivered` once sent; the bytes sent before a failure go with it.
pub(super) async fn stream_range(
    mut resp: Response,
    mut skip: u64,
    len: u64,
    stall: Duration,
    tx: &Sender<Bytes>,
    delivered: &AtomicU64,
) -> Result<Streamed, (u64, BodyError)> {
    let mut got = 0u64;
    while got < len {
        let mut piece = match next_chunk(&mut resp, stall, got).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(Streamed::Short(got)),
            Err(e) => return Err((got, e)),
        };
        if skip > 0 {
            let n = skip.min(piece.len() as u64);
            piece = piece.slice(n as usize..);
            skip -= n;
        }
        piece.truncate((len - got).min(piece.len() as u64) as usize);
        if piece.is_empty() {
            continue;
        }
        let n = piece.len() as u64;
        if tx.send(piece).await.is_err() {
            return Ok(Streamed::Dropped);
        }
        got += n;
        delivered.fetch_add(n, Ordering::Relaxed);
    }
    Ok(Streamed::Complete)
}
