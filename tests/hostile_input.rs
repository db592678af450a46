//! Hostile image input against a running daemon (`streamsnap serve`, real
//! registry, FUSE): each input is refused with an error naming its layer,
//! the daemon stays up and keeps serving another image's layer, and its peak
//! memory (VmHWM) stays under the bound ARCHITECTURE.md states.
mod common;
use ::streamsnap::proto::containerd::services::snapshots::v1 as api;
use common::raw::{push_annotated, sha256};
use common::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

/// The daemon's peak resident memory under any hostile input (ARCHITECTURE.md, "Bounds").
const RSS_BOUND: u64 = 512 << 20;
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// A registry, a daemon, and a good eStargz image served lazily beside the hostile ones.
struct Node {
    registry: Registry,
    serve: ServeProcess,
    rt: tokio::runtime::Runtime,
    good: Image,
    work: tempfile::TempDir,
}

/// A pushed one-layer image.
struct Image {
    reference: String,
    manifest: String,
    layer: String,
}

fn start() -> Node {
    start_with(&[])
}

/// `start`, with extra `serve` flags.
fn start_with(flags: &[&str]) -> Node {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let serve = ServeProcess::start_with(&work.path().join("streamsnap"), flags);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blob = estargz(&[("hello.txt", b"hello from a good layer\n", "2020-01-01T00:00:00Z")]);
    let good = push_one(&registry.addr(), "good/app", GZIP, blob.0, blob.1);
    Node {
        registry,
        serve,
        rt,
        good,
        work,
    }
}

fn push_one(registry: &str, repo: &str, media_type: &str, blob: Vec<u8>, ann: serde_json::Value) -> Image {
    let layer = sha256(&blob);
    let (manifest, _) = push_annotated(registry, repo, "t", &[(media_type, blob, ann)]);
    Image {
        reference: format!("{registry}/{repo}:t"),
        manifest,
        layer,
    }
}

impl Node {
    /// Prepares the image's layer the way containerd's CRI does; true when it
    /// is served lazily (containerd is told it already exists).
    fn prepare(&self, image: &Image, key: &str) -> bool {
        let labels: HashMap<String, String> = [
            ("containerd.io/snapshot.ref", format!("chain-{key}")),
            ("containerd.io/snapshot/cri.image-ref", image.reference.clone()),
            ("containerd.io/snapshot/cri.layer-digest", image.layer.clone()),
            ("containerd.io/snapshot/cri.manifest-digest", image.manifest.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let socket = self.serve.socket.clone();
        self.rt.block_on(async move {
            let channel = ::streamsnap::pull::connect(&socket)
                .await
                .expect("connect to streamsnap");
            let mut client = api::snapshots_client::SnapshotsClient::new(channel);
            let req = api::PrepareSnapshotRequest {
                snapshotter: "streamsnap".into(),
                key: key.into(),
                parent: String::new(),
                labels,
            };
            match client.prepare(req).await {
                Err(s) if s.code() == tonic::Code::AlreadyExists => true,
                Ok(_) => false,
                Err(s) => panic!("prepare {key}: {s}"),
            }
        })
    }

    /// The good layer's file, read through its FUSE mount.
    fn read_good(&self, key: &str) -> Vec<u8> {
        assert!(
            self.prepare(&self.good, key),
            "good layer not served lazily:\n{}",
            self.serve.log()
        );
        let snapshots = self.work.path().join("streamsnap/state/snapshots");
        let found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().path().join("fs/hello.txt"))
            .filter(|p| p.exists())
            .collect();
        assert!(!found.is_empty(), "no mount holds hello.txt");
        std::fs::read(&found[0]).unwrap()
    }

    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.serve.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb << 10
    }

