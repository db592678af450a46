//! Integrity policy (issue #12 item 2): a registry that serves a tampered blob
//! (same size, one byte flipped) never gets the flipped byte into a read, in
//! any layer form; lazy serving happens only from TOCs the manifest binds and
//! indexes from trusted sources.
mod common;
use common::fsutil::random_bytes;
use common::*;
use std::path::Path;

/// A one-layer image (small files around an 8 MiB random file) pushed in
/// `format`, and a proxy in front of the registry serving its layer with the
/// byte in the middle of the blob flipped.
struct Tampered {
    registry: Registry,
    proxy: FaultProxy,
    image: BigLayerImage,
    /// The image's reference on the registry itself (honest bytes).
    honest: String,
    /// The same image through the tampering proxy.
    reference: String,
    layer: String,
    work: tempfile::TempDir,
}

fn tampered(format: Format) -> Tampered {
    tampered_at(format, |size| size / 2)
}

/// Like `tampered`, with the byte at `at(blob size)` flipped.
fn tampered_at(format: Format, at: fn(u64) -> u64) -> Tampered {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let honest = push(&image.image, &registry, format);
    let layer = registry.manifest(&honest)["layers"][0].clone();
    let (digest, size) = (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    );
    let proxy = FaultProxy::start(&registry.addr());
    proxy.set(&format!("/blobs/{digest}"), Fault::FlipAt(at(size)));
    let reference = honest.replacen(&registry.addr(), &proxy.addr(), 1);
    Tampered {
        registry,
        proxy,
        image,
        honest,
        reference,
        layer: digest,
        work,
    }
}

impl Tampered {
    /// Every file of the image, with the content it must have.
    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let big = (
            self.image.big_path.clone(),
            random_bytes(self.image.big_size as usize, 42),
        );
        let i = &self.image;
        i.before.iter().chain(&i.after).cloned().chain([big]).collect()
    }

    /// Mounts through the proxy; `Err(log)` when the mount is refused.
    fn mount(&self, state: &Path, extra: &[&str]) -> Result<MountProcess, String> {
        MountProcess::try_start(&self.reference, state, &self.work.path().join("mnt"), extra)
    }

    /// Reads every file of the mount: each read gives the right bytes or an
    /// error, never other bytes. Returns the paths whose reads failed.
    fn reads_never_wrong(&self, mount: &MountProcess) -> Vec<String> {
        let mut failed = Vec::new();
        for (path, content) in self.files() {
            match std::fs::read(mount.mountpoint.join(&path)) {
                Ok(got) => assert!(got == content, "{path}: wrong bytes handed out\n{}", mount.log()),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}");
                    failed.push(path);
                }
            }
        }
        failed
    }
}

/// A mount refused because the layer, downloaded whole, failed its digest.
fn refused_by_digest(log: &str, layer: &str) {
    assert!(!log.contains("panicked"), "streamsnap panicked:\n{log}");
    assert!(
        log.contains(layer) && log.contains("downloaded content hashes to"),
        "the layer and its digest mismatch are named:\n{log}"
    );
}

