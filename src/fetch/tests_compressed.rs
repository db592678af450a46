//! The fetcher on a layer whose chunks are gzip members (as in eStargz):
//! each chunk decodes from the range body's pieces as they arrive.

use super::testing::{services, tar_blob, tar_fetcher, Fault, TestSource};
use super::*;
use crate::index::Encoding;
use std::io::Write;

const CHUNK: u64 = 64 << 10;

/// Random-looking bytes: they compress little, like model weights.
fn weights(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A layer of `files` whose every chunk is its own gzip member, with chunk
/// digests; the source serves that blob.
async fn gzip_layer(files: &[(&str, Vec<u8>)]) -> (Arc<Fetcher>, Arc<TestSource>, tempfile::TempDir) {
    let tar = tar_blob(files);
    let cache = tempfile::tempdir().unwrap();
    let node = services(cache.path(), 1 << 30);
    let plain = tar_fetcher(&tar, Arc::new(TestSource::new(tar.clone())), &node, CHUNK, true).await;
    let mut index = (**plain.index()).clone();
    let mut blob = Vec::new();
    for c in &mut index.chunks {
        let raw = &tar[c.blob_offset as usize..(c.blob_offset + c.len) as usize];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(raw).unwrap();
        let member = gz.finish().unwrap();
        c.blob_offset = blob.len() as u64;
        c.blob_len = member.len() as u64;
        c.encoding = Encoding::Gzip;
        blob.extend_from_slice(&member);
    }
    drop(plain);
    let source = Arc::new(TestSource::new(blob.clone()));
    let layer = crate::digest::Digest::of(&blob);
    let f = Fetcher::new(
        layer,
        Arc::new(index),
        Arc::clone(&source) as Arc<dyn RangeSource>,
        &node,
    );
    (f, source, cache)
}

#[tokio::test]
async fn gzip_chunks_decode_from_a_body_arriving_in_pieces() {
    let w = weights(4 * CHUNK as usize + 1000, 1);
    let (f, source, _cache) = gzip_layer(&[("w.bin", w.clone())]).await;
    let n = f.index().resolve("w.bin").unwrap();
    let got = f.read(n, 0, 1 << 30).await.unwrap();
    assert!(got[..] == w[..], "the file's bytes");
    assert_eq!(source.requests().len(), 1, "one request for the run");
}

#[tokio::test]
async fn a_gzip_chunk_whose_body_ends_mid_member_is_a_source_error_not_corrupt() {
    let w = weights(4 * CHUNK as usize, 2);
    let (f, source, _cache) = gzip_layer(&[("w.bin", w)]).await;
    let n = f.index().resolve("w.bin").unwrap();
    let first = f.index().chunks[f.index().node(n).unwrap().first_chunk as usize].clone();
    source.fail_next(Fault::Short(first.blob_len / 2));
    let e = f.read(n, 0, 1 << 30).await.unwrap_err();
    assert!(matches!(e, FetchError::Source { .. }), "{e}");
    assert_eq!(source.requests().len(), 1, "a cut body is not fetched again as corrupt");
}

#[tokio::test]
async fn a_flipped_byte_in_a_gzip_chunk_is_fetched_once_more_and_the_reader_gets_the_right_bytes() {
    let w = weights(2 * CHUNK as usize, 3);
    let (f, source, _cache) = gzip_layer(&[("w.bin", w.clone())]).await;
    let n = f.index().resolve("w.bin").unwrap();
    source.fail_next(Fault::WrongBytes);
    let got = f.read(n, 0, 1 << 30).await.unwrap();
    assert!(got[..] == w[..], "the file's bytes");
    assert_eq!(source.requests().len(), 2);
}
