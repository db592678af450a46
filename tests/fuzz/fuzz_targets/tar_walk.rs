//! The tar header walk (PAX, GNU long names, base-256 sizes) over range reads
//! of the input, and the tree built from its entries.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use streamsnap::digest::Digest;
use streamsnap::index::tar::index_tar;

/// The walk's final tree build runs on tokio's blocking pool, as in the daemon.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

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
    let _ = runtime().block_on(index_tar(&layer, size, 4096, read));
});
