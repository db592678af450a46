//! Mirrors from containerd's `hosts.toml` (`--registry-config-path`), with
//! real docker-registry instances as origin and mirror and `streamsnap
//! mount` reading through FUSE: a mirror that dies mid-read and a mirror
//! without the blob both leave the read to the origin, with the right bytes.
mod common;
use common::raw::sha256;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// `<root>/<host>_<port>_/hosts.toml` naming `mirror` (pull and resolve)
/// before `origin` (as `server`, or implied when `server` is false).
fn hosts_dir(root: &Path, origin: &str, mirror: &str, server: bool) -> PathBuf {
    let dir = root.join(format!("{}_", origin.replace(':', "_")));
    std::fs::create_dir_all(&dir).unwrap();
    let server = match server {
        true => format!("server = \"http://{origin}\"\n\n"),
        false => String::new(),
    };
    std::fs::write(
        dir.join("hosts.toml"),
        format!("{server}[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    root.to_path_buf()
}

/// Copies an image between registries byte for byte (same manifest digest).
fn copy_image(from: &str, to: &str) {
    common::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{from}"),
        &format!("docker://{to}"),
    ]));
}

#[test]
fn a_mirror_killed_while_a_large_file_is_read_leaves_the_rest_to_the_origin() {
    require_root();
    let origin = Registry::start();
    let mut mirror = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let big = build_big_layer_image(&work.path().join("image"), 64);
    let reference = push(&big.image, &origin, Format::Estargz);
    copy_image(&reference, &reference.replacen(&origin.addr(), &mirror.addr(), 1));
    let (_, layers) = origin.layers(&reference);
    let layer = &layers[0];
    let config = hosts_dir(&work.path().join("certs.d"), &origin.addr(), &mirror.addr(), true);
    let (origin_mark, mirror_mark) = (origin.mark(), mirror.mark());

    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--registry-config-path", config.to_str().unwrap()],
    );
    assert_eq!(
        origin.bytes_served_for_blob_since(layer, origin_mark),
        0,
        "the mount's footer and TOC came from the mirror"
    );

    // One thread reads the whole file; the mirror is killed once 4 MiB are read
    // (with read-ahead, larger requests to it are then in flight).
    let read = Arc::new(AtomicU64::new(0));
    let path = mount.mountpoint.join(&big.big_path);
    let reader = {
        let read = Arc::clone(&read);
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(&path).unwrap();
            let mut all = Vec::with_capacity(64 << 20);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f
                    .read(&mut buf)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&buf[..n]);
                read.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    wait_until(Duration::from_secs(120), "4 MiB read through the mirror", || {
        read.load(Ordering::Relaxed) >= 4 * MIB
    });
    let at_kill = read.load(Ordering::Relaxed);
    mirror.kill();
    let content = reader.join().expect("the read completes");
    assert_eq!(content.len() as u64, big.big_size);
    assert_eq!(
        sha256(&content),
        sha256(&common::fsutil::random_bytes(big.big_size as usize, 42)),
        "bytes of {}",
        big.big_path
    );

    let from_mirror = mirror.bytes_served_for_blob_since(layer, mirror_mark);
    let from_origin = origin.bytes_served_for_blob_since(layer, origin_mark);
    let log = mount.log();
    eprintln!(
        "mirror killed after {} MiB read: mirror served {from_mirror} layer bytes (completed responses), origin {from_origin}",
        at_kill / MIB
    );
    let mid_body = log
        .lines()
        .filter(|l| l.contains("range read failed") && l.contains(&mirror.addr()))
        .count();
    eprintln!("range reads the kill cut off mid-body: {mid_body}");
    assert!(from_mirror >= 4 * MIB, "the mirror served the start: {from_mirror}");
    assert!(from_origin > 0, "the origin served the rest");
    // The registry logs a response once it is complete: what a body cut off mid-way delivered
    // before the kill (its chunks are answered as they arrive) is in neither count.
    let cut_off_at_most = mid_body as u64 * ::streamsnap::fetch::MAX_REQUEST;
    assert!(
        from_mirror + from_origin + cut_off_at_most >= big.big_size,
        "mirror {from_mirror} + origin {from_origin} + {mid_body} bodies cut off cover the file"
    );
    assert!(
        log.contains("falling over") && log.contains(&mirror.addr()),
        "a log line names the failed mirror:\n{}",
        tail(&log, 40)
    );
    mount.stop();
}

