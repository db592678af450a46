//! Random access into unmodified gzip layers through a checkpoint index, built
//! once by one pass over the layer ([`build`]): the tar entry table plus, every
//! few MiB of output, an inflate checkpoint (compressed offset, bit offset,
//! 32 KiB window). Any file's bytes then decode from the nearest checkpoint.
//! The bytes between two checkpoints (a *span*) are fetched with one range
//! request and checked against the sha256 of their output recorded at
//! indexing, which also catches a wrong window, offset or layer.
//!
//! The file format is [`format`]; `docs/gzip-index.md` describes it.

mod build;
pub mod format;
pub mod inflate;
mod stored;

pub use build::{build, build_into};
pub use format::{Checkpoint, EntryKind, FormatError, IndexEntry, IndexMeta};
pub use inflate::InflateError;
pub use stored::build_stored;

use super::{Chunk, Encoding, EntryMeta, IndexError, Kind, LayerIndex, Timestamp, TreeBuilder};
use crate::digest::Digest;
use bytes::Bytes;
use sha2::Digest as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Output bytes between checkpoints when not told otherwise.
pub const DEFAULT_SPAN: u64 = 4 << 20;
/// Most output one span may claim: bounds what one read decodes.
pub const MAX_SPAN_OUTPUT: u64 = 64 << 20;

/// How a layer's bytes relate to the tar stream an index describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A gzip layer: spans inflate from their checkpoints.
    Deflate,
    /// An uncompressed tar layer: spans are the blob's own bytes (no windows),
    /// each still checked against its recorded digest.
    Stored,
}

/// A stored index file that cannot be opened for a layer.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening: {0}")]
    Open(#[source] std::io::Error),
    #[error("reading its size: {0}")]
    Metadata(#[source] std::io::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("window of checkpoint {0} lies past the end of the file")]
    WindowPastEnd(usize),
}

/// A span whose fetched bytes do not inflate to what the index recorded.
#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    #[error("no span {0}")]
    NoSpan(u32),
    #[error("span {span}: {got} bytes where the index says {expected}")]
    Length { span: u32, got: usize, expected: u64 },
    #[error("span {span}: reading window from the index file: {source}")]
    ReadWindow {
        span: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("span {span}: window: {source}")]
    DecompressWindow {
        span: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("span {span}: window holds {got} bytes, the index says {expected}")]
    WindowLength { span: u32, got: usize, expected: u32 },
    #[error("span {span} at blob offset {blob_offset}: {source}")]
    Inflate {
        span: u32,
        blob_offset: u64,
        #[source]
        source: InflateError,
    },
    #[error("span {span} at blob offset {blob_offset} ends after {done} of {expected} bytes")]
    Short {
        span: u32,
        blob_offset: u64,
        done: usize,
        expected: u64,
    },
    #[error(
        "span {span} at blob offset {blob_offset} does not match the digest recorded at indexing \
         (the index does not belong to this layer, or its window is wrong)"
    )]
    DigestMismatch { span: u32, blob_offset: u64 },
}

/// One span: `blob_offset..blob_offset+blob_len` of the layer inflates, from
/// its checkpoint, to `out_len` bytes hashing to `digest`.
#[derive(Clone, Debug)]
pub struct Span {
    pub blob_offset: u64,
    pub blob_len: u64,
    pub bits: u8,
    pub out_offset: u64,
    pub out_len: u64,
    pub digest: [u8; 32],
    window_at: u64,
    window_zlen: u32,
    window_len: u32,
}

/// The spans of one layer and the index file their windows are read from.
pub struct Spans {
    spans: Vec<Span>,
    file: Arc<std::fs::File>,
    layout: Layout,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spans").field("spans", &self.spans.len()).finish()
    }
}

