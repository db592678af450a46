//! The gzip index file: header, meta section (zstd around postcard),
//! validation against a layer, spans and tree. First byte 0: the rest is the
//! file as stored; otherwise the rest is the postcard meta, packed into a
//! file here (so the fuzzer reaches the decoder without producing zstd).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use streamsnap::digest::Digest;
use streamsnap::index::gzip::{self, format};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else { return };
    let file = if *mode == 0 {
        rest.to_vec()
    } else {
        let packed = zstd::bulk::compress(rest, 1).expect("compress");
        let mut f = format::MAGIC.to_vec();
        f.extend_from_slice(&format::VERSION.to_le_bytes());
        f.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        f.extend_from_slice(&packed);
        f.extend_from_slice(&[0u8; 64]);
        f
    };
    let _ = format::decode_meta(rest);
    let mut tmp = tempfile::NamedTempFile::new().expect("temp file");
    tmp.write_all(&file).expect("write");
    // The layer the meta names, so validation goes past the layer check.
    let Ok((meta, _)) = format::read(tmp.as_file()) else {
        return;
    };
    let Ok(layer) = meta.layer.parse::<Digest>() else {
        return;
    };
    // Both layouts: a gzip layer's index and an uncompressed tar layer's.
    for layout in [gzip::Layout::Deflate, gzip::Layout::Stored] {
        let _ = gzip::open(tmp.path(), &layer, meta.compressed_size, layout);
    }
});