    /// The checks every hostile input must pass: refused naming its layer and
    /// the reason, daemon alive, the good layer still served, memory bounded.
    fn assert_refused(&mut self, image: &Image, reason: &str) {
        let started = std::time::Instant::now();
        assert!(!self.prepare(image, "hostile"), "hostile layer was served lazily");
        // The log arrives through a pipe: give it a moment.
        let names = |log: &str| log.lines().any(|l| l.contains(&image.layer) && l.contains(reason));
        let waited = std::time::Duration::from_secs(10);
        let seen = poll(waited, || names(&self.serve.log()));
        let log = self.serve.log();
        assert!(seen, "no log line names layer {} and {reason:?}:\n{log}", image.layer);
        assert!(!log.contains("panicked"), "{log}");
        assert!(self.serve.alive(), "daemon died:\n{log}");
        assert_eq!(self.read_good("good"), b"hello from a good layer\n");
        let peak = self.peak_rss();
        eprintln!(
            "{reason}: refused in {:?}, daemon peak RSS {} MiB",
            started.elapsed(),
            peak >> 20
        );
        assert!(peak < RSS_BOUND, "daemon peak RSS {} MiB over the bound", peak >> 20);
    }
}

/// Polls `f` every 50 ms for up to `limit`; whether it became true.
fn poll(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while !f() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A ustar header for `name` of `size` bytes (content not included).
fn header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// The eStargz footer pointing at `toc_offset`.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0];
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    f
}

/// An eStargz blob: `payload` gzip members, then the TOC member holding
/// `toc_tar` (already a tar stream, or anything hostile), then the footer.
fn estargz_raw(payload: &[u8], toc_member: Vec<u8>) -> Vec<u8> {
    let mut blob = payload.to_vec();
    let toc_offset = blob.len() as u64;
    blob.extend_from_slice(&toc_member);
    blob.extend_from_slice(&footer(toc_offset));
    blob
}

/// The TOC member for `json`, and the toc.digest annotation binding it.
fn toc_member(json: &[u8]) -> (Vec<u8>, serde_json::Value) {
    let mut tar = header("stargz.index.json", json.len() as u64);
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    (gz(&tar), serde_json::json!({ TOC_DIGEST: sha256(json) }))
}

/// A well-formed eStargz layer of small files (path, content, modtime).
fn estargz(files: &[(&str, &[u8], &str)]) -> (Vec<u8>, serde_json::Value) {
    let mut payload = Vec::new();
    let mut entries = Vec::new();
    for (name, content, modtime) in files {
        payload.extend_from_slice(&gz(&header(name, content.len() as u64)));
        let offset = payload.len();
        let mut padded = content.to_vec();
        padded.resize(padded.len().div_ceil(512) * 512, 0);
        payload.extend_from_slice(&gz(&padded));
        entries.push(serde_json::json!({
            "name": name, "type": "reg", "size": content.len(), "mode": 0o644,
            "modtime": modtime, "offset": offset, "digest": sha256(content),
        }));
    }
    let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).unwrap();
    let (member, ann) = toc_member(&json);
    (estargz_raw(&payload, member), ann)
}

#[test]
fn a_toc_chunk_of_2_pow_40_bytes_is_refused_naming_the_layer() {
    let mut node = start();
    let mut payload = gz(&header("huge", 16));
    let offset = payload.len();
    payload.extend_from_slice(&gz(b"a few real bytes"));
    let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": [{
        "name": "huge", "type": "reg", "size": 1u64 << 40, "offset": offset,
        "digest": sha256(b"x"),
    }]}))
    .unwrap();
    let (member, ann) = toc_member(&json);
    let image = push_one(
        &node.registry.addr(),
        "bad/chunk",
        GZIP,
        estargz_raw(&payload, member),
        ann,
    );
    node.assert_refused(&image, "cannot come from");
}

