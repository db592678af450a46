//! Priorities measured: how long a cold on-demand read waits while a profile
//! replay (prefetch) and a background fill run on the same link, against the
//! same read alone and against the bound "alone + one low-priority request in
//! flight". A baseline round issues the replay and fill at on-demand priority,
//! as if priority were only a label.
//!
//! The link is simulated in process (fetch::testing: a rate and a round-trip
//! time shared by concurrent requests), so the figures isolate scheduling from
//! the machine's noise; the registry and TCP are the start-up benchmark's job.
//! Run: `cargo bench --bench priorities` (release build, no root).

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use streamsnap::digest::Digest;
use streamsnap::fetch::testing::{services, tar_blob, tar_fetcher, Link, TestSource};
use streamsnap::fetch::{Fetcher, RangeSource, LOW_BUDGET};
use streamsnap::metrics::Cause;
use streamsnap::prefetch::background::{self, FillConfig};
use streamsnap::prefetch::profile::{self, Profile, ProfileRead};

const MIB: u64 = 1 << 20;
const LINK: Link = Link {
    bytes_per_sec: 125_000_000, // 1 Gbit/s
    rtt: Duration::from_millis(2),
};
const ROUNDS: usize = 5;
/// The cold read: one file of this size, read at once.
const PROBE: u64 = 4 * MIB;
/// What the profile replays (prefetch) before the probe.
const REPLAYED: u64 = 96 * MIB;
/// Bulk the background fill works through (it never reaches the probes at the end).
const BULK: u64 = 256 * MIB;
/// Time the replay and fill run before the probe is read.
const WARM_UP: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Alone,
    Prioritized,
    /// Replay and fill issued as on-demand: priority as a label only.
    Unprioritized,
}

fn layer_blob() -> Bytes {
    let filler = |len: u64, seed: u8| {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    };
    let mut files = vec![("replayed.bin", filler(REPLAYED, 1)), ("bulk.bin", filler(BULK, 2))];
    let probes: Vec<String> = (0..ROUNDS * 3).map(|i| format!("probe{i}")).collect();
    for (i, name) in probes.iter().enumerate() {
        files.push((name.as_str(), filler(PROBE, 10 + i as u8)));
    }
    tar_blob(&files)
}

async fn round(blob: &Bytes, mode: Mode, probe: &str) -> Duration {
    let cache = tempfile::tempdir().expect("temp dir");
    let source: Arc<dyn RangeSource> = Arc::new(TestSource::new(blob.clone()).over(LINK));
    let node = services(cache.path(), 4 << 30);
    let fetcher = tar_fetcher(blob, source, &node, MIB, true).await;
    let mut background_work = Vec::new();
    if mode != Mode::Alone {
        background_work.push(start_replay(&fetcher, mode));
        background_work.push(start_fill(&fetcher, mode, blob.len() as u64));
        tokio::time::sleep(WARM_UP).await;
    }
    let file = fetcher.index().resolve(probe).expect("probe file");
    let started = Instant::now();
    let data = fetcher.read(file, 0, PROBE as u32).await.expect("probe read");
    let took = started.elapsed();
    assert_eq!(data.len() as u64, PROBE);
    drop(fetcher);
    for w in background_work {
        w.abort();
        let _ = w.await;
    }
    took
}

fn start_replay(fetcher: &Arc<Fetcher>, mode: Mode) -> tokio::task::JoinHandle<()> {
    let f = Arc::clone(fetcher);
    tokio::spawn(async move {
        if mode == Mode::Prioritized {
            let p = Profile {
                version: profile::VERSION,
                image: Digest::of(b"bench"),
                reads: vec![ProfileRead {
                    layer: f.layer().clone(),
                    path: "replayed.bin".into(),
                    offset: 0,
                    len: REPLAYED,
                }],
            };
            profile::replay(&f, &p, Duration::from_secs(60), profile::DEFAULT_REPLAY_BUDGET).await;
        } else {
            // The same batches as a replay (8 MiB, four at a time), at on-demand priority.
            let node = f.index().resolve("replayed.bin").expect("replayed file");
            let ids: Vec<u32> = f.index().chunks_for_range(node, 0, REPLAYED).collect();
            for four in ids.chunks(32) {
                futures::future::join_all(four.chunks(8).map(|b| f.chunks(None, b.to_vec(), Cause::OnDemand))).await;
            }
        }
    })
}

