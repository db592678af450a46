//! The disk cache's bookkeeping: what each cache file holds (`Entry`), the
//! partial entries being filled, and the two LRUs (idle and pinned layers)
//! with their byte counts. Pure memory: no file I/O happens here.

use super::super::seal::Record;
use super::super::ChunkKey;
use super::SUMS;
use crate::digest::Digest;
use lru::LruCache;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, OnceLock};

/// What one cache file holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Entry {
    Chunk(ChunkKey),
    /// The whole decoded content of file node `node` of `layer`.
    File {
        layer: Digest,
        node: u32,
    },
    /// Some chunks of file node `node`, at their offsets in a sparse file.
    Partial {
        layer: Digest,
        node: u32,
    },
}

impl Entry {
    pub(super) fn layer(&self) -> &Digest {
        match self {
            Entry::Chunk(k) => &k.layer,
            Entry::File { layer, .. } | Entry::Partial { layer, .. } => layer,
        }
    }

    pub(super) fn parse(layer: &Digest, name: &str) -> Option<Self> {
        if name.ends_with(SUMS) {
            return None;
        }
        match name.strip_prefix("file-") {
            Some(n) => Some(Entry::File {
                layer: layer.clone(),
                node: n.parse().ok()?,
            }),
            None => ChunkKey::parse(layer, name).map(Entry::Chunk),
        }
    }
}

/// The open files of a partial entry: plain, and O_DIRECT when the filesystem allows.
pub(super) type PartialFiles = (Arc<std::fs::File>, Option<Arc<std::fs::File>>);

/// A partial entry's files, opened once by its first writer.
pub(super) type FilesCell = Arc<OnceLock<Result<PartialFiles, Arc<io::Error>>>>;

/// A file entry still being filled. Its files are created by the first
/// writer, outside the cache's lock (concurrent writers of the same entry
/// wait on this cell only).
pub(super) struct Partial {
    pub(super) files: FilesCell,
    /// Per chunk of the file: where it landed and its sha256, once written.
    pub(super) records: Vec<Option<Record>>,
    pub(super) missing: u32,
    pub(super) bytes: u64,
}

/// The cache's bookkeeping; every operation on it is O(1) or O(log n) but
/// pinning and unpinning a layer, which move that layer's entries.
pub(super) struct Lru {
    /// Entries of layers no mount uses: evicted first.
    pub(super) idle: LruCache<Entry, u64>,
    /// Entries of mounted layers: evicted only when no idle entry is left.
    pub(super) pinned: LruCache<Entry, u64>,
    pub(super) total: u64,
    pub(super) by_layer: HashMap<Digest, u64>,
    pub(super) partials: HashMap<(Digest, u32), Partial>,
    /// Filled partial entries being made whole (synced, renamed): out of the
    /// LRUs, so nothing evicts them, but their chunks are still served from
    /// the open files and not written again.
    pub(super) sealing: HashMap<(Digest, u32), FilesCell>,
    /// Whole-file entries found on open and not yet checked; the cell runs one check.
    pub(super) unchecked: HashMap<(Digest, u32), Arc<Unchecked>>,
    /// Layers mounted now (with their mount counts).
    pub(super) in_use: HashMap<Digest, usize>,
    /// Entries of mounted layers evicted so far (the bound is below their working set).
    pub(super) evicted_in_use: u64,
}

impl Lru {
    pub(super) fn new() -> Self {
        Self {
            idle: LruCache::unbounded(),
            pinned: LruCache::unbounded(),
            total: 0,
            by_layer: HashMap::new(),
            partials: HashMap::new(),
            sealing: HashMap::new(),
            unchecked: HashMap::new(),
            in_use: HashMap::new(),
            evicted_in_use: 0,
        }
    }

    pub(super) fn list(&mut self, layer: &Digest) -> &mut LruCache<Entry, u64> {
        match self.in_use.contains_key(layer) {
            true => &mut self.pinned,
            false => &mut self.idle,
        }
    }

    pub(super) fn count(&mut self, layer: &Digest, add: u64, sub: u64) {
        self.total = (self.total + add).saturating_sub(sub);
        let n = self.by_layer.entry(layer.clone()).or_default();
        *n = (*n + add).saturating_sub(sub);
        if *n == 0 {
            self.by_layer.remove(layer);
        }
    }

    /// Adds (or replaces) an entry as the most recently used.
    pub(super) fn insert(&mut self, e: Entry, len: u64) {
        let layer = e.layer().clone();
        self.remove(&e);
        self.list(&layer).put(e, len);
        self.count(&layer, len, 0);
    }

    pub(super) fn remove(&mut self, e: &Entry) -> Option<u64> {
        let len = self.idle.pop(e).or_else(|| self.pinned.pop(e))?;
        self.count(&e.layer().clone(), 0, len);
        self.forget_state(e);
        Some(len)
    }

    /// Marks a use; false when absent.
    pub(super) fn touch(&mut self, e: &Entry) -> bool {
        let layer = e.layer().clone();
        self.list(&layer).get(e).is_some()
    }

    pub(super) fn contains(&self, e: &Entry) -> bool {
        self.idle.contains(e) || self.pinned.contains(e)
    }

    pub(super) fn grow(&mut self, e: &Entry, len: u64) {
        let layer = e.layer().clone();
        if let Some(n) = self.list(&layer).peek_mut(e) {
            *n += len;
            self.count(&layer, len, 0);
        }
    }

    /// The least recently used entry of an unmounted layer, else (counted) of a mounted one.
    pub(super) fn pop_victim(&mut self) -> Option<Entry> {
        let (e, len) = match self.idle.pop_lru() {
            Some(v) => v,
            None => {
                let v = self.pinned.pop_lru()?;
                self.evicted_in_use += 1;
                v
            }
        };
        self.count(&e.layer().clone(), 0, len);
        self.forget_state(&e);
        Some(e)
    }

    /// Drops what is kept beside an entry leaving the books.
    pub(super) fn forget_state(&mut self, e: &Entry) {
        match e {
            Entry::Partial { layer, node } => drop(self.partials.remove(&(layer.clone(), *node))),
            Entry::File { layer, node } => drop(self.unchecked.remove(&(layer.clone(), *node))),
            Entry::Chunk(_) => {}
        }
    }

    /// Moves a layer's entries between the lists (pin and unpin), oldest first.
    pub(super) fn move_layer(&mut self, layer: &Digest, to_pinned: bool) {
        let (from, to) = match to_pinned {
            true => (&mut self.idle, &mut self.pinned),
            false => (&mut self.pinned, &mut self.idle),
        };
        let keys: Vec<Entry> = from
            .iter()
            .rev()
            .filter(|(k, _)| k.layer() == layer)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(len) = from.pop(&k) {
                to.put(k, len);
            }
        }
    }
}

/// A whole-file entry left by an earlier run: its sums (read once, for
/// checking single chunks) and the one check of the whole file.
#[derive(Default)]
pub(super) struct Unchecked {
    /// `None`: the sidecar cannot be read.
    pub(super) sums: OnceLock<Option<Vec<Record>>>,
    pub(super) whole: OnceLock<bool>,
    /// A background check of the whole file was started (one per entry).
    pub(super) claimed: std::sync::atomic::AtomicBool,
}

impl Partial {
    pub(super) fn has(&self, chunk_index: u32) -> bool {
        matches!(self.records.get(chunk_index as usize), Some(Some(_)))
    }
}
