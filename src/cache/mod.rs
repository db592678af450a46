//! Chunk caches: a bounded on-disk store under the state dir that survives
//! restarts (LRU by size), and a bounded in-memory LRU of decoded chunks.
//!
//! Keys are (layer digest, blob offset, inner offset): stable for a layer
//! whatever index form produced them. Files are written to a temporary name
//! and renamed, so a crash never leaves a partial chunk under a real name;
//! the fetcher verifies digests on every disk read anyway.
//!
//! A file whose chunks are all cached can be turned into one whole-file entry
//! (`file-<node>`): the kernel then reads it directly (FUSE passthrough), and
//! its chunk entries go, so nothing is stored twice.

use crate::digest::Digest;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// What one cache file holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Entry {
    Chunk(ChunkKey),
    /// The whole decoded content of file node `node` of `layer`.
    File {
        layer: Digest,
        node: u32,
    },
}

impl Entry {
    fn layer(&self) -> &Digest {
        match self {
            Entry::Chunk(k) => &k.layer,
            Entry::File { layer, .. } => layer,
        }
    }

    fn parse(layer: &Digest, name: &str) -> Option<Self> {
        match name.strip_prefix("file-") {
            Some(n) => Some(Entry::File {
                layer: layer.clone(),
                node: n.parse().ok()?,
            }),
            None => ChunkKey::parse(layer, name).map(Entry::Chunk),
        }
    }
}

struct Lru {
    entries: LruCache<Entry, u64>,
    total: u64,
}

/// On-disk chunk store bounded to `limit` bytes.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    lru: Mutex<Lru>,
}

/// A cache directory that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("chunk cache {path}: {source}")]
pub struct CacheError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl DiskCache {
    /// Opens (creating) the cache at `dir`, indexing what a previous run left,
    /// oldest first, and trimming it to `limit`.
    pub fn open(dir: &Path, limit: u64) -> Result<Self, CacheError> {
        let err = |path: &Path, source| CacheError {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let mut found = Vec::new();
        for layer_dir in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let layer_dir = layer_dir.map_err(|e| err(dir, e))?;
            let Ok(layer) = format!("sha256:{}", layer_dir.file_name().to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            for f in std::fs::read_dir(layer_dir.path()).map_err(|e| err(&layer_dir.path(), e))? {
                let f = f.map_err(|e| err(&layer_dir.path(), e))?;
                let name = f.file_name().to_string_lossy().into_owned();
                match Entry::parse(&layer, &name) {
                    Some(key) => {
                        let md = f.metadata().map_err(|e| err(&f.path(), e))?;
                        found.push((md.modified().ok(), key, md.len()));
                    }
                    // Leftover temporary files of an interrupted write.
                    None => drop(std::fs::remove_file(f.path())),
                }
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let cache = Self {
            dir: dir.to_path_buf(),
            limit,
            lru: Mutex::new(Lru {
                entries: LruCache::unbounded(),
                total: 0,
            }),
        };
        {
            let mut lru = cache.lru.lock();
            for (_, key, len) in found {
                lru.total += len;
                lru.entries.put(key, len);
            }
        }
        cache.evict_to(limit);
        Ok(cache)
    }

    fn path(&self, e: &Entry) -> PathBuf {
        let dir = self.dir.join(e.layer().hex());
        match e {
            Entry::Chunk(k) => dir.join(k.file_name()),
            Entry::File { node, .. } => dir.join(format!("file-{node}")),
        }
    }

    /// Reads a chunk (blocking); `None` when absent.
    pub fn get(&self, key: &ChunkKey) -> Option<Vec<u8>> {
        let e = Entry::Chunk(key.clone());
        self.lru.lock().entries.get(&e)?;
        match std::fs::read(self.path(&e)) {
            Ok(data) => Some(data),
            Err(_) => {
                self.forget(&e);
                None
            }
        }
    }

    /// Whether a chunk is stored (without counting as a use).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.lru.lock().entries.contains(&Entry::Chunk(key.clone()))
    }

    /// Stores a chunk (blocking), evicting least recently used ones to stay under the limit.
    pub fn put(&self, key: &ChunkKey, data: &[u8]) -> io::Result<()> {
        self.store(Entry::Chunk(key.clone()), data.len() as u64, |f| f.write_all(data))
    }

    /// Writes an entry of `len` bytes through a temporary file and makes room for it.
    fn store(&self, e: Entry, len: u64, write: impl FnOnce(&mut std::fs::File) -> io::Result<()>) -> io::Result<()> {
        if len > self.limit {
            return Ok(()); // larger than the whole cache: serve it, don't keep it
        }
        self.evict_to(self.limit - len);
        let path = self.path(&e);
        let dir = path.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().expect("cache path has a name").to_string_lossy();
        let tmp = dir.join(format!(".tmp-{name}-{:?}", std::thread::current().id()));
        let written = std::fs::File::create(&tmp).and_then(|mut f| write(&mut f));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        std::fs::rename(&tmp, &path)?;
        let mut lru = self.lru.lock();
        if let Some(old) = lru.entries.put(e, len) {
            lru.total -= old;
        }
        lru.total += len;
        Ok(())
    }

    /// Stores the whole content of file `node` of `layer` (`len` bytes, written by `write`).
    pub fn put_file(
        &self,
        layer: &Digest,
        node: u32,
        len: u64,
        write: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
    ) -> io::Result<()> {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        self.store(e, len, write)
    }

    /// The whole-file entry of `node`, if there is one (counts as a use).
    pub fn file(&self, layer: &Digest, node: u32) -> Option<PathBuf> {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        self.lru.lock().entries.get(&e)?;
        Some(self.path(&e))
    }

    /// `len` bytes at `offset` of a whole-file entry; `None` when absent or short.
    pub fn read_file(&self, layer: &Digest, node: u32, offset: u64, len: u64) -> Option<Vec<u8>> {
        let path = self.file(layer, node)?;
        let mut buf = vec![0u8; len as usize];
        std::fs::File::open(path).ok()?.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    fn forget(&self, e: &Entry) {
        let mut lru = self.lru.lock();
        if let Some(len) = lru.entries.pop(e) {
            lru.total -= len;
        }
    }

    /// Drops a chunk (corrupt, or now held by a whole-file entry).
    pub fn remove(&self, key: &ChunkKey) {
        let e = Entry::Chunk(key.clone());
        self.forget(&e);
        let _ = std::fs::remove_file(self.path(&e));
    }

    /// Drops a whole-file entry (its content failed verification).
    pub fn remove_file(&self, layer: &Digest, node: u32) {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        self.forget(&e);
        let _ = std::fs::remove_file(self.path(&e));
    }

    /// Drops every cached chunk of a layer (its last user is gone).
    pub fn remove_layer(&self, layer: &Digest) {
        {
            let mut lru = self.lru.lock();
            let keys: Vec<Entry> = lru
                .entries
                .iter()
                .filter(|(k, _)| k.layer() == layer)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                if let Some(len) = lru.entries.pop(&k) {
                    lru.total -= len;
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join(layer.hex()));
    }

    fn evict_to(&self, target: u64) {
        loop {
            let victim = {
                let mut lru = self.lru.lock();
                if lru.total <= target {
                    return;
                }
                let Some((key, len)) = lru.entries.pop_lru() else {
                    return;
                };
                lru.total -= len;
                key
            };
            let _ = std::fs::remove_file(self.path(&victim));
        }
    }

    /// Bytes currently stored.
    pub fn total_bytes(&self) -> u64 {
        self.lru.lock().total
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

    fn key(off: u64) -> ChunkKey {
        ChunkKey {
            layer: Digest::of(b"l"),
            blob_offset: off,
            inner_offset: 0,
        }
    }

    #[test]
    fn disk_cache_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        DiskCache::open(dir.path(), 100)
            .unwrap()
            .put(&key(1), b"hello")
            .unwrap();
        let c = DiskCache::open(dir.path(), 100).unwrap();
        assert_eq!(c.get(&key(1)).as_deref(), Some(&b"hello"[..]));
        assert_eq!(c.total_bytes(), 5);
    }

    #[test]
    fn disk_cache_evicts_least_recently_used_to_stay_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 10).unwrap();
        c.put(&key(1), b"aaaa").unwrap();
        c.put(&key(2), b"bbbb").unwrap();
        assert!(c.get(&key(1)).is_some()); // 1 is now most recent
        c.put(&key(3), b"cccc").unwrap();
        assert!(c.get(&key(2)).is_none());
        assert!(c.get(&key(1)).is_some() && c.get(&key(3)).is_some());
        assert!(c.total_bytes() <= 10);
    }

    #[test]
    fn reopening_with_a_smaller_limit_trims() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 100).unwrap();
        for i in 0..5 {
            c.put(&key(i), &[0u8; 10]).unwrap();
        }
        let c = DiskCache::open(dir.path(), 25).unwrap();
        assert!(c.total_bytes() <= 25);
    }