#[test]
fn a_mirror_without_the_blob_leaves_it_to_the_origin_lazily() {
    require_root();
    let origin = Registry::start();
    let mirror = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let big = build_big_layer_image(&work.path().join("image"), 16);
    let reference = push(&big.image, &origin, Format::Estargz);
    let (size, layers) = origin.layers(&reference);
    let layer = &layers[0];
    let config = hosts_dir(&work.path().join("certs.d"), &origin.addr(), &mirror.addr(), false);
    let mark = origin.mark();

    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--registry-config-path", config.to_str().unwrap()],
    );
    for (path, content) in big.before.iter().chain(&big.after) {
        let got = std::fs::read(mount.mountpoint.join(path)).unwrap();
        assert_eq!(&got, content, "{path}");
    }
    let from_origin = origin.bytes_served_for_blob_since(layer, mark);
    let misses: Vec<BlobRequest> = mirror
        .blob_requests()
        .into_iter()
        .filter(|r| &r.digest == layer)
        .collect();
    eprintln!(
        "layer {size} bytes: origin served {from_origin}; mirror answered {} blob requests with {:?}",
        misses.len(),
        misses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(
        !misses.is_empty() && misses.iter().all(|r| r.status == 404),
        "{misses:?}"
    );
    assert!(from_origin > 0, "the origin served the blob");
    assert!(from_origin < size / 4, "lazily: {from_origin} of {size} bytes");
    mount.stop();
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    require_tool("openssl");
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    common::run(Command::new("openssl").args(["req", "-x509"]).args(ec).args([
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=streamsnap test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    common::run(Command::new("openssl").args(["req"]).args(ec).args([
        "-keyout",
        &p("mirror.key"),
        "-out",
        &p("mirror.csr"),
        "-subj",
        "/CN=127.0.0.1",
    ]));
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    common::run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &p("mirror.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("mirror.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext"),
    ]));
    (dir.join("ca.pem"), dir.join("mirror.pem"), dir.join("mirror.key"))
}

/// An origin holding a one-layer eStargz image with a `mib` MiB file, and a second registry
/// serving the same storage (a mirror holding a copy) started with `mirror_opts`.
struct Copied {
    origin: Registry,
    mirror: Registry,
    big: BigLayerImage,
    reference: String,
    layers: Vec<String>,
}

fn origin_and_copy(work: &Path, mib: u64, mirror_opts: RegistryOpts) -> Copied {
    let storage = work.join("storage");
    let origin = Registry::start_with(RegistryOpts {
        storage: Some(storage.clone()),
        ..Default::default()
    });
    let big = build_big_layer_image(&work.join("image"), mib);
    let reference = push(&big.image, &origin, Format::Estargz);
    let (_, layers) = origin.layers(&reference);
    let mirror = Registry::start_with(RegistryOpts {
        storage: Some(storage),
        ..mirror_opts
    });
    Copied {
        origin,
        mirror,
        big,
        reference,
        layers,
    }
}

#[test]
fn a_tls_mirror_is_used_with_its_ca_or_skip_verify_and_passed_over_without() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(&work.path().join("pki"));
    // The copy served over HTTPS.
    let Copied {
        origin,
        mirror,
        big,
        reference,
        layers,
    } = origin_and_copy(
        work.path(),
        2,
        RegistryOpts {
            tls: Some((cert, key)),
            ..Default::default()
        },
    );
    let layer = &layers[0];
    // `ca` relative to the hosts.toml's directory, as containerd reads it.
    let cases = [
        ("ca", "ca = \"mirror-ca.pem\"\n", true),
        ("skip_verify", "skip_verify = true\n", true),
        ("nothing", "", false),
    ];
    for (name, tls, via_mirror) in cases {
        let root = work.path().join(format!("certs-{name}"));
        let dir = root.join(format!("{}_", origin.addr().replace(':', "_")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&ca, dir.join("mirror-ca.pem")).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "[host.\"https://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n{tls}",
                mirror.addr()
            ),
        )
        .unwrap();
        let (origin_mark, mirror_mark) = (origin.mark(), mirror.mark());
        let mount = MountProcess::start(
            &reference,
            &work.path().join(format!("state-{name}")),
            &work.path().join(format!("mnt-{name}")),
            &["--registry-config-path", root.to_str().unwrap()],
        );
        for (path, content) in big.before.iter().chain(&big.after) {
            assert_eq!(
                &std::fs::read(mount.mountpoint.join(path)).unwrap(),
                content,
                "{name}: {path}"
            );
        }
        let from_mirror = mirror.bytes_served_for_blob_since(layer, mirror_mark);
        let from_origin = origin.bytes_served_for_blob_since(layer, origin_mark);
        eprintln!("{name}: mirror served {from_mirror} layer bytes, origin {from_origin}");
        match via_mirror {
            true => assert!(
                from_mirror > 0 && from_origin == 0,
                "{name}: mirror {from_mirror}, origin {from_origin}"
            ),
            false => {
                assert!(
                    from_mirror == 0 && from_origin > 0,
                    "{name}: mirror {from_mirror}, origin {from_origin}"
                );
                let log = mount.log();
                assert!(log.contains("falling over"), "{name}: {}", tail(&log, 20));
            }
        }
        mount.stop();
    }
}

