//! Bad input gets a clear error naming what was wrong, never a panic and never
//! wrong bytes: malformed layers, lying sizes, escaping paths, and a registry
//! (behind a fault-injecting proxy) that errors, truncates or corrupts.
mod common;
use common::raw::{push_layers, tar_end, tar_entry};
use common::*;
use std::path::Path;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// `streamsnap mount` must refuse; returns its log.
fn mount_fails(image: &str, work: &Path) -> String {
    match MountProcess::try_start(image, &work.join("state"), &work.join("mnt"), &[]) {
        Ok(m) => panic!("mount of {image} succeeded:\n{}", m.log()),
        Err(log) => {
            assert!(!log.contains("panicked"), "streamsnap panicked:\n{log}");
            log
        }
    }
}

fn assert_mentions(log: &str, words: &[&str]) {
    for w in words {
        assert!(log.contains(w), "log does not mention {w:?}:\n{log}");
    }
}

#[test]
fn a_missing_image_is_reported_by_name() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = format!("{}/no/such:thing", registry.addr());
    let log = mount_fails(&image, work.path());
    assert_mentions(&log, &["no/such", "not found (404)"]);
}

#[test]
fn entries_escaping_the_layer_root_are_rejected() {
    require_root();
    let registry = Registry::start();
    for (i, name) in [&b"../x"[..], b"a/../../x", b"/etc/x"].iter().enumerate() {
        let work = tempfile::tempdir().unwrap();
        let layer = tar_end([tar_entry(b"ok", b'0', b"fine", 4), tar_entry(name, b'0', b"evil", 4)].concat());
        let digest = common::raw::sha256(&layer);
        let image = push_layers(&registry.addr(), "bad/escape", &format!("t{i}"), &[(TAR, layer)]);
        let log = mount_fails(&image, work.path());
        assert_mentions(&log, &[&digest, &String::from_utf8_lossy(name), "bad/escape"]);
    }
}

#[test]
fn a_size_that_runs_past_the_blob_is_rejected() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layer = [
        tar_entry(b"small", b'0', b"x", 1),
        tar_entry(b"liar", b'0', b"only this", 1 << 30),
    ]
    .concat();
    let digest = common::raw::sha256(&layer);
    let image = push_layers(&registry.addr(), "bad/size", "t", &[(TAR, layer)]);
    let log = mount_fails(&image, work.path());
    assert_mentions(&log, &[&digest, "runs past the end of the blob"]);
}

#[test]
fn a_corrupt_tar_header_is_rejected() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layer = tar_end(tar_entry(b"f", b'0', b"x", 1));
    layer[10] ^= 1;
    let digest = common::raw::sha256(&layer);
    let image = push_layers(&registry.addr(), "bad/header", "t", &[(TAR, layer)]);
    let log = mount_fails(&image, work.path());
    assert_mentions(&log, &[&digest, "checksum mismatch"]);
}

/// A small eStargz image behind a proxy, and a mount through the proxy.
struct Setup {
    _registry: Registry,
    proxy: FaultProxy,
    reference: String,
    image: BigLayerImage,
    work: tempfile::TempDir,
}

fn estargz_behind_proxy() -> Setup {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let pushed = push(&image.image, &registry, Format::Estargz);
    let proxy = FaultProxy::start(&registry.addr());
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    Setup {
        _registry: registry,
        proxy,
        reference,
        image,
        work,
    }
}

#[test]
fn registry_errors_on_the_manifest_are_reported() {
    let s = estargz_behind_proxy();
    for (code, words) in [
        (403u16, vec!["access denied (403)"]),
        (401, vec!["access denied (401)"]),
        (404, vec!["not found (404)"]),
    ] {
        s.proxy.clear();
        s.proxy.set(
            "/manifests/",
            Fault::Status {
                code,
                times: u32::MAX,
                retry_after: None,
            },
        );
        let log = mount_fails(&s.reference, s.work.path());
        let mut words = words.clone();
        words.push("fetching manifest");
        assert_mentions(&log, &words);
    }
    s.proxy.clear();
    s.proxy
        .set("/manifests/", Fault::Garbage(b"{this is not json".to_vec()));
    let log = mount_fails(&s.reference, s.work.path());
    assert_mentions(&log, &["manifest of", "not valid JSON"]);
}

