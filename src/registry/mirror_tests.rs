//! Mirrors from a `hosts.toml` against scripted HTTP servers on loopback:
//! order, capabilities, `ns`, headers, `override_path`, failover within one
//! read and the cool-down.

use super::tests::{answer, client, Script};
use super::{Reference, RegistryOptions};
use crate::digest::Digest;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;

fn data() -> Vec<u8> {
    (0..4096u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// Serves ranges of `data()` (206), and `{}` for anything else.
fn serve_ranges(head: &str, c: &mut TcpStream) {
    let d = data();
    let Some(range) = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string))
    else {
        return answer(c, "200 OK", &[], b"{}");
    };
    let (a, b) = range.trim().split_once('-').unwrap();
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    answer(
        c,
        "206 Partial Content",
        &[format!("Content-Range: bytes {a}-{b}/{}", d.len())],
        &d[a..=b],
    );
}

/// A `hosts.toml` for `registry` under a fresh config path.
fn config_path(registry: &str, hosts_toml: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join(registry.replace(':', "_") + "_");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), hosts_toml).unwrap();
    d
}

fn with_hosts(path: &Path) -> RegistryOptions {
    RegistryOptions {
        config_path: Some(path.to_path_buf()),
        max_attempts: 2,
        ..Default::default()
    }
}

fn repo(host: &str) -> Reference {
    format!("{host}/team/app:latest").parse().unwrap()
}

fn digest(n: u8) -> Digest {
    Digest::of(&[n])
}

#[tokio::test]
async fn a_blob_the_mirror_lacks_comes_from_the_registry_and_the_mirror_gets_ns_and_headers() {
    let mirror = Script::start(|_, c| answer(c, "404 Not Found", &[], b"{}"));
    let origin = Script::start(serve_ranges);
    let cfg = config_path(
        &origin.host(),
        &format!(
            "[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n[host.\"http://{}\".header]\nx-mirror-test = [\"a\", \"b\"]\n",
            mirror.host(),
            mirror.host()
        ),
    );
    let r = client(with_hosts(cfg.path()));
    let got = r
        .read_blob_range(&repo(&origin.host()), &digest(1), 100, 50)
        .await
        .unwrap();
    assert_eq!(&got[..], &data()[100..150]);
    let asked = mirror.heads();
    assert_eq!(asked.len(), 1, "{asked:?}");
    let ns = format!("?ns={}", origin.host().replace(':', "%3A"));
    assert!(
        asked[0].starts_with(&format!("GET /v2/team/app/blobs/{}{ns} ", digest(1))),
        "{}",
        asked[0]
    );
    assert!(
        asked[0].contains("x-mirror-test: a") && asked[0].contains("x-mirror-test: b"),
        "{}",
        asked[0]
    );
    let o = origin.heads();
    assert!(!o[0].contains("ns=") && !o[0].contains("x-mirror-test"), "{}", o[0]);
    // The miss is remembered for that blob: its next range goes straight to the registry.
    r.read_blob_range(&repo(&origin.host()), &digest(1), 0, 10)
        .await
        .unwrap();
    assert_eq!(mirror.heads().len(), 1);
    // Another blob is asked of the mirror again.
    r.read_blob_range(&repo(&origin.host()), &digest(2), 0, 10)
        .await
        .unwrap();
    assert_eq!(mirror.heads().len(), 2);
}

#[tokio::test]
async fn a_mirror_that_breaks_off_a_body_hands_the_rest_of_the_read_to_the_registry_and_cools_down() {
    let mirror = Script::start(|_, c| {
        let _ = c.write_all(
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/4096\r\nContent-Length: 1000\r\n\r\n",
        );
        let _ = c.write_all(&data()[..300]);
        // Closed mid-body: a mirror killed while serving.
    });
    let origin = Script::start(serve_ranges);
    let cfg = config_path(&origin.host(), &format!("[host.\"http://{}\"]\n", mirror.host()));
    let r = client(with_hosts(cfg.path()));
    let got = r
        .read_blob_range(&repo(&origin.host()), &digest(1), 0, 1000)
        .await
        .unwrap();
    assert_eq!(&got[..], &data()[..1000]);
    assert_eq!(origin.heads().len(), 1, "one request at the registry");
    let asked = origin.heads()[0].to_ascii_lowercase();
    assert!(asked.contains("range: bytes=300-999"), "the rest only: {asked}");
    // The mirror cools down as a host: other blobs skip it too.
    r.read_blob_range(&repo(&origin.host()), &digest(2), 0, 10)
        .await
        .unwrap();
    assert_eq!(mirror.heads().len(), 1);
    assert_eq!(r.endpoint_metrics.failures_total(&mirror.host()), 1);
    assert_eq!(r.endpoint_metrics.served_total(&origin.host()), 700 + 10);
}

#[tokio::test]
async fn a_pull_only_mirror_is_not_asked_to_resolve_a_tag_but_serves_by_digest() {
    let mirror = Script::start(serve_ranges);
    let origin = Script::start(serve_ranges);
    let cfg = config_path(
        &origin.host(),
        &format!("[host.\"http://{}\"]\ncapabilities = [\"pull\"]\n", mirror.host()),
    );
    let r = client(with_hosts(cfg.path()));
    let image = repo(&origin.host());
    r.fetch_manifest(&image, "latest").await.unwrap();
    assert!(mirror.heads().is_empty(), "{:?}", mirror.heads());
    let by_digest = Digest::of(b"{}");
    r.fetch_manifest(&image, &by_digest.to_string()).await.unwrap();
    assert_eq!(mirror.heads().len(), 1);
    assert_eq!(origin.heads().len(), 1, "the tag only");
}

#[tokio::test]
async fn override_path_puts_requests_at_the_given_root() {
    let mirror = Script::start(serve_ranges);
    let origin = Script::start(serve_ranges);
    let cfg = config_path(
        &origin.host(),
        &format!("[host.\"http://{}/custom/api\"]\noverride_path = true\n", mirror.host()),
    );
    let r = client(with_hosts(cfg.path()));
    r.read_blob_range(&repo(&origin.host()), &digest(1), 0, 10)
        .await
        .unwrap();
    let asked = mirror.heads();
    assert!(asked[0].starts_with("GET /custom/api/team/app/blobs/"), "{}", asked[0]);
    assert!(origin.heads().is_empty());
}

#[tokio::test]
async fn with_a_server_the_registry_itself_is_never_asked() {
    let server = Script::start(|_, c| answer(c, "404 Not Found", &[], b"{}"));
    let origin = Script::start(serve_ranges);
    let cfg = config_path(&origin.host(), &format!("server = \"http://{}\"\n", server.host()));
    let r = client(with_hosts(cfg.path()));
    let e = r
        .read_blob_range(&repo(&origin.host()), &digest(1), 0, 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    assert!(origin.heads().is_empty());
    assert_eq!(server.heads().len(), 1);
}
