//! The JSON TOC shared by eStargz and zstd:chunked (same entry schema), and
//! its conversion into a [`LayerIndex`].

use super::limits::{self, MAX_PIECE};
use super::{Chunk, Encoding, EntryMeta, IndexError, Kind, LayerIndex, Timestamp, TreeBuilder, Whole};
use crate::digest::Digest;
use base64::Engine as _;
use std::collections::BTreeMap;

/// Top-level TOC document.
#[derive(serde::Deserialize, Debug)]
pub struct Toc {
    pub version: u32,
    #[serde(deserialize_with = "limits::bounded_entries")]
    pub entries: Vec<TocEntry>,
}

/// One TOC entry (field names as in the eStargz spec).
#[derive(serde::Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub modtime: Option<String>,
    pub link_name: String,
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, String>,
    pub digest: Option<String>,
    pub offset: u64,
    pub end_offset: u64,
    pub chunk_offset: u64,
    pub chunk_size: u64,
    pub chunk_digest: Option<String>,
    pub inner_offset: u64,
}

/// Names that belong to the format, not the image; hidden from the mount.
pub const ARTEFACTS: [&str; 3] = ["stargz.index.json", PREFETCH_LANDMARK, ".no.prefetch.landmark"];
/// eStargz: the files before this entry are what start-up reads.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";