    #[test]
    fn removing_a_layer_frees_its_chunks_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = DiskCache::open(dir.path(), 100).unwrap();
        c.put(&key(1), b"aaaa").unwrap();
        let other = ChunkKey {
            layer: Digest::of(b"other"),
            blob_offset: 1,
            inner_offset: 0,
        };
        c.put(&other, b"bb").unwrap();
        c.remove_layer(&Digest::of(b"l"));
        assert!(c.get(&key(1)).is_none());
        assert_eq!(c.total_bytes(), 2);
        assert!(!dir.path().join(Digest::of(b"l").hex()).exists());
    }

    #[test]
    fn a_whole_file_entry_is_counted_survives_reopen_and_serves_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::of(b"l");
        let c = DiskCache::open(dir.path(), 100).unwrap();
        c.put_file(&layer, 7, 10, |f| f.write_all(b"0123456789")).unwrap();
        let c = DiskCache::open(dir.path(), 100).unwrap();
        assert_eq!(c.total_bytes(), 10);
        assert_eq!(c.read_file(&layer, 7, 3, 4).as_deref(), Some(&b"3456"[..]));
        assert!(c.read_file(&layer, 7, 8, 4).is_none(), "a short read is no answer");
        c.remove_file(&layer, 7);
        assert!(c.file(&layer, 7).is_none() && c.total_bytes() == 0);
    }

    #[test]
    fn mem_cache_is_bounded() {
        let m = MemCache::new(8);
        m.put(key(1), Bytes::from_static(b"12345"));
        m.put(key(2), Bytes::from_static(b"12345"));
        assert!(m.get(&key(1)).is_none());
        assert!(m.get(&key(2)).is_some());
    }
}
