//! The client against scripted HTTP servers on loopback: credentials,
//! redaction, body limits and stalls through the real reqwest path.

use super::{Reference, Registry, RegistryError, RegistryOptions};
use crate::credentials::{docker::DockerConfig, Chain, Secret, Source};
use crate::digest::Digest;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Handler = dyn Fn(&str, &mut TcpStream) + Send + Sync;

/// An HTTP server answering each request (one per connection) with `handler`;
/// keeps every request head it saw.
pub(super) struct Script {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Script {
    pub(super) fn start(handler: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (h, handler): (_, Arc<Handler>) = (Arc::clone(&heads), Arc::new(handler));
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let (h, handler) = (Arc::clone(&h), Arc::clone(&handler));
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    h.lock().unwrap().push(head.clone());
                    handler(&head, &mut conn);
                });
            }
        });
        Self { port, heads }
    }

    pub(super) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(super) fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

pub(super) fn answer(conn: &mut TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    let _ = conn.write_all(text.as_bytes());
    let _ = conn.write_all(body);
}

pub(super) fn client(opts: RegistryOptions) -> Registry {
    Registry::new(RegistryOptions {
        backoff: Duration::from_millis(10),
        ..opts
    })
    .unwrap()
}

fn image(host: &str) -> Reference {
    format!("{host}/team/app:latest").parse().unwrap()
}

fn error_text(e: &RegistryError) -> String {
    let mut text = format!("{e:?}");
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        text.push_str(&format!("\n{s}"));
        source = s.source();
    }
    text
}

