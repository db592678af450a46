//! Layer forms beyond the converters' output, and our own push path.
mod common;
use ::streamsnap::registry::{Reference, Registry as Client, RegistryOptions};
use common::raw::{push_layers, tar_end, tar_entry};
use common::*;
use std::sync::Arc;

fn two_file_tar() -> Vec<u8> {
    tar_end(
        [
            tar_entry(b"dir/", b'5', b"", 0),
            tar_entry(b"dir/a.txt", b'0', b"alpha\n", 6),
        ]
        .concat(),
    )
}

#[test]
fn a_plain_zstd_layer_is_downloaded_checked_and_served() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layer = zstd::encode_all(&two_file_tar()[..], 3).unwrap();
    let image = push_layers(
        &registry.addr(),
        "forms/zstd",
        "t",
        &[("application/vnd.oci.image.layer.v1.tar+zstd", layer)],
    );
    let mount = MountProcess::start(&image, &work.path().join("state"), &work.path().join("mnt"), &[]);
    assert_eq!(
        std::fs::read_to_string(mount.mountpoint.join("dir/a.txt")).unwrap(),
        "alpha\n"
    );
    assert!(mount.log().contains("Downloaded"), "{}", mount.log());
    mount.stop_with(libc::SIGINT);
}

#[test]
fn blobs_and_manifests_pushed_by_our_client_can_be_mounted() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image: Reference = format!("{}/forms/pushed:v1", registry.addr()).parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = Arc::new(Client::new(RegistryOptions::default()).unwrap());
    runtime.block_on(async {
        let layer = bytes::Bytes::from(two_file_tar());
        let config = bytes::Bytes::from_static(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
        let layer_digest = client.push_blob(&image, layer.clone()).await.unwrap();
        let config_digest = client.push_blob(&image, config.clone()).await.unwrap();
        // Pushing the same blob again is a no-op that still succeeds.
        assert_eq!(client.push_blob(&image, layer.clone()).await.unwrap(), layer_digest);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer.len()}],
        });
        let body = bytes::Bytes::from(serde_json::to_vec(&manifest).unwrap());
        client.push_manifest(&image, "v1", "application/vnd.oci.image.manifest.v1+json", body).await.unwrap();
        let resolved = client.resolve(&image, &Default::default()).await.unwrap();
        assert_eq!(resolved.layers[0].digest, layer_digest);
    });
    let mount = MountProcess::start(
        &image.to_string(),
        &work.path().join("state"),
        &work.path().join("mnt"),
        &[],
    );
    assert_eq!(
        std::fs::read_to_string(mount.mountpoint.join("dir/a.txt")).unwrap(),
        "alpha\n"
    );
    mount.stop();
}
