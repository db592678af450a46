//! eStargz: a gzip layer whose last 51 bytes locate a TOC (`stargz.index.json`,
//! itself a gzip member holding a one-entry tar) describing every file's chunks.

use super::limits::{self, MAX_TOC_COMPRESSED, MAX_TOC_JSON};
use super::toc::{self, Toc};
use super::{Encoding, IndexError, LayerIndex};
use crate::digest::Digest;
use bytes::Bytes;
use std::future::Future;

/// Size of the eStargz footer (a gzip member with an `SG` extra field).
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy stargz footer (extra field without subfield header).
const LEGACY_FOOTER_SIZE: u64 = 47;

/// A TOC member that does not hold a readable `stargz.index.json`.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("not gzip: {0}")]
    NotGzip(#[source] std::io::Error),
    #[error("inflates to more than {MAX_TOC_JSON} bytes")]
    TooLarge,
    #[error("not a tar: {0}")]
    NotTar(#[source] std::io::Error),
    #[error("empty TOC archive")]
    Empty,
    #[error("first entry is {0:?}, not stargz.index.json")]
    FirstEntry(String),
    #[error("reading TOC entry: {0}")]
    ReadEntry(#[source] std::io::Error),
}

/// Finds the TOC offset in the blob's tail (at least 51 bytes, or the whole
/// blob when shorter); returns `(toc_offset, footer_len)`.
pub fn parse_footer(tail: &[u8]) -> Option<(u64, u64)> {
    let parse_hex = |b: &[u8]| -> Option<u64> {
        let (hex, magic) = b.split_at(16);
        (magic == b"STARGZ").then_some(())?;
        u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let is_gzip_with_extra = |f: &[u8]| f.len() >= 12 && f[0] == 0x1f && f[1] == 0x8b && f[3] & 4 != 0;
    if tail.len() as u64 >= FOOTER_SIZE {
        let f = &tail[tail.len() - FOOTER_SIZE as usize..];
        if is_gzip_with_extra(f) && &f[12..14] == b"SG" && f[14..16] == [22, 0] {
            if let Some(off) = parse_hex(&f[16..38]) {
                return Some((off, FOOTER_SIZE));
            }
        }
    }
    if tail.len() as u64 >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE as usize..];
        if is_gzip_with_extra(f) && f[10..12] == [22, 0] {
            return parse_hex(&f[12..34]).map(|off| (off, LEGACY_FOOTER_SIZE));
        }
    }
    None
}

/// Reads footer and TOC (two range reads) and builds the layer's index.
/// `toc_digest` (the `containerd.io/snapshot/stargz/toc.digest` annotation)
/// is required and checked against the decompressed TOC JSON: the TOC is
/// trusted only because the manifest binds it.
pub async fn index_estargz<R, Fut, E>(
    layer: &Digest,
    size: u64,
    toc_digest: &Digest,
    mut read: R,
) -> Result<LayerIndex, IndexError>
where
    R: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let bad = |reason: String| IndexError::layer(layer, reason);
    let fetch_err = |what: &str, e: E| IndexError::fetch(layer, what, e);
    if size < FOOTER_SIZE {
        return Err(bad(format!("blob of {size} bytes is too small for an eStargz footer")));
    }
    let tail = read(size - FOOTER_SIZE, FOOTER_SIZE)
        .await
        .map_err(|e| fetch_err("eStargz footer", e))?;
    let (toc_offset, footer_len) = parse_footer(&tail).ok_or_else(|| bad("no eStargz footer".into()))?;
    if toc_offset >= size - footer_len {
        return Err(bad(format!(
            "footer points at TOC offset {toc_offset}, past the blob ({size} bytes)"
        )));
    }
    let toc_len = size - footer_len - toc_offset;
    if toc_len > MAX_TOC_COMPRESSED {
        return Err(bad(format!(
            "TOC at offset {toc_offset} is {toc_len} bytes, over the limit of {MAX_TOC_COMPRESSED}"
        )));
    }
    let compressed = read(toc_offset, toc_len)
        .await
        .map_err(|e| fetch_err("eStargz TOC", e))?;
    let (l, expected) = (layer.clone(), toc_digest.clone());
    super::blocking(layer, move || parse_toc(&l, &compressed, toc_offset, &expected, size)).await
}

/// The CPU part: inflates the TOC member at `toc_offset`, checks it against
/// `toc_digest`, parses it and builds the index. Public for the fuzz targets.
pub fn parse_toc(
    layer: &Digest,
    compressed: &[u8],
    toc_offset: u64,
    toc_digest: &Digest,
    size: u64,
) -> Result<LayerIndex, IndexError> {
    let bad = |reason: String| IndexError::layer(layer, reason);
    let json = toc_json(compressed).map_err(|source| IndexError::Toc {
        layer: layer.clone(),
        offset: toc_offset,
        source,
    })?;
    let actual = Digest::of(&json);
    if &actual != toc_digest {
        return Err(bad(format!(
            "TOC digest {actual} does not match the annotated {toc_digest}"
        )));
    }
    let toc: Toc = serde_json::from_slice(&json).map_err(|e| bad(format!("TOC JSON: {e}")))?;
    // The text is as large as the parsed TOC: not kept through the build's peak.
    drop(json);
    toc::build(layer, &toc, Encoding::Gzip, toc_offset, size)
}

/// Decompresses the TOC member (refused while inflating once past the cap)
/// and takes the `stargz.index.json` tar entry.
pub fn toc_json(compressed: &[u8]) -> Result<Vec<u8>, TocError> {
    // The tar around the JSON adds headers and padding: a few blocks.
    let tar_bytes = limits::read_capped(flate2::read::MultiGzDecoder::new(compressed), MAX_TOC_JSON + 4096)
        .map_err(|e| e.map_or(TocError::TooLarge, TocError::NotGzip))?;
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut entries = archive.entries().map_err(TocError::NotTar)?;
    let mut entry = entries.next().ok_or(TocError::Empty)?.map_err(TocError::NotTar)?;
    let name = entry.path_bytes().into_owned();
    if name != b"stargz.index.json" {
        return Err(TocError::FirstEntry(String::from_utf8_lossy(&name).into_owned()));
    }
    let json =
        limits::read_capped(&mut entry, MAX_TOC_JSON).map_err(|e| e.map_or(TocError::TooLarge, TocError::ReadEntry))?;
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(offset: u64) -> Vec<u8> {
        let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0];
        f.extend_from_slice(format!("{offset:016x}STARGZ").as_bytes());
        f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        f
    }

    #[test]
    fn footer_gives_the_toc_offset() {
        let f = footer(0x1234);
        assert_eq!(f.len() as u64, FOOTER_SIZE);
        assert_eq!(parse_footer(&f), Some((0x1234, FOOTER_SIZE)));
    }

    #[test]
    fn plain_gzip_tail_is_not_a_footer() {
        assert_eq!(parse_footer(&[0u8; 64]), None);
    }

    #[test]
    fn a_toc_that_inflates_past_the_cap_is_refused_while_inflating() {
        use std::io::Write;
        // 1 GiB of zeros as 1024 gzip members of 1 MiB (members decode as one stream).
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&vec![0u8; 1 << 20]).unwrap();
        let bomb = e.finish().unwrap().repeat(1024);
        assert!(matches!(toc_json(&bomb), Err(TocError::TooLarge)));
    }
}
