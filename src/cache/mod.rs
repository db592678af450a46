//! Chunk caches: a bounded on-disk store under the state dir that survives
//! restarts and crashes (`disk`: LRU by size; `seal`: what proves an entry
//! intact), and a bounded in-memory LRU of decoded chunks.
//!
//! Keys are (layer digest, blob offset, inner offset): stable for a layer
//! whatever index form produced them.

mod disk;
mod seal;

pub use disk::{CacheError, DiskCache, FileEntry, FileSlot};

use crate::digest::Digest;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

/// Identity of one decoded chunk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub layer: Digest,
    pub blob_offset: u64,
    pub inner_offset: u64,
}

impl ChunkKey {
    fn file_name(&self) -> String {
        format!("{:x}-{:x}", self.blob_offset, self.inner_offset)
    }

    fn parse(layer: &Digest, name: &str) -> Option<Self> {
        let (a, b) = name.split_once('-')?;
        Some(Self {
            layer: layer.clone(),
            blob_offset: u64::from_str_radix(a, 16).ok()?,
            inner_offset: u64::from_str_radix(b, 16).ok()?,
        })
    }
}

/// In-memory LRU of decoded chunks bounded to `limit` bytes.
pub struct MemCache {
    limit: u64,
    inner: Mutex<(LruCache<ChunkKey, Bytes>, u64)>,
}

impl MemCache {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            inner: Mutex::new((LruCache::unbounded(), 0)),
        }
    }

    pub fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        self.inner.lock().0.get(key).cloned()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().1
    }

    /// The chunk, which memory no longer holds.
    pub fn take(&self, key: &ChunkKey) -> Option<Bytes> {
        let mut inner = self.inner.lock();
        let data = inner.0.pop(key)?;
        inner.1 -= data.len() as u64;
        Some(data)
    }

    pub fn put(&self, key: ChunkKey, data: Bytes) {
        let len = data.len() as u64;
        if len > self.limit {
            return;
        }
        let mut inner = self.inner.lock();
        if let Some(old) = inner.0.put(key, data) {
            inner.1 -= old.len() as u64;
        }
        inner.1 += len;
        while inner.1 > self.limit {
            match inner.0.pop_lru() {
                Some((_, old)) => inner.1 -= old.len() as u64,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk key of a test layer.
    pub(super) fn key(off: u64) -> ChunkKey {
        ChunkKey {
            layer: Digest::of(b"l"),
            blob_offset: off,
            inner_offset: 0,
        }
    }

    #[test]
    fn mem_cache_is_bounded() {
        let m = MemCache::new(8);
        m.put(key(1), Bytes::from_static(b"12345"));
        m.put(key(2), Bytes::from_static(b"12345"));
        assert!(m.get(&key(1)).is_none());
        assert!(m.get(&key(2)).is_some());
    }

    #[test]
    fn a_taken_chunk_leaves_memory_and_frees_its_share_of_the_bound() {
        let m = MemCache::new(8);
        m.put(key(1), Bytes::from_static(b"12345"));
        assert_eq!(m.take(&key(1)).as_deref(), Some(&b"12345"[..]));
        assert!(m.get(&key(1)).is_none());
        m.put(key(2), Bytes::from_static(b"12345"));
        m.put(key(3), Bytes::from_static(b"123"));
        assert!(
            m.get(&key(2)).is_some(),
            "8 bytes fit once the taken chunk no longer counts"
        );
    }
}