#[test]
fn a_tampered_estargz_layer_without_a_toc_digest_annotation_is_never_served_lazily() {
    let t = tampered(Format::Estargz);
    // The same image, its manifest without the annotation that binds the TOC.
    let mut m = t.registry.manifest(&t.honest);
    m["layers"][0]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("containerd.io/snapshot/stargz/toc.digest");
    let repo = t.honest.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    let body = serde_json::to_vec(&m).unwrap();
    let media_type = m["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    common::raw::put_manifest(&t.registry.addr(), repo, "unbound", media_type, &body);
    let reference = format!("{}/{repo}:unbound", t.proxy.addr());
    let state = t.work.path().join("state");
    match MountProcess::try_start(&reference, &state, &t.work.path().join("mnt"), &[]) {
        // Downloaded whole: the flipped byte fails the layer digest.
        Err(log) => {
            refused_by_digest(&log, &t.layer);
        }
        Ok(mount) => {
            t.reads_never_wrong(&mount);
            let log = mount.stop();
            assert!(!log.contains("format=Estargz"), "served from an unbound TOC:\n{log}");
        }
    }
}

#[test]
fn a_tampered_zstd_chunked_layer_fails_the_chunk_it_touches_and_serves_the_rest() {
    let t = tampered(Format::ZstdChunked);
    let mount = t.mount(&t.work.path().join("state"), &[]).unwrap();
    let failed = t.reads_never_wrong(&mount);
    let log = mount.stop();
    assert!(log.contains("format=ZstdChunked"), "{log}");
    assert_eq!(failed, vec![t.image.big_path.clone()], "{log}");
}

#[test]
fn a_tampered_uncompressed_layer_without_a_trusted_index_is_not_served() {
    let t = tampered(Format::Uncompressed);
    match t.mount(&t.work.path().join("state"), &[]) {
        Err(log) => {
            refused_by_digest(&log, &t.layer);
        }
        Ok(mount) => {
            t.reads_never_wrong(&mount);
            let log = mount.stop();
            assert!(!log.contains("format=Tar"), "served lazily without an index:\n{log}");
        }
    }
}

#[test]
fn a_tampered_uncompressed_layer_under_a_trusted_index_fails_the_span_it_touches() {
    let t = tampered(Format::Uncompressed);
    let state = t.work.path().join("state");
    // Built on this node from the honest registry: checked against the layer digest.
    let out = index_image(&t.honest, &state, &["--min-layer-size", "0", "--span", "1MiB"]);
    assert!(out.contains("indexed"), "{out}");
    let mark = t.registry.mark();
    let mount = t.mount(&state, &[]).unwrap();
    let at_mount = t.registry.bytes_served_for_blob_since(&t.layer, mark);
    assert_eq!(at_mount, 0, "served lazily: the mount fetched {at_mount} layer bytes");
    let failed = t.reads_never_wrong(&mount);
    let log = mount.stop();
    assert!(log.contains("format=Tar"), "{log}");
    assert!(log.contains("span failed verification"), "{log}");
    assert_eq!(failed, vec![t.image.big_path.clone()], "{log}");
}

#[test]
fn a_tampered_gzip_layer_under_a_trusted_index_fails_the_span_it_touches() {
    let t = tampered(Format::Gzip);
    let state = t.work.path().join("state");
    index_image(&t.honest, &state, &["--min-layer-size", "0", "--span", "1MiB"]);
    let mount = t.mount(&state, &[]).unwrap();
    let failed = t.reads_never_wrong(&mount);
    let log = mount.stop();
    assert!(log.contains("format=GzipIndex"), "{log}");
    assert_eq!(failed, vec![t.image.big_path.clone()], "{log}");
}

#[test]
fn a_tampered_gzip_layer_without_an_index_is_refused_by_its_digest() {
    let t = tampered(Format::Gzip);
    match t.mount(&t.work.path().join("state"), &[]) {
        Err(log) => {
            refused_by_digest(&log, &t.layer);
        }
        Ok(mount) => panic!("a tampered layer was downloaded and served:\n{}", mount.stop()),
    }
}

/// An index of `honest`'s layer as a forger with push rights to the image's
/// repository would make it: built from the real layer (so every span digest
/// is right), then two files' data offsets swapped and one file made setuid.
fn forged_index(honest: &str, work: &Path, layer: &str) -> Vec<u8> {
    use ::streamsnap::index::gzip::format as index_file;
    let state = work.join("forger");
    index_image(honest, &state, &["--min-layer-size", "0"]);
    let path = state
        .join("indexes")
        .join(format!("{}.trusted.gzindex", layer.trim_start_matches("sha256:")));
    let file = std::fs::File::open(&path).unwrap();
    let (mut meta, windows_at) = index_file::read(&file).unwrap();
    let windows = std::fs::read(&path).unwrap()[windows_at as usize..].to_vec();
    let at = |entries: &[index_file::IndexEntry], p: &str| {
        let name = |e: &index_file::IndexEntry| String::from_utf8_lossy(&e.path).trim_start_matches("./").to_string();
        entries.iter().position(|e| name(e) == p).unwrap()
    };
    let (a, b) = (
        at(&meta.entries, "aa-before/one.txt"),
        at(&meta.entries, "zz-after/one.txt"),
    );
    let (oa, ob) = (meta.entries[a].data_offset, meta.entries[b].data_offset);
    meta.entries[a].data_offset = ob;
    meta.entries[b].data_offset = oa;
    let s = at(&meta.entries, "aa-before/two.bin");
    meta.entries[s].mode |= 0o4755;
    index_file::write(&meta, &[windows]).unwrap()
}

/// Pushes `index` as an index artifact referring to the image's manifest.
fn push_as_referrer(image: &str, layer: &str, index: Vec<u8>) {
    use ::streamsnap::layer::gzip_index::{ARTIFACT_TYPE, LAYER_ANNOTATION};
    use ::streamsnap::registry::referrers::{ArtifactBlob, Subject};
    use ::streamsnap::registry::{Reference, Registry as Client, RegistryOptions};
    let image: Reference = image.parse().unwrap();
    let client = Client::new(RegistryOptions::default()).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let tag = image.tag.clone().unwrap();
        let (body, media_type, digest) = client.fetch_manifest(&image, &tag).await.unwrap();
        let subject = Subject {
            digest,
            size: body.len() as u64,
            media_type: media_type.unwrap(),
        };
        let blob = ArtifactBlob {
            media_type: ARTIFACT_TYPE.into(),
            data: index.into(),
            annotations: [(LAYER_ANNOTATION.to_string(), layer.to_string())].into(),
        };
        let repo = Reference {
            tag: None,
            digest: None,
            ..image.clone()
        };
        client
            .push_artifact(&repo, ARTIFACT_TYPE, vec![blob], Some(&subject), &[])
            .await
            .unwrap();
    });
}

