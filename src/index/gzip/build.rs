//! One streaming pass over a gzip layer: inflate it, record a checkpoint at
//! the first deflate block boundary after every `span` output bytes, hash
//! each span's output, and walk the tar headers of the output as it goes by.

use super::format::{Checkpoint, EntryKind, IndexEntry, IndexMeta};
use super::inflate::{Inflater, WINDOW};
use crate::digest::Digest;
use crate::index::tar::{walk_tar, TarEntry};
use crate::index::{IndexError, Kind};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};
use tracing::info;

const INPUT_BUF: usize = 256 << 10;
const OUTPUT_STEP: usize = 64 << 10;
const PROGRESS_EVERY: u64 = 256 << 20;

/// Builds the index of `layer` from its compressed bytes (read to the end and
/// checked against the layer digest). Returns the meta and the compressed
/// windows, ready for [`super::format::write`].
pub fn build(layer: &Digest, span: u64, input: impl Read) -> Result<(IndexMeta, Vec<Vec<u8>>), IndexError> {
    build_into(layer, span, input, None)
}

/// [`build`], also writing the inflated layer (its tar) to `output` as it goes.
pub fn build_into<'a>(
    layer: &'a Digest,
    span: u64,
    input: impl Read,
    output: Option<&'a mut dyn Write>,
) -> Result<(IndexMeta, Vec<Vec<u8>>), IndexError> {
    let mut s = Stream::new(layer, span.max(WINDOW as u64), input)?;
    s.output = output;
    let mut entries = Vec::new();
    let walk = walk_tar(
        layer,
        u64::MAX,
        |offset, len| std::future::ready(s.read_at(offset, len)),
        |e| {
            entries.push(entry(e));
            Ok(())
        },
    );
    futures::executor::block_on(walk)?;
    s.finish()?;
    let bad = |reason: String| IndexError::layer(layer, reason);
    let mut windows_at = 0u64;
    for (cp, w) in s.checkpoints.iter_mut().zip(&s.windows) {
        cp.window_at = windows_at;
        cp.window_zlen = w.len() as u32;
        windows_at += w.len() as u64;
    }
    let meta = IndexMeta {
        layer: layer.to_string(),
        compressed_size: s.compressed,
        uncompressed_size: s.inf.total_out(),
        deflate_end: s.deflate_end.ok_or_else(|| bad("gzip stream has no end".into()))?,
        span_size: s.span,
        checkpoints: s.checkpoints,
        entries,
    };
    Ok((meta, s.windows))
}

pub(super) fn entry(e: TarEntry) -> IndexEntry {
    let (kind, link, dev) = match (&e.meta.kind, e.hardlink) {
        (_, Some(target)) => (EntryKind::HardLink, target, (0, 0)),
        (Kind::File, None) => (EntryKind::File, Vec::new(), (0, 0)),
        (Kind::Dir, None) => (EntryKind::Dir, Vec::new(), (0, 0)),
        (Kind::Symlink(t), None) => (EntryKind::Symlink, t.clone(), (0, 0)),
        (Kind::CharDev { major, minor }, None) => (EntryKind::CharDev, Vec::new(), (*major, *minor)),
        (Kind::BlockDev { major, minor }, None) => (EntryKind::BlockDev, Vec::new(), (*major, *minor)),
        (Kind::Fifo, None) => (EntryKind::Fifo, Vec::new(), (0, 0)),
    };
    IndexEntry {
        path: e.path,
        kind,
        link,
        mode: e.meta.mode,
        uid: e.meta.uid,
        gid: e.meta.gid,
        size: e.meta.size,
        mtime_secs: e.meta.mtime.secs,
        mtime_nanos: e.meta.mtime.nanos,
        dev_major: dev.0,
        dev_minor: dev.1,
        xattrs: e.meta.xattrs,
        data_offset: e.data_offset,
    }
}

/// The inflated layer as a forward-only stream of tar bytes, taking
/// checkpoints as it passes block boundaries.
struct Stream<'a, R> {
    layer: &'a Digest,
    input: R,
    inbuf: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    input_done: bool,
    /// Compressed bytes read so far, and their hash (the layer digest).
    compressed: u64,
    blob_hash: Sha256,
    inf: Inflater,
    scratch: Vec<u8>,
    /// Output not yet passed over: `out[0]` is output byte `out_start`.
    out: Vec<u8>,
    out_start: u64,
    /// The last output bytes (at least a window's worth once there are that many).
    tail: Vec<u8>,
    deflate_end: Option<u64>,
    span: u64,
    span_hash: Sha256,
    checkpoints: Vec<Checkpoint>,
    windows: Vec<Vec<u8>>,
    next_progress: u64,
    /// Where every output byte is also written, if anywhere.
    output: Option<&'a mut dyn Write>,
}

impl<'a, R: Read> Stream<'a, R> {
    fn new(layer: &'a Digest, span: u64, input: R) -> Result<Self, IndexError> {
        Ok(Self {
            layer,
            input,
            inbuf: vec![0; INPUT_BUF],
            in_pos: 0,
            in_len: 0,
            input_done: false,
            compressed: 0,
            blob_hash: Sha256::new(),
            inf: Inflater::gzip().map_err(|source| IndexError::Inflate {
                layer: layer.clone(),
                offset: 0,
                source,
            })?,
            scratch: vec![0; OUTPUT_STEP],
            out: Vec::new(),
            out_start: 0,
            tail: Vec::with_capacity(4 * WINDOW),
            deflate_end: None,
            span,
            span_hash: Sha256::new(),
            checkpoints: Vec::new(),
            windows: Vec::new(),
            next_progress: PROGRESS_EVERY,
            output: None,
        })
    }

