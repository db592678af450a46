//! The TOML config file, with every typed value parsed at load.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamsnap::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
