//! Snapshot labels as containerd sends them (one `key=value` per line): the
//! remote-layer target they name, and list filters.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use streamsnap::snapshotter::filters::Filter;
use streamsnap::snapshotter::remote::RemoteLayers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let labels: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = RemoteLayers::target(&labels);
    let filters: Vec<String> = text.lines().map(str::to_string).collect();
    let _ = Filter::parse(&filters);
});
