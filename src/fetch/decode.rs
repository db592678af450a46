//! Turning a chunk's stored bytes into its file bytes, and checking them.

use crate::index::{Chunk, Encoding};
use bytes::{Bytes, BytesMut};
use std::io::Read;

/// Decodes `raw` (exactly the chunk's blob extent) to the chunk's `len` bytes.
pub fn decode(c: &Chunk, raw: &Bytes) -> Result<Bytes, String> {
    match c.encoding {
        Encoding::Raw => {
            if raw.len() as u64 != c.len {
                return Err(format!("expected {} raw bytes, got {}", c.len, raw.len()));
            }
            Ok(raw.clone())
        }
        // bufread: inflate straight from the fetched bytes, no intermediate buffer copy.
        Encoding::Gzip => read_prefix(flate2::bufread::MultiGzDecoder::new(&raw[..]), c, "gzip"),
        Encoding::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(&raw[..]).map_err(|e| format!("zstd: {e}"))?;
            read_prefix(d, c, "zstd")
        }
        // Spans decode as a whole (the fetcher's span path), never per chunk.
        Encoding::Span(n) => Err(format!("span {n} chunk decoded outside its span")),
    }
}

/// Skips `inner_offset` decoded bytes and reads `len`; the stream may go on
/// (tar headers of following entries share the last member).
fn read_prefix(mut r: impl Read, c: &Chunk, what: &str) -> Result<Bytes, String> {
    if c.inner_offset > 0 {
        let skipped = std::io::copy(&mut (&mut r).take(c.inner_offset), &mut std::io::sink())
            .map_err(|e| format!("{what} stream: {e}"))?;
        if skipped != c.inner_offset {
            return Err(format!("{what} stream ends before inner offset {}", c.inner_offset));
        }
    }
    // Page-aligned output, so the disk cache can write it with O_DIRECT.
    let mut out: Vec<u8> = Vec::with_capacity(c.len as usize + PAGE);
    let pad = out.as_ptr().align_offset(PAGE);
    out.resize(pad, 0);
    r.take(c.len)
        .read_to_end(&mut out)
        .map_err(|e| format!("{what} stream: {e}"))?;
    let got = out.len() - pad;
    if got as u64 != c.len {
        return Err(format!("{what} stream holds {got} bytes, chunk needs {}", c.len));
    }
    Ok(Bytes::from(out).slice(pad..))
}

/// `len` zero bytes starting on a page boundary (for O_DIRECT cache writes).
pub fn aligned_buffer(len: usize) -> BytesMut {
    let mut v = BytesMut::zeroed(len + PAGE);
    let pad = v.as_ptr().align_offset(PAGE);
    let mut out = v.split_off(pad);
    out.truncate(len);
    out
}

const PAGE: usize = 4096;

/// Checks decoded bytes against the chunk's digest (when the format has one).
pub fn verify(c: &Chunk, data: &[u8]) -> Result<(), String> {
    if data.len() as u64 != c.len {
        return Err(format!("{} bytes where the index says {}", data.len(), c.len));
    }
    match &c.digest {
        Some(d) if !d.matches(data) => Err(format!("content does not match digest {d}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
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
        assert!(verify(&c, b"PAYLOAD").unwrap_err().contains("digest"));
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
