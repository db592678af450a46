//! Image indexes (multi-platform images) resolve to the requested platform.
mod common;
use common::raw::{push_image, put_manifest, tar_end, tar_entry};
use common::*;

#[test]
fn an_index_resolves_to_the_requested_platform() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let tar = "application/vnd.oci.image.layer.v1.tar";
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let layer = tar_end(tar_entry(b"arch", b'0', arch.as_bytes(), arch.len() as u64));
        let (digest, size) = push_image(&registry.addr(), "multi/app", arch, &[(tar, layer)]);
        let platform = match arch {
            "arm64" => serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"}),
            _ => serde_json::json!({"os": "linux", "architecture": arch}),
        };
        entries.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size, "platform": platform}));
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
    put_manifest(
        &registry.addr(),
        "multi/app",
        "latest",
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let image = format!("{}/multi/app", registry.addr());
    for (args, expected) in [
        (vec![], "amd64"),
        (vec!["--platform", "linux/arm64"], "arm64"),
        (vec!["--platform", "linux/arm64/v8"], "arm64"),
    ] {
        let dir = work.path().join(expected).join(args.len().to_string());
        let mount = MountProcess::start(&image, &dir.join("state"), &dir.join("mnt"), &args);
        assert_eq!(
            std::fs::read_to_string(mount.mountpoint.join("arch")).unwrap(),
            expected,
            "{args:?}"
        );
        mount.stop();
    }
    let log = MountProcess::try_start(
        &image,
        &work.path().join("s390x/state"),
        &work.path().join("s390x/mnt"),
        &["--platform", "linux/s390x"],
    )
    .err()
    .expect("no s390x manifest");
    assert!(
        log.contains("no manifest for platform linux/s390x") && log.contains("linux/amd64"),
        "{log}"
    );
}