#[test]
fn a_forged_gzip_index_pushed_as_a_referrer_is_not_used_by_default() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let reference = push(&image.image, &registry, Format::Gzip);
    let (_, layers) = registry.layers(&reference);
    let forged = forged_index(&reference, work.path(), &layers[0]);
    push_as_referrer(&reference, &layers[0], forged);
    let (one, two) = (&image.before[0], &image.before[1]);

    let mount = MountProcess::start(&reference, &work.path().join("s1"), &work.path().join("m1"), &[]);
    assert!(std::fs::read(mount.mountpoint.join(&one.0)).unwrap() == one.1);
    let mode = std::fs::metadata(mount.mountpoint.join(&two.0))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0, "{} is setuid", two.0);
    let log = mount.stop();
    assert!(!log.contains("format=GzipIndex"), "the referrer was used:\n{log}");
    assert!(log.contains("format=Downloaded"), "{log}");

    // The forgery is well-formed: a node that opts into referrers serves it,
    // which is why that is not the default.
    let trusting = MountProcess::start(
        &reference,
        &work.path().join("s2"),
        &work.path().join("m2"),
        &["--trust-referrers"],
    );
    let got = std::fs::read(trusting.mountpoint.join(&one.0)).unwrap();
    let mode = std::fs::metadata(trusting.mountpoint.join(&two.0))
        .unwrap()
        .permissions()
        .mode();
    let log = trusting.stop();
    assert!(log.contains("format=GzipIndex"), "{log}");
    assert!(got != one.1 && mode & 0o4000 != 0, "the forgery took effect");
}

