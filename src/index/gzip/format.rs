//! The gzip index file, version 1 (described in `docs/gzip-index.md`):
//!
//! ```text
//! magic "SSGZIDX\n" | version u32 LE | meta length u32 LE | meta | windows
//! ```
//! `meta` is a zstd frame holding [`IndexMeta`] in postcard's documented
//! wire format; `windows` is one zstd frame per checkpoint window, located by
//! the checkpoint's `window_at` (from the start of `windows`) and `window_zlen`.

use super::{inflate::WINDOW, Layout, MAX_SPAN_OUTPUT};
use crate::digest::Digest;
use crate::index::limits;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;

pub const MAGIC: &[u8; 8] = b"SSGZIDX\n";
pub const VERSION: u32 = 1;
/// Largest meta section we accept, compressed and inflated (entry tables of
/// huge layers fit easily); the inflated cap is enforced while inflating.
const MAX_META: u32 = 64 << 20;
const MAX_META_INFLATED: u64 = 128 << 20;
/// Largest compressed window: a 32 KiB window never compresses to more.
const MAX_WINDOW_ZLEN: u32 = 64 << 10;

/// An index file that cannot be written, read, or trusted for a layer.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("encoding index: {0}")]
    Encode(#[source] postcard::Error),
    #[error("compressing index: {0}")]
    Compress(#[source] std::io::Error),
    #[error("reading header: {0}")]
    ReadHeader(#[source] std::io::Error),
    #[error("not a streamsnap gzip index (bad magic)")]
    BadMagic,
    #[error("format version {0}, this build reads {VERSION}")]
    Version(u32),
    #[error("meta section of {0} bytes is over the limit")]
    MetaTooLarge(u32),
    #[error("reading meta: {0}")]
    ReadMeta(#[source] std::io::Error),
    #[error("meta section: {0}")]
    DecompressMeta(#[source] std::io::Error),
    #[error("meta section inflates past {MAX_META_INFLATED} bytes")]
    MetaInflatesTooFar,
    #[error("meta section: {0}")]
    DecodeMeta(#[source] postcard::Error),
    #[error("built for layer {0}, not this one")]
    OtherLayer(String),
    #[error("built for a blob of {built} bytes, the layer has {actual}")]
    BlobSize { built: u64, actual: u64 },
    #[error("deflate end {0} past the blob end")]
    DeflateEnd(u64),
    #[error("no checkpoints")]
    NoCheckpoints,
    #[error("first checkpoint does not start the output")]
    FirstCheckpoint,
    #[error(
        "checkpoint {index} (blob offset {blob_offset}, bit {bits}, output {out_offset}) \
         is inconsistent with its neighbours"
    )]
    Checkpoint {
        index: usize,
        blob_offset: u64,
        bits: u8,
        out_offset: u64,
    },
    #[error(
        "an index of an uncompressed layer must have equal blob, tar and data sizes and checkpoints without windows"
    )]
    NotStored,
    #[error("entry {entry:?}: mtime nanoseconds {nanos} are not under a second")]
    Nanoseconds { entry: String, nanos: u32 },
    #[error("entry {entry:?}: data {offset}+{size} lies outside the tar stream ({tar_size} bytes)")]
    EntryOutside {
        entry: String,
        offset: u64,
        size: u64,
        tar_size: u64,
    },
}

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
    #[serde(deserialize_with = "limits::bounded_entries")]
    pub checkpoints: Vec<Checkpoint>,
    /// Tar entries in archive order.
    #[serde(deserialize_with = "limits::bounded_entries")]
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
pub fn write(meta: &IndexMeta, windows: &[Vec<u8>]) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(meta).map_err(FormatError::Encode)?;
    let packed = zstd::bulk::compress(&payload, 3).map_err(FormatError::Compress)?;
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
pub fn read(file: &std::fs::File) -> Result<(IndexMeta, u64), FormatError> {
    let mut head = [0u8; 16];
    file.read_exact_at(&mut head, 0).map_err(FormatError::ReadHeader)?;
    if &head[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    let len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
    if len > MAX_META {
        return Err(FormatError::MetaTooLarge(len));
    }
    let mut packed = vec![0u8; len as usize];
    file.read_exact_at(&mut packed, 16).map_err(FormatError::ReadMeta)?;
    Ok((decode_meta(&packed)?, 16 + len as u64))
}

/// Inflates and decodes the meta section, refusing it once it inflates past
/// its cap (a zstd bomb is never held). Public for the fuzz targets.
pub fn decode_meta(packed: &[u8]) -> Result<IndexMeta, FormatError> {
    let decoder = zstd::stream::read::Decoder::new(packed).map_err(FormatError::DecompressMeta)?;
    let payload = limits::read_capped(decoder, MAX_META_INFLATED)
        .map_err(|e| e.map_or(FormatError::MetaInflatesTooFar, FormatError::DecompressMeta))?;
    postcard::from_bytes(&payload).map_err(FormatError::DecodeMeta)
}

/// Checks an index against the layer it is meant for, and for internal
/// consistency, before anything is served from it. (This binds nothing: a
/// forger can write any of it. What makes an index trustworthy is where it
/// came from; see `layer::gzip_index`.)
pub fn validate(meta: &IndexMeta, layer: &Digest, blob_size: u64, layout: Layout) -> Result<(), FormatError> {
    if meta.layer != layer.to_string() {
        return Err(FormatError::OtherLayer(meta.layer.clone()));
    }
    if meta.compressed_size != blob_size {
        return Err(FormatError::BlobSize {
            built: meta.compressed_size,
            actual: blob_size,
        });
    }
    if meta.deflate_end > blob_size {
        return Err(FormatError::DeflateEnd(meta.deflate_end));
    }
    let stored = layout == Layout::Stored;
    if stored && (meta.uncompressed_size != blob_size || meta.deflate_end != blob_size) {
        return Err(FormatError::NotStored);
    }
    let Some(first) = meta.checkpoints.first() else {
        return Err(FormatError::NoCheckpoints);
    };
    if first.out_offset != 0 {
        return Err(FormatError::FirstCheckpoint);
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
            && match layout {
                Layout::Deflate => cp.window_len as u64 == cp.out_offset.min(WINDOW as u64),
                Layout::Stored => cp.window_len == 0 && cp.bits == 0 && cp.blob_offset == cp.out_offset,
            }
            && cp.window_zlen <= MAX_WINDOW_ZLEN
            && cp.window_at.checked_add(cp.window_zlen.into()).is_some();
        if !ok {
            return Err(FormatError::Checkpoint {
                index: i,
                blob_offset: cp.blob_offset,
                bits: cp.bits,
                out_offset: cp.out_offset,
            });
        }
    }
    for e in &meta.entries {
        let has_data = matches!(e.kind, EntryKind::File);
        let end = e.data_offset.checked_add(if has_data { e.size } else { 0 });
        if e.mtime_nanos >= 1_000_000_000 {
            return Err(FormatError::Nanoseconds {
                entry: String::from_utf8_lossy(&e.path).into_owned(),
                nanos: e.mtime_nanos,
            });
        }
        if end.is_none_or(|end| end > meta.uncompressed_size) || (!has_data && e.size != 0) {
            return Err(FormatError::EntryOutside {
                entry: String::from_utf8_lossy(&e.path).into_owned(),
                offset: e.data_offset,
                size: e.size,
                tar_size: meta.uncompressed_size,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_meta_section_inflating_to_1_gib_is_refused_while_inflating() {
        // 1 GiB of zeros as 1024 frames of 1 MiB (frames decode as one stream).
        let frame = zstd::encode_all(std::io::repeat(0).take(1 << 20), 1).unwrap();
        let bomb = frame.repeat(1024);
        assert!(matches!(decode_meta(&bomb), Err(FormatError::MetaInflatesTooFar)));
    }
}
