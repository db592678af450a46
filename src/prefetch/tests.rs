//! Prefetch hints and background fill against an in-process source.

use super::background::{self, FillConfig, FillEnd};
use super::profile::{self, Profile, ProfileRead, Profiles};
use crate::digest::Digest;
use crate::fetch::testing::Fault;
use crate::fetch::testing::{services, tar_blob, tar_fetcher, TestSource};
use crate::fetch::{FetchError, Fetcher, Proof, RangeSource};
use crate::registry::{Reference, Registry, RegistryOptions};
use std::sync::Arc;
use std::time::Duration;

const CHUNK: u64 = 64 << 10;

struct Fixture {
    fetcher: Arc<Fetcher>,
    source: Arc<TestSource>,
    cache: tempfile::TempDir,
    blob_size: u64,
}

fn target(fx: &Fixture) -> background::Target {
    background::Target {
        image: "registry.test/app:v1".into(),
        size: fx.blob_size,
    }
}

async fn fixture(cache_size: u64) -> Fixture {
    fixture_verified(cache_size, true).await
}

/// `verified`: the layer's chunks carry digests (else only the layer digest can catch wrong bytes).
async fn fixture_verified(cache_size: u64, verified: bool) -> Fixture {
    let files = vec![
        ("etc/greeting", b"hello".to_vec()),
        ("models/weights.bin", vec![7u8; 8 * CHUNK as usize]),
        ("lib/unused.so", vec![9u8; 4 * CHUNK as usize]),
    ];
    let blob = tar_blob(&files);
    let source = Arc::new(TestSource::new(blob.clone()));
    let cache = tempfile::tempdir().unwrap();
    let node = services(cache.path(), cache_size);
    let fetcher = tar_fetcher(
        &blob,
        Arc::clone(&source) as Arc<dyn RangeSource>,
        &node,
        CHUNK,
        verified,
    )
    .await;
    Fixture {
        fetcher,
        source,
        cache,
        blob_size: blob.len() as u64,
    }
}

fn all_cached(f: &Fetcher) -> bool {
    (0..f.index().chunks.len() as u32).all(|id| f.is_cached(id))
}

#[tokio::test]
async fn a_fill_caches_the_whole_layer_so_reads_need_no_source() {
    let fx = fixture(1 << 30).await;
    let cfg = FillConfig {
        enabled: true,
        delay: Duration::ZERO,
        rate: None,
    };
    let end = background::spawn(&fx.fetcher, cfg, target(&fx))
        .expect("fill starts")
        .await
        .unwrap();
    assert!(
        matches!(
            end,
            FillEnd::Complete {
                proof: Proof::LayerDigest,
                ..
            }
        ),
        "{end:?}"
    );
    assert!(all_cached(&fx.fetcher));
    let before = fx.source.requests().len();
    let node = fx.fetcher.index().resolve("models/weights.bin").unwrap();
    fx.fetcher.read(node, 0, 1 << 20).await.unwrap();
    assert_eq!(fx.source.requests().len(), before);
}

#[tokio::test]
async fn a_fill_stops_when_the_cache_cannot_hold_the_layer() {
    let fx = fixture(CHUNK).await;
    let cfg = FillConfig {
        enabled: true,
        delay: Duration::ZERO,
        rate: None,
    };
    let end = background::spawn(&fx.fetcher, cfg, target(&fx)).unwrap().await.unwrap();
    assert_eq!(end, FillEnd::CacheTooSmall);
}

#[tokio::test]
async fn a_fill_ends_when_the_layer_is_unmounted() {
    let fx = fixture(1 << 30).await;
    let cfg = FillConfig {
        enabled: true,
        delay: Duration::from_millis(50),
        rate: None,
    };
    let fill = background::spawn(&fx.fetcher, cfg, target(&fx)).unwrap();
    drop(fx.fetcher);
    assert_eq!(fill.await.unwrap(), FillEnd::Unmounted);
    assert!(fx.source.requests().is_empty());
}

