//! One in-memory model for every layer form: a tree of nodes with full tar
//! metadata and, per regular file, the chunks that hold its bytes in the blob.
//!
//! Sources: [`estargz`] (TOC), [`zstd_chunked`] (TOC), [`tar`] (header walk
//! over range reads, or over a local file for layers downloaded whole), [`gzip`]
//! (checkpoint index of an unmodified gzip layer).

mod builder;
pub mod estargz;
pub mod gzip;
pub mod limits;
pub mod tar;
pub mod toc;
pub mod zstd_chunked;

pub use builder::{EntryMeta, TreeBuilder};

use crate::digest::Digest;

/// Position of a node in [`LayerIndex::nodes`]; the root is 0.
pub type NodeId = u32;
/// Position of a chunk in [`LayerIndex::chunks`].
pub type ChunkId = u32;

/// Name of the opaque-directory xattr overlayfs reads.
pub const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// A time from input whose nanoseconds may be out of range (a leap
    /// second, or a hostile field): the excess carries into the seconds.
    pub fn normalized(secs: i64, nanos: u64) -> Option<Self> {
        let secs = secs.checked_add(i64::try_from(nanos / 1_000_000_000).ok()?)?;
        Some(Self {
            secs,
            nanos: (nanos % 1_000_000_000) as u32,
        })
    }
}

/// What a node is; type-specific data lives here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
}

/// One inode of the layer.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub nlink: u32,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Directory entries sorted by name (directories only).
    pub children: Vec<(Box<[u8]>, NodeId)>,
    /// Chunks of a regular file, in file order: `chunks[first..first+count]`.
    pub first_chunk: ChunkId,
    pub chunk_count: u32,
}

/// How a chunk's bytes are stored in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Gzip,
    Zstd,
    /// A piece of span N of a gzip checkpoint index ([`LayerIndex::spans`]).
    Span(u32),
}

/// A piece of one file: `len` bytes at `file_offset`, stored at
/// `blob_offset..blob_offset+blob_len` of the blob, decoding to a stream in
/// which they start at `inner_offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub file_offset: u64,
    pub len: u64,
    pub blob_offset: u64,
    pub blob_len: u64,
    pub inner_offset: u64,
    pub encoding: Encoding,
    /// sha256 of the decoded chunk; `None` where the format has none.
    pub digest: Option<Digest>,
    /// Set on a piece of a chunk too large to decode at once: `digest` is the
    /// whole chunk's.
    pub whole: Option<Whole>,
}

/// The chunk a piece belongs to: its decoded bytes start at inner offset
/// `start` and run `len` bytes; the chunk digest covers exactly those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Whole {
    pub start: u64,
    pub len: u64,
}

/// The index of one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    pub nodes: Vec<Node>,
    pub chunks: Vec<Chunk>,
    /// Spans of a gzip layer served through a checkpoint index.
    pub spans: Option<std::sync::Arc<gzip::Spans>>,
    /// Files the layer marks as read at start-up (eStargz landmark), in layer order.
    pub prefetch: Vec<NodeId>,
}

impl LayerIndex {
    /// A path of file `node` in the layer, for messages (a search of the
    /// tree: only failed reads ask).
    pub fn path_of(&self, node: NodeId) -> String {
        let mut stack: Vec<(NodeId, String)> = vec![(0, String::new())];
        while let Some((dir, path)) = stack.pop() {
            for (name, child) in self.node(dir).map_or(&[][..], |n| &n.children[..]) {
                let p = format!("{path}/{}", String::from_utf8_lossy(name));
                if *child == node {
                    return p;
                }
                if self.node(*child).is_some_and(|n| n.kind == Kind::Dir) && *child != dir {
                    stack.push((*child, p));
                }
            }
        }
        format!("<node {node}>")
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    /// Looks a name up in a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        let node = self.node(dir)?;
        node.children
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
            .map(|i| node.children[i].1)
    }

    /// The chunks of a file.
    pub fn file_chunks(&self, id: NodeId) -> &[Chunk] {
        match self.node(id) {
            Some(n) => {
                let start = n.first_chunk as usize;
                &self.chunks[start..start + n.chunk_count as usize]
            }
            None => &[],
        }
    }

    /// Ids of the chunks of `file` overlapping `[offset, offset+len)`.
    pub fn chunks_for_range(&self, file: NodeId, offset: u64, len: u64) -> std::ops::Range<ChunkId> {
        let Some(n) = self.node(file) else {
            return 0..0;
        };
        let chunks = self.file_chunks(file);
        let end = offset.saturating_add(len).min(n.size);
        if offset >= end {
            return 0..0;
        }
        let first = chunks.partition_point(|c| c.file_offset + c.len <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        n.first_chunk + first as u32..n.first_chunk + last as u32
    }

    /// Looks a slash-separated path up from the root.
    pub fn resolve(&self, path: &str) -> Option<NodeId> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(0, |dir, name| self.lookup(dir, name.as_bytes()))
    }

    /// The regular file holding chunk `id` (files own contiguous chunk ranges,
    /// in node order).
    pub fn node_of_chunk(&self, id: ChunkId) -> Option<NodeId> {
        let i = self.nodes.partition_point(|n| n.first_chunk <= id).checked_sub(1)?;
        let n = &self.nodes[i];
        (id < n.first_chunk + n.chunk_count).then_some(i as NodeId)
    }

    /// Total decoded bytes of all files.
    pub fn content_bytes(&self) -> u64 {
        // Saturating: the sizes come from the image.
        self.chunks.iter().fold(0u64, |sum, c| sum.saturating_add(c.len))
    }
}

/// Runs the CPU part of indexing `layer` (TOC inflate, JSON, tree building)
/// on the blocking pool, so it does not stall the async worker serving gRPC.
async fn blocking<T: Send + 'static>(
    layer: &Digest,
    work: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, IndexError> {
    tokio::task::spawn_blocking(|| {
        let built = work();
        crate::alloc::trim();
        built
    })
    .await
    .map_err(|source| IndexError::Task {
        layer: layer.clone(),
        source,
    })?
}

/// A layer whose index cannot be built; names the layer and the entry.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        layer: Digest,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: Digest, reason: String },
    #[error("layer {layer}: gzip index {}: {source}", path.display())]
    GzipIndex {
        layer: Digest,
        path: std::path::PathBuf,
        #[source]
        source: gzip::OpenError,
    },
    #[error("layer {layer}: at compressed offset {offset}: {source}")]
    Inflate {
        layer: Digest,
        offset: u64,
        #[source]
        source: gzip::InflateError,
    },
    #[error("layer {layer}: TOC at offset {offset}: {source}")]
    Toc {
        layer: Digest,
        offset: u64,
        #[source]
        source: estargz::TocError,
    },
    #[error("layer {layer}: tar header at offset {offset}: {source}")]
    TarHeader {
        layer: Digest,
        offset: u64,
        #[source]
        source: tar::ChecksumError,
    },
    #[error("layer {layer}: indexing task failed: {source}")]
    Task {
        layer: Digest,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("layer {layer}: fetching {what}: {source}")]
    Fetch {
        layer: Digest,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl IndexError {
    /// The layer as a whole is malformed.
    pub fn layer(layer: &Digest, reason: impl Into<String>) -> Self {
        Self::Layer {
            layer: layer.clone(),
            reason: reason.into(),
        }
    }

    /// Reading `what` of the layer failed.
    pub fn fetch(layer: &Digest, what: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Fetch {
            layer: layer.clone(),
            what: what.into(),
            source: Box::new(e),
        }
    }
}