/// The value of `name{host="HOST"}` in a Prometheus exposition (0 when absent).
fn metric(text: &str, name: &str, host: &str) -> u64 {
    let key = format!("{name}{{host=\"{host}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn serve_takes_mirrors_from_its_config_file_and_counts_bytes_per_host() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let Copied {
        origin,
        mirror,
        big,
        reference,
        layers,
    } = origin_and_copy(work.path(), 4, RegistryOpts::default());
    let certs = hosts_dir(&work.path().join("certs.d"), &origin.addr(), &mirror.addr(), false);
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("streamsnap.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_address = \"{metrics}\"\n[registry]\nconfig_path = \"{}\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let root = work.path().join("streamsnap");
    let serve = ServeProcess::start_with(&root, &["--config", config.to_str().unwrap()]);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let (origin_mark, mirror_mark) = (origin.mark(), mirror.mark());
    containerd.rpull(&reference);
    let (path, content) = &big.after[1];
    let file = fuse_mounts_under(&root)
        .iter()
        .map(|m| m.join(path))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no layer mount holds {path}"));
    assert_eq!(&std::fs::read(&file).unwrap(), content);
    let from_mirror = mirror.layer_bytes_served_since(&layers, mirror_mark);
    let from_origin = origin.layer_bytes_served_since(&layers, origin_mark);
    let text = common::run(Command::new("curl").args(["-sSf", &format!("http://{metrics}/metrics")]));
    let counted = metric(&text, "streamsnap_registry_endpoint_bytes_total", &mirror.addr());
    eprintln!("layer bytes: mirror {from_mirror}, origin {from_origin}; metric for the mirror {counted}");
    assert!(
        from_mirror > 0 && from_origin == 0,
        "mirror {from_mirror}, origin {from_origin}"
    );
    assert!(
        counted >= from_mirror,
        "the daemon counted {counted} bytes from the mirror:\n{text}"
    );
    assert_eq!(
        metric(&text, "streamsnap_registry_endpoint_failures_total", &mirror.addr()),
        0
    );
}

#[test]
fn a_mirror_serving_wrong_bytes_costs_a_request_to_the_origin_not_a_failed_read() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let Copied {
        origin,
        mirror,
        big,
        reference,
        layers,
    } = origin_and_copy(work.path(), 2, RegistryOpts::default());
    let lying = FaultProxy::start(&mirror.addr());
    let certs = hosts_dir(&work.path().join("certs.d"), &origin.addr(), &lying.addr(), false);
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--registry-config-path", certs.to_str().unwrap()],
    );
    // From now on every blob body from the mirror has one byte flipped.
    lying.set("/blobs/", Fault::FlipByte);
    let mark = origin.mark();
    for (path, content) in big.before.iter().chain(&big.after) {
        assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content, "{path}");
    }
    let from_origin = origin.layer_bytes_served_since(&layers, mark);
    let log = mount.log();
    eprintln!("the origin served {from_origin} layer bytes after the mirror's bytes failed verification");
    assert!(from_origin > 0, "the second try went to the origin");
    assert!(log.contains("failed verification"), "{}", tail(&log, 20));
    mount.stop();
}

#[test]
fn a_mirror_added_while_mounted_serves_the_next_read() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let Copied {
        origin,
        mirror,
        big,
        reference,
        layers,
    } = origin_and_copy(work.path(), 2, RegistryOpts::default());
    let certs = work.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    let mount = MountProcess::start(
        &reference,
        &work.path().join("state"),
        &work.path().join("mnt"),
        &["--registry-config-path", certs.to_str().unwrap()],
    );
    let (path, content) = &big.before[1];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    assert_eq!(mirror.layer_bytes_served_since(&layers, 0), 0, "no hosts.toml yet");

    hosts_dir(&certs, &origin.addr(), &mirror.addr(), false);
    let (origin_mark, mirror_mark) = (origin.mark(), mirror.mark());
    let (path, content) = &big.after[1];
    assert_eq!(&std::fs::read(mount.mountpoint.join(path)).unwrap(), content);
    let from_mirror = mirror.layer_bytes_served_since(&layers, mirror_mark);
    let from_origin = origin.layer_bytes_served_since(&layers, origin_mark);
    eprintln!("after hosts.toml appeared: mirror {from_mirror} layer bytes, origin {from_origin}");
    assert!(
        from_mirror > 0 && from_origin == 0,
        "mirror {from_mirror}, origin {from_origin}"
    );
    mount.stop();
}
