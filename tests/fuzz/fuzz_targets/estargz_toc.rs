//! eStargz: footer, TOC member (gzip around a tar around JSON) and the tree
//! built from it. First byte 0: the rest is the TOC member as stored in the
//! blob; otherwise the rest is the TOC JSON itself (to reach the tree build
//! without the fuzzer having to produce gzip).
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamsnap::digest::Digest;
use streamsnap::index::{estargz, toc, Encoding};

fuzz_target!(|data: &[u8]| {
    let layer = Digest::of(b"fuzz");
    let _ = estargz::parse_footer(data);
    let Some((mode, rest)) = data.split_first() else { return };
    let size = 1 << 30;
    if *mode == 0 {
        // The digest the manifest would bind, so the fuzzer gets past the check to the parser.
        if let Ok(json) = estargz::toc_json(rest) {
            let _ = estargz::parse_toc(&layer, rest, 1 << 20, &Digest::of(&json), size);
        }
    } else if let Ok(t) = serde_json::from_slice::<toc::Toc>(rest) {
        let _ = toc::build(&layer, &t, Encoding::Gzip, 1 << 20, size);
    }
});