#[test]
fn a_corrupt_toc_is_rejected_naming_the_layer() {
    let s = estargz_behind_proxy();
    s.proxy.set("/blobs/", Fault::FlipByte);
    let log = mount_fails(&s.reference, s.work.path());
    assert_mentions(&log, &["layer sha256:", "TOC"]);
}

fn read_err(path: &Path) -> std::io::Error {
    match std::fs::read(path) {
        Ok(_) => panic!("reading {} succeeded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn wrong_bytes_from_the_registry_are_never_handed_out() {
    let s = estargz_behind_proxy();
    let mount = MountProcess::start(
        &s.reference,
        &s.work.path().join("state"),
        &s.work.path().join("mnt"),
        &[],
    );
    s.proxy.set("/blobs/", Fault::FlipByte);
    let (path, content) = &s.image.after[1];
    let err = read_err(&mount.mountpoint.join(path));
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mount.log().contains("failed verification"), "{}", mount.log());
    // Once the registry behaves, the same read succeeds: failures are not cached.
    s.proxy.clear();
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    mount.stop();
}

#[test]
fn truncated_blob_reads_fail_with_eio_then_recover() {
    let s = estargz_behind_proxy();
    let mount = MountProcess::start(
        &s.reference,
        &s.work.path().join("state"),
        &s.work.path().join("mnt"),
        &[],
    );
    s.proxy.set("/blobs/", Fault::Truncate { keep: 10 });
    let err = read_err(&mount.mountpoint.join("big.bin"));
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(mount.log().contains("truncated"), "{}", mount.log());
    s.proxy.clear();
    assert!(
        std::fs::read(mount.mountpoint.join("big.bin")).unwrap()
            == common::fsutil::random_bytes(s.image.big_size as usize, 42)
    );
    mount.stop();
}

#[test]
fn transient_server_errors_and_rate_limits_are_retried() {
    let s = estargz_behind_proxy();
    s.proxy.set(
        "/manifests/",
        Fault::Status {
            code: 503,
            times: 2,
            retry_after: None,
        },
    );
    s.proxy.set(
        "/blobs/",
        Fault::Status {
            code: 429,
            times: 1,
            retry_after: Some(1),
        },
    );
    let mount = MountProcess::start(
        &s.reference,
        &s.work.path().join("state"),
        &s.work.path().join("mnt"),
        &[],
    );
    let (path, content) = &s.image.before[0];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    mount.stop();
}

/// Mounts through the proxy with docker config credentials alice:s3cret for it.
fn mount_as_alice(s: &Setup) -> MountProcess {
    let docker = s.work.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let config = format!(r#"{{"auths":{{"{}":{{"auth":"{ALICE}"}}}}}}"#, s.proxy.addr());
    std::fs::write(docker.join("config.json"), config).unwrap();
    let (state, mnt) = (s.work.path().join("state"), s.work.path().join("mnt"));
    MountProcess::try_start_env(&s.reference, &state, &mnt, &[], &[("DOCKER_CONFIG", &docker)])
        .unwrap_or_else(|log| panic!("mount failed:\n{log}"))
}

/// base64 of "alice:s3cret".
const ALICE: &str = "YWxpY2U6czNjcmV0";

#[test]
fn basic_auth_from_docker_config_and_redirects_without_credentials() {
    let s = estargz_behind_proxy();
    s.proxy.require_basic_auth(ALICE);
    s.proxy.set("/blobs/", Fault::Redirect);
    let mount = mount_as_alice(&s);
    let (path, content) = &s.image.after[0];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    let seen = s.proxy.redirected_auth();
    assert!(!seen.is_empty(), "no blob request was redirected");
    assert!(
        seen.iter().all(Option::is_none),
        "credentials followed a redirect: {seen:?}"
    );
    mount.stop();
}

#[test]
fn bearer_tokens_are_fetched_with_docker_config_credentials_and_refreshed() {
    let s = estargz_behind_proxy();
    s.proxy.require_bearer(ALICE, std::time::Duration::from_secs(10));
    let mount = mount_as_alice(&s);
    let (path, content) = &s.image.before[0];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    let first = s.proxy.tokens_issued();
    assert!(first >= 1);
    std::thread::sleep(std::time::Duration::from_secs(11));
    let (path, content) = &s.image.after[0];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    assert!(s.proxy.tokens_issued() > first, "the expired token was not refreshed");
    mount.stop();
}

#[test]
fn a_range_read_redirected_to_loopback_by_a_registry_off_loopback_is_refused() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 8);
    let pushed = push(&image.image, &registry, Format::Estargz);
    // The proxy plays a registry on this machine's non-loopback address.
    let proxy = FaultProxy::start_on("0.0.0.0", &registry.addr());
    let outside = format!("{}:{}", non_loopback_ipv4(), proxy.port());
    let reference = pushed.replacen(&registry.addr(), &outside, 1);
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--plain-http"],
    );
    proxy.set("/blobs/", Fault::RedirectTo(proxy.addr()));
    let (path, content) = &image.after[1];
    let err = read_err(&mount.mountpoint.join(path));
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = mount.log();
    assert!(
        log.contains("redirect to") && log.contains("127.0.0.1 is Loopback"),
        "{log}"
    );
    assert!(
        proxy.redirected_auth().is_empty(),
        "a request reached the loopback target"
    );
    // Without the redirect the same read succeeds: only the redirect was refused.
    proxy.clear();
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    mount.stop();
}

