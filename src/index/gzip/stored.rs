//! The same index for an uncompressed tar layer: one streaming pass that
//! checks the layer digest, walks the tar headers and records the sha256 of
//! every `span` bytes. Tar bytes carry no digest of their own, so these span
//! digests are what lets such a layer be served lazily at all.

use super::format::{Checkpoint, IndexMeta};
use super::MAX_SPAN_OUTPUT;
use crate::digest::Digest;
use crate::index::tar::walk_tar;
use crate::index::IndexError;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use std::io::Read;

const INPUT_BUF: usize = 256 << 10;
/// Smallest span: below this the checkpoint table outgrows its use.
const MIN_SPAN: u64 = 64 << 10;

/// Builds the index of the uncompressed tar `layer` from its bytes (read to
/// the end and checked against the layer digest). Checkpoints sit every
/// `span` bytes, at equal blob and tar offsets, without windows.
pub fn build_stored(layer: &Digest, span: u64, input: impl Read) -> Result<(IndexMeta, Vec<Vec<u8>>), IndexError> {
    let mut s = Stream {
        layer,
        input,
        span: span.clamp(MIN_SPAN, MAX_SPAN_OUTPUT),
        total: 0,
        done: false,
        out: Vec::new(),
        out_start: 0,
        blob_hash: Sha256::new(),
        span_hash: Sha256::new(),
        checkpoints: Vec::new(),
    };
    let mut entries = Vec::new();
    let walk = walk_tar(
        layer,
        u64::MAX,
        |offset, len| std::future::ready(s.read_at(offset, len)),
        |e| {
            entries.push(super::build::entry(e));
            Ok(())
        },
    );
    futures::executor::block_on(walk)?;
    s.finish()?;
    let windows = vec![Vec::new(); s.checkpoints.len()];
    let meta = IndexMeta {
        layer: layer.to_string(),
        compressed_size: s.total,
        uncompressed_size: s.total,
        deflate_end: s.total,
        span_size: s.span,
        checkpoints: s.checkpoints,
        entries,
    };
    Ok((meta, windows))
}

/// The layer as a forward-only stream, hashing everything that passes.
struct Stream<'a, R> {
    layer: &'a Digest,
    input: R,
    span: u64,
    /// Bytes read so far.
    total: u64,
    done: bool,
    /// Bytes not yet passed over: `out[0]` is byte `out_start`.
    out: Vec<u8>,
    out_start: u64,
    blob_hash: Sha256,
    span_hash: Sha256,
    checkpoints: Vec<Checkpoint>,
}