#[tokio::test]
async fn landmark_files_are_fetched_before_they_are_read() {
    let fx = fixture(1 << 30).await;
    let mut index = (**fx.fetcher.index()).clone();
    index.prefetch = vec![index.resolve("etc/greeting").unwrap()];
    let fetcher = Fetcher::new(
        fx.fetcher.layer().clone(),
        Arc::new(index),
        Arc::clone(&fx.source) as Arc<dyn RangeSource>,
        &services(fx.cache.path(), 1 << 30),
    );
    let done = super::landmarks(&fetcher, Duration::from_secs(10)).await;
    assert!(done.complete && done.files == 1, "{done:?}");
    let before = fx.source.requests().len();
    let node = fetcher.index().resolve("etc/greeting").unwrap();
    assert_eq!(&fetcher.read(node, 0, 5).await.unwrap()[..], b"hello");
    assert_eq!(fx.source.requests().len(), before);
}

#[tokio::test]
async fn a_replayed_profile_fetches_exactly_its_ranges() {
    let fx = fixture(1 << 30).await;
    let layer = fx.fetcher.layer().clone();
    let profile = Profile {
        version: profile::VERSION,
        image: Digest::of(b"image"),
        reads: vec![
            ProfileRead {
                layer: layer.clone(),
                path: "etc/greeting".into(),
                offset: 0,
                len: 5,
            },
            ProfileRead {
                layer,
                path: "models/weights.bin".into(),
                offset: 0,
                len: 2 * CHUNK,
            },
        ],
    };
    profile::replay(
        &fx.fetcher,
        &profile,
        Duration::from_secs(10),
        profile::DEFAULT_REPLAY_BUDGET,
    )
    .await;
    let weights = fx.fetcher.index().resolve("models/weights.bin").unwrap();
    let asked = fx.source.bytes_requested();
    assert!(
        (2 * CHUNK + 5..3 * CHUNK).contains(&asked),
        "the profile's ranges and no more: {asked}"
    );
    let before = fx.source.requests().len();
    fx.fetcher.read(weights, 0, 2 * CHUNK as u32).await.unwrap();
    assert_eq!(fx.source.requests().len(), before);
}

#[tokio::test]
async fn a_profile_replays_no_more_than_its_byte_budget() {
    let fx = fixture(1 << 30).await;
    let profile = Profile {
        version: profile::VERSION,
        image: Digest::of(b"image"),
        reads: vec![ProfileRead {
            layer: fx.fetcher.layer().clone(),
            path: "models/weights.bin".into(),
            offset: 0,
            len: u64::MAX,
        }],
    };
    profile::replay(&fx.fetcher, &profile, Duration::from_secs(10), 2 * CHUNK).await;
    let asked = fx.source.bytes_requested();
    assert!(asked > 0 && asked <= 2 * CHUNK, "within the budget: {asked}");
}

#[test]
fn a_profile_kept_from_a_referrer_is_used_only_while_referrers_are_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let image = Digest::of(b"manifest");
    let p = Profile {
        version: profile::VERSION,
        image: image.clone(),
        reads: Vec::new(),
    };
    let kept = dir.path().join(format!("{}.referrer.json", image.hex()));
    std::fs::write(&kept, serde_json::to_vec(&p).unwrap()).unwrap();
    let profiles = || Profiles::new(dir.path().into(), Duration::ZERO, false, Vec::new());
    assert_eq!(profiles().load(&image), None);
    assert_eq!(profiles().trusting_referrers(true).load(&image), Some(p));
}

#[tokio::test]
async fn a_recording_keeps_the_reads_in_order_and_then_detaches() {
    let fx = fixture(1 << 30).await;
    let dir = tempfile::tempdir().unwrap();
    let profiles =
        Arc::new(Profiles::new(dir.path().into(), Duration::from_millis(200), false, Vec::new()).replaying(false));
    let registry = Arc::new(Registry::new(RegistryOptions::default()).unwrap());
    let manifest = Digest::of(b"manifest");
    let image: Reference = format!("localhost:1/app@{manifest}").parse().unwrap();
    profiles
        .on_layer_open(&registry, &image, &fx.fetcher, Duration::ZERO)
        .await;
    assert!(fx.fetcher.is_observed());
    let greeting = fx.fetcher.index().resolve("etc/greeting").unwrap();
    let weights = fx.fetcher.index().resolve("models/weights.bin").unwrap();
    fx.fetcher.read(greeting, 0, 5).await.unwrap();
    fx.fetcher.read(weights, 0, 1000).await.unwrap();
    fx.fetcher.read(weights, 1000, 1000).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while profiles.load(&manifest).is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = profiles.load(&manifest).expect("profile kept");
    let reads: Vec<(&str, u64, u64)> = p.reads.iter().map(|r| (r.path.as_str(), r.offset, r.len)).collect();
    assert_eq!(reads, vec![("etc/greeting", 0, 5), ("models/weights.bin", 0, 2000)]);
    assert!(!fx.fetcher.is_observed(), "the recorder is detached once done");
}

