//! The blob digest of a compressed layer, computed while its background fill
//! runs. The fill caches decoded chunks, so the compressed bytes are hashed as
//! they go by: every range request whose chunks passed verification offers its
//! bytes to the layer's [`Tap`], which holds them (up to [`HELD_MAX`]) until
//! the in-order hash reaches them. Bytes the fill did not fetch itself (chunks
//! that reads cached before it started, gaps between requests, the TOC) are
//! fetched for the hash at background priority, so after a fill the whole blob
//! has been hashed in order exactly once.

use super::{FetchError, Fetcher, Urgency, MAX_REQUEST};
use crate::digest::Digest;
use crate::metrics::Cause;
use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

/// Fetched bytes held at most per layer while its blob is hashed; beyond
/// this, offers are dropped (the hash fetches those bytes again).
pub const HELD_MAX: u64 = 32 << 20;

/// Ranges offered while a hash is open, by blob offset.
#[derive(Default)]
pub(super) struct Tap(Mutex<Option<Held>>);

#[derive(Default)]
struct Held {
    /// Where the hash is: bytes before it are no longer wanted.
    at: u64,
    ranges: BTreeMap<u64, Bytes>,
    bytes: u64,
}

impl Tap {
    /// Verified blob bytes at `offset` (kept only while a hash is open).
    pub(super) fn offer(&self, offset: u64, data: &Bytes) {
        let mut g = self.0.lock();
        let Some(h) = g.as_mut() else { return };
        let len = data.len() as u64;
        if offset.saturating_add(len) <= h.at || h.bytes + len > HELD_MAX {
            return;
        }
        if let Some(old) = h.ranges.insert(offset, data.clone()) {
            h.bytes -= old.len() as u64;
        }
        h.bytes += len;
    }

    /// Is a hash open (do offers count)?
    pub(super) fn is_open(&self) -> bool {
        self.0.lock().is_some()
    }

    /// Held bytes from `at` on, if some range covers it; forgets what lies before `at`.
    fn take_at(&self, at: u64) -> Option<Bytes> {
        let mut g = self.0.lock();
        let h = g.as_mut()?;
        h.at = at;
        let passed: Vec<u64> = h
            .ranges
            .range(..=at)
            .filter(|(s, b)| *s + b.len() as u64 <= at)
            .map(|(s, _)| *s)
            .collect();
        for s in passed {
            if let Some(b) = h.ranges.remove(&s) {
                h.bytes -= b.len() as u64;
            }
        }
        let (s, b) = h.ranges.range(..=at).max_by_key(|(s, b)| *s + b.len() as u64)?;
        Some(b.slice((at - s) as usize..))
    }

    /// Start of the first held range after `at`.
    fn next_after(&self, at: u64) -> Option<u64> {
        let g = self.0.lock();
        g.as_ref()?.ranges.range(at + 1..).next().map(|(s, _)| *s)
    }

    fn open(&self) {
        *self.0.lock() = Some(Held::default());
    }

    fn close(&self) {
        *self.0.lock() = None;
    }
}

/// An in-order hash of a layer's blob, begun by its fill; dropping it stops
/// the layer's tap from holding bytes.
pub struct BlobHash {
    at: u64,
    size: u64,
    hasher: Option<Sha256>,
    fetcher: Weak<Fetcher>,
}

impl Drop for BlobHash {
    fn drop(&mut self) {
        if let Some(f) = self.fetcher.upgrade() {
            f.tap.close();
        }
    }
}

impl BlobHash {
    /// Bytes hashed so far (from the blob's start).
    pub fn hashed(&self) -> u64 {
        self.at
    }
}

impl Fetcher {
    /// Begins hashing the blob (`size` bytes, from the manifest) as the fill fetches it.
    pub fn begin_blob_hash(self: &Arc<Self>, size: u64) -> BlobHash {
        self.tap.open();
        BlobHash {
            at: 0,
            size,
            hasher: Some(Sha256::new()),
            fetcher: Arc::downgrade(self),
        }
    }

    /// Hashes the blob up to `to` at least (capped at its size): held bytes
    /// first, the holes between them fetched at background priority.
    pub async fn hash_blob_to(&self, h: &mut BlobHash, to: u64) -> Result<(), FetchError> {
        let to = to.min(h.size);
        let urgency = Urgency::new(Cause::Background);
        while h.at < to {
            let data = match self.tap.take_at(h.at) {
                Some(held) => held,
                None => {
                    let end = self.tap.next_after(h.at).unwrap_or(to).min(to);
                    let end = end.min(h.at.saturating_add(MAX_REQUEST));
                    self.fetch_range(h.at, end - h.at, &urgency, Cause::Background).await?
                }
            };
            let data = data.slice(..(h.size - h.at).min(data.len() as u64) as usize);
            let n = data.len() as u64;
            let mut hasher = h.hasher.take().expect("a hasher between updates");
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&data);
                hasher
            })
            .await
            .map_err(|e| self.corrupt(h.at, format!("blob hash panicked: {e}")))?;
            h.hasher = Some(hasher);
            h.at += n;
        }
        Ok(())
    }

    /// The blob's digest, once all of it is hashed.
    pub(super) async fn finish_blob_hash(&self, mut h: BlobHash) -> Result<Digest, FetchError> {
        let size = h.size;
        self.hash_blob_to(&mut h, size).await?;
        Ok(Digest::from_hasher(h.hasher.take().expect("a hasher")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_tap() -> Tap {
        let t = Tap::default();
        t.open();
        t
    }

    #[test]
    fn a_closed_tap_holds_nothing() {
        let t = Tap::default();
        t.offer(0, &Bytes::from_static(b"abc"));
        assert!(t.take_at(0).is_none());
    }

    #[test]
    fn held_bytes_are_taken_from_inside_a_range() {
        let t = open_tap();
        t.offer(10, &Bytes::from_static(b"abcdef"));
        assert_eq!(t.take_at(12).unwrap(), Bytes::from_static(b"cdef"));
        assert!(t.take_at(9).is_none(), "nothing covers 9");
    }

    #[test]
    fn ranges_the_hash_has_passed_are_dropped_and_not_taken_again() {
        let t = open_tap();
        t.offer(0, &Bytes::from_static(b"abc"));
        t.offer(3, &Bytes::from_static(b"def"));
        assert_eq!(t.take_at(3).unwrap(), Bytes::from_static(b"def"));
        t.offer(0, &Bytes::from_static(b"abc"));
        assert_eq!(
            t.0.lock().as_ref().unwrap().bytes,
            3,
            "an offer behind the hash is refused"
        );
        assert_eq!(t.next_after(0), Some(3));
    }

    #[test]
    fn a_newer_offer_at_the_same_offset_replaces_the_older() {
        let t = open_tap();
        t.offer(0, &Bytes::from_static(b"xxx"));
        t.offer(0, &Bytes::from_static(b"abc"));
        assert_eq!(t.take_at(0).unwrap(), Bytes::from_static(b"abc"));
    }

    #[test]
    fn offers_beyond_the_bound_are_dropped() {
        let t = open_tap();
        let big = Bytes::from(vec![0u8; HELD_MAX as usize]);
        t.offer(0, &big);
        t.offer(HELD_MAX, &Bytes::from_static(b"a"));
        assert_eq!(t.next_after(0), None);
    }
}