#[test]
fn a_pax_size_of_u64_max_is_refused_naming_the_layer() {
    let mut node = start();
    // A PAX record counts its own length's digits.
    let body = format!(" size={}\n", u64::MAX);
    let total = (1..4)
        .map(|d| d + body.len())
        .find(|t| t.to_string().len() + body.len() == *t)
        .unwrap();
    let record = format!("{total}{body}");
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/f").unwrap();
    h.set_size(record.len() as u64);
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_cksum();
    let mut layer = h.as_bytes().to_vec();
    layer.extend_from_slice(record.as_bytes());
    layer.resize(layer.len().div_ceil(512) * 512, 0);
    layer.extend_from_slice(&header("f", 0));
    layer.extend_from_slice(&[0u8; 1024]);
    let image = push_one(&node.registry.addr(), "bad/pax", TAR, layer, serde_json::json!({}));
    // The daemon walks a tar layer only under a trusted index; without one, containerd unpacks it.
    node.assert_refused(&image, "cannot be read lazily");
    // Building that index is where the walk meets the header: refused, naming the layer.
    let out = std::process::Command::new(common::streamsnap::binary())
        .arg("index")
        .arg("--state-dir")
        .arg(node.work.path().join("indexer"))
        .args(["--min-layer-size", "0", &image.reference])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let reason = format!("entry size {}", u64::MAX);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&image.layer) && text.contains(&reason), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn a_toc_of_ten_million_entries_is_refused_naming_the_layer() {
    let mut node = start();
    let mut json = b"{\"version\":1,\"entries\":[".to_vec();
    for _ in 0..10_000_000 - 1 {
        json.extend_from_slice(b"{},");
    }
    json.extend_from_slice(b"{}]}");
    let (member, ann) = toc_member(&json);
    let image = push_one(
        &node.registry.addr(),
        "bad/entries",
        GZIP,
        estargz_raw(&gz(b"x"), member),
        ann,
    );
    node.assert_refused(&image, "more than 1048576 entries");
}

#[test]
fn a_toc_that_inflates_to_1_gib_is_refused_naming_the_layer() {
    let mut node = start();
    // 1 GiB of zeros as 1024 gzip members of 1 MiB (members decode as one stream).
    let bomb = gz(&vec![0u8; 1 << 20]).repeat(1024);
    let ann = serde_json::json!({ TOC_DIGEST: sha256(b"whatever") });
    let image = push_one(
        &node.registry.addr(),
        "bad/gzbomb",
        GZIP,
        estargz_raw(&gz(b"x"), bomb),
        ann,
    );
    node.assert_refused(&image, "inflates to more than");
}

#[test]
fn a_zstd_chunked_manifest_that_inflates_to_1_gib_is_refused_naming_the_layer() {
    let mut node = start();
    let payload = zstd::encode_all(&b"some file bytes"[..], 1).unwrap();
    // 1 GiB of spaces as 1024 frames of 1 MiB (frames decode as one stream).
    let bomb = zstd::encode_all(&vec![b' '; 1 << 20][..], 1).unwrap().repeat(1024);
    let mut blob = payload;
    // The manifest sits in a skippable frame.
    blob.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    blob.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    let offset = blob.len();
    blob.extend_from_slice(&bomb);
    let ann = serde_json::json!({
        "io.github.containers.zstd-chunked.manifest-position": format!("{offset}:{}:1000:1", bomb.len()),
        "io.github.containers.zstd-chunked.manifest-checksum": sha256(&bomb),
    });
    let image = push_one(&node.registry.addr(), "bad/zstdbomb", ZSTD, blob, ann);
    node.assert_refused(&image, "inflates past its stated 1000 bytes");
}

#[test]
fn a_leap_second_modtime_with_nanoseconds_of_a_second_is_served_without_a_panic() {
    let node = start();
    let (blob, ann) = estargz(&[("leap.txt", b"leap\n", "2016-12-31T23:59:60.5Z")]);
    let image = push_one(&node.registry.addr(), "odd/leap", GZIP, blob, ann);
    assert!(node.prepare(&image, "leap"), "{}", node.serve.log());
    let snapshots = node.work.path().join("streamsnap/state/snapshots");
    let file = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/leap.txt"))
        .find(|p| p.exists())
        .expect("leap.txt mounted");
    let md = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_483_228_800, 500_000_000));
    assert_eq!(std::fs::read(&file).unwrap(), b"leap\n");
    assert_eq!(node.read_good("good"), b"hello from a good layer\n");
    assert!(node.peak_rss() < RSS_BOUND);
}