#[tokio::test]
async fn a_plain_http_token_realm_on_another_host_gets_no_basic_credentials() {
    let tokens = Script::start(|_, c| answer(c, "200 OK", &[], br#"{"token":"t"}"#));
    let realm = format!("http://{}/token", tokens.host());
    let registry = Script::start(move |head, c| match head.contains("Bearer t") {
        true => answer(c, "200 OK", &[], b"{}"),
        false => answer(
            c,
            "401 Unauthorized",
            &[format!(r#"WWW-Authenticate: Bearer realm="{realm}",service="s""#)],
            b"",
        ),
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    // base64("alice:s3cret")
    let auths = format!(r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#, registry.host());
    std::fs::write(&config, auths).unwrap();
    let r = client(RegistryOptions {
        credentials: Arc::new(Chain::new(vec![Source::Docker(
            DockerConfig::open(&config, Duration::from_secs(5)).unwrap(),
        )])),
        ..Default::default()
    });
    r.fetch_manifest(&image(&registry.host()), "latest").await.unwrap();
    let asked = tokens.heads();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        !asked[0].to_ascii_lowercase().contains("authorization"),
        "credentials went to the realm: {}",
        asked[0]
    );
}

#[tokio::test]
async fn a_pulls_registry_token_is_sent_as_the_bearer_token_for_that_image_only() {
    let tokens = Script::start(|_, c| answer(c, "200 OK", &[], br#"{"token":"from-realm"}"#));
    let realm = format!("http://{}/token", tokens.host());
    let registry = Script::start(move |head, c| match head.contains("Bearer kubelet-token") {
        true => answer(c, "200 OK", &[], b"{}"),
        false => answer(
            c,
            "401 Unauthorized",
            &[format!(r#"WWW-Authenticate: Bearer realm="{realm}",service="s""#)],
            b"",
        ),
    });
    let dir = tempfile::tempdir().unwrap();
    let auths = Arc::new(crate::credentials::PullAuths::open(dir.path()).unwrap());
    let r = client(RegistryOptions {
        credentials: Arc::new(Chain::new(vec![Source::PullAuth(Arc::clone(&auths))])),
        max_attempts: 1,
        ..Default::default()
    });
    let pulled = image(&registry.host());
    let pulling = auths.begin(pulled.key(), Secret::RegistryToken("kubelet-token".into()));
    r.fetch_manifest(&pulled, "latest").await.unwrap();
    auths.end(pulling, true);
    assert!(tokens.heads().is_empty(), "the realm was asked: {:?}", tokens.heads());
    // Another repository of the registry gets no credentials: the realm's anonymous token is refused.
    let other: Reference = format!("{}/team/other:latest", registry.host()).parse().unwrap();
    let e = r.fetch_manifest(&other, "latest").await.unwrap_err();
    assert!(error_text(&e).contains("no credentials"), "{}", error_text(&e));
    let asked = tokens.heads();
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|h| !h.to_ascii_lowercase().contains("authorization")),
        "{asked:?}"
    );
}

#[tokio::test]
async fn presigned_redirect_urls_never_appear_in_errors() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let registry = Script::start(move |head, c| {
        let storage = match head.contains("/v2/") {
            true => "/storage/blob?X-Amz-Signature=SECRET&token=SECRET".to_string(),
            false => return answer(c, "500 Internal Server Error", &[], b"storage error"),
        };
        let location = match head.contains("blobs/sha256:00") {
            // A storage host that refuses connections (a transport error).
            true => format!("http://127.0.0.1:{closed}{storage}"),
            false => storage,
        };
        answer(c, "307 Temporary Redirect", &[format!("Location: {location}")], b"");
    });
    let r = client(RegistryOptions {
        max_attempts: 2,
        ..Default::default()
    });
    let repo = image(&registry.host());
    for digest in [Digest::of(b"x"), format!("sha256:{}", "00".repeat(32)).parse().unwrap()] {
        let e = r.read_blob_range(&repo, &digest, 0, 10).await.unwrap_err();
        let text = error_text(&e);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("/storage/blob?<redacted>"), "{text}");
    }
}

#[tokio::test]
async fn a_body_over_its_limit_is_refused_while_reading() {
    // No Content-Length: only counting while reading can catch it.
    let registry = Script::start(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let piece = vec![b' '; 64 << 10];
        for _ in 0..128 {
            if c.write_all(&piece).is_err() {
                return;
            }
        }
    });
    let r = client(RegistryOptions::default());
    let e = r.fetch_manifest(&image(&registry.host()), "latest").await.unwrap_err();
    assert!(matches!(e, RegistryError::BadManifest { .. }), "{e}");
    assert!(
        e.to_string().contains("manifest is larger than its 4194304-byte limit"),
        "{e}"
    );
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_any_body_arrives() {
    let registry = Script::start(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n");
        std::thread::sleep(Duration::from_secs(30));
    });
    let r = client(RegistryOptions::default());
    let started = Instant::now();
    let e = r.fetch_manifest(&image(&registry.host()), "latest").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("larger than"), "{e}");
}

#[tokio::test]
async fn a_trickling_body_is_dropped_retried_on_a_new_connection_and_bounded_by_the_deadline() {
    // Headers, then one byte every 20 s: a gap timer of reqwest's kind would
    // wait forever at a 30 s setting; ours gives up after `stall_timeout`.
    let registry = Script::start(|head, c| {
        // Each attempt asks for the bytes not yet received.
        let from: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(str::to_string))
            .and_then(|r| r.split('-').next().and_then(|a| a.parse().ok()))
            .unwrap_or(0);
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-9/100\r\nContent-Length: {}\r\n\r\n",
            10 - from
        );
        let _ = c.write_all(head.as_bytes());
        for _ in from..10 {
            if c.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(20));
        }
    });
    let r = client(RegistryOptions {
        stall_timeout: Duration::from_millis(300),
        deadline: Duration::from_secs(2),
        ..Default::default()
    });
    let started = Instant::now();
    let e = r
        .read_blob_range(&image(&registry.host()), &Digest::of(b"x"), 0, 10)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    let text = error_text(&e);
    assert!(text.contains("stalled") && text.contains("gave up"), "{text}");
    assert!(registry.heads().len() >= 2, "not retried on a new connection");
}

#[tokio::test]
async fn a_failing_range_read_makes_at_most_max_attempts_requests() {
    // Retries used to nest (5 range attempts of 5 sends each: 25 requests).
    let registry = Script::start(|_, c| answer(c, "503 Service Unavailable", &[], b""));
    let r = client(RegistryOptions {
        max_attempts: 3,
        ..Default::default()
    });
    let e = r
        .read_blob_range(&image(&registry.host()), &Digest::of(b"x"), 0, 10)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gave up after 3 attempt(s)"), "{e}");
    assert_eq!(registry.heads().len(), 3);
}

#[tokio::test]
async fn error_bodies_of_redirect_targets_are_not_quoted() {
    let registry = Script::start(|head, c| match head.contains("/v2/") {
        true => answer(
            c,
            "307 Temporary Redirect",
            &["Location: /storage?sig=S".to_string()],
            b"",
        ),
        false => answer(
            c,
            "500 Internal Server Error",
            &[],
            b"<SignatureProvided>SECRET</SignatureProvided>",
        ),
    });
    let r = client(RegistryOptions {
        max_attempts: 1,
        ..Default::default()
    });
    let e = r
        .read_blob_range(&image(&registry.host()), &Digest::of(b"x"), 0, 10)
        .await
        .unwrap_err();
    assert!(!error_text(&e).contains("SECRET"), "{}", error_text(&e));
}

#[test]
fn whole_blob_deadlines_allow_for_their_size() {
    let r = client(RegistryOptions {
        deadline: Duration::from_secs(8),
        ..Default::default()
    });
    assert_eq!(r.policy_for(4 << 10).deadline, Duration::from_secs(8));
    // A 1 GiB layer at 64 KiB/s.
    assert_eq!(r.policy_for(1 << 30).deadline, Duration::from_secs(16384));
}

/// A pull-through cache's blob: the whole blob (200) for the first `cold`
/// requests, ranges (206) after.
fn filling_cache(blob: Arc<Vec<u8>>, cold: usize) -> Script {
    let seen = Arc::new(Mutex::new(0usize));
    Script::start(move |head, c| {
        let n = {
            let mut seen = seen.lock().unwrap();
            *seen += 1;
            *seen
        };
        let range = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("range: bytes=").map(String::from));
        match range {
            Some(r) if n > cold => {
                let (a, b) = r.trim().split_once('-').unwrap();
                let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
                let cr = format!("Content-Range: bytes {a}-{b}/{}", blob.len());
                answer(c, "206 Partial Content", &[cr], &blob[a..=b]);
            }
            _ => answer(c, "200 OK", &[], &blob),
        }
    })
}

