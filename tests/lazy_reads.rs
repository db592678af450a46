//! Laziness, caching and concurrent reads, measured at the registry (its own
//! log of bytes written), not in our code.
mod common;
use common::fsutil::random_bytes;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Size of a blob as stored by the registry.
fn blob_size(registry: &Registry, digest: &str) -> u64 {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let p = registry
        .storage_dir()
        .join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    std::fs::metadata(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

/// The single layer descriptor of an image in the registry.
fn only_layer(registry: &Registry, reference: &str) -> serde_json::Value {
    let m = registry.manifest(reference);
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{m}");
    layers[0].clone()
}

/// Bytes an eStargz or zstd:chunked mount needs: footer + TOC, as the format lays them out.
fn metadata_bytes(registry: &Registry, format: Format, layer: &serde_json::Value) -> u64 {
    let digest = layer["digest"].as_str().unwrap();
    match format {
        Format::Estargz => {
            let hex = digest.strip_prefix("sha256:").unwrap();
            let data = std::fs::read(
                registry
                    .storage_dir()
                    .join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2])),
            )
            .unwrap();
            let footer = &data[data.len() - 51..];
            let toc_offset = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap();
            data.len() as u64 - toc_offset
        }
        Format::ZstdChunked => {
            let pos = layer["annotations"]["io.containers.zstd-chunked.manifest-position"]
                .as_str()
                .unwrap();
            pos.split(':').nth(1).unwrap().parse().unwrap()
        }
        _ => unreachable!(),
    }
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn mounting_fetches_only_metadata_and_one_small_file_costs_little() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let big = build_big_layer_image(&work.path().join("image"), 500);
    let formats = [Format::Estargz, Format::ZstdChunked, Format::Uncompressed];
    let refs = push_all(&big.image, &registry, &formats);
    for (format, reference) in formats.iter().zip(&refs) {
        let layer = only_layer(&registry, reference);
        let digest = layer["digest"].as_str().unwrap().to_string();
        let size = blob_size(&registry, &digest);
        assert!(size > 500 * MIB, "{format:?} layer is {size} bytes");
        let state = work.path().join(format!("state-{format:?}"));
        if *format == Format::Uncompressed {
            // Tar bytes are served lazily only under a trusted index: built here.
            eprintln!("{}", index_image(reference, &state, &["--span", "1MiB"]));
        }
        let mark = registry.mark();
        let mount = MountProcess::start(reference, &state, &work.path().join(format!("mnt-{format:?}")), &[]);
        let at_mount = registry.bytes_served_for_blob_since(&digest, mark);
        match format {
            Format::Uncompressed => {
                // The index is local: mounting fetches nothing of the layer.
                assert_eq!(
                    at_mount, 0,
                    "{format:?}: mount fetched {at_mount} bytes of a {size}-byte layer"
                );
            }
            _ => assert_eq!(
                at_mount,
                metadata_bytes(&registry, *format, &layer),
                "{format:?}: mount fetched more than footer and TOC"
            ),
        }
        let mark = registry.mark();
        let (path, content) = &big.after[0];
        assert_eq!(&read_file(&mount.mountpoint.join(path)), content, "{format:?}: {path}");
        let read_cost = registry.bytes_served_for_blob_since(&digest, mark);
        assert!(
            read_cost < 5 * MIB,
            "{format:?}: reading {path} fetched {read_cost} bytes"
        );
        eprintln!("{format:?}: layer {size} bytes, mount fetched {at_mount}, one small file {read_cost}");
        mount.stop();
    }
}

/// Pushes a one-layer image whose big file is `mib` MiB, as eStargz.
fn estargz_image(registry: &Registry, dir: &Path, mib: u64) -> (BigLayerImage, String, String) {
    let big = build_big_layer_image(dir, mib);
    let reference = push(&big.image, registry, Format::Estargz);
    let digest = only_layer(registry, &reference)["digest"].as_str().unwrap().to_string();
    (big, reference, digest)
}

#[test]
fn a_second_mount_with_the_same_state_dir_fetches_no_content() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (big, reference, digest) = estargz_image(&registry, &work.path().join("image"), 24);
    let state = work.path().join("state");
    let expected = random_bytes(big.big_size as usize, 42);
    let mut toc_cost = 0;
    for round in 0..2 {
        let mark = registry.mark();
        let mount = MountProcess::start(&reference, &state, &work.path().join("mnt"), &[]);
        let at_mount = registry.bytes_served_for_blob_since(&digest, mark);
        if round == 0 {
            toc_cost = at_mount;
        }
        let mark = registry.mark();
        assert!(
            read_file(&mount.mountpoint.join("big.bin")) == expected,
            "round {round}: big.bin differs"
        );
        for (path, content) in big.before.iter().chain(&big.after) {
            assert_eq!(
                &read_file(&mount.mountpoint.join(path)),
                content,
                "round {round}: {path}"
            );
        }
        let content_cost = registry.bytes_served_for_blob_since(&digest, mark);
        if round == 0 {
            assert!(
                content_cost >= big.big_size,
                "first round fetched only {content_cost} bytes"
            );
        } else {
            assert_eq!(at_mount, toc_cost, "second mount fetched more than the TOC");
            assert_eq!(content_cost, 0, "second round fetched content bytes");
        }
        mount.stop();
    }
}

