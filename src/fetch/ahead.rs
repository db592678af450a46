//! Fetching ahead of readers, at read-ahead priority: the following chunks
//! of a file read sequentially, and the small files that follow a small file
//! read cold. Start-up reads many small files in tar order (a package's
//! modules one after another), and each would otherwise be a round trip of
//! its own.

use super::*;

/// Default of how far ahead of a sequential reader chunks are fetched
/// ([`Services::read_ahead`], `[fetch] read_ahead`). Four 4 MiB requests read
/// 9% faster than one on a fast link and 1.7% at 1 Gbit/s; each costs about
/// 5-6.5 MB of the daemon's peak memory, so a node short of memory sets 4 MiB
/// (start-up benchmark, README's ninth round).
pub const READ_AHEAD: u64 = 16 << 20;
/// Blob bytes after a cold small file fetched with it: about what 1 Gbit/s
/// carries while a request starts (5-8 ms), a package directory's modules.
/// 256 KiB left start-up waiting on more round trips (start-up benchmark:
/// `ready` 1.50 s, against 1.25 s with 1 MiB, for 3 MB more).
pub(super) const NEIGHBOURS: u64 = 1 << 20;
/// Files under this size count as small (source files, bytecode, configs;
/// a large module's bytecode is over 64 KiB).
pub(super) const SMALL_FILE: u64 = 256 << 10;
/// Chunks looked at past the read at most (an index of empty files costs no bytes).
const NEIGHBOUR_CHUNKS: usize = 1024;

impl Fetcher {
    /// A reader that continues where its last read ended gets the following
    /// chunks (up to `Services::read_ahead` bytes) fetched in the background, so a
    /// sequential scan of a large file keeps several requests in flight.
    pub(super) fn read_ahead(self: &Arc<Self>, node: NodeId, ids: Range<ChunkId>) {
        let Some(n) = self.index.node(node) else { return };
        let file_end = n.first_chunk + n.chunk_count;
        let ahead = {
            let mut seq = self.sequential.lock();
            // A first read is not yet a pattern: partial reads of big files stay cheap.
            let (sequential, asked) = match seq.get(&node) {
                Some(&(last, asked)) => (ids.start == last || ids.start == last + 1, asked),
                None => (false, 0),
            };
            let mut end = ids.end;
            let mut bytes = 0;
            while sequential && end < file_end && bytes < self.node.read_ahead {
                bytes += self.index.chunks[end as usize].len;
                end += 1;
            }
            let from = ids.end.max(asked);
            seq.insert(node, (ids.end - 1, end.max(asked)));
            if seq.len() > 4096 {
                seq.clear(); // bounded: forgetting only costs read-ahead
            }
            from..end
        };
        if !ahead.is_empty() {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let _ = this.chunks(Some(node), ahead, Cause::ReadAhead).await;
            });
        }
    }

    /// Does chunk `id` belong to a small file?
    pub(super) fn of_small_file(&self, id: ChunkId) -> bool {
        self.index
            .node_of_chunk(id)
            .and_then(|n| self.index.node(n))
            .is_some_and(|n| n.size < SMALL_FILE)
    }

    /// A cold read from the start of a small file also fetches the small
    /// files after it in the blob (up to [`NEIGHBOURS`] bytes; not cached ones
    /// only; never past a larger file, never in a gzip-indexed layer, whose
    /// spans hold many files anyway), in a request of their own.
    pub(super) fn neighbours(self: &Arc<Self>, node: NodeId, ids: Range<ChunkId>) {
        let small = self.index.node(node).is_some_and(|n| n.size < SMALL_FILE);
        if !small || ids.is_empty() || self.index.spans.is_some() || self.is_cached(ids.start) {
            return;
        }
        let chunks = &self.index.chunks;
        let last = &chunks[ids.end as usize - 1];
        let mut at = last.blob_offset + last.blob_len;
        let limit = at.saturating_add(NEIGHBOURS);
        let mut next = Vec::new();
        for id in (ids.end..chunks.len() as ChunkId).take(NEIGHBOUR_CHUNKS) {
            let c = &chunks[id as usize];
            // Blob order only, and only small files: a neighbour costs bytes, not a wait.
            if c.blob_offset < at || c.blob_offset.saturating_add(c.blob_len) > limit || !self.of_small_file(id) {
                break;
            }
            at = c.blob_offset + c.blob_len;
            if !self.is_cached(id) {
                next.push(id);
            }
        }
        if !next.is_empty() {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                let _ = this.chunks(None, next, Cause::ReadAhead).await;
            });
        }
    }
}