#[test]
fn a_layer_downloaded_whole_is_checked_against_its_digest() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 4);
    let pushed = push(&image.image, &registry, Format::Gzip);
    let proxy = FaultProxy::start(&registry.addr());
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    proxy.set("/blobs/", Fault::FlipByte);
    let log = mount_fails(&reference, &work.path().join("flip"));
    assert_mentions(&log, &["layer sha256:", "downloaded content hashes to"]);
    proxy.clear();
    proxy.set("/blobs/", Fault::Truncate { keep: 1000 });
    let log = mount_fails(&reference, &work.path().join("trunc"));
    assert_mentions(&log, &["layer sha256:", "download"]);
    // And with a well-behaved registry the same image mounts.
    proxy.clear();
    let mount = MountProcess::start(&reference, &work.path().join("ok"), &work.path().join("mnt"), &[]);
    let (path, content) = &image.after[0];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    mount.stop();
}

#[test]
fn a_first_use_download_from_a_stalling_or_truncating_registry_fails_by_name_and_keeps_nothing() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_big_layer_image(&work.path().join("image"), 4);
    let pushed = push(&image.image, &registry, Format::Gzip);
    let proxy = FaultProxy::start(&registry.addr());
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    let first_use = ["--build-index-on-first-use", "--stall-timeout", "1"];
    let faults = [
        (
            Fault::Stall {
                every: std::time::Duration::from_secs(5),
            },
            "no byte for 1s",
        ),
        (Fault::Truncate { keep: 100_000 }, "reading the layer at 100000"),
    ];
    for (i, (fault, named)) in faults.into_iter().enumerate() {
        proxy.clear();
        proxy.set("/blobs/", fault);
        let state = work.path().join(format!("state-{i}"));
        let started = std::time::Instant::now();
        let log = match MountProcess::try_start(&reference, &state, &work.path().join("mnt"), &first_use) {
            Ok(m) => panic!("mount of {reference} succeeded:\n{}", m.log()),
            Err(log) => log,
        };
        assert!(!log.contains("panicked"), "streamsnap panicked:\n{log}");
        assert_mentions(&log, &["layer cannot be indexed on first use", "layer sha256:", named]);
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{log}");
        let kept: Vec<_> = std::fs::read_dir(state.join("layers"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(kept.is_empty(), "left behind: {kept:?}");
    }
}
