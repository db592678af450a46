//! zstd:chunked: a zstd layer whose tail holds, in skippable frames, a
//! zstd-compressed JSON TOC (the eStargz entry schema) and a footer locating it.
//!
//! Two footers exist: 40 data bytes ending in `GnUlInUx` (what ctr-remote
//! writes) and 64 ending in `GNUlInUx` (containers/storage, with tar-split).
//! Both start with: manifest offset, compressed length, uncompressed length,
//! type (LE u64 each).

use super::limits::{self, MAX_TOC_COMPRESSED, MAX_TOC_JSON};
use super::toc::{self, Toc};
use super::{Encoding, IndexError, LayerIndex};
use crate::digest::Digest;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;

const SKIPPABLE_HEADER: u64 = 8;
const FOOTER_V1: u64 = 40;
const FOOTER_V2: u64 = 64;

/// Annotation keys that locate and check the manifest (old and new spellings).
pub const POSITION_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];
pub const CHECKSUM_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];

/// The TOC digest annotation, checked against the decompressed manifest.
const TOC_DIGEST_KEY: &str = "containerd.io/snapshot/stargz/toc.digest";

/// Where the compressed manifest lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestPosition {
    pub offset: u64,
    pub compressed: u64,
    pub uncompressed: u64,
}

/// Is this layer's zstd:chunked manifest bound to the image manifest (a
/// manifest-checksum annotation)? Only then is it served from its TOC.
pub fn is_bound(annotations: &HashMap<String, String>) -> bool {
    CHECKSUM_KEYS.iter().any(|k| annotations.contains_key(*k))
}

/// Parses `offset:compressed:uncompressed:type`.
pub fn parse_position(s: &str) -> Option<ManifestPosition> {
    let parts: Vec<u64> = s.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    match parts.as_slice() {
        [offset, compressed, uncompressed, 1] => Some(ManifestPosition {
            offset: *offset,
            compressed: *compressed,
            uncompressed: *uncompressed,
        }),
        _ => None,
    }
}

/// Parses the footer from the blob's last 64+8 (or fewer) bytes.
pub fn parse_footer(tail: &[u8]) -> Option<ManifestPosition> {
    let le = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    for (len, magic) in [(FOOTER_V1, b"GnUlInUx"), (FOOTER_V2, b"GNUlInUx")] {
        if (tail.len() as u64) < len {
            continue;
        }
        let f = &tail[tail.len() - len as usize..];
        if &f[f.len() - 8..] == magic && le(&f[24..]) == 1 {
            return Some(ManifestPosition {
                offset: le(f),
                compressed: le(&f[8..]),
                uncompressed: le(&f[16..]),
            });
        }
    }
    None
}

/// Locates (annotations first, else footer), fetches, checks and parses the TOC.
pub async fn index_zstd_chunked<R, Fut, E>(
    layer: &Digest,
    size: u64,
    annotations: &HashMap<String, String>,
    mut read: R,
) -> Result<LayerIndex, IndexError>
where
    R: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let bad = |reason: String| IndexError::layer(layer, reason);
    let fetch_err = |what: &str, e: E| IndexError::fetch(layer, what, e);
    let checksum = CHECKSUM_KEYS
        .iter()
        .find_map(|k| annotations.get(*k))
        .ok_or_else(|| bad("no manifest-checksum annotation binds the zstd:chunked manifest".into()))?;
    let expected: Digest = checksum
        .parse()
        .map_err(|e: crate::digest::DigestError| bad(format!("manifest-checksum annotation: {e}")))?;
    let annotated = POSITION_KEYS.iter().find_map(|k| annotations.get(*k));
    let pos = match annotated {
        Some(s) => parse_position(s).ok_or_else(|| bad(format!("invalid zstd:chunked manifest position {s:?}")))?,
        None => {
            let n = (FOOTER_V2 + SKIPPABLE_HEADER).min(size);
            let tail = read(size - n, n)
                .await
                .map_err(|e| fetch_err("zstd:chunked footer", e))?;
            parse_footer(&tail).ok_or_else(|| bad("no zstd:chunked footer".into()))?
        }
    };
    let end = pos.offset.checked_add(pos.compressed).filter(|e| *e <= size);
    if end.is_none() || pos.offset < SKIPPABLE_HEADER {
        return Err(bad(format!(
            "manifest position {pos:?} does not fit a blob of {size} bytes"
        )));
    }
    if pos.uncompressed > MAX_TOC_JSON || pos.compressed > MAX_TOC_COMPRESSED {
        return Err(bad(format!(
            "manifest of {} bytes ({} compressed) is over the limit of {MAX_TOC_JSON}",
            pos.uncompressed, pos.compressed
        )));
    }
    let compressed = read(pos.offset, pos.compressed)
        .await
        .map_err(|e| fetch_err("zstd:chunked manifest", e))?;
    let toc_digest = annotations.get(TOC_DIGEST_KEY).cloned();
    let l = layer.clone();
    super::blocking(layer, move || {
        parse_manifest(&l, &compressed, pos, &expected, toc_digest.as_deref(), size)
    })
    .await
}

