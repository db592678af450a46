//! containerd's `hosts.toml` (mirrors), as Spegel, Dragonfly or an operator writes it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = streamsnap::registry::hosts::parse(std::path::Path::new("/certs.d/r.test/hosts.toml"), text);
    }
});