#[tokio::test]
async fn a_range_read_answered_with_the_whole_blob_waits_for_the_cache_to_answer_ranges() {
    let blob: Arc<Vec<u8>> = Arc::new((0..8u32 << 20).map(|i| (i % 251) as u8).collect());
    let cache = filling_cache(Arc::clone(&blob), 2);
    let r = client(RegistryOptions::default());
    let digest = Digest::of(&blob);
    let (offset, len) = (7u64 << 20, 4096u64);
    let got = r
        .read_blob_range(&image(&cache.host()), &digest, offset, len)
        .await
        .unwrap();
    assert_eq!(&got[..], &blob[offset as usize..(offset + len) as usize]);
    // The first answer and one probe were whole blobs, dropped; the third request got the range.
    assert_eq!(cache.heads().len(), 3, "{:?}", cache.heads());
}

#[tokio::test]
async fn a_registry_that_never_answers_ranges_is_read_through_after_the_wait() {
    let blob: Arc<Vec<u8>> = Arc::new((0..2u32 << 20).map(|i| (i % 251) as u8).collect());
    let cache = filling_cache(Arc::clone(&blob), usize::MAX);
    let r = client(RegistryOptions::default());
    let started = Instant::now();
    let got = r
        .read_blob_range(&image(&cache.host()), &Digest::of(&blob), 1 << 20, 100)
        .await
        .unwrap();
    assert_eq!(&got[..], &blob[1 << 20..(1 << 20) + 100]);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(9),
        "waited {waited:?}"
    );
}
