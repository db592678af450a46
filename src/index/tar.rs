//! Indexes an uncompressed tar by walking its 512-byte headers through range
//! reads: file contents are skipped, never fetched (small files that sit
//! inside a read window come along for free).

use super::{Chunk, Encoding, EntryMeta, IndexError, Kind, LayerIndex, Timestamp, TreeBuilder};
use crate::digest::Digest;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;

const BLOCK: u64 = 512;
/// Bytes read per header fetch; neighbouring small entries arrive together.
const WINDOW: u64 = 64 << 10;
/// Upper bound for PAX and GNU long-name payloads.
const MAX_META: u64 = 1 << 20;

/// A 512-byte block whose header checksum does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    #[error("checksum field is not octal")]
    NotOctal,
    #[error("checksum mismatch (stored {stored:o}, computed {computed:o}): not a tar header")]
    Mismatch { stored: u32, computed: u32 },
}

/// One archive entry as the walk found it.
pub struct TarEntry {
    pub path: Vec<u8>,
    /// Target of a hard link (`None` for every other entry).
    pub hardlink: Option<Vec<u8>>,
    /// Metadata; `chunks` is left empty for the caller to fill.
    pub meta: EntryMeta,
    /// Where the entry's data starts in the tar stream.
    pub data_offset: u64,
}

/// Walks the tar in `[0, size)` via `read(offset, len)` and splits file
/// contents into `Raw` chunks of at most `chunk_size` bytes.
pub async fn index_tar<R, Fut, E>(layer: &Digest, size: u64, chunk_size: u64, read: R) -> Result<LayerIndex, IndexError>
where
    R: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut builder = TreeBuilder::new(layer.clone());
    walk_tar(layer, size, read, |mut e| {
        e.meta.chunks = raw_chunks(e.data_offset, e.meta.size, chunk_size);
        match &e.hardlink {
            Some(target) => builder.add_hardlink(&e.path, target, e.meta),
            None => builder.add(&e.path, e.meta),
        }
    })
    .await?;
    // Header parsing above is cheap per read window; the final build walks
    // every node, so it runs on the blocking pool.
    super::blocking(layer, move || builder.finish(size)).await
}