impl<R: Read> Stream<'_, R> {
    fn err(&self, reason: String) -> IndexError {
        IndexError::layer(self.layer, reason)
    }

    /// Up to `len` bytes at `offset` (fewer only at the end); bytes before
    /// `offset` are dropped for good.
    fn read_at(&mut self, offset: u64, len: u64) -> Result<Bytes, IndexError> {
        if offset < self.out_start {
            return Err(self.err(format!("tar walk went back to {offset}")));
        }
        let want = offset.saturating_add(len);
        while self.total < want && !self.done {
            self.pull(offset)?;
        }
        let skip = usize::try_from(offset - self.out_start).map_or(self.out.len(), |s| s.min(self.out.len()));
        self.out.drain(..skip);
        self.out_start += skip as u64;
        let n = usize::try_from(len).map_or(self.out.len(), |l| l.min(self.out.len()));
        Ok(Bytes::copy_from_slice(&self.out[..n]))
    }

    /// Reads the rest of the layer and checks its digest.
    fn finish(&mut self) -> Result<(), IndexError> {
        while !self.done {
            self.pull(u64::MAX)?;
        }
        let actual = Digest::from_hasher(self.blob_hash.clone());
        if &actual != self.layer {
            return Err(self.err(format!("downloaded bytes hash to {actual}")));
        }
        match self.checkpoints.last_mut() {
            Some(last) => last.span_digest = self.span_hash.finalize_reset().into(),
            None => return Err(self.err("empty layer: nothing to index".into())),
        }
        Ok(())
    }

    /// One read of the input; bytes before `keep_from` are not kept.
    fn pull(&mut self, keep_from: u64) -> Result<(), IndexError> {
        let mut buf = vec![0u8; INPUT_BUF];
        let n = loop {
            match self.input.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(format!("reading the layer at {}: {e}", self.total))),
            }
        };
        if n == 0 {
            self.done = true;
            return Ok(());
        }
        let data = &buf[..n];
        self.blob_hash.update(data);
        self.hash_spans(data);
        let end = self.out_start + self.out.len() as u64 + n as u64;
        if end <= keep_from {
            self.out.clear();
            self.out_start = end;
        } else {
            self.out.extend_from_slice(data);
        }
        Ok(())
    }

    /// Feeds span digests, opening a checkpoint at every `span` bytes.
    fn hash_spans(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let into_span = self.total % self.span;
            if into_span == 0 {
                if let Some(last) = self.checkpoints.last_mut() {
                    last.span_digest = self.span_hash.finalize_reset().into();
                }
                self.checkpoints.push(Checkpoint {
                    blob_offset: self.total,
                    bits: 0,
                    out_offset: self.total,
                    span_digest: [0; 32],
                    window_at: 0,
                    window_zlen: 0,
                    window_len: 0,
                });
            }
            let room = usize::try_from(self.span - into_span).unwrap_or(usize::MAX);
            let n = room.min(data.len());
            self.span_hash.update(&data[..n]);
            self.total += n as u64;
            data = &data[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{format, open, Layout};
    use super::*;
    use crate::index::Encoding;
    use std::io::Write;

    fn tar_layer(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, Digest) {
        let tar = super::super::tests::tar_of(files);
        let d = Digest::of(&tar);
        (tar, d)
    }

    fn files() -> Vec<(&'static str, Vec<u8>)> {
        let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        vec![
            ("etc/small", b"hello".to_vec()),
            ("data/big.bin", big),
            ("etc/last", b"bye".to_vec()),
        ]
    }

    fn stored(tar: &[u8], d: &Digest) -> tempfile::NamedTempFile {
        let (meta, windows) = build_stored(d, 64 << 10, tar).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        f
    }

    /// A file's bytes as the fetcher would produce them from `blob`.
    fn read(index: &crate::index::LayerIndex, blob: &[u8], path: &str) -> Result<Vec<u8>, super::super::SpanError> {
        let spans = index.spans.as_ref().unwrap();
        let mut out = Vec::new();
        for c in index.file_chunks(index.resolve(path).unwrap()) {
            let Encoding::Span(s) = c.encoding else {
                panic!("not a span chunk")
            };
            let span = spans.decode(s, &blob[c.blob_offset as usize..(c.blob_offset + c.blob_len) as usize])?;
            out.extend_from_slice(&span[c.inner_offset as usize..(c.inner_offset + c.len) as usize]);
        }
        Ok(out)
    }

    #[test]
    fn every_file_of_an_uncompressed_layer_reads_through_its_spans() {
        let files = files();
        let (tar, d) = tar_layer(&files);
        let f = stored(&tar, &d);
        let index = open(f.path(), &d, tar.len() as u64, Layout::Stored).unwrap();
        assert!(index.spans.as_ref().unwrap().len() > 10);
        for (path, data) in &files {
            assert!(read(&index, &tar, path).unwrap() == *data, "{path} differs");
        }
    }

    #[test]
    fn a_flipped_byte_in_an_uncompressed_layer_fails_its_span() {
        let files = files();
        let (tar, d) = tar_layer(&files);
        let f = stored(&tar, &d);
        let index = open(f.path(), &d, tar.len() as u64, Layout::Stored).unwrap();
        let mut tampered = tar.clone();
        let node = index.resolve("data/big.bin").unwrap();
        let c = &index.file_chunks(node)[3];
        tampered[(c.blob_offset + c.inner_offset + 10) as usize] ^= 1;
        let e = read(&index, &tampered, "data/big.bin").unwrap_err().to_string();
        assert!(e.contains("does not match the digest recorded at indexing"), "{e}");
    }

    #[test]
    fn a_gzip_index_does_not_open_as_an_uncompressed_one() {
        let (tar, d) = tar_layer(&files());
        let (mut meta, windows) = build_stored(&d, 64 << 10, &tar[..]).unwrap();
        meta.checkpoints[1].blob_offset += 1;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&format::write(&meta, &windows).unwrap()).unwrap();
        assert!(open(f.path(), &d, tar.len() as u64, Layout::Stored).is_err());
    }

    #[test]
    fn an_uncompressed_layer_whose_bytes_do_not_match_its_digest_is_not_indexed() {
        let (tar, _) = tar_layer(&files());
        let e = build_stored(&Digest::of(b"x"), 1 << 20, &tar[..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("hash to"), "{e}");
    }
}
