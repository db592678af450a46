//! The on-disk cache under the state dir: bounded by size (one LRU over all
//! entries), survives restarts. Files are written to a temporary name and
//! renamed, so a crash never leaves a partial chunk under a real name; the
//! fetcher verifies digests on every disk read anyway.
//!
//! Chunks of large files are written straight into one sparse file per file
//! node (`partial-<node>`, at their file offsets); when the last chunk lands it
//! is renamed `file-<node>`, a whole-file entry the kernel can read directly
//! (FUSE passthrough). No second copy, no assembly pass. Partial files are
//! dropped on restart (which chunks they hold is kept in memory only).

use super::ChunkKey;
use crate::digest::Digest;
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// What one cache file holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Entry {
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
    fn layer(&self) -> &Digest {
        match self {
            Entry::Chunk(k) => &k.layer,
            Entry::File { layer, .. } | Entry::Partial { layer, .. } => layer,
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

/// Where a chunk of a large file goes: file node, its size and chunk count, the chunk's index and offset in it.
#[derive(Clone, Copy, Debug)]
pub struct FileSlot {
    pub node: u32,
    pub file_size: u64,
    pub chunk_count: u32,
    pub chunk_index: u32,
    pub file_offset: u64,
}

/// The open files of a partial entry: plain, and O_DIRECT when the filesystem allows.
type PartialFiles = (Arc<std::fs::File>, Option<Arc<std::fs::File>>);

/// A file entry still being filled. Its files are created by the first
/// writer, outside the cache's lock (concurrent writers of the same entry
/// wait on this cell only).
struct Partial {
    files: Arc<OnceLock<Result<PartialFiles, Arc<io::Error>>>>,
    present: Vec<bool>,
    missing: u32,
    bytes: u64,
}

/// The cache's bookkeeping; every operation on it is O(1) or O(log n) but
/// pinning and unpinning a layer, which move that layer's entries.
struct Lru {
    /// Entries of layers no mount uses: evicted first.
    idle: LruCache<Entry, u64>,
    /// Entries of mounted layers: evicted only when no idle entry is left.
    pinned: LruCache<Entry, u64>,
    total: u64,
    by_layer: HashMap<Digest, u64>,
    partials: HashMap<(Digest, u32), Partial>,
    /// Layers mounted now (with their mount counts).
    in_use: HashMap<Digest, usize>,
    /// Entries of mounted layers evicted so far (the bound is below their working set).
    evicted_in_use: u64,
}

impl Lru {
    fn new() -> Self {
        Self {
            idle: LruCache::unbounded(),
            pinned: LruCache::unbounded(),
            total: 0,
            by_layer: HashMap::new(),
            partials: HashMap::new(),
            in_use: HashMap::new(),
            evicted_in_use: 0,
        }
    }

    fn list(&mut self, layer: &Digest) -> &mut LruCache<Entry, u64> {
        match self.in_use.contains_key(layer) {
            true => &mut self.pinned,
            false => &mut self.idle,
        }
    }

    fn count(&mut self, layer: &Digest, add: u64, sub: u64) {
        self.total = (self.total + add).saturating_sub(sub);
        let n = self.by_layer.entry(layer.clone()).or_default();
        *n = (*n + add).saturating_sub(sub);
        if *n == 0 {
            self.by_layer.remove(layer);
        }
    }

    /// Adds (or replaces) an entry as the most recently used.
    fn insert(&mut self, e: Entry, len: u64) {
        let layer = e.layer().clone();
        self.remove(&e);
        self.list(&layer).put(e, len);
        self.count(&layer, len, 0);
    }

    fn remove(&mut self, e: &Entry) -> Option<u64> {
        let len = self.idle.pop(e).or_else(|| self.pinned.pop(e))?;
        self.count(&e.layer().clone(), 0, len);
        if let Entry::Partial { layer, node } = e {
            self.partials.remove(&(layer.clone(), *node));
        }
        Some(len)
    }

    /// Marks a use; false when absent.
    fn touch(&mut self, e: &Entry) -> bool {
        let layer = e.layer().clone();
        self.list(&layer).get(e).is_some()
    }

    fn contains(&self, e: &Entry) -> bool {
        self.idle.contains(e) || self.pinned.contains(e)
    }

    fn grow(&mut self, e: &Entry, len: u64) {
        let layer = e.layer().clone();
        if let Some(n) = self.list(&layer).peek_mut(e) {
            *n += len;
            self.count(&layer, len, 0);
        }
    }

    /// The least recently used entry of an unmounted layer, else (counted) of a mounted one.
    fn pop_victim(&mut self) -> Option<Entry> {
        let (e, len) = match self.idle.pop_lru() {
            Some(v) => v,
            None => {
                let v = self.pinned.pop_lru()?;
                self.evicted_in_use += 1;
                v
            }
        };
        self.count(&e.layer().clone(), 0, len);
        if let Entry::Partial { layer, node } = &e {
            self.partials.remove(&(layer.clone(), *node));
        }
        Some(e)
    }

    /// Moves a layer's entries between the lists (pin and unpin), oldest first.
    fn move_layer(&mut self, layer: &Digest, to_pinned: bool) {
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
        crate::private::dir(dir).map_err(|e| err(dir, e))?;
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
        let mut lru = Lru::new();
        for (_, key, len) in found {
            lru.insert(key, len);
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            limit,
            lru: Mutex::new(lru),
        };
        cache.evict_to(limit);
        Ok(cache)
    }

    fn path(&self, e: &Entry) -> PathBuf {
        let dir = self.dir.join(e.layer().hex());
        match e {
            Entry::Chunk(k) => dir.join(k.file_name()),
            Entry::File { node, .. } => dir.join(format!("file-{node}")),
            Entry::Partial { node, .. } => dir.join(format!("partial-{node}")),
        }
    }

    /// Reads a chunk (blocking); `None` when absent.
    pub fn get(&self, key: &ChunkKey) -> Option<Vec<u8>> {
        let e = Entry::Chunk(key.clone());
        if !self.lru.lock().touch(&e) {
            return None;
        }
        match std::fs::read(self.path(&e)) {
            Ok(data) => Some(data),
            Err(_) => {
                self.forget(&e);
                None
            }
        }
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
        crate::private::dir(dir)?;
        let name = path.file_name().expect("cache path has a name").to_string_lossy();
        let tmp = dir.join(format!(".tmp-{name}-{:?}", std::thread::current().id()));
        let written = crate::private::create(&tmp).and_then(|mut f| write(&mut f));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        std::fs::rename(&tmp, &path)?;
        self.lru.lock().insert(e, len);
        Ok(())
    }

    /// Stores a chunk of a large file inside that file's entry; the entry
    /// becomes a whole-file entry when its last chunk is stored.
    pub fn put_in_file(&self, layer: &Digest, slot: FileSlot, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        let whole = Entry::File {
            layer: layer.clone(),
            node: slot.node,
        };
        if slot.file_size > self.limit || self.lru.lock().contains(&whole) {
            return Ok(()); // never fits whole, or already complete
        }
        self.evict_to(self.limit.saturating_sub(len));
        let id = (layer.clone(), slot.node);
        let partial = Entry::Partial {
            layer: layer.clone(),
            node: slot.node,
        };
        let cell = {
            let mut lru = self.lru.lock();
            match lru.partials.get(&id) {
                Some(p) if p.present.get(slot.chunk_index as usize) == Some(&true) => return Ok(()),
                Some(p) => Arc::clone(&p.files),
                None => {
                    let cell = Arc::new(OnceLock::new());
                    lru.insert(partial.clone(), 0);
                    lru.partials.insert(
                        id.clone(),
                        Partial {
                            files: Arc::clone(&cell),
                            present: vec![false; slot.chunk_count as usize],
                            missing: slot.chunk_count,
                            bytes: 0,
                        },
                    );
                    cell
                }
            }
        };
        let path = self.path(&partial);
        let (file, direct) = match cell.get_or_init(|| create_partial(&path, slot.file_size).map_err(Arc::new)) {
            Ok(files) => files.clone(),
            Err(e) => {
                self.forget(&partial);
                return Err(io::Error::new(e.kind(), format!("creating {}: {e}", path.display())));
            }
        };
        write_at(&file, direct.as_deref(), data, slot.file_offset)?;
        {
            let mut lru = self.lru.lock();
            // Evicted meanwhile (or replaced): the write went to a dropped file.
            let Some(p) = lru.partials.get_mut(&id).filter(|p| Arc::ptr_eq(&p.files, &cell)) else {
                return Ok(());
            };
            let Some(bit) = p.present.get_mut(slot.chunk_index as usize).filter(|b| !**b) else {
                return Ok(());
            };
            *bit = true;
            p.missing -= 1;
            p.bytes += len;
            let complete = p.missing == 0;
            lru.grow(&partial, len);
            if !complete {
                return Ok(());
            }
            // Out of the books while it is renamed: nothing evicts or serves it meanwhile.
            lru.remove(&partial);
        }
        std::fs::rename(&path, self.path(&whole))?;
        self.lru.lock().insert(whole, slot.file_size);
        Ok(())
    }

    /// A chunk stored by `put_in_file`; `None` when absent.
    pub fn get_in_file(&self, layer: &Digest, slot: FileSlot, len: u64) -> Option<Vec<u8>> {
        let whole = Entry::File {
            layer: layer.clone(),
            node: slot.node,
        };
        let held = {
            let mut lru = self.lru.lock();
            let partial = lru
                .partials
                .get(&(layer.clone(), slot.node))
                .map(|p| (p.present.get(slot.chunk_index as usize) == Some(&true)).then(|| Arc::clone(&p.files)));
            match partial {
                Some(Some(cell)) => Some(cell),
                Some(None) => return None,
                None if lru.touch(&whole) => None,
                None => return None,
            }
        };
        let file = match held {
            Some(cell) => Arc::clone(&cell.get()?.as_ref().ok()?.0),
            None => Arc::new(std::fs::File::open(self.path(&whole)).ok()?),
        };
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, slot.file_offset).ok()?;
        Some(buf)
    }

    /// The whole-file entry of `node`, if complete (counts as a use).
    pub fn file(&self, layer: &Digest, node: u32) -> Option<PathBuf> {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        self.lru.lock().touch(&e).then(|| self.path(&e))
    }

    /// Drops the entry that holds a chunk of a large file (the chunk failed
    /// verification): the partial entry or the whole-file one, whichever it is.
    pub fn remove_in_file(&self, layer: &Digest, slot: FileSlot) {
        let (layer, node) = (layer.clone(), slot.node);
        let partial = self.lru.lock().partials.contains_key(&(layer.clone(), node));
        let e = if partial {
            Entry::Partial { layer, node }
        } else {
            Entry::File { layer, node }
        };
        self.forget(&e);
        let _ = std::fs::remove_file(self.path(&e));
    }

    fn forget(&self, e: &Entry) {
        self.lru.lock().remove(e);
    }

    /// Drops a chunk (corrupt, or now held by a whole-file entry).
    pub fn remove(&self, key: &ChunkKey) {
        let e = Entry::Chunk(key.clone());
        self.forget(&e);
        let _ = std::fs::remove_file(self.path(&e));
    }

    /// Drops every cached chunk of a layer (its last user is gone).
    pub fn remove_layer(&self, layer: &Digest) {
        {
            let mut lru = self.lru.lock();
            let keys: Vec<Entry> = lru
                .idle
                .iter()
                .chain(lru.pinned.iter())
                .filter(|(k, _)| k.layer() == layer)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                lru.remove(&k);
            }
            lru.partials.retain(|(l, _), _| l != layer);
        }
        let _ = std::fs::remove_dir_all(self.dir.join(layer.hex()));
    }

    /// Evicts least recently used entries down to `target` bytes: those of
    /// layers no mount uses first, then (counted) those of mounted layers.
    fn evict_to(&self, target: u64) {
        loop {
            let victim = {
                let mut lru = self.lru.lock();
                if lru.total <= target {
                    return;
                }
                match lru.pop_victim() {
                    Some(v) => v,
                    None => return,
                }
            };
            let _ = std::fs::remove_file(self.path(&victim));
        }
    }

    /// A layer is mounted (once more): its entries are evicted last.
    pub fn pin(&self, layer: &Digest) {
        let mut lru = self.lru.lock();
        let n = lru.in_use.entry(layer.clone()).or_default();
        *n += 1;
        if *n == 1 {
            lru.move_layer(layer, true);
        }
    }

    /// One mount of the layer is gone.
    pub fn unpin(&self, layer: &Digest) {
        let mut lru = self.lru.lock();
        let Some(n) = lru.in_use.get_mut(layer) else { return };
        *n -= 1;
        if *n == 0 {
            lru.in_use.remove(layer);
            lru.move_layer(layer, false);
        }
    }

    /// Bytes held for mounted layers other than `layer`.
    pub fn mounted_bytes_except(&self, layer: &Digest) -> u64 {
        let lru = self.lru.lock();
        lru.in_use
            .keys()
            .filter(|l| *l != layer)
            .map(|l| lru.by_layer.get(l).copied().unwrap_or(0))
            .sum()
    }

    /// Entries of mounted layers evicted since the cache opened.
    pub fn evictions_in_use(&self) -> u64 {
        self.lru.lock().evicted_in_use
    }

    /// Is the chunk cached (without counting as a use)?
    pub fn has(&self, key: &ChunkKey) -> bool {
        self.lru.lock().contains(&Entry::Chunk(key.clone()))
    }

    /// Is this chunk of a large file cached, in its partial or whole-file entry?
    pub fn has_in_file(&self, layer: &Digest, slot: FileSlot) -> bool {
        let lru = self.lru.lock();
        match lru.partials.get(&(layer.clone(), slot.node)) {
            Some(p) => p.present.get(slot.chunk_index as usize) == Some(&true),
            None => lru.contains(&Entry::File {
                layer: layer.clone(),
                node: slot.node,
            }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently stored.
    pub fn total_bytes(&self) -> u64 {
        self.lru.lock().total
    }
}

/// Creates a sparse partial entry of `size` bytes and opens it twice: plainly and with O_DIRECT.
fn create_partial(path: &Path, size: u64) -> io::Result<PartialFiles> {
    crate::private::dir(path.parent().expect("cache path has a parent"))?;
    let f = crate::private::options()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(path)?;
    f.set_len(size)?;
    let direct = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
        .map(Arc::new);
    Ok((Arc::new(f), direct))
}

/// Writes `data` at `offset`; its page-aligned part through `direct` (O_DIRECT)
/// when there is one: the device copies it, not the CPU, which a cold read of
/// a large file is short of. The unaligned tail goes through the page cache.
fn write_at(file: &std::fs::File, direct: Option<&std::fs::File>, data: &[u8], offset: u64) -> io::Result<()> {
    const ALIGN: usize = 4096;
    let aligned = data.as_ptr() as usize % ALIGN == 0 && offset % ALIGN as u64 == 0;
    let head = if aligned { data.len() / ALIGN * ALIGN } else { 0 };
    if let (Some(d), true) = (direct, head > 0) {
        match d.write_all_at(&data[..head], offset) {
            Ok(()) => return file.write_all_at(&data[head..], offset + head as u64),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // no O_DIRECT here after all
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(data, offset)
}

#[cfg(test)]
mod tests;