/// The CPU part: checks the compressed manifest against its annotated
/// checksum (required: it is what binds the TOC to the image), decompresses
/// it, checks the TOC digest when annotated too, parses and builds. Public
/// for the fuzz targets.
pub fn parse_manifest(
    layer: &Digest,
    compressed: &[u8],
    pos: ManifestPosition,
    checksum: &Digest,
    toc_digest: Option<&str>,
    size: u64,
) -> Result<LayerIndex, IndexError> {
    let bad = |reason: String| IndexError::layer(layer, reason);
    let actual = Digest::of(compressed);
    if &actual != checksum {
        return Err(bad(format!(
            "manifest checksum {actual} does not match the annotated {checksum}"
        )));
    }
    // Stops one byte past the stated size (itself capped): a manifest that
    // inflates further (a zstd bomb) is refused without being held.
    let decoder = zstd::stream::read::Decoder::new(compressed).map_err(|e| bad(format!("manifest: {e}")))?;
    let json = match limits::read_capped(decoder, pos.uncompressed.min(MAX_TOC_JSON)) {
        Ok(json) => json,
        Err(Some(e)) => return Err(bad(format!("manifest is not valid zstd: {e}"))),
        Err(None) => {
            return Err(bad(format!(
                "manifest inflates past its stated {} bytes",
                pos.uncompressed
            )))
        }
    };
    if json.len() as u64 != pos.uncompressed {
        return Err(bad(format!(
            "manifest decompresses to {} bytes, not the stated {}",
            json.len(),
            pos.uncompressed
        )));
    }
    if let Some(t) = toc_digest {
        let expected: Digest = t.parse().map_err(|e: crate::digest::DigestError| bad(e.to_string()))?;
        let actual = Digest::of(&json);
        if actual != expected {
            return Err(bad(format!(
                "TOC digest {actual} does not match the annotated {expected}"
            )));
        }
    }
    let toc: Toc = serde_json::from_slice(&json).map_err(|e| bad(format!("TOC JSON: {e}")))?;
    // The text is as large as the parsed TOC: not kept through the build's peak.
    drop(json);
    // Payload frames end where the manifest's skippable frame begins.
    let payload_end = pos
        .offset
        .checked_sub(SKIPPABLE_HEADER)
        .ok_or_else(|| bad(format!("manifest offset {} is inside the first frame", pos.offset)))?;
    toc::build(layer, &toc, Encoding::Zstd, payload_end, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn footer_fields_are_little_endian() {
        let mut f = Vec::new();
        for v in [5_243_983u64, 868, 3391, 1] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(b"GnUlInUx");
        assert_eq!(
            parse_footer(&f),
            Some(ManifestPosition {
                offset: 5_243_983,
                compressed: 868,
                uncompressed: 3391
            })
        );
    }

    #[test]
    fn position_annotation() {
        assert_eq!(
            parse_position("5243983:868:3391:1"),
            Some(ManifestPosition {
                offset: 5_243_983,
                compressed: 868,
                uncompressed: 3391
            })
        );
        assert_eq!(parse_position("1:2:3"), None);
    }

    async fn index_with(annotations: &[(&str, &str)]) -> Result<LayerIndex, IndexError> {
        let a: HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let json = br#"{"version":1,"entries":[]}"#;
        let manifest = zstd::bulk::compress(json, 3).unwrap();
        let mut blob = vec![0u8; 64];
        blob.extend_from_slice(&manifest);
        let position = format!("64:{}:{}:1", manifest.len(), json.len());
        let mut a = a;
        a.insert(POSITION_KEYS[0].into(), position);
        let read = |off: u64, len: u64| {
            let b = bytes::Bytes::copy_from_slice(&blob[off as usize..(off + len) as usize]);
            async move { Ok::<_, std::io::Error>(b) }
        };
        index_zstd_chunked(&Digest::of(b"layer"), blob.len() as u64, &a, read).await
    }

    #[tokio::test]
    async fn a_manifest_without_a_checksum_annotation_is_not_trusted() {
        let e = index_with(&[]).await.unwrap_err().to_string();
        assert!(e.contains("manifest-checksum"), "{e}");
    }

    #[tokio::test]
    async fn a_manifest_that_does_not_match_its_checksum_is_refused() {
        let wrong = Digest::of(b"another manifest").to_string();
        let e = index_with(&[(CHECKSUM_KEYS[0], &wrong)]).await.unwrap_err().to_string();
        assert!(e.contains("does not match the annotated"), "{e}");
    }

    #[test]
    fn a_manifest_inflating_past_its_stated_size_is_refused_while_inflating() {
        // 1 GiB of zeros as 1024 frames of 1 MiB (frames decode as one stream).
        let frame = zstd::encode_all(std::io::repeat(0).take(1 << 20), 1).unwrap();
        let bomb = frame.repeat(1024);
        let pos = ManifestPosition {
            offset: 100,
            compressed: bomb.len() as u64,
            uncompressed: 1000,
        };
        let layer = Digest::of(b"l");
        let e = parse_manifest(&layer, &bomb, pos, &Digest::of(&bomb), None, 1 << 40)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&layer.to_string()) && e.contains("inflates past"), "{e}");
    }
}