/// Walks the headers of the tar in `[0, size)`, reading through
/// `read(offset, len)` at increasing offsets (so a forward-only stream can
/// serve it), and hands each entry to `on_entry` in archive order.
/// `size` may be `u64::MAX` when the stream's length is not known yet.
pub async fn walk_tar<R, Fut, E>(
    layer: &Digest,
    size: u64,
    read: R,
    mut on_entry: impl FnMut(TarEntry) -> Result<(), IndexError>,
) -> Result<(), IndexError>
where
    R: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut win = Windowed {
        layer,
        size,
        read,
        start: 0,
        data: Bytes::new(),
    };
    let bad = |at: u64, reason: String| IndexError::Layer {
        layer: layer.clone(),
        reason: format!("tar header at offset {at}: {reason}"),
    };
    let mut pos = 0u64;
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: HashMap<String, Vec<u8>> = HashMap::new();
    let mut global: HashMap<String, Vec<u8>> = HashMap::new();
    loop {
        if pos.checked_add(BLOCK).is_none_or(|end| end > size) {
            if pos == size {
                break; // no end-of-archive blocks: accept a tar that ends on a boundary
            }
            return Err(bad(pos, format!("truncated: blob ends at {size}")));
        }
        let block = win.get(pos, BLOCK).await?;
        if block.iter().all(|b| *b == 0) {
            break;
        }
        let header = tar::Header::from_byte_slice(&block);
        verify_checksum(&block).map_err(|source| IndexError::TarHeader {
            layer: layer.clone(),
            offset: pos,
            source,
        })?;
        let mut entry_size = header.entry_size().map_err(|e| bad(pos, e.to_string()))?;
        if let Some(s) = pax.get("size").or_else(|| global.get("size")) {
            entry_size = parse_num(s).ok_or_else(|| bad(pos, "invalid PAX size".into()))?;
        }
        // Sizes come from the archive (a PAX size may be near u64::MAX): every
        // sum is checked, so nothing wraps.
        let data_at = pos + BLOCK;
        let typ = header.entry_type();
        let header_only = matches!(typ.as_byte(), b'1' | b'2' | b'3' | b'4' | b'5' | b'6');
        let payload = if header_only { 0 } else { entry_size };
        let overflows = || bad(pos, format!("entry size {payload} overflows the archive offsets"));
        let next = payload
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|padded| data_at.checked_add(padded))
            .ok_or_else(overflows)?;
        if data_at.checked_add(payload).is_none_or(|end| end > size) {
            return Err(bad(
                pos,
                format!("entry size {payload} runs past the end of the blob ({size})"),
            ));
        }
        if matches!(typ.as_byte(), b'L' | b'K' | b'x' | b'g') && payload > MAX_META {
            return Err(bad(pos, format!("metadata entry of {payload} bytes is too large")));
        }
        match typ.as_byte() {
            b'L' | b'K' => {
                let data = win.get(data_at, payload).await?;
                let name = trim_nul(&data).to_vec();
                if typ.as_byte() == b'L' {
                    long_name = Some(name);
                } else {
                    long_link = Some(name);
                }
            }
            b'x' | b'g' => {
                let data = win.get(data_at, payload).await?;
                let target = if typ.as_byte() == b'x' { &mut pax } else { &mut global };
                for ext in tar::PaxExtensions::new(&data) {
                    let ext = ext.map_err(|e| bad(pos, format!("malformed PAX record: {e}")))?;
                    let key = ext.key().map_err(|_| bad(pos, "PAX key is not UTF-8".into()))?;
                    target.insert(key.to_string(), ext.value_bytes().to_vec());
                }
            }
            b'S' => return Err(bad(pos, "GNU sparse files are not supported".into())),
            _ => {
                let lookup = |k: &str| pax.get(k).or_else(|| global.get(k));
                let path = match (lookup("path"), long_name.take()) {
                    (Some(p), _) => p.clone(),
                    (None, Some(n)) => n,
                    (None, None) => header.path_bytes().into_owned(),
                };
                let link = match (lookup("linkpath"), long_link.take()) {
                    (Some(p), _) => p.clone(),
                    (None, Some(n)) => n,
                    (None, None) => header.link_name_bytes().map(|c| c.into_owned()).unwrap_or_default(),
                };
                let num = |k: &str, fallback: u64| -> Result<u64, IndexError> {
                    match lookup(k) {
                        Some(v) => parse_num(v).ok_or_else(|| bad(pos, format!("invalid PAX {k}"))),
                        None => Ok(fallback),
                    }
                };
                // An all-blank numeric field reads as 0, as Go's archive/tar has it.
                let field = |r: std::io::Result<u64>, raw: &[u8], what: &str| {
                    if raw.iter().all(|b| *b == 0 || *b == b' ') {
                        return Ok(0);
                    }
                    r.map_err(|e| bad(pos, format!("{what}: {e}")))
                };
                let old = header.as_old();
                let uid = num("uid", field(header.uid(), &old.uid, "uid")?)? as u32;
                let gid = num("gid", field(header.gid(), &old.gid, "gid")?)? as u32;
                let mtime = match lookup("mtime") {
                    Some(v) => parse_time(v).ok_or_else(|| bad(pos, "invalid PAX mtime".into()))?,
                    None => Timestamp {
                        secs: field(header.mtime(), &old.mtime, "mtime")? as i64,
                        nanos: 0,
                    },
                };
                let mode = header.mode().map_err(|e| bad(pos, format!("mode: {e}")))?;
                let xattrs: Vec<(Vec<u8>, Vec<u8>)> = pax
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix("SCHILY.xattr.")
                            .map(|n| (n.as_bytes().to_vec(), v.clone()))
                    })
                    .collect();
                let dev = |r: std::io::Result<Option<u32>>| r.ok().flatten().unwrap_or(0);
                let kind = match typ.as_byte() {
                    b'0' | b'\0' | b'7' => Kind::File,
                    b'1' => Kind::File, // hard link: resolved below
                    b'2' => Kind::Symlink(link.clone()),
                    b'3' => Kind::CharDev {
                        major: dev(header.device_major()),
                        minor: dev(header.device_minor()),
                    },
                    b'4' => Kind::BlockDev {
                        major: dev(header.device_major()),
                        minor: dev(header.device_minor()),
                    },
                    b'5' => Kind::Dir,
                    b'6' => Kind::Fifo,
                    other => return Err(bad(pos, format!("unsupported entry type {:?}", other as char))),
                };
                let file_size = if kind == Kind::File && typ.as_byte() != b'1' {
                    payload
                } else {
                    0
                };
                let meta = EntryMeta {
                    kind,
                    mode,
                    uid,
                    gid,
                    size: file_size,
                    mtime,
                    xattrs,
                    chunks: Vec::new(),
                };
                let hardlink = (typ.as_byte() == b'1').then_some(link);
                on_entry(TarEntry {
                    path,
                    hardlink,
                    meta,
                    data_offset: data_at,
                })?;
                pax.clear();
            }
        }
        pos = next;
    }
    Ok(())
}

