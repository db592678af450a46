//! The on-disk cache under the state dir: bounded by size (one LRU over all
//! entries), survives restarts and crashes. Files are written to a temporary
//! name, fsynced, renamed and the directory fsynced, so a crash never leaves a
//! partial chunk under a real name; every entry is sealed (`seal`) and checked
//! before its first use after a restart, so a flipped byte is never served.
//!
//! Chunks of large files are written straight into one sparse file per file
//! node (`partial-<node>`, at their file offsets); when the last chunk lands it
//! is renamed `file-<node>`, a whole-file entry the kernel can read directly
//! (FUSE passthrough). No second copy, no assembly pass. Partial files are
//! dropped on restart (which chunks they hold is kept in memory only); a
//! whole-file entry is kept only with its sums sidecar, and is handed out for
//! passthrough only once it has been checked against it in this process.

mod books;
mod files;
mod proven;

use super::seal::{self, Record};
use super::ChunkKey;
use crate::digest::Digest;
use books::{Entry, Lru, Partial, Unchecked};
use files::{create_partial, sums_path, syncfs, write_at};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tracing::warn;

/// Suffix of a whole-file entry's sums sidecar.
const SUMS: &str = ".sums";

/// A whole-file entry, as far as passthrough may know.
#[derive(Debug, PartialEq, Eq)]
pub enum FileEntry {
    Absent,
    /// Checked (or written) by this process: the kernel may read it directly.
    Ready(PathBuf),
    /// Left by an earlier run and not yet checked against its sums (`check_file`).
    Unchecked,
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
        let mut unchecked = HashMap::new();
        for layer_dir in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let layer_dir = layer_dir.map_err(|e| err(dir, e))?;
            let Ok(layer) = format!("sha256:{}", layer_dir.file_name().to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            let mut sums = std::collections::HashSet::new();
            let mut files = Vec::new();
            for f in std::fs::read_dir(layer_dir.path()).map_err(|e| err(&layer_dir.path(), e))? {
                let f = f.map_err(|e| err(&layer_dir.path(), e))?;
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(SUMS) {
                    sums.insert(f.path());
                    continue;
                }
                match Entry::parse(&layer, &name) {
                    Some(key) => {
                        let md = f.metadata().map_err(|e| err(&f.path(), e))?;
                        let len = match key {
                            Entry::Chunk(_) => md.len().saturating_sub(seal::TRAILER as u64),
                            _ => md.len(),
                        };
                        files.push((md.modified().ok(), key, len, f.path()));
                    }
                    // Leftover temporary files of an interrupted write.
                    None => drop(std::fs::remove_file(f.path())),
                }
            }
            for (t, key, len, path) in files {
                if let Entry::File { layer, node } = &key {
                    // Without its sums nothing proves the entry complete.
                    if !sums.remove(&sums_path(&path)) {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    unchecked.insert((layer.clone(), *node), Arc::new(Unchecked::default()));
                }
                found.push((t, key, len));
            }
            // Sums whose file never got its name (a crash between the two renames).
            for orphan in sums {
                let _ = std::fs::remove_file(orphan);
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut lru = Lru::new();
        for (_, key, len) in found {
            lru.insert(key, len);
        }
        lru.unchecked = unchecked;
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
        match std::fs::read(self.path(&e)).ok().and_then(seal::unseal) {
            Some(data) => Some(data),
            None => {
                warn!(layer = %key.layer, offset = key.blob_offset, "dropping cached chunk that fails its seal");
                self.forget(&e);
                let _ = std::fs::remove_file(self.path(&e));
                None
            }
        }
    }

    /// Stores a chunk (blocking), evicting least recently used ones to stay under the limit.
    pub fn put(&self, key: &ChunkKey, data: &[u8]) -> io::Result<()> {
        self.put_many(&[(key.clone(), data)])
    }

    /// Stores chunks (blocking) as one durable batch: each is written to a
    /// temporary name, all reach the disk together (one `syncfs`: an fsync
    /// per small file costs about 10 ms on a virtual disk), then they are
    /// renamed and each directory fsynced once. A crash leaves each entry
    /// absent or whole, never partial under its name.
    pub fn put_many(&self, items: &[(ChunkKey, &[u8])]) -> io::Result<()> {
        // Larger than the whole cache: serve it, don't keep it.
        let items: Vec<&(ChunkKey, &[u8])> = items.iter().filter(|(_, d)| d.len() as u64 <= self.limit).collect();
        let total: u64 = items.iter().map(|(_, d)| d.len() as u64).sum();
        if items.is_empty() {
            return Ok(());
        }
        self.evict_to(self.limit.saturating_sub(total));
        let mut written: Vec<(PathBuf, PathBuf, std::fs::File)> = Vec::with_capacity(items.len());
        let mut dirs: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for (key, data) in &items {
                let path = self.path(&Entry::Chunk(key.clone()));
                let dir = path.parent().expect("cache path has a parent").to_path_buf();
                if !dirs.contains(&dir) {
                    crate::private::dir(&dir)?;
                    dirs.push(dir.clone());
                }
                let name = path.file_name().expect("cache path has a name").to_string_lossy();
                let tmp = dir.join(format!(".tmp-{name}-{:?}", std::thread::current().id()));
                let mut f = crate::private::create(&tmp)?;
                written.push((tmp, path, f.try_clone()?));
                f.write_all(data)?;
                f.write_all(&seal::sha(data))?;
            }
            // Durable before named.
            match written.as_slice() {
                [(_, _, f)] => f.sync_data()?,
                [(_, _, f), ..] => syncfs(f)?,
                [] => {}
            }
            for (tmp, path, _) in &written {
                std::fs::rename(tmp, path)?;
            }
            dirs.iter().try_for_each(|d| seal::sync_dir(d))
        })();
        if let Err(e) = result {
            for (tmp, _, _) in &written {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
        let mut lru = self.lru.lock();
        for (key, data) in items {
            lru.insert(Entry::Chunk(key.clone()), data.len() as u64);
        }
        Ok(())
    }

    /// Stores a chunk of a large file inside that file's entry; the entry
    /// becomes a whole-file entry when its last chunk is stored.
    pub fn put_in_file(&self, layer: &Digest, slot: FileSlot, data: &[u8]) -> io::Result<()> {
        self.put_in_file_hashed(layer, slot, data, seal::sha(data))
    }

    /// [`Self::put_in_file`] of a chunk whose sha256 the caller already
    /// computed (its verified chunk digest): each byte is hashed once.
    pub fn put_in_file_hashed(&self, layer: &Digest, slot: FileSlot, data: &[u8], sha: [u8; 32]) -> io::Result<()> {
        let len = data.len() as u64;
        let whole = Entry::File {
            layer: layer.clone(),
            node: slot.node,
        };
        let id = (layer.clone(), slot.node);
        let complete = |lru: &books::Lru| lru.contains(&whole) || lru.sealing.contains_key(&id);
        if slot.file_size > self.limit || complete(&self.lru.lock()) {
            return Ok(()); // never fits whole, or already complete
        }
        self.evict_to(self.limit.saturating_sub(len));
        let record = Record {
            offset: slot.file_offset,
            len,
            sha,
        };
        let partial = Entry::Partial {
            layer: layer.clone(),
            node: slot.node,
        };
        let cell = {
            let mut lru = self.lru.lock();
            match lru.partials.get(&id) {
                Some(p) if p.has(slot.chunk_index) => return Ok(()),
                Some(p) => Arc::clone(&p.files),
                None if complete(&lru) => return Ok(()),
                None => {
                    let cell = Arc::new(OnceLock::new());
                    lru.insert(partial.clone(), 0);
                    lru.partials.insert(
                        id.clone(),
                        Partial {
                            files: Arc::clone(&cell),
                            records: vec![None; slot.chunk_count as usize],
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
        let records = {
            let mut lru = self.lru.lock();
            // Evicted meanwhile (or replaced): the write went to a dropped file.
            let Some(p) = lru.partials.get_mut(&id).filter(|p| Arc::ptr_eq(&p.files, &cell)) else {
                return Ok(());
            };
            let Some(r) = p.records.get_mut(slot.chunk_index as usize).filter(|r| r.is_none()) else {
                return Ok(());
            };
            *r = Some(record);
            p.missing -= 1;
            p.bytes += len;
            let records: Option<Vec<Record>> = (p.missing == 0).then(|| p.records.iter().flatten().copied().collect());
            lru.grow(&partial, len);
            let Some(records) = records else {
                return Ok(());
            };
            // Out of the LRUs while it is renamed (nothing evicts it), still
            // served from its open files.
            lru.remove(&partial);
            lru.sealing.insert(id.clone(), Arc::clone(&cell));
            records
        };
        let whole_path = self.path(&whole);
        let finished = self.seal_file(&file, &path, &whole_path, &records);
        let mut lru = self.lru.lock();
        lru.sealing.remove(&id);
        if let Err(e) = finished {
            drop(lru);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(sums_path(&whole_path));
            return Err(e);
        }
        lru.insert(whole, slot.file_size);
        Ok(())
    }

    /// Makes a filled partial entry a whole-file entry, durably: its data and
    /// then its sums sidecar reach the disk before the entry gets its name.
    fn seal_file(&self, file: &std::fs::File, partial: &Path, whole: &Path, records: &[Record]) -> io::Result<()> {
        file.sync_data()?;
        let sums = sums_path(whole);
        let dir = whole.parent().expect("cache path has a parent");
        let tmp = dir.join(format!(".tmp-sums-{:?}", std::thread::current().id()));
        let written = crate::private::create(&tmp).and_then(|mut f| {
            f.write_all(&seal::encode(records))?;
            f.sync_data()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &sums)?;
        std::fs::rename(partial, whole)?;
        seal::sync_dir(dir)
    }

    /// A chunk stored by `put_in_file`; `None` when absent.
    pub fn get_in_file(&self, layer: &Digest, slot: FileSlot, len: u64) -> Option<Vec<u8>> {
        let whole = Entry::File {
            layer: layer.clone(),
            node: slot.node,
        };
        let held = {
            let mut lru = self.lru.lock();
            let id = (layer.clone(), slot.node);
            let partial = match lru.sealing.get(&id) {
                Some(cell) => Some(Some(Arc::clone(cell))),
                None => lru
                    .partials
                    .get(&id)
                    .map(|p| p.has(slot.chunk_index).then(|| Arc::clone(&p.files))),
            };
            match partial {
                Some(Some(cell)) => Some(cell),
                Some(None) => return None,
                None if lru.touch(&whole) => None,
                None => return None,
            }
        };
        let path = self.path(&whole);
        let (file, unchecked) = match held {
            Some(cell) => (Arc::clone(&cell.get()?.as_ref().ok()?.0), None),
            None => (
                Arc::new(std::fs::File::open(&path).ok()?),
                self.lru.lock().unchecked.get(&(layer.clone(), slot.node)).cloned(),
            ),
        };
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact_at(&mut buf, slot.file_offset).ok()?;
        // Left by an earlier run and not yet checked whole: this chunk is
        // checked against its record before its first use.
        if let Some(u) = unchecked {
            let sums = u.sums.get_or_init(|| seal::read_sums(&sums_path(&path)).ok());
            if !sums
                .as_deref()
                .is_some_and(|r| seal::chunk_matches(r, slot.file_offset, &buf))
            {
                warn!(%layer, node = slot.node, offset = slot.file_offset, path = %path.display(), "dropping cached file that fails its check");
                self.drop_unchecked(layer, slot.node, &u);
                return None;
            }
        }
        Some(buf)
    }

    /// Drops a whole-file entry left by an earlier run that failed a check,
    /// if `cell` is still its record in the books.
    fn drop_unchecked(&self, layer: &Digest, node: u32, cell: &Arc<Unchecked>) {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        let mut lru = self.lru.lock();
        if lru
            .unchecked
            .get(&(layer.clone(), node))
            .is_some_and(|c| Arc::ptr_eq(c, cell))
        {
            lru.unchecked.remove(&(layer.clone(), node));
            lru.remove(&e);
            drop(lru);
            self.delete(&e);
        }
    }

    /// The whole-file entry of `node` (counts as a use), and whether the
    /// kernel may read it directly yet.
    pub fn file(&self, layer: &Digest, node: u32) -> FileEntry {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        let mut lru = self.lru.lock();
        if !lru.touch(&e) {
            return FileEntry::Absent;
        }
        match lru.unchecked.contains_key(&(layer.clone(), node)) {
            true => FileEntry::Unchecked,
            false => FileEntry::Ready(self.path(&e)),
        }
    }

    /// True for the first caller only, per unchecked whole-file entry: who
    /// starts its background check (later opens need not queue behind it).
    pub fn claim_check(&self, layer: &Digest, node: u32) -> bool {
        let lru = self.lru.lock();
        lru.unchecked
            .get(&(layer.clone(), node))
            .is_some_and(|u| !u.claimed.swap(true, std::sync::atomic::Ordering::Relaxed))
    }

    /// Checks a whole-file entry left by an earlier run against its sums
    /// (blocking: reads the file once; concurrent callers share one check).
    /// True when the entry is there and sound; a failing one is dropped.
    pub fn check_file(&self, layer: &Digest, node: u32) -> bool {
        let e = Entry::File {
            layer: layer.clone(),
            node,
        };
        // Not in the match: its guard would live through the arms.
        let cell = self.lru.lock().unchecked.get(&(layer.clone(), node)).cloned();
        let Some(cell) = cell else {
            return self.lru.lock().contains(&e);
        };
        let path = self.path(&e);
        let sound = *cell
            .whole
            .get_or_init(|| match seal::check_file(&path, &sums_path(&path)) {
                Ok(()) => true,
                Err(error) => {
                    warn!(%layer, node, path = %path.display(), %error, "dropping cached file that fails its check");
                    false
                }
            });
        if sound {
            let mut lru = self.lru.lock();
            // Only if the entry checked is still the one in the books.
            if lru
                .unchecked
                .get(&(layer.clone(), node))
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                lru.unchecked.remove(&(layer.clone(), node));
            }
        } else {
            self.drop_unchecked(layer, node, &cell);
        }
        sound
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
        self.delete(&e);
    }

    /// Removes an entry's files (a whole-file entry's sums too).
    fn delete(&self, e: &Entry) {
        let path = self.path(e);
        let _ = std::fs::remove_file(&path);
        if let Entry::File { .. } = e {
            let _ = std::fs::remove_file(sums_path(&path));
        }
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

    /// Layers with entries in the cache.
    pub fn layers(&self) -> Vec<Digest> {
        self.lru.lock().by_layer.keys().cloned().collect()
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
            lru.unchecked.retain(|(l, _), _| l != layer);
        }
        self.forget_proven(layer);
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
            self.delete(&victim);
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
        if lru.sealing.contains_key(&(layer.clone(), slot.node)) {
            return true;
        }
        match lru.partials.get(&(layer.clone(), slot.node)) {
            Some(p) => p.has(slot.chunk_index),
            None => lru.contains(&Entry::File {
                layer: layer.clone(),
                node: slot.node,
            }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes stored for `layer`.
    pub fn layer_bytes(&self, layer: &Digest) -> u64 {
        self.lru.lock().by_layer.get(layer).copied().unwrap_or(0)
    }

    /// Bytes currently stored.
    pub fn total_bytes(&self) -> u64 {
        self.lru.lock().total
    }
}

#[cfg(test)]
mod tests;
