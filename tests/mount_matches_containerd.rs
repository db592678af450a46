//! `streamsnap mount` shows, entry by entry, what containerd's own overlayfs
//! snapshotter unpacks from the same image, for every layer form.
mod common;
use common::*;

/// Size of the big file in the feature image (the issue asks for 300 MiB).
const BIG_FILE: u64 = 300 << 20;

#[test]
fn mounted_tree_equals_containerd_unpack_in_every_format() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_feature_image(&work.path().join("image"), BIG_FILE);
    let refs = push_all(&image, &registry, &Format::ALL);
    let containerd = Containerd::start(ContainerdOpts::default());
    let mut failures = Vec::new();
    for (format, reference) in Format::ALL.iter().zip(&refs) {
        let truth = containerd_unpack(
            &containerd,
            reference,
            &work.path().join(format!("truth-{}", format.suffix())),
        );
        let state = work.path().join(format!("state-{}", format.suffix()));
        let mount = MountProcess::start(
            reference,
            &state,
            &work.path().join(format!("mnt-{}", format.suffix())),
            &[],
        );
        let mut opts = CompareOpts::stargz_artefacts();
        if matches!(format, Format::Estargz | Format::ZstdChunked) {
            // Their TOCs keep whole (rounded) seconds; the tar headers keep nanoseconds.
            opts.mtime_tolerance_ns = 1_000_000_000;
        }
        let big = mount
            .mountpoint
            .join("data/big.bin")
            .metadata()
            .expect("big file visible in the mount");
        assert_eq!(big.len(), BIG_FILE, "{format:?}");
        let diffs = compare_trees(&mount.mountpoint, truth.path(), opts);
        for d in &diffs {
            failures.push(format!("{format:?}: {d}"));
        }
        // Format artefacts are hidden from the mount.
        for artefact in ["stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark"] {
            if mount.mountpoint.join(artefact).symlink_metadata().is_ok() {
                failures.push(format!("{format:?}: {artefact} is visible"));
            }
        }
        let log = mount.stop();
        eprintln!("{format:?}: {} differences; log:\n{log}", diffs.len());
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