impl Spans {
    pub fn get(&self, id: u32) -> Option<&Span> {
        self.spans.get(id as usize)
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Inflates span `id` from its fetched bytes and checks the output
    /// against its digest. Blocking: reads the window from the index file.
    pub fn decode(&self, id: u32, raw: &[u8]) -> Result<Bytes, SpanError> {
        let s = self.get(id).ok_or(SpanError::NoSpan(id))?;
        if raw.len() as u64 != s.blob_len {
            return Err(SpanError::Length {
                span: id,
                got: raw.len(),
                expected: s.blob_len,
            });
        }
        if self.layout == Layout::Stored {
            let mut out = crate::buf::aligned_buffer(raw.len());
            out.copy_from_slice(raw);
            return self.checked(id, s, out.freeze());
        }
        let window = self.window(id, s)?;
        let inflate = |source| SpanError::Inflate {
            span: id,
            blob_offset: s.blob_offset,
            source,
        };
        let mut inf = inflate::Inflater::raw().map_err(inflate)?;
        let mut input = raw;
        if s.bits > 0 {
            inf.prime(s.bits, input[0]).map_err(inflate)?;
            input = &input[1..];
        }
        inf.set_window(&window).map_err(inflate)?;
        // Page-aligned output, so the disk cache can write its pieces with O_DIRECT.
        let mut out = crate::buf::aligned_buffer(s.out_len as usize);
        let mut done = 0;
        while done < out.len() {
            let step = inf.step(input, &mut out[done..], false).map_err(inflate)?;
            input = &input[step.consumed..];
            done += step.produced;
            if step.produced == 0 && (step.end || input.is_empty() || step.consumed == 0) {
                return Err(SpanError::Short {
                    span: id,
                    blob_offset: s.blob_offset,
                    done,
                    expected: s.out_len,
                });
            }
        }
        self.checked(id, s, out.freeze())
    }

    /// The span's output, if it hashes to the digest recorded at indexing.
    fn checked(&self, id: u32, s: &Span, out: Bytes) -> Result<Bytes, SpanError> {
        if <[u8; 32]>::from(sha2::Sha256::digest(&out)) != s.digest {
            return Err(SpanError::DigestMismatch {
                span: id,
                blob_offset: s.blob_offset,
            });
        }
        Ok(out)
    }

    fn window(&self, id: u32, s: &Span) -> Result<Vec<u8>, SpanError> {
        if s.window_len == 0 {
            return Ok(Vec::new());
        }
        let mut z = vec![0u8; s.window_zlen as usize];
        self.file
            .read_exact_at(&mut z, s.window_at)
            .map_err(|source| SpanError::ReadWindow { span: id, source })?;
        let w = zstd::bulk::decompress(&z, s.window_len as usize)
            .map_err(|source| SpanError::DecompressWindow { span: id, source })?;
        if w.len() != s.window_len as usize {
            return Err(SpanError::WindowLength {
                span: id,
                got: w.len(),
                expected: s.window_len,
            });
        }
        Ok(w)
    }
}

/// Opens a stored index for `layer` (of `blob_size` bytes, laid out as
/// `layout` says) and turns it into the layer's [`LayerIndex`]: tree from the
/// entry table, file chunks as pieces of spans. Everything is checked against
/// the layer first.
pub fn open(path: &Path, layer: &Digest, blob_size: u64, layout: Layout) -> Result<LayerIndex, IndexError> {
    let bad = |e: OpenError| IndexError::GzipIndex {
        layer: layer.clone(),
        path: path.to_path_buf(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(OpenError::Open(e)))?;
    let (meta, windows_base) = format::read(&file).map_err(|e| bad(e.into()))?;
    format::validate(&meta, layer, blob_size, layout).map_err(|e| bad(e.into()))?;
    let file_len = file.metadata().map_err(|e| bad(OpenError::Metadata(e)))?.len();
    let mut spans = Vec::with_capacity(meta.checkpoints.len());
    for (i, cp) in meta.checkpoints.iter().enumerate() {
        let start = cp.blob_offset - (cp.bits > 0) as u64;
        let (end, out_end) = match meta.checkpoints.get(i + 1) {
            Some(next) => (next.blob_offset, next.out_offset),
            None => (meta.deflate_end, meta.uncompressed_size),
        };
        let window_at = windows_base
            .checked_add(cp.window_at)
            .filter(|at| at.checked_add(cp.window_zlen.into()).is_some_and(|end| end <= file_len))
            .ok_or_else(|| bad(OpenError::WindowPastEnd(i)))?;
        spans.push(Span {
            blob_offset: start,
            blob_len: end - start,
            bits: cp.bits,
            out_offset: cp.out_offset,
            out_len: out_end - cp.out_offset,
            digest: cp.span_digest,
            window_at,
            window_zlen: cp.window_zlen,
            window_len: cp.window_len,
        });
    }
    let mut builder = TreeBuilder::new(layer.clone());
    for e in &meta.entries {
        let entry_meta = EntryMeta {
            kind: e.kind(),
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: Timestamp {
                secs: e.mtime_secs,
                nanos: e.mtime_nanos,
            },
            xattrs: e.xattrs.clone(),
            chunks: span_chunks(&spans, e.data_offset, e.size),
        };
        match e.kind {
            EntryKind::HardLink => builder.add_hardlink(&e.path, &e.link, entry_meta)?,
            _ => builder.add(&e.path, entry_meta)?,
        }
    }
    let mut index = builder.finish(blob_size)?;
    index.spans = Some(Arc::new(Spans {
        spans,
        file: Arc::new(file),
        layout,
    }));
    Ok(index)
}

/// Splits the output range `[at, at+len)` into one chunk per span it touches.
fn span_chunks(spans: &[Span], at: u64, len: u64) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut pos = at;
    let end = at + len;
    let mut i = spans.partition_point(|s| s.out_offset + s.out_len <= pos);
    while pos < end && i < spans.len() {
        let s = &spans[i];
        let to = end.min(s.out_offset + s.out_len);
        chunks.push(Chunk {
            file_offset: pos - at,
            len: to - pos,
            blob_offset: s.blob_offset,
            blob_len: s.blob_len,
            inner_offset: pos - s.out_offset,
            encoding: Encoding::Span(i as u32),
            digest: None,
            whole: None,
        });
        pos = to;
        i += 1;
    }
    chunks
}

impl IndexEntry {
    fn kind(&self) -> Kind {
        match self.kind {
            EntryKind::File | EntryKind::HardLink => Kind::File,
            EntryKind::Dir => Kind::Dir,
            EntryKind::Symlink => Kind::Symlink(self.link.clone()),
            EntryKind::CharDev => Kind::CharDev {
                major: self.dev_major,
                minor: self.dev_minor,
            },
            EntryKind::BlockDev => Kind::BlockDev {
                major: self.dev_major,
                minor: self.dev_minor,
            },
            EntryKind::Fifo => Kind::Fifo,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;

    /// A tar holding `files` (path, content): regular files, mode 0644.
    pub(super) fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A gzip tar holding `files` (path, content), and its layer digest.
    fn layer(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, Digest) {
        let tar = tar_of(files);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&tar).unwrap();
        let gz = e.finish().unwrap();
        let d = Digest::of(&gz);
        (gz, d)
    }

    fn sample() -> Vec<(&'static str, Vec<u8>)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let random: Vec<u8> = (0..700_000).map(|_| rng.gen()).collect();
        let text: Vec<u8> = (0..900_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        vec![
            ("etc/small", b"hello".to_vec()),
            ("weights/random.bin", random),
            ("lib/text.txt", text),
            ("etc/last", b"bye".to_vec()),
        ]
    }

    fn stored(gz: &[u8], d: &Digest, span: u64) -> (tempfile::NamedTempFile, IndexMeta) {
        let (meta, windows) = build(d, span, gz).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        (f, meta)
    }

    /// File bytes as the fetcher would produce them: decode spans, slice.
    fn read_file(index: &LayerIndex, gz: &[u8], path: &str) -> Vec<u8> {
        let spans = index.spans.as_ref().unwrap();
        let node = index.resolve(path).unwrap();
        let mut out = Vec::new();
        for c in index.file_chunks(node) {
            let Encoding::Span(s) = c.encoding else {
                panic!("not a span chunk")
            };
            let raw = &gz[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
            let span = spans.decode(s, raw).unwrap();
            out.extend_from_slice(&span[c.inner_offset as usize..(c.inner_offset + c.len) as usize]);
        }
        out
    }

    #[test]
    fn every_file_decodes_from_its_nearest_checkpoints() {
        let files = sample();
        let (gz, d) = layer(&files);
        let (f, meta) = stored(&gz, &d, 64 << 10);
        assert!(meta.checkpoints.len() > 10, "{} checkpoints", meta.checkpoints.len());
        assert!(
            meta.checkpoints.iter().any(|c| c.bits != 0),
            "some checkpoint sits inside a byte"
        );
        let index = open(f.path(), &d, gz.len() as u64, Layout::Deflate).unwrap();
        for (path, data) in &files {
            assert!(read_file(&index, &gz, path) == *data, "{path} differs");
        }
    }

    #[test]
    fn an_index_of_another_layer_is_rejected() {
        let (gz, d) = layer(&sample());
        let (f, _) = stored(&gz, &d, 1 << 20);
        let other = Digest::of(b"another layer");
        let e = open(f.path(), &other, gz.len() as u64, Layout::Deflate)
            .unwrap_err()
            .to_string();
        assert!(e.contains("built for layer"), "{e}");
    }

    #[test]
    fn a_wrong_window_fails_span_verification() {
        let (gz, d) = layer(&sample());
        let (mut meta, _) = build(&d, 64 << 10, &gz[..]).unwrap();
        // Well-formed windows of the right sizes, but zeros.
        let mut windows = Vec::new();
        let mut at = 0;
        for cp in &mut meta.checkpoints {
            let z = zstd::bulk::compress(&vec![0u8; cp.window_len as usize], 3).unwrap();
            (cp.window_at, cp.window_zlen) = (at, z.len() as u32);
            at += z.len() as u64;
            windows.push(z);
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        let index = open(f.path(), &d, gz.len() as u64, Layout::Deflate).unwrap();
        let spans = index.spans.as_ref().unwrap();
        let node = index.resolve("lib/text.txt").unwrap();
        let c = &index.file_chunks(node)[1];
        let Encoding::Span(s) = c.encoding else { panic!() };
        let raw = &gz[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize];
        let e = spans.decode(s, raw).unwrap_err().to_string();
        assert!(e.contains("digest") || e.contains("invalid"), "{e}");
        assert!(
            e.starts_with(&format!("span {s} at blob offset {}", c.blob_offset)),
            "{e}"
        );
    }

    #[test]
    fn a_span_offset_past_the_blob_is_rejected() {
        let (gz, d) = layer(&sample());
        let (mut meta, windows) = build(&d, 64 << 10, &gz[..]).unwrap();
        meta.checkpoints[2].blob_offset = gz.len() as u64 * 2;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        let e = open(f.path(), &d, gz.len() as u64, Layout::Deflate)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checkpoint 1") || e.contains("checkpoint 2"), "{e}");
    }

    #[test]
    fn a_truncated_index_file_is_rejected() {
        let (gz, d) = layer(&sample());
        let (f, _) = stored(&gz, &d, 64 << 10);
        let bytes = std::fs::read(f.path()).unwrap();
        std::fs::write(f.path(), &bytes[..40]).unwrap();
        assert!(open(f.path(), &d, gz.len() as u64, Layout::Deflate).is_err());
    }

    #[test]
    fn a_layer_whose_bytes_do_not_match_its_digest_is_not_indexed() {
        let (gz, _) = layer(&sample());
        let e = build(&Digest::of(b"x"), 1 << 20, &gz[..]).unwrap_err().to_string();
        assert!(e.contains("hash to"), "{e}");
    }

    #[test]
    fn multi_member_gzip_is_refused_by_name() {
        let (mut gz, _) = layer(&sample());
        let (second, _) = layer(&[("x", b"y".to_vec())]);
        gz.extend_from_slice(&second);
        let e = build(&Digest::of(&gz), 1 << 20, &gz[..]).unwrap_err().to_string();
        assert!(e.contains("multi-member"), "{e}");
    }

    #[test]
    fn an_entry_with_nanoseconds_of_a_whole_second_is_rejected() {
        let (gz, d) = layer(&sample());
        let (mut meta, windows) = build(&d, 1 << 20, &gz[..]).unwrap();
        meta.entries[0].mtime_nanos = 1_000_000_000;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        let e = open(f.path(), &d, gz.len() as u64, Layout::Deflate)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&d.to_string()) && e.contains("nanoseconds"), "{e}");
    }
}
