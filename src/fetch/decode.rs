//! Turning a chunk's stored bytes into its file bytes, and checking them.

use crate::buf::AlignedVec;
use crate::digest::Digest;
use crate::index::{Chunk, Encoding};
use bytes::Bytes;
use std::io::{self, Read};

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
        // bufread: inflate straight from the fetched bytes, no intermediate buffer copy.
        Encoding::Gzip => read_prefix(flate2::bufread::MultiGzDecoder::new(&raw[..]), c, "gzip"),
        Encoding::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(&raw[..]).map_err(DecodeError::ZstdInit)?;
            read_prefix(d, c, "zstd")
        }
        // Spans decode as a whole (the fetcher's span path), never per chunk.
        Encoding::Span(n) => Err(DecodeError::SpanOutsideSpan(n)),
    }
}

/// Skips `inner_offset` decoded bytes and reads `len`; the stream may go on
/// (tar headers of following entries share the last member).
fn read_prefix(mut r: impl Read, c: &Chunk, format: &'static str) -> Result<Bytes, DecodeError> {
    let stream = |source| DecodeError::Stream { format, source };
    if c.inner_offset > 0 {
        let skipped = io::copy(&mut (&mut r).take(c.inner_offset), &mut io::sink()).map_err(stream)?;
        if skipped != c.inner_offset {
            return Err(DecodeError::EndsBeforeInnerOffset {
                format,
                inner_offset: c.inner_offset,
            });
        }
    }
    // Page-aligned output, so the disk cache can write it with O_DIRECT.
    let mut out = AlignedVec::with_capacity(c.len as usize);
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

/// Checks decoded bytes against the chunk's digest (when the format has one).
pub fn verify(c: &Chunk, data: &[u8]) -> Result<(), DecodeError> {
    if data.len() as u64 != c.len {
        return Err(DecodeError::Length {
            got: data.len(),
            expected: c.len,
        });
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
}
