//! The gzip index file, version 1 (described in `docs/gzip-index.md`):
//!
//! ```text
//! magic "SSGZIDX\n" | version u32 LE | meta length u32 LE | meta | windows
//! ```
//! `meta` is a zstd frame holding [`IndexMeta`] in postcard's documented
//! wire format; `windows` is one zstd frame per checkpoint window, located by
//! the checkpoint's `window_at` (from the start of `windows`) and `window_zlen`.

use super::{inflate::WINDOW, MAX_SPAN_OUTPUT};
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;

pub const MAGIC: &[u8; 8] = b"SSGZIDX\n";
pub const VERSION: u32 = 1;
/// Largest meta section we accept (entry tables of huge layers fit easily).
const MAX_META: u32 = 256 << 20;

/// Everything but the windows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexMeta {
    /// The layer this index was built from (`sha256:<hex>`).
    pub layer: String,
    /// Size of the compressed layer blob.
    pub compressed_size: u64,
    /// Size of the tar stream inside.
    pub uncompressed_size: u64,
    /// Blob offset just past the deflate data (the gzip trailer follows).
    pub deflate_end: u64,
    /// Output bytes between checkpoints the builder aimed for.
    pub span_size: u64,
    pub checkpoints: Vec<Checkpoint>,
    /// Tar entries in archive order.
    pub entries: Vec<IndexEntry>,
}

/// Where inflating can start: deflate block boundary `bits` bits before the
/// end of blob byte `blob_offset - 1` (or exactly at `blob_offset` when `bits`
/// is 0), producing output from `out_offset` on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub blob_offset: u64,
    pub bits: u8,
    pub out_offset: u64,
    /// sha256 of the output from here to the next checkpoint (or the end).
    pub span_digest: [u8; 32],
    /// The window: the `window_len` output bytes before `out_offset`.
    pub window_at: u64,
    pub window_zlen: u32,
    pub window_len: u32,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum EntryKind {
    File,
    HardLink,
    Symlink,
    Dir,
    CharDev,
    BlockDev,
    Fifo,
}

/// One tar entry: its metadata and where its data starts in the tar stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Symlink or hard-link target.
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub data_offset: u64,
}

/// Serialises an index: `windows[i]` is checkpoint i's zstd-compressed window
/// (the checkpoints' `window_at`/`window_zlen` must already describe them).
pub fn write(meta: &IndexMeta, windows: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let payload = postcard::to_stdvec(meta).map_err(|e| format!("encoding index: {e}"))?;
    let packed = zstd::bulk::compress(&payload, 3).map_err(|e| format!("compressing index: {e}"))?;
    let mut out = Vec::with_capacity(16 + packed.len() + windows.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
    out.extend_from_slice(&packed);
    for w in windows {
        out.extend_from_slice(w);
    }
    Ok(out)
}

/// Reads the header and meta; returns them with the file offset of the windows.
pub fn read(file: &std::fs::File) -> Result<(IndexMeta, u64), String> {
    let mut head = [0u8; 16];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| format!("reading header: {e}"))?;
    if &head[..8] != MAGIC {
        return Err("not a streamsnap gzip index (bad magic)".into());
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("format version {version}, this build reads {VERSION}"));
    }
    let len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    if len > MAX_META {
        return Err(format!("meta section of {len} bytes is over the limit"));
    }
    let mut packed = vec![0u8; len as usize];
    file.read_exact_at(&mut packed, 16)
        .map_err(|e| format!("reading meta: {e}"))?;
    let payload = zstd::bulk::decompress(&packed, 1 << 30).map_err(|e| format!("meta section: {e}"))?;
    let meta: IndexMeta = postcard::from_bytes(&payload).map_err(|e| format!("meta section: {e}"))?;
    Ok((meta, 16 + len as u64))
}

/// Checks an index against the layer it is meant for, and for internal
/// consistency, before anything is served from it.
pub fn validate(meta: &IndexMeta, layer: &Digest, blob_size: u64) -> Result<(), String> {
    if meta.layer != layer.to_string() {
        return Err(format!("built for layer {}, not this one", meta.layer));
    }
    if meta.compressed_size != blob_size {
        return Err(format!(
            "built for a blob of {} bytes, the layer has {blob_size}",
            meta.compressed_size
        ));
    }
    if meta.deflate_end > blob_size {
        return Err(format!("deflate end {} past the blob end", meta.deflate_end));
    }
    let Some(first) = meta.checkpoints.first() else {
        return Err("no checkpoints".into());
    };
    if first.out_offset != 0 {
        return Err("first checkpoint does not start the output".into());
    }
    for (i, cp) in meta.checkpoints.iter().enumerate() {
        let (end, out_end) = match meta.checkpoints.get(i + 1) {
            Some(n) => (n.blob_offset, n.out_offset),
            None => (meta.deflate_end, meta.uncompressed_size),
        };
        let start = cp.blob_offset.checked_sub((cp.bits > 0) as u64);
        let ok = cp.bits <= 7
            && start.is_some_and(|s| s < end)
            && cp.out_offset < out_end
            && out_end - cp.out_offset <= MAX_SPAN_OUTPUT
            && cp.window_len as u64 == cp.out_offset.min(WINDOW as u64);
        if !ok {
            return Err(format!(
                "checkpoint {i} (blob offset {}, bit {}, output {}) is inconsistent with its neighbours",
                cp.blob_offset, cp.bits, cp.out_offset
            ));
        }
    }
    for e in &meta.entries {
        let has_data = matches!(e.kind, EntryKind::File);
        let end = e.data_offset.checked_add(if has_data { e.size } else { 0 });
        if end.is_none_or(|end| end > meta.uncompressed_size) || (!has_data && e.size != 0) {
            return Err(format!(
                "entry {:?}: data {}+{} lies outside the tar stream ({} bytes)",
                String::from_utf8_lossy(&e.path),
                e.data_offset,
                e.size,
                meta.uncompressed_size
            ));
        }
    }
    Ok(())
}