/// Serves small reads from the last fetched window of the blob.
struct Windowed<'a, R> {
    layer: &'a Digest,
    size: u64,
    read: R,
    start: u64,
    data: Bytes,
}

impl<R, Fut, E> Windowed<'_, R>
where
    R: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<Bytes, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    async fn get(&mut self, offset: u64, len: u64) -> Result<Bytes, IndexError> {
        let end = self.start + self.data.len() as u64;
        let Some(wanted_end) = offset.checked_add(len).filter(|e| *e <= self.size) else {
            return Err(IndexError::Layer {
                layer: self.layer.clone(),
                reason: format!(
                    "read of {len} bytes at {offset} runs past the blob ({} bytes)",
                    self.size
                ),
            });
        };
        if offset < self.start || wanted_end > end {
            let want = len.max(WINDOW).min(self.size - offset);
            let data = (self.read)(offset, want).await.map_err(|e| IndexError::Fetch {
                layer: self.layer.clone(),
                what: format!("tar headers at {offset}+{want}"),
                source: Box::new(e),
            })?;
            if (data.len() as u64) < len {
                return Err(IndexError::Layer {
                    layer: self.layer.clone(),
                    reason: format!("short read at {offset}: {} of {len} bytes", data.len()),
                });
            }
            self.start = offset;
            self.data = data;
        }
        let s = (offset - self.start) as usize;
        Ok(self.data.slice(s..s + len as usize))
    }
}

/// Splits `[at, at+len)` into raw chunks of at most `chunk_size`.
pub fn raw_chunks(at: u64, len: u64, chunk_size: u64) -> Vec<Chunk> {
    (0..len.div_ceil(chunk_size))
        .map(|i| {
            let off = i * chunk_size;
            let n = chunk_size.min(len - off);
            Chunk {
                file_offset: off,
                len: n,
                blob_offset: at + off,
                blob_len: n,
                inner_offset: 0,
                encoding: Encoding::Raw,
                digest: None,
                whole: None,
            }
        })
        .collect()
}

