//! Caps on what a layer's metadata may make us hold. Every index form (TOC,
//! tar walk, gzip index) is held in memory whole, so each is bounded before
//! or while it is read, never after: a hostile image is refused with an
//! error naming the layer instead of growing the daemon (see ARCHITECTURE.md,
//! "Bounds").

use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};
use std::io::Read;
use std::marker::PhantomData;

/// Entries (TOC entries, tar headers, index entries, tree nodes) per layer.
/// Large real layers hold a few hundred thousand files.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Decompressed bytes of an eStargz / zstd:chunked TOC (about 400k entries).
pub const MAX_TOC_JSON: u64 = 128 << 20;
/// Compressed bytes of a TOC fetched from the blob.
pub const MAX_TOC_COMPRESSED: u64 = 128 << 20;
/// Bytes of a path (Linux's `PATH_MAX`) and of a symlink target.
pub const MAX_PATH: usize = 4096;
/// Components of a path.
pub const MAX_DEPTH: usize = 512;
/// Bytes of one xattr name (`XATTR_NAME_MAX`) and value (`XATTR_SIZE_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Decoded bytes of one chunk held at once: larger chunks are served in
/// pieces of this size (nydus caps its chunks at the same 16 MiB).
pub const MAX_PIECE: u64 = 16 << 20;

/// Chunks per layer (pieces included).
pub const MAX_CHUNKS: usize = 1 << 21;
/// Slack on top of a ratio bound: frame headers, a final partial block.
pub const RATIO_SLACK: u64 = 1 << 17;

/// Most decoded bytes one compressed byte can yield: deflate's limit is
/// 1032:1; zstd's is a 128 KiB RLE block from a 4-byte block.
pub fn max_ratio(encoding: super::Encoding) -> u64 {
    match encoding {
        super::Encoding::Gzip => 1032,
        super::Encoding::Zstd => 32 << 10,
        super::Encoding::Raw => 1,
        super::Encoding::Span(_) => 1032,
    }
}

/// Reads all of `r` unless it yields more than `limit` bytes: the limit is
/// enforced while reading, so a decompression bomb stops at `limit + 1`.
/// Returns `Err(None)` when over the limit, `Err(Some(e))` on a read error.
pub fn read_capped(r: impl Read, limit: u64) -> Result<Vec<u8>, Option<std::io::Error>> {
    let mut out = Vec::new();
    r.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(Some)?;
    if out.len() as u64 > limit {
        return Err(None);
    }
    Ok(out)
}

/// `#[serde(deserialize_with)]` for a list of at most [`MAX_ENTRIES`]
/// items: refused while parsing, before the next item is built.
pub fn bounded_entries<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_ENTRIES} entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            // A declared length is only a hint: never allocate by it.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX_ENTRIES {
                    return Err(A::Error::custom(format!("more than {MAX_ENTRIES} entries")));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct List {
        #[serde(deserialize_with = "bounded_entries")]
        items: Vec<u8>,
    }

    #[test]
    fn a_list_over_the_entry_cap_is_refused_while_parsing() {
        let json = format!(r#"{{"items":[{}0]}}"#, "0,".repeat(MAX_ENTRIES));
        let e = serde_json::from_str::<List>(&json).err().unwrap().to_string();
        assert!(e.contains(&format!("more than {MAX_ENTRIES} entries")), "{e}");
        let ok = format!(r#"{{"items":[{}0]}}"#, "0,".repeat(MAX_ENTRIES - 1));
        assert_eq!(serde_json::from_str::<List>(&ok).unwrap().items.len(), MAX_ENTRIES);
    }

    #[test]
    fn reading_stops_one_byte_past_the_cap() {
        assert_eq!(read_capped(&[7u8; 10][..], 10).unwrap().len(), 10);
        assert!(read_capped(std::io::repeat(0), 1 << 20).unwrap_err().is_none());
    }
}
