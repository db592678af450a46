//! Turning a chunk's stored bytes into its file bytes, and checking them.

use crate::buf::AlignedVec;
use crate::digest::Digest;
use crate::index::limits::MAX_PIECE;
use crate::index::{Chunk, Encoding, Whole};
use bytes::Bytes;
use sha2::Digest as _;
use std::io::{self, BufRead, Read};

/// A chunk whose stored bytes do not decode to what the index says.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} raw bytes, got {got}")]
    RawLength { expected: u64, got: usize },
    #[error("zstd: {0}")]
    ZstdInit(#[source] io::Error),
    #[error("{format} stream: {source}")]
    Stream {
        format: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{format} stream ends before inner offset {inner_offset}")]
    EndsBeforeInnerOffset { format: &'static str, inner_offset: u64 },
    #[error("{format} stream holds {got} bytes, chunk needs {needed}")]
    Short {
        format: &'static str,
        got: usize,
        needed: u64,
    },
    #[error("span {0} chunk decoded outside its span")]
    SpanOutsideSpan(u32),
    #[error("{got} bytes where the index says {expected}")]
    Length { got: usize, expected: u64 },
    #[error("content does not match digest {digest}")]
    DigestMismatch { digest: Digest },
    #[error("piece {inner_offset}+{len} lies outside its chunk {}+{}", whole.start, whole.len)]
    PieceOutsideChunk { inner_offset: u64, len: u64, whole: Whole },
}

/// Decodes `raw` (exactly the chunk's blob extent) to the chunk's `len` bytes.
pub fn decode(c: &Chunk, raw: &Bytes) -> Result<Bytes, DecodeError> {
    match c.encoding {
        Encoding::Raw => {
            if raw.len() as u64 != c.len {
                return Err(DecodeError::RawLength {
                    expected: c.len,
                    got: raw.len(),
                });
            }
            Ok(raw.clone())
        }
        _ => decode_from(c, &raw[..]),
    }
}

/// [`decode`] of a chunk whose blob extent `raw` yields as it arrives;
/// decoders inflate straight from its buffers, with no copy of their own.
pub fn decode_from(c: &Chunk, mut raw: impl BufRead) -> Result<Bytes, DecodeError> {
    match c.encoding {
        Encoding::Raw => {
            let mut out = AlignedVec::with_capacity(c.len.min(MAX_PIECE) as usize);
            let stream = |source| DecodeError::Stream { format: "raw", source };
            // One byte more than the chunk: a longer extent is an error, not cut short.
            out.read_to_end((&mut raw).take(c.len.saturating_add(1)))
                .map_err(stream)?;
            if out.len() as u64 != c.len {
                return Err(DecodeError::RawLength {
                    expected: c.len,
                    got: out.len(),
                });
            }
            Ok(out.freeze())
        }
        Encoding::Gzip => read_chunk(flate2::bufread::MultiGzDecoder::new(raw), c, "gzip"),
        Encoding::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(raw).map_err(DecodeError::ZstdInit)?;
            read_chunk(d, c, "zstd")
        }
        // Spans decode as a whole (the fetcher's span path), never per chunk.
        Encoding::Span(n) => Err(DecodeError::SpanOutsideSpan(n)),
    }
}

fn read_chunk(r: impl Read, c: &Chunk, format: &'static str) -> Result<Bytes, DecodeError> {
    match c.whole {
        Some(whole) => read_piece(r, c, whole, format),
        None => read_prefix(r, c, format),
    }
}

/// Reads and discards `n` decoded bytes.
fn skip(r: &mut impl Read, n: u64, format: &'static str) -> Result<(), DecodeError> {
    let skipped = io::copy(&mut r.take(n), &mut io::sink()).map_err(|source| DecodeError::Stream { format, source })?;
    if skipped != n {
        return Err(DecodeError::EndsBeforeInnerOffset {
            format,
            inner_offset: n,
        });
    }
    Ok(())
}

/// Skips `inner_offset` decoded bytes and reads `len`; the stream may go on
/// (tar headers of following entries share the last member).
fn read_prefix(mut r: impl Read, c: &Chunk, format: &'static str) -> Result<Bytes, DecodeError> {
    let stream = |source| DecodeError::Stream { format, source };
    skip(&mut r, c.inner_offset, format)?;
    // Page-aligned output, so the disk cache can write it with O_DIRECT. The
    // buffer grows with what the stream really holds, never by a declared
    // length beyond a piece (indexes split larger chunks).
    let mut out = AlignedVec::with_capacity(c.len.min(MAX_PIECE) as usize);
    out.read_to_end(r.take(c.len)).map_err(stream)?;
    if out.len() as u64 != c.len {
        return Err(DecodeError::Short {
            format,
            got: out.len(),
            needed: c.len,
        });
    }
    Ok(out.freeze())
}

/// A piece of a chunk too large to hold: decodes the whole chunk as a
/// stream, hashing all of it and keeping only the piece, then checks the
/// chunk's digest. Memory stays one piece; the price is decoding from the
/// chunk's start for every piece.
fn read_piece(mut r: impl Read, c: &Chunk, whole: Whole, format: &'static str) -> Result<Bytes, DecodeError> {
    let stream = |source| DecodeError::Stream { format, source };
    let outside = || DecodeError::PieceOutsideChunk {
        inner_offset: c.inner_offset,
        len: c.len,
        whole,
    };
    let before = c.inner_offset.checked_sub(whole.start).ok_or_else(outside)?;
    let after = whole
        .len
        .checked_sub(before)
        .and_then(|rest| rest.checked_sub(c.len))
        .ok_or_else(outside)?;
    if c.len > MAX_PIECE {
        return Err(outside());
    }
    skip(&mut r, whole.start, format)?;
    let mut hasher = sha2::Sha256::new();
    let mut hashed = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let mut hash_through = |r: &mut dyn Read, n: u64, hasher: &mut sha2::Sha256| -> Result<u64, DecodeError> {
        let mut done = 0u64;
        while done < n {
            let want = (n - done).min(buf.len() as u64) as usize;
            let got = r.read(&mut buf[..want]).map_err(stream)?;
            if got == 0 {
                break;
            }
            hasher.update(&buf[..got]);
            done += got as u64;
        }
        Ok(done)
    };
    hashed += hash_through(&mut r, before, &mut hasher)?;
    let mut out = AlignedVec::with_capacity(c.len as usize);
    out.read_to_end((&mut r).take(c.len)).map_err(stream)?;
    hasher.update(out.as_slice());
    hashed += out.len() as u64;
    hashed += hash_through(&mut r, after, &mut hasher)?;
    if hashed != whole.len {
        return Err(DecodeError::Short {
            format,
            got: hashed as usize,
            needed: whole.len,
        });
    }
    match &c.digest {
        Some(d) if &Digest::from_hasher(hasher) != d => Err(DecodeError::DigestMismatch { digest: d.clone() }),
        _ => Ok(out.freeze()),
    }
}

/// Checks decoded bytes against the chunk's digest (when the format has one).
/// A piece's digest is the whole chunk's, checked while decoding it
/// ([`read_piece`]): here only its length is.
pub fn verify(c: &Chunk, data: &[u8]) -> Result<(), DecodeError> {
    if data.len() as u64 != c.len {
        return Err(DecodeError::Length {
            got: data.len(),
            expected: c.len,
        });
    }
    if c.whole.is_some() {
        return Ok(());
    }
    match &c.digest {
        Some(d) if !d.matches(data) => Err(DecodeError::DigestMismatch { digest: d.clone() }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        Bytes::from(e.finish().unwrap())
    }

    fn chunk(len: u64, blob_len: u64, encoding: Encoding, digest: &[u8]) -> Chunk {
        Chunk {
            file_offset: 0,
            len,
            blob_offset: 0,
            blob_len,
            inner_offset: 0,
            encoding,
            digest: Some(Digest::of(digest)),
            whole: None,
        }
    }

    #[test]
    fn gzip_member_with_trailing_headers_decodes_to_the_payload() {
        let raw = gz(b"payload+following tar headers");
        let c = chunk(7, raw.len() as u64, Encoding::Gzip, b"payload");
        let d = decode(&c, &raw).unwrap();
        assert_eq!(&d[..], b"payload");
        verify(&c, &d).unwrap();
    }

    #[test]
    fn wrong_bytes_fail_verification() {
        let c = chunk(7, 7, Encoding::Raw, b"payload");
        assert!(verify(&c, b"PAYLOAD").unwrap_err().to_string().contains("digest"));
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let raw = gz(&[5u8; 10000]);
        let c = chunk(10000, 20, Encoding::Gzip, &[5u8; 10000]);
        assert!(decode(&c, &raw.slice(0..20)).is_err());
    }

    #[test]
    fn zstd_frame_decodes() {
        let raw = Bytes::from(zstd::encode_all(&b"hello zstd"[..], 1).unwrap());
        let c = chunk(5, raw.len() as u64, Encoding::Zstd, b"hello");
        assert_eq!(&decode(&c, &raw).unwrap()[..], b"hello");
    }

    #[test]
    fn a_piece_of_a_large_chunk_decodes_alone_and_checks_the_whole_chunks_digest() {
        let whole: Vec<u8> = (0..30u8).collect();
        let raw = gz(&whole);
        let mut c = chunk(10, raw.len() as u64, Encoding::Gzip, &whole);
        c.inner_offset = 10;
        c.whole = Some(Whole { start: 0, len: 30 });
        assert_eq!(&decode(&c, &raw).unwrap()[..], &whole[10..20]);
        verify(&c, &whole[10..20]).unwrap();
        c.digest = Some(Digest::of(b"another chunk"));
        assert!(matches!(decode(&c, &raw), Err(DecodeError::DigestMismatch { .. })));
    }

    #[test]
    fn a_declared_length_past_the_stream_is_an_error_not_an_allocation() {
        let raw = gz(b"tiny");
        let c = chunk(1 << 40, raw.len() as u64, Encoding::Gzip, b"tiny");
        assert!(matches!(decode(&c, &raw), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn a_piece_outside_its_chunk_is_refused() {
        let raw = gz(b"0123456789");
        let mut c = chunk(8, raw.len() as u64, Encoding::Gzip, b"0123456789");
        c.inner_offset = 5;
        c.whole = Some(Whole { start: 0, len: 10 });
        assert!(matches!(decode(&c, &raw), Err(DecodeError::PieceOutsideChunk { .. })));
    }
}