/// Builds the index. `payload_end` is where the last chunk's compressed bytes
/// end (the TOC's offset) when entries carry no `endOffset`.
pub fn build(
    layer: &Digest,
    toc: &Toc,
    encoding: Encoding,
    payload_end: u64,
    blob_size: u64,
) -> Result<LayerIndex, IndexError> {
    let err = |e: &TocEntry, reason: String| IndexError::Entry {
        layer: layer.clone(),
        entry: e.name.clone(),
        reason,
    };
    // Compressed extents end where the next (distinct) chunk offset begins.
    let mut starts: Vec<u64> = toc.entries.iter().filter(|e| e.offset > 0).map(|e| e.offset).collect();
    starts.push(payload_end);
    starts.sort_unstable();
    starts.dedup();
    let extent_end = |e: &TocEntry| -> Result<u64, IndexError> {
        if e.end_offset > 0 {
            return Ok(e.end_offset);
        }
        let i = starts.partition_point(|s| *s <= e.offset);
        starts
            .get(i)
            .copied()
            .ok_or_else(|| err(e, format!("chunk offset {} is at or past the TOC", e.offset)))
    };
    let mut builder = TreeBuilder::new(layer.clone());
    // Regular files in layer order until a landmark says whether they are the
    // start-up set (`.prefetch.landmark`) or there is none (`.no.prefetch.landmark`).
    let mut before_landmark: Vec<String> = Vec::new();
    let mut landmark: Option<bool> = None;
    // Entries of one file: its "reg" entry followed by its "chunk" entries.
    let mut pending: Option<(TocEntry, EntryMeta)> = None;
    let flush = |b: &mut TreeBuilder, p: Option<(TocEntry, EntryMeta)>| -> Result<(), IndexError> {
        if let Some((e, meta)) = p {
            b.add(e.name.as_bytes(), meta)?;
        }
        Ok(())
    };
    for e in &toc.entries {
        if e.kind == "chunk" {
            let Some((reg, meta)) = pending.as_mut() else {
                return Err(err(e, "chunk entry without a preceding regular file".into()));
            };
            if e.name != reg.name {
                return Err(err(e, format!("chunk entry follows file {:?}", reg.name)));
            }
            let c = chunk(layer, e, reg.size, encoding, extent_end(e)?)?;
            meta.chunks.extend(c);
            continue;
        }
        flush(&mut builder, pending.take())?;
        let trimmed = e.name.trim_start_matches("./").trim_end_matches('/');
        if ARTEFACTS.contains(&trimmed) {
            if landmark.is_none() && trimmed != ARTEFACTS[0] {
                landmark = Some(trimmed == PREFETCH_LANDMARK);
            }
            continue;
        }
        if landmark.is_none() && e.kind == "reg" {
            before_landmark.push(trimmed.to_string());
        }
        let mtime = match &e.modtime {
            Some(t) if !t.is_empty() => parse_rfc3339(t).ok_or_else(|| err(e, format!("invalid modtime {t:?}")))?,
            _ => Timestamp::default(),
        };
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| err(e, format!("xattr {k} is not base64")))?;
            xattrs.push((k.as_bytes().to_vec(), value));
        }
        let kind = match e.kind.as_str() {
            "dir" => Kind::Dir,
            "reg" => Kind::File,
            "symlink" => Kind::Symlink(e.link_name.as_bytes().to_vec()),
            "hardlink" => Kind::File,
            "char" => Kind::CharDev {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "block" => Kind::BlockDev {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "fifo" => Kind::Fifo,
            other => return Err(err(e, format!("unknown entry type {other:?}"))),
        };
        if e.mode < 0 {
            return Err(err(e, format!("negative mode {}", e.mode)));
        }
        let mut meta = EntryMeta {
            kind,
            mode: (e.mode as u64 & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            size: if e.kind == "reg" { e.size } else { 0 },
            mtime,
            xattrs,
            chunks: Vec::new(),
        };
        match e.kind.as_str() {
            "hardlink" => builder.add_hardlink(e.name.as_bytes(), e.link_name.as_bytes(), meta)?,
            "reg" if e.size > 0 => {
                meta.chunks.extend(chunk(layer, e, e.size, encoding, extent_end(e)?)?);
                pending = Some((e.clone(), meta));
            }
            _ => builder.add(e.name.as_bytes(), meta)?,
        }
    }
    flush(&mut builder, pending.take())?;
    let mut index = builder.finish(blob_size)?;
    if landmark == Some(true) {
        index.prefetch = before_landmark.iter().filter_map(|p| index.resolve(p)).collect();
    }
    Ok(index)
}

/// The chunk an entry describes, as pieces of at most [`MAX_PIECE`] decoded
/// bytes: eStargz allows chunks of any size, and a piece is what one read
/// decodes and holds (each piece checks the whole chunk's digest).
fn chunk(layer: &Digest, e: &TocEntry, file_size: u64, encoding: Encoding, end: u64) -> Result<Vec<Chunk>, IndexError> {
    let err = |reason: String| IndexError::Entry {
        layer: layer.clone(),
        entry: e.name.clone(),
        reason,
    };
    if e.offset == 0 || end <= e.offset {
        return Err(err(format!(
            "chunk at file offset {} has no payload offset",
            e.chunk_offset
        )));
    }
    let len = if e.chunk_size > 0 {
        e.chunk_size
    } else {
        file_size.saturating_sub(e.chunk_offset)
    };
    if e.chunk_offset.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(err(format!(
            "chunk {}+{len} runs past the file's {file_size} bytes",
            e.chunk_offset
        )));
    }
    // No stream decodes to more than its format's largest ratio allows, so
    // a larger claim is a lie (a chunk "of 2^40 bytes") refused here.
    let most = (end - e.offset)
        .saturating_mul(limits::max_ratio(encoding))
        .saturating_add(limits::RATIO_SLACK);
    if e.inner_offset.checked_add(len).is_none_or(|n| n > most) {
        return Err(err(format!(
            "chunk of {len} bytes at inner offset {} cannot come from {} compressed bytes",
            e.inner_offset,
            end - e.offset
        )));
    }
    if len.div_ceil(MAX_PIECE) > limits::MAX_CHUNKS as u64 {
        return Err(err(format!("chunk of {len} bytes is too large to index")));
    }
    let digest: Option<Digest> = match &e.chunk_digest {
        Some(d) if !d.is_empty() => Some(d.parse().map_err(|x: crate::digest::DigestError| err(x.to_string()))?),
        // A file stored as one chunk is verified by its whole-file digest.
        _ if e.chunk_offset == 0 && len == file_size => match &e.digest {
            Some(d) if !d.is_empty() => Some(d.parse().map_err(|x: crate::digest::DigestError| err(x.to_string()))?),
            _ => None,
        },
        _ => None,
    };
    if digest.is_none() {
        return Err(err("chunk has no digest to verify it against".into()));
    }
    let whole = (len > MAX_PIECE).then_some(Whole {
        start: e.inner_offset,
        len,
    });
    // Within the chunk and the file (both checked above), so no overflow.
    Ok((0..len.div_ceil(MAX_PIECE))
        .map(|i| {
            let at = i * MAX_PIECE;
            Chunk {
                file_offset: e.chunk_offset + at,
                len: MAX_PIECE.min(len - at),
                blob_offset: e.offset,
                blob_len: end - e.offset,
                inner_offset: e.inner_offset + at,
                encoding,
                digest: digest.clone(),
                whole,
            }
        })
        .collect())
}