fn dir_bytes(p: &Path) -> u64 {
    walk(p).iter().map(|f| f.metadata().unwrap().len()).sum()
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_cache_smaller_than_the_data_read_stays_bounded_and_bytes_stay_right() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (big, reference, _) = estargz_image(&registry, &work.path().join("image"), 40);
    let state = work.path().join("state");
    let expected = random_bytes(big.big_size as usize, 42);
    let bound = 10 * MIB;
    for round in 0..2 {
        let mount = MountProcess::start(&reference, &state, &work.path().join("mnt"), &["--cache-size", "10MiB"]);
        assert!(
            read_file(&mount.mountpoint.join("big.bin")) == expected,
            "round {round}: big.bin differs"
        );
        let cached = dir_bytes(&state.join("cache"));
        assert!(
            cached <= bound,
            "round {round}: cache holds {cached} bytes, bound {bound}"
        );
        mount.stop();
    }
}

#[test]
fn sixteen_threads_reading_random_offsets_get_right_bytes_and_each_chunk_once() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (big, reference, digest) = estargz_image(&registry, &work.path().join("image"), 64);
    let expected = std::sync::Arc::new(random_bytes(big.big_size as usize, 42));
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    let mark = registry.mark();
    let path = mount.mountpoint.join("big.bin");
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (path, expected) = (path.clone(), expected.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::open(&path).unwrap();
                let mut x = t * 7919 + 1;
                for _ in 0..64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let len = 1 + (x >> 40) as usize % (256 << 10);
                    let off = (x >> 8) as usize % (expected.len() - len);
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert!(
                        buf == expected[off..off + len],
                        "thread {t}: wrong bytes at {off}+{len}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Then read everything, so every chunk has been asked for at least once.
    assert!(read_file(&path) == *expected);
    let served = registry.blob_requests_since(mark);
    let total: u64 = served
        .iter()
        .filter(|r| digest.ends_with(r.digest.trim_start_matches("sha256:")))
        .map(|r| r.bytes)
        .sum();
    let size = blob_size(&registry, &digest);
    assert!(
        total <= size,
        "fetched {total} bytes of a {size}-byte blob: some chunk was fetched twice"
    );
    assert!(
        total >= big.big_size,
        "fetched {total} bytes, less than the file ({})",
        big.big_size
    );
    mount.stop();
}

#[test]
fn sequential_readers_get_chunks_fetched_ahead_and_single_reads_do_not() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (big, reference, digest) = estargz_image(&registry, &work.path().join("image"), 96);
    let expected = random_bytes(big.big_size as usize, 42);
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    let f = std::fs::File::open(mount.mountpoint.join("big.bin")).unwrap();
    // One small read at the start: at most the chunk that holds it (eStargz chunks are 4 MiB).
    let mark = registry.mark();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == expected[..4096]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let single = registry.bytes_served_for_blob_since(&digest, mark);
    assert!(single <= 5 * MIB, "a single 4 KiB read fetched {single} bytes");
    // A sequential scan of 12 MiB: the following chunks are fetched before they are asked for.
    let mark = registry.mark();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..12u64 {
        f.read_exact_at(&mut buf, i * MIB).unwrap();
        assert!(buf == expected[(i * MIB) as usize..((i + 1) * MIB) as usize]);
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let scanned = registry.bytes_served_for_blob_since(&digest, mark);
    assert!(
        scanned >= 24 * MIB,
        "only {scanned} bytes fetched for a 12 MiB sequential scan: no read-ahead"
    );
    assert!(
        scanned <= 12 * MIB + 32 * MIB + 8 * MIB,
        "read-ahead fetched {scanned} bytes, past its 32 MiB bound"
    );
    mount.stop();
}

#[test]
fn a_fully_read_file_becomes_one_cache_file_the_kernel_reads_directly() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let (big, reference, digest) = estargz_image(&registry, &work.path().join("image"), 24);
    let state = work.path().join("state");
    let expected = random_bytes(big.big_size as usize, 42);
    let layer_cache = state.join("cache").join(digest.strip_prefix("sha256:").unwrap());
    let whole_files = || -> Vec<std::path::PathBuf> {
        walk(&layer_cache)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("file-") && !name.ends_with(".sums")
            })
            .collect()
    };
    let mount = MountProcess::start(&reference, &state, &work.path().join("mnt"), &[]);
    assert!(
        read_file(&mount.mountpoint.join("big.bin")) == expected,
        "cold read differs"
    );
    wait_until(std::time::Duration::from_secs(20), "a whole-file cache entry", || {
        whole_files().len() == 1
    });
    let whole = &whole_files()[0];
    assert_eq!(whole.metadata().unwrap().len(), big.big_size);
    assert!(
        dir_bytes(&layer_cache) < big.big_size + big.big_size / 4,
        "the file's chunk entries should be gone"
    );
    // Across a remount, with page caches dropped: the kernel reads the cache file
    // itself, once the entry has been checked against its sums (the first open
    // after a restart is served through FUSE meanwhile, from the cache).
    mount.stop();
    run_sh("sync; echo 3 > /proc/sys/vm/drop_caches");
    let mark = registry.mark();
    let mount = MountProcess::start(&reference, &state, &work.path().join("mnt"), &[]);
    let before_toc = registry.bytes_served_for_blob_since(&digest, mark);
    assert!(
        read_file(&mount.mountpoint.join("big.bin")) == expected,
        "warm read differs"
    );
    assert_eq!(
        registry.bytes_served_for_blob_since(&digest, mark),
        before_toc,
        "warm read fetched content"
    );
    wait_until(std::time::Duration::from_secs(20), "a passthrough open", || {
        assert!(
            read_file(&mount.mountpoint.join("big.bin")) == expected,
            "warm read differs"
        );
        mount.log().contains("opened in passthrough mode")
    });
    assert_eq!(
        registry.bytes_served_for_blob_since(&digest, mark),
        before_toc,
        "warm reads fetched content"
    );
    mount.stop();
}
