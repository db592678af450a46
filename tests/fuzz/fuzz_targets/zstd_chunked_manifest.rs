//! zstd:chunked: footer, position annotation, and the manifest (zstd around
//! JSON) with the tree built from it. First byte 0: the rest is the
//! compressed manifest as stored; otherwise the rest is the JSON, compressed
//! here (so the fuzzer reaches the parser without producing zstd).
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamsnap::digest::Digest;
use streamsnap::index::zstd_chunked::{self, ManifestPosition};

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"fuzz");
    let _ = zstd_chunked::parse_footer(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = zstd_chunked::parse_position(s);
    }
    let Some((mode, rest)) = data.split_first() else { return };
    let (compressed, uncompressed) = if *mode == 0 {
        (rest.to_vec(), rest.len() as u64 * 4)
    } else {
        (zstd::bulk::compress(rest, 1).expect("compress"), rest.len() as u64)
    };
    let pos = ManifestPosition {
        offset: 1 << 20,
        compressed: compressed.len() as u64,
        uncompressed,
    };
    // The checksum the manifest would bind, so the fuzzer gets past the check to the parser.
    let checksum = Digest::of(&compressed);
    let _ = zstd_chunked::parse_manifest(&layer, &compressed, pos, &checksum, None, 1 << 30);
});
