//! Start-up profile documents (local files and published artifacts).
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamsnap::prefetch::profile;

fuzz_target!(|data: &[u8]| {
    let _ = profile::parse(data);
});