#[test]
fn an_index_the_image_manifest_pins_is_used_without_any_trusted_source() {
    use ::streamsnap::layer::gzip_index::PINNED_ANNOTATION;
    use ::streamsnap::registry::{Reference, Registry as Client, RegistryOptions};
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let reference = push(&image.image, &registry, Format::Gzip);
    let (_, layers) = registry.layers(&reference);
    let builder = work.path().join("builder");
    index_image(&reference, &builder, &["--min-layer-size", "0"]);
    let index = std::fs::read(
        builder
            .join("indexes")
            .join(format!("{}.trusted.gzindex", layers[0].trim_start_matches("sha256:"))),
    )
    .unwrap();
    // The index blob goes into the image's repository, its digest into the manifest.
    let repo: Reference = reference.parse().unwrap();
    let client = Client::new(RegistryOptions::default()).unwrap();
    let index_digest = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(client.push_blob(&repo, index.into()))
        .unwrap();
    let mut m = registry.manifest(&reference);
    m["layers"][0]["annotations"] = serde_json::json!({ PINNED_ANNOTATION: index_digest.to_string() });
    let media_type = m["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let path = reference.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    common::raw::put_manifest(
        &registry.addr(),
        path,
        "pinned",
        &media_type,
        &serde_json::to_vec(&m).unwrap(),
    );
    let pinned = format!("{}/{path}:pinned", registry.addr());

    let mount = MountProcess::start(&pinned, &work.path().join("state"), &work.path().join("mnt"), &[]);
    for (path, content) in image.before.iter().chain(&image.after) {
        assert!(
            std::fs::read(mount.mountpoint.join(path)).unwrap() == *content,
            "{path}"
        );
    }
    let log = mount.stop();
    assert!(
        log.contains("format=GzipIndex") && log.contains("gzip index fetched"),
        "{log}"
    );
}

/// Mounts `t` with a background fill (under an index built on this node
/// when `indexed`) and waits for the fill to quarantine the layer: then every
/// read fails.
fn quarantined_by_its_fill(t: &Tampered, indexed: bool) {
    let state = t.work.path().join("state");
    if indexed {
        index_image(&t.honest, &state, &["--min-layer-size", "0", "--span", "1MiB"]);
    }
    let fill = ["--background-fill", "--background-fill-delay", "0"];
    let mount = t.mount(&state, &fill).unwrap();
    wait_for_log(|| mount.log(), "layer quarantined", 1);
    for (path, _) in t.files() {
        let err = std::fs::read(mount.mountpoint.join(&path)).expect_err(&path);
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{path}: {err}");
    }
    let log = mount.stop();
    let line = log.lines().find(|l| l.contains("layer quarantined")).unwrap();
    assert!(
        line.contains(&t.layer) && line.contains(&t.reference),
        "names image and layer: {line}"
    );
    assert!(line.contains("content hashes to"), "{line}");
    assert!(!log.contains("background fill complete"), "{log}");
}

#[test]
fn a_gzip_layer_tampered_outside_every_span_is_quarantined_when_its_fill_completes() {
    // The gzip trailer's last byte: no span covers it, only the layer digest does.
    let t = tampered_at(Format::Gzip, |size| size - 1);
    quarantined_by_its_fill(&t, true);
}

#[test]
fn an_estargz_layer_tampered_outside_every_chunk_is_quarantined_when_its_fill_completes() {
    // The first gzip member's MTIME: no chunk digest covers it, only the layer digest does.
    let t = tampered_at(Format::Estargz, |_| 4);
    quarantined_by_its_fill(&t, false);
}

#[test]
fn a_tampered_gzip_layer_is_neither_indexed_on_first_use_nor_served_nor_kept() {
    let t = tampered(Format::Gzip);
    let state = t.work.path().join("state");
    match t.mount(&state, &["--build-index-on-first-use"]) {
        Err(log) => {
            // The flipped byte breaks the inflate before the digest is reached.
            assert!(
                log.contains("layer cannot be indexed on first use") && log.contains("invalid deflate data"),
                "the build names the layer and what was wrong:\n{log}"
            );
            refused_by_digest(&log, &t.layer);
        }
        Ok(mount) => panic!("a tampered layer was indexed and served:\n{}", mount.stop()),
    }
    let hex = t.layer.trim_start_matches("sha256:");
    assert!(!state.join(format!("indexes/{hex}.trusted.gzindex")).exists());
    assert!(!state.join(format!("layers/{hex}.tar")).exists());
    assert!(!state.join(format!("layers/{hex}.tar.first-use")).exists());
}