fn verify_checksum(block: &[u8]) -> Result<(), ChecksumError> {
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok())
        .ok_or(ChecksumError::NotOctal)?;
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                b' ' as u32
            } else {
                *b as u32
            }
        })
        .sum();
    if sum != stored {
        return Err(ChecksumError::Mismatch { stored, computed: sum });
    }
    Ok(())
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|c| *c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn parse_num(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// PAX times are decimal seconds with an optional fraction.
fn parse_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    // Digits only: a second sign would make `-secs` below overflow.
    if !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = whole.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: u32 = digits.parse().ok()?;
    Some(if neg && nanos > 0 {
        Timestamp {
            secs: -secs - 1,
            nanos: 1_000_000_000 - nanos,
        }
    } else if neg {
        Timestamp { secs: -secs, nanos: 0 }
    } else {
        Timestamp { secs, nanos }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_tar(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    async fn index(data: Vec<u8>) -> Result<LayerIndex, IndexError> {
        let data = Bytes::from(data);
        let size = data.len() as u64;
        index_tar(&Digest::of(b"t"), size, 1 << 20, |off, len| {
            let d = data.slice(off as usize..(off + len) as usize);
            async move { Ok::<_, std::io::Error>(d) }
        })
        .await
    }

    fn header(path: &str, size: u64, typ: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_entry_type(typ);
        h.set_mode(0o640);
        h.set_cksum();
        h
    }

    #[tokio::test]
    async fn long_names_and_pax_times_are_read() {
        let long = format!("d/{}", "n".repeat(150));
        let data = build_tar(|b| {
            let mut h = header("x", 0, tar::EntryType::Regular);
            b.append_pax_extensions([("mtime", &b"1700000000.123456789"[..]), ("SCHILY.xattr.user.k", b"v")])
                .unwrap();
            b.append_data(&mut h, "x", &[][..]).unwrap();
            let mut h = header("placeholder", 3, tar::EntryType::Regular);
            b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        });
        let idx = index(data).await.map_err(|e| e.to_string()).unwrap();
        let x = idx.node(idx.resolve("x").unwrap()).unwrap();
        assert_eq!(
            x.mtime,
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789
            }
        );
        assert_eq!(x.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
        let f = idx.resolve(&long).unwrap();
        assert_eq!(idx.file_chunks(f)[0].len, 3);
    }

    #[tokio::test]
    async fn a_size_past_the_end_of_the_blob_is_an_error() {
        let mut data = build_tar(|b| {
            let mut h = header("f", 10, tar::EntryType::Regular);
            b.append_data(&mut h, "f", &[7u8; 10][..]).unwrap();
        });
        data.truncate(512 + 5);
        let e = index(data).await.unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[tokio::test]
    async fn a_corrupt_header_is_an_error_with_its_offset() {
        let mut data = build_tar(|b| {
            let mut h = header("f", 1, tar::EntryType::Regular);
            b.append_data(&mut h, "f", &[1u8][..]).unwrap();
        });
        data[0] ^= 0xff;
        let e = index(data).await.unwrap_err().to_string();
        assert!(e.contains("offset 0") && e.contains("checksum"), "{e}");
    }

    #[tokio::test]
    async fn base256_numbers_and_gnu_long_names_are_read() {
        let long = "l".repeat(120);
        let data = build_tar(|b| {
            let mut h = header("x", 0, tar::EntryType::Regular);
            h.set_uid(3_000_000_000); // too large for octal: GNU base-256
            h.set_mtime(1);
            h.set_cksum();
            b.append_data(&mut h, &long, &[][..]).unwrap();
        });
        let idx = index(data).await.unwrap();
        assert_eq!(idx.node(idx.resolve(&long).unwrap()).unwrap().uid, 3_000_000_000);
    }

    #[test]
    fn negative_fractional_pax_time() {
        assert_eq!(
            parse_time(b"-1.5"),
            Some(Timestamp {
                secs: -2,
                nanos: 500_000_000
            })
        );
    }

    #[tokio::test]
    async fn a_pax_size_near_u64_max_is_refused_without_wrapping() {
        for size in [u64::MAX, u64::MAX - 511, u64::MAX / 2] {
            let data = build_tar(|b| {
                b.append_pax_extensions([("size", size.to_string().as_bytes())])
                    .unwrap();
                let mut h = header("f", 0, tar::EntryType::Regular);
                b.append_data(&mut h, "f", &[][..]).unwrap();
            });
            let e = index(data).await.unwrap_err().to_string();
            assert!(e.contains("layer sha256:") && e.contains(&size.to_string()), "{e}");
        }
    }

    #[test]
    fn a_pax_mtime_with_two_signs_is_refused_not_negated_past_i64() {
        assert_eq!(parse_time(b"--9223372036854775808"), None);
        assert_eq!(parse_time(b"-+5"), None);
        assert_eq!(
            parse_time(b"-1.5"),
            Some(Timestamp {
                secs: -2,
                nanos: 500_000_000
            })
        );
    }
}
