//! The tar header walk (PAX, GNU long names, base-256 sizes) over range reads
//! of the input, and the tree built from its entries.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use streamsnap::digest::Digest;
use streamsnap::index::tar::index_tar;

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"fuzz");
    let blob = Bytes::copy_from_slice(data);
    let size = blob.len() as u64;
    let read = |offset: u64, len: u64| {
        let b = blob.clone();
        async move {
            let end = offset.saturating_add(len).min(b.len() as u64);
            let start = offset.min(end);
            Ok::<_, std::io::Error>(b.slice(start as usize..end as usize))
        }
    };
    let _ = futures::executor::block_on(index_tar(&layer, size, 4096, read));
});
