//! Hand-made layers and images, for inputs no well-behaved tool produces.
use super::run;
use sha2::{Digest, Sha256};
use std::process::Command;

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One ustar header + content (padded), with `declared_size` written in the header.
pub fn tar_entry(name: &[u8], typeflag: u8, content: &[u8], declared_size: u64) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{declared_size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Ends a tar stream.
pub fn tar_end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

/// Uploads a blob; returns its digest.
pub fn put_blob(registry: &str, repo: &str, data: &[u8]) -> String {
    upload(registry, repo, data)
}

fn upload(registry: &str, repo: &str, data: &[u8]) -> String {
    let digest = sha256(data);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), data).unwrap();
    let head = run(Command::new("curl")
        .args(["-sSf", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{registry}/v2/{repo}/blobs/uploads/")));
    let location = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no Location in upload answer: {head}"));
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{registry}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    run(Command::new("curl")
        .args([
            "-sSf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
        ])
        .arg(format!("@{}", tmp.path().display()))
        .arg(format!("{url}{sep}digest={digest}")));
    digest
}

/// Pushes an image made of these (media type, blob) layers; returns its reference.
pub fn push_layers(registry: &str, repo: &str, tag: &str, layers: &[(&str, Vec<u8>)]) -> String {
    push_image(registry, repo, tag, layers);
    format!("{registry}/{repo}:{tag}")
}

/// Like `push_layers`; returns the manifest's digest and size.
pub fn push_image(registry: &str, repo: &str, tag: &str, layers: &[(&str, Vec<u8>)]) -> (String, usize) {
    let layers: Vec<(&str, Vec<u8>, serde_json::Value)> = layers
        .iter()
        .map(|(mt, b)| (*mt, b.clone(), serde_json::json!({})))
        .collect();
    push_annotated(registry, repo, tag, &layers)
}

/// Like `push_image`, with annotations on each layer descriptor.
pub fn push_annotated(
    registry: &str,
    repo: &str,
    tag: &str,
    layers: &[(&str, Vec<u8>, serde_json::Value)],
) -> (String, usize) {
    let diff_ids: Vec<String> = layers.iter().map(|(_, b, _)| sha256(b)).collect();
    let config =
        serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = upload(registry, repo, &config);
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|(mt, blob, ann)| serde_json::json!({"mediaType": mt, "digest": upload(registry, repo, blob), "size": blob.len(), "annotations": ann}))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    (
        put_manifest(registry, repo, tag, "application/vnd.oci.image.manifest.v1+json", &body),
        body.len(),
    )
}

/// PUTs a manifest (or index) under a tag.
pub fn put_manifest(registry: &str, repo: &str, tag: &str, media_type: &str, body: &[u8]) -> String {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), body).unwrap();
    run(Command::new("curl")
        .args(["-sSf", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {media_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", tmp.path().display()))
        .arg(format!("http://{registry}/v2/{repo}/manifests/{tag}")));
    sha256(body)
}