    fn err(&self, reason: impl Into<String>) -> IndexError {
        IndexError::layer(self.layer, reason)
    }

    /// Up to `len` output bytes at `offset` (fewer only at the end of the
    /// stream); output before `offset` is dropped for good.
    fn read_at(&mut self, offset: u64, len: u64) -> Result<Bytes, IndexError> {
        if offset < self.out_start {
            return Err(self.err(format!("tar walk went back to {offset}")));
        }
        while self.out_start + (self.out.len() as u64) < offset + len && self.deflate_end.is_none() {
            self.step(offset)?;
        }
        let skip = ((offset - self.out_start) as usize).min(self.out.len());
        self.out.drain(..skip);
        self.out_start += skip as u64;
        let n = (len as usize).min(self.out.len());
        Ok(Bytes::copy_from_slice(&self.out[..n]))
    }

    /// Inflates the rest and reads the input to its end.
    fn finish(&mut self) -> Result<(), IndexError> {
        while self.deflate_end.is_none() {
            self.step(u64::MAX)?;
        }
        // After the member: only zero padding may follow.
        loop {
            if self.inbuf[self.in_pos..self.in_len].iter().any(|b| *b != 0) {
                return Err(self.err(format!(
                    "data follows the gzip member at offset {}: multi-member gzip layers are not indexed",
                    self.compressed - (self.in_len - self.in_pos) as u64
                )));
            }
            self.in_pos = self.in_len;
            if !self.refill()? {
                break;
            }
        }
        let actual = Digest::from_hasher(self.blob_hash.clone());
        if &actual != self.layer {
            return Err(self.err(format!("downloaded bytes hash to {actual}")));
        }
        let last = self.checkpoints.last_mut().expect("a checkpoint at the start");
        last.span_digest = self.span_hash.finalize_reset().into();
        Ok(())
    }

    fn refill(&mut self) -> Result<bool, IndexError> {
        if self.input_done {
            return Ok(false);
        }
        let n = loop {
            match self.input.read(&mut self.inbuf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(format!("reading the layer at {}: {e}", self.compressed))),
            }
        };
        self.blob_hash.update(&self.inbuf[..n]);
        self.compressed += n as u64;
        self.in_pos = 0;
        self.in_len = n;
        self.input_done = n == 0;
        if self.compressed >= self.next_progress {
            info!(layer = %self.layer, mib = self.compressed >> 20, "indexing");
            self.next_progress += PROGRESS_EVERY;
        }
        Ok(n > 0)
    }

    /// One inflate call (to the next block boundary at most); output before
    /// `keep_from` is not kept.
    fn step(&mut self, keep_from: u64) -> Result<(), IndexError> {
        if self.in_pos == self.in_len && !self.refill()? {
            return Err(self.err(format!("gzip stream truncated after {} bytes", self.compressed)));
        }
        let step = self
            .inf
            .step(&self.inbuf[self.in_pos..self.in_len], &mut self.scratch, true)
            .map_err(|source| IndexError::Inflate {
                layer: self.layer.clone(),
                offset: self.inf.total_in(),
                source,
            })?;
        self.in_pos += step.consumed;
        let produced = &self.scratch[..step.produced];
        if let Some(out) = &mut self.output {
            if let Err(e) = out.write_all(produced) {
                return Err(IndexError::layer(
                    self.layer,
                    format!("writing the inflated layer: {e}"),
                ));
            }
        }
        self.span_hash.update(produced);
        self.tail.extend_from_slice(produced);
        if self.tail.len() > 3 * WINDOW {
            self.tail.drain(..self.tail.len() - WINDOW);
        }
        let end = self.out_start + self.out.len() as u64 + produced.len() as u64;
        if end <= keep_from {
            self.out.clear();
            self.out_start = end;
        } else {
            self.out.extend_from_slice(produced);
        }
        let total_out = self.inf.total_out();
        let due = match self.checkpoints.last() {
            None => true,
            Some(last) => total_out - last.out_offset >= self.span,
        };
        if due && self.inf.at_block_boundary() && !step.end {
            self.checkpoint(total_out)?;
        }
        if step.end {
            // The 8-byte trailer (CRC32, size) was checked and consumed by zlib.
            self.deflate_end = Some(self.inf.total_in() - 8);
        }
        Ok(())
    }

    fn checkpoint(&mut self, total_out: u64) -> Result<(), IndexError> {
        if let Some(last) = self.checkpoints.last_mut() {
            last.span_digest = self.span_hash.finalize_reset().into();
        } else if total_out != 0 {
            return Err(self.err("deflate data starts after output was produced"));
        }
        let wlen = (total_out as usize).min(WINDOW);
        let window = &self.tail[self.tail.len() - wlen..];
        let z = zstd::bulk::compress(window, 3).map_err(|e| self.err(format!("compressing a window: {e}")))?;
        self.checkpoints.push(Checkpoint {
            blob_offset: self.inf.total_in(),
            bits: self.inf.pending_bits(),
            out_offset: total_out,
            span_digest: [0; 32],
            window_at: 0,
            window_zlen: 0,
            window_len: wlen as u32,
        });
        self.windows.push(z);
        Ok(())
    }
}
