//! What proves a cache entry intact after a crash or a restart, whatever the
//! layer's format: a chunk entry ends with the sha256 of its bytes; a
//! whole-file entry `file-<node>` has a sidecar `file-<node>.sums` listing
//! (offset, length, sha256) of every chunk written into it. Both are written
//! from bytes the fetcher had verified, fsynced before the entry gets its
//! final name. A flipped byte, a torn write or a file of another length then
//! fails the check and the entry is dropped (refetched), never served.

use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes of the sha256 trailer of a chunk entry.
pub const TRAILER: usize = 32;
/// Bytes of one record of a sums sidecar.
const RECORD: usize = 8 + 8 + 32;
/// Largest piece read at once while checking a whole-file entry.
const PIECE: u64 = 1 << 20;

pub type Sha = [u8; 32];

pub fn sha(data: &[u8]) -> Sha {
    Sha256::digest(data).into()
}

/// The bytes of a chunk entry read whole, without its trailer; `None` when
/// the trailer does not match (or is missing).
pub fn unseal(mut stored: Vec<u8>) -> Option<Vec<u8>> {
    let at = stored.len().checked_sub(TRAILER)?;
    let ok = sha(&stored[..at])[..] == stored[at..];
    stored.truncate(at);
    ok.then_some(stored)
}

/// One chunk written into a whole-file entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub len: u64,
    pub sha: Sha,
}

/// Why a whole-file entry cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("reading {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sums sidecar of {len} bytes is not a whole number of records")]
    Torn { len: usize },
    #[error("chunks do not cover the file: gap or overlap at offset {offset}")]
    Gap { offset: u64 },
    #[error("file holds {got} bytes, its chunks {covered}")]
    Length { got: u64, covered: u64 },
    #[error("chunk at file offset {offset} does not match its sha256")]
    Mismatch { offset: u64 },
}

/// The sidecar's bytes for `records` (in file-offset order).
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD);
    for r in records {
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
        out.extend_from_slice(&r.sha);
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<Record>, SealError> {
    if bytes.len() % RECORD != 0 {
        return Err(SealError::Torn { len: bytes.len() });
    }
    Ok(bytes
        .chunks_exact(RECORD)
        .map(|r| Record {
            offset: u64::from_le_bytes(r[0..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(r[8..16].try_into().expect("8 bytes")),
            sha: r[16..48].try_into().expect("32 bytes"),
        })
        .collect())
}

/// Checks the whole-file entry at `file` against its sidecar at `sums`: the
/// records tile the file exactly and every chunk matches its sha256. Reads
/// the file once, in pieces of at most `PIECE` bytes.
pub fn check_file(file: &Path, sums: &Path) -> Result<(), SealError> {
    let io = |what| move |source| SealError::Io { what, source };
    let records = read_sums(sums)?;
    let f = File::open(file).map_err(io("cache file"))?;
    let got = f.metadata().map_err(io("cache file"))?.len();
    let mut covered = 0u64;
    let mut buf = vec![0u8; PIECE as usize];
    for r in &records {
        if r.offset != covered {
            return Err(SealError::Gap { offset: covered });
        }
        let end = r.offset.checked_add(r.len).ok_or(SealError::Gap { offset: r.offset })?;
        if end > got {
            return Err(SealError::Length { got, covered: end });
        }
        let mut h = Sha256::new();
        let mut at = r.offset;
        while at < end {
            let n = (end - at).min(PIECE) as usize;
            f.read_exact_at(&mut buf[..n], at).map_err(io("cache file"))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        if h.finalize()[..] != r.sha {
            return Err(SealError::Mismatch { offset: r.offset });
        }
        covered = end;
    }
    if covered != got {
        return Err(SealError::Length { got, covered });
    }
    Ok(())
}

/// The records of the sums sidecar at `path`, in file-offset order.
pub fn read_sums(path: &Path) -> Result<Vec<Record>, SealError> {
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|source| SealError::Io {
            what: "sums sidecar",
            source,
        })?;
    let mut records = decode(&raw)?;
    records.sort_by_key(|r| r.offset);
    Ok(records)
}

/// Is `data`, read at `offset` of a whole-file entry, the chunk its sums recorded there?
pub fn chunk_matches(records: &[Record], offset: u64, data: &[u8]) -> bool {
    match records.binary_search_by_key(&offset, |r| r.offset) {
        Ok(i) => records[i].len == data.len() as u64 && records[i].sha == sha(data),
        Err(_) => false,
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.extend_from_slice(&sha(data));
        v
    }

    #[test]
    fn a_sealed_chunk_unseals_to_its_bytes() {
        assert_eq!(unseal(sealed(b"chunk")).unwrap(), b"chunk");
    }

    #[test]
    fn a_flipped_byte_in_a_sealed_chunk_is_refused() {
        let mut s = sealed(b"chunk");
        s[2] ^= 1;
        assert!(unseal(s).is_none());
        assert!(unseal(b"short".to_vec()).is_none());
    }

    fn whole_file(dir: &Path, data: &[u8], chunk: usize) -> (std::path::PathBuf, std::path::PathBuf) {
        let records: Vec<Record> = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| Record {
                offset: (i * chunk) as u64,
                len: c.len() as u64,
                sha: sha(c),
            })
            .rev() // written in any order
            .collect();
        let (f, s) = (dir.join("file-1"), dir.join("file-1.sums"));
        std::fs::write(&f, data).unwrap();
        std::fs::write(&s, encode(&records)).unwrap();
        (f, s)
    }

    #[test]
    fn a_whole_file_entry_checks_against_its_sums() {
        let dir = tempfile::tempdir().unwrap();
        let (f, s) = whole_file(dir.path(), &[7u8; 3000], 1000);
        check_file(&f, &s).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_a_whole_file_entry_fails_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let (f, s) = whole_file(dir.path(), &[7u8; 3000], 1000);
        let mut data = std::fs::read(&f).unwrap();
        data[1500] ^= 0x10;
        std::fs::write(&f, data).unwrap();
        assert!(matches!(check_file(&f, &s), Err(SealError::Mismatch { offset: 1000 })));
    }

    #[test]
    fn a_whole_file_entry_whose_chunks_leave_a_gap_fails_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let (f, s) = whole_file(dir.path(), &[7u8; 3000], 1000);
        let mut raw = std::fs::read(&s).unwrap();
        raw.truncate(raw.len() - RECORD); // the record of offset 0 was written first
        std::fs::write(&s, raw).unwrap();
        assert!(matches!(check_file(&f, &s), Err(SealError::Gap { offset: 0 })));
        std::fs::write(&s, b"torn").unwrap();
        assert!(matches!(check_file(&f, &s), Err(SealError::Torn { .. })));
    }
}