/// Parses the RFC 3339 times Go's `time.Time` writes.
fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    // A leap second (`…:60Z`) comes back as nanoseconds of 10^9 or more.
    Timestamp::normalized(t.timestamp(), t.timestamp_subsec_nanos().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> TocEntry {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn chunks_extend_to_the_next_offset_and_artefacts_are_hidden() {
        let d1 = Digest::of(b"1");
        let d2 = Digest::of(b"2");
        let toc = Toc {
            version: 1,
            entries: vec![
                entry(r#"{"name":"bin/","type":"dir","mode":493,"modtime":"2020-01-02T03:04:05Z"}"#),
                entry(&format!(
                    r#"{{"name":"bin/f","type":"reg","size":10,"mode":420,"offset":100,"chunkSize":6,"chunkDigest":"{d1}"}}"#
                )),
                entry(&format!(
                    r#"{{"name":"bin/f","type":"chunk","offset":150,"chunkOffset":6,"chunkSize":4,"chunkDigest":"{d2}"}}"#
                )),
                entry(
                    r#"{"name":".no.prefetch.landmark","type":"reg","size":1,"offset":170,"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#,
                ),
            ],
        };
        let idx = build(&Digest::of(b"l"), &toc, Encoding::Gzip, 200, 300).unwrap();
        let f = idx.resolve("bin/f").unwrap();
        let c = idx.file_chunks(f);
        assert_eq!((c[0].blob_offset, c[0].blob_len, c[0].len), (100, 50, 6));
        assert_eq!((c[1].blob_offset, c[1].blob_len, c[1].file_offset), (150, 20, 6));
        assert!(idx.resolve(".no.prefetch.landmark").is_none());
        let bin = idx.node(idx.resolve("bin").unwrap()).unwrap();
        assert_eq!(bin.mtime.secs, 1_577_934_245);
    }

    #[test]
    fn chunk_without_any_digest_is_rejected() {
        let toc = Toc {
            version: 1,
            entries: vec![entry(r#"{"name":"f","type":"reg","size":10,"offset":100}"#)],
        };
        let e = build(&Digest::of(b"l"), &toc, Encoding::Gzip, 200, 300)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"f\"") && e.contains("digest"), "{e}");
    }

    #[test]
    fn a_chunk_declaring_2_pow_40_bytes_is_refused_naming_the_layer_and_entry() {
        let d = Digest::of(b"x");
        let toc = Toc {
            version: 1,
            entries: vec![entry(&format!(
                r#"{{"name":"huge","type":"reg","size":1099511627776,"offset":100,"digest":"{d}"}}"#
            ))],
        };
        let layer = Digest::of(b"l");
        let e = build(&layer, &toc, Encoding::Gzip, 200, 300).unwrap_err().to_string();
        assert!(
            e.contains(&layer.to_string()) && e.contains("huge") && e.contains("cannot come from"),
            "{e}"
        );
    }

    #[test]
    fn a_large_chunk_is_served_as_bounded_pieces_of_the_whole_chunk() {
        let d = Digest::of(b"x");
        let size = 2 * MAX_PIECE + 5;
        let toc = Toc {
            version: 1,
            entries: vec![entry(&format!(
                r#"{{"name":"big","type":"reg","size":{size},"offset":100,"digest":"{d}"}}"#
            ))],
        };
        let idx = build(&Digest::of(b"l"), &toc, Encoding::Gzip, 1 << 20, 2 << 20).unwrap();
        let c = idx.file_chunks(idx.resolve("big").unwrap());
        assert_eq!(c.len(), 3);
        assert!(c
            .iter()
            .all(|c| c.len <= MAX_PIECE && c.whole == Some(Whole { start: 0, len: size })));
        assert_eq!(
            (c[2].file_offset, c[2].inner_offset, c[2].len),
            (2 * MAX_PIECE, 2 * MAX_PIECE, 5)
        );
    }

    #[test]
    fn a_leap_second_modtime_carries_into_the_next_second() {
        let t = parse_rfc3339("2016-12-31T23:59:60.5Z").unwrap();
        assert!(t.nanos < 1_000_000_000, "{t:?}");
        assert_eq!(t.secs, 1_483_228_800);
    }

    #[test]
    fn a_toc_of_more_entries_than_the_cap_is_refused_while_parsing() {
        let json = format!(
            r#"{{"version":1,"entries":[{}{{}}]}}"#,
            "{},".repeat(limits::MAX_ENTRIES)
        );
        let e = serde_json::from_str::<Toc>(&json).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }
}