#[test]
fn an_8_gib_profile_blob_claiming_1_byte_is_refused_naming_the_image() {
    profile_blob_is_refused(true);
}

#[test]
fn an_8_gib_profile_body_of_no_stated_length_is_cut_at_its_descriptor_size() {
    profile_blob_is_refused(false);
}

/// A profile artifact whose descriptor says 1 byte, served as 8 GiB (with
/// that length declared, or not: then the limit holds while streaming).
fn profile_blob_is_refused(declare: bool) {
    // Profiles pushed as referrers are read only when the operator trusts referrers.
    let mut node = start_with(&["--trust-referrers"]);
    let proxy = FaultProxy::start(&node.registry.addr());
    // The good image, reached through the proxy, with a profile referring to it.
    let (blob, ann) = estargz(&[("hello.txt", b"hello from a good layer\n", "2020-01-01T00:00:00Z")]);
    let pushed = push_one(&node.registry.addr(), "prof/app", GZIP, blob, ann);
    let profile_blob = b"x".to_vec();
    push_profile(&node.registry.addr(), "prof/app", &pushed.manifest, &profile_blob);
    proxy.set(
        &format!("/blobs/{}", sha256(&profile_blob)),
        Fault::Endless { len: 8 << 30, declare },
    );
    let image = Image {
        reference: pushed.reference.replacen(&node.registry.addr(), &proxy.addr(), 1),
        ..pushed
    };
    assert!(node.prepare(&image, "profiled"), "{}", node.serve.log());
    let names = |log: &str| {
        log.lines()
            .any(|l| l.contains("prof/app") && l.contains("larger than its 1-byte limit"))
    };
    let seen = poll(std::time::Duration::from_secs(10), || names(&node.serve.log()));
    assert!(seen, "no log line names the image and the limit:\n{}", node.serve.log());
    assert!(node.serve.alive());
    assert_eq!(node.read_good("good"), b"hello from a good layer\n");
    let peak = node.peak_rss();
    eprintln!("8 GiB profile blob: daemon peak RSS {} MiB", peak >> 20);
    assert!(peak < RSS_BOUND, "daemon peak RSS {} MiB over the bound", peak >> 20);
}

/// Pushes a profile artifact whose subject is `manifest`, listed under the
/// referrers fallback tag (Debian's registry has no referrers API).
fn push_profile(registry: &str, repo: &str, manifest: &str, blob: &[u8]) {
    let config = b"{}";
    common::raw::put_blob(registry, repo, config);
    let config_size = config.len();
    common::raw::put_blob(registry, repo, blob);
    let subject_size = {
        let out = common::run(std::process::Command::new("curl").args([
            "-sSf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{registry}/v2/{repo}/manifests/{manifest}"),
        ]));
        out.len()
    };
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ::streamsnap::prefetch::profile::ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(config), "size": config_size},
        "layers": [{"mediaType": ::streamsnap::prefetch::profile::ARTIFACT_TYPE, "digest": sha256(blob), "size": 1}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": subject_size},
    });
    let body = serde_json::to_vec(&artifact).unwrap();
    let digest = common::raw::put_manifest(
        registry,
        repo,
        &sha256(&body),
        "application/vnd.oci.image.manifest.v1+json",
        &body,
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": body.len(),
            "artifactType": ::streamsnap::prefetch::profile::ARTIFACT_TYPE,
        }],
    });
    let tag = format!("sha256-{}", manifest.trim_start_matches("sha256:"));
    common::raw::put_manifest(
        registry,
        repo,
        &tag,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
}