fn fill_now() -> FillConfig {
    FillConfig {
        enabled: true,
        delay: Duration::ZERO,
        rate: None,
    }
}

/// Log lines written while `f` runs on this thread (and the tasks it spawns
/// on a current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_filled_layer_whose_content_does_not_match_its_digest_is_quarantined() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    // No chunk digests: a flipped byte passes the fetch and lands in the cache.
    let fx = fixture_verified(1 << 30, false).await;
    fx.source.fail_next(Fault::WrongBytes);
    let end = background::spawn(&fx.fetcher, fill_now(), target(&fx))
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(end, FillEnd::Quarantined(_)), "{end:?}");
    let node = fx.fetcher.index().resolve("models/weights.bin").unwrap();
    let read = fx.fetcher.read(node, 0, 4096).await;
    assert!(matches!(read, Err(FetchError::Quarantined { .. })), "{read:?}");
    assert_eq!(fx.fetcher.cached_file(node), None, "nothing goes to passthrough");
    assert_eq!(fx.fetcher.metrics().quarantined_total(), 1);
    assert!(fx
        .fetcher
        .metrics()
        .encode()
        .contains("streamsnap_quarantined_layers_total 1"));
    let logs = String::from_utf8(logs.0.lock().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("quarantined"))
        .expect("a quarantine log line");
    assert!(
        line.contains("registry.test/app:v1") && line.contains(&fx.fetcher.layer().to_string()),
        "{line}"
    );
}

#[tokio::test]
async fn a_quarantined_layer_leaves_nothing_in_the_cache() {
    let fx = fixture_verified(1 << 30, false).await;
    fx.source.fail_next(Fault::WrongBytes);
    let end = background::spawn(&fx.fetcher, fill_now(), target(&fx))
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(end, FillEnd::Quarantined(_)), "{end:?}");
    assert_eq!(fx.fetcher.disk().total_bytes(), 0);
    assert!(!fx.cache.path().join(fx.fetcher.layer().hex()).exists());
}

#[tokio::test]
async fn a_filled_layer_without_chunk_digests_is_proven_by_its_layer_digest() {
    let fx = fixture_verified(1 << 30, false).await;
    let end = background::spawn(&fx.fetcher, fill_now(), target(&fx))
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(
            end,
            FillEnd::Complete {
                proof: Proof::LayerDigest,
                ..
            }
        ),
        "{end:?}"
    );
    assert_eq!(fx.fetcher.metrics().quarantined_total(), 0);
}

#[tokio::test]
async fn a_fills_state_tells_waiting_then_how_it_ended() {
    let fx = fixture(1 << 30).await;
    let state = std::sync::Arc::new(background::FillState::default());
    let off = FillConfig {
        enabled: false,
        ..fill_now()
    };
    assert!(background::spawn_reporting(&fx.fetcher, off, target(&fx), state.clone()).is_none());
    assert_eq!(state.phase(), background::FillPhase::Off);
    let cfg = FillConfig {
        delay: Duration::from_millis(200),
        ..fill_now()
    };
    let fill = background::spawn_reporting(&fx.fetcher, cfg, target(&fx), state.clone()).expect("fill starts");
    assert_eq!(state.phase(), background::FillPhase::Waiting);
    let end = fill.await.unwrap();
    assert!(matches!(end, FillEnd::Complete { .. }), "{end:?}");
    assert_eq!(state.phase(), background::FillPhase::Ended(end));
}