fn start_fill(fetcher: &Arc<Fetcher>, mode: Mode, blob_size: u64) -> tokio::task::JoinHandle<()> {
    if mode == Mode::Prioritized {
        let cfg = FillConfig {
            enabled: true,
            delay: Duration::ZERO,
            rate: None,
        };
        let target = background::Target {
            image: "bench/layer".into(),
            size: blob_size,
        };
        let fill = background::spawn(fetcher, cfg, target).expect("fill starts");
        return tokio::spawn(async move {
            let _ = fill.await;
        });
    }
    let f = Arc::clone(fetcher);
    tokio::spawn(async move {
        let node = f.index().resolve("bulk.bin").expect("bulk file");
        let ids: Vec<u32> = f.index().chunks_for_range(node, 0, BULK).collect();
        for batch in ids.chunks(8) {
            let _ = f.chunks(None, batch.to_vec(), Cause::OnDemand).await;
        }
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let blob = layer_blob();
    let (mut alone, mut busy, mut flat) = (Vec::new(), Vec::new(), Vec::new());
    runtime.block_on(async {
        for r in 0..ROUNDS {
            // Side by side: the three modes alternate within each round.
            alone.push(round(&blob, Mode::Alone, &format!("probe{}", 3 * r)).await);
            busy.push(round(&blob, Mode::Prioritized, &format!("probe{}", 3 * r + 1)).await);
            flat.push(round(&blob, Mode::Unprioritized, &format!("probe{}", 3 * r + 2)).await);
            eprintln!(
                "round {}: alone {} ms, prioritized {} ms, unprioritized {} ms",
                r + 1,
                ms(alone[r]),
                ms(busy[r]),
                ms(flat[r])
            );
        }
    });
    let one_request = LINK.rtt + Duration::from_secs_f64(LOW_BUDGET as f64 / LINK.bytes_per_sec as f64);
    let (alone, busy, flat) = (median(alone), median(busy), median(flat));
    let bound = alone + one_request;
    let mut out = String::new();
    out.push_str(&format!(
        "# Priorities: a cold {} MiB on-demand read beside a profile replay and a background fill\n\n",
        PROBE / MIB
    ));
    out.push_str(&format!(
        "Simulated link {} Mbit/s, {} ms RTT; medians of {ROUNDS} rounds, modes alternating.\n\n",
        LINK.bytes_per_sec * 8 / 1_000_000,
        LINK.rtt.as_millis()
    ));
    out.push_str("| case | read time (ms) |\n| --- | --- |\n");
    out.push_str(&format!("| read alone | {} |\n", ms(alone)));
    out.push_str(&format!("| during replay + fill, scheduled | {} |\n", ms(busy)));
    out.push_str(&format!(
        "| bound: alone + one {} MiB low-priority request | {} |\n",
        LOW_BUDGET / MIB,
        ms(bound)
    ));
    out.push_str(&format!(
        "| during replay + fill, all at on-demand priority | {} |\n\n",
        ms(flat)
    ));
    out.push_str(&format!(
        "Scheduled ÷ bound: {:.2} ({}). Unprioritized ÷ alone: {:.1}x.\n",
        busy.as_secs_f64() / bound.as_secs_f64(),
        if busy <= bound { "within" } else { "OVER" },
        flat.as_secs_f64() / alone.as_secs_f64()
    ));
    print!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/priorities-bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("priorities.md"), &out);
    }
}
