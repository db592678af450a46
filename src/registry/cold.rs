//! Blobs a registry answered a Range request on with the whole blob.
//!
//! A pull-through cache (docker-registry 2.8 in proxy mode) that does not hold
//! a blob yet answers every GET of it, ranged or not, with the whole blob (200)
//! streamed from its upstream, while one background copy of its own fills its
//! storage; once that copy is in, it answers ranges (206) from disk. Reading
//! such an answer up to a range's offset makes the upstream send the blob's
//! prefix once more per request and per node (an eStargz footer sits at the
//! end of its blob). So the read that gets a whole-blob answer drops it, and
//! the blob's reads wait until the registry answers it with a range. Probes go
//! one at a time per registry (its blobs fill side by side); the first waits
//! until every blob that went cold there could have filled at [`GUESS_RATE`],
//! later ones after doubling pauses; a range answer lets the next cold blob be
//! probed at once. The upstream then sends each blob about once however many
//! nodes ask. Few probes matter: each costs the upstream what it sends before
//! the cache notices the drop, and docker-registry 2.8 starts a second full
//! copy when a request checks its store just before a copy commits and checks
//! for copies in flight just after (an upstream round trip later). A registry
//! that keeps answering 200 (one without range support) is read through, as
//! before, once the blob's wait budget is spent (its size at [`FILL_RATE`], at
//! least [`MIN_WAIT`], at most the client's `cold_blob_wait`).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::warn;

/// Whole-blob answers up to this size are read through at once: cheaper than a wait.
pub(super) const SMALL_BLOB: u64 = 1 << 20;
/// The slowest fill of a cache a wait allows for.
const FILL_RATE: u64 = 4 << 20;
/// Every blob's wait budget is at least this.
const MIN_WAIT: Duration = Duration::from_secs(5);
/// The fill rate the first pause assumes: every probe of a cold blob makes the
/// upstream send a few hundred KiB to a few MiB before the cache notices it was
/// dropped, so the first one should rather come late than early.
const GUESS_RATE: u64 = 64 << 20;
/// The shortest pause between probes; pauses double up to [`MAX_PAUSE`].
const MIN_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(2);
/// The longest wait before a registry's first probe.
const MAX_FIRST_PAUSE: Duration = Duration::from_secs(4);
/// Blobs remembered at once; beyond that, whole-blob answers are read through.
const MAX_BLOBS: usize = 1024;

struct Cold {
    since: Instant,
    budget: Duration,
    /// The budget ran out: read through the whole-blob answers.
    gave_up: bool,
}

/// Probes go to a registry one at a time: its cold blobs fill side by side,
/// so while one is still cold the others most likely are too.
struct Pace {
    pause: Duration,
    next_probe: Instant,
    /// A probe to this registry is in flight.
    probing: bool,
    /// Until the first probe: when the first blob went cold, and the bytes of
    /// every blob that did since (the first probe waits for all of them to
    /// fill at [`GUESS_RATE`]: the cache copies them side by side).
    first: Option<(Instant, u64)>,
}

#[derive(Default)]
struct State {
    /// By blob URL.
    blobs: HashMap<String, Cold>,
    /// By registry (the URL up to `/v2/`).
    hosts: HashMap<String, Pace>,
}

/// The client's cold blobs.
#[derive(Default)]
pub(super) struct ColdBlobs {
    state: Mutex<State>,
    changed: Notify,
}

/// Leave to send one request for a blob; tell how it was answered.
pub(super) struct Turn<'a> {
    cold: &'a ColdBlobs,
    url: &'a str,
    /// This turn is its registry's probe (clears `probing` when done).
    probe: AtomicBool,
    /// Read whole-blob answers through (no wait).
    read_through: bool,
}

fn host(url: &str) -> &str {
    url.split("/v2/").next().unwrap_or(url)
}

impl ColdBlobs {
    /// Waits until a request for `url` may go: at once for a blob not known
    /// cold; else when it is this caller's turn to probe the registry, the
    /// blob answers ranges again, or its wait is given up.
    pub(super) async fn turn<'a>(&'a self, url: &'a str) -> Turn<'a> {
        loop {
            let (notified, pause) = {
                let mut state = self.state.lock();
                let State { blobs, hosts } = &mut *state;
                let now = Instant::now();
                let Some(c) = blobs.get(url) else {
                    return self.make_turn(url, false, false);
                };
                if c.gave_up {
                    return self.make_turn(url, false, true);
                }
                let pace = hosts.entry(host(url).to_string()).or_insert(Pace {
                    pause: MIN_PAUSE,
                    next_probe: now,
                    probing: false,
                    first: None,
                });
                if !pace.probing && now >= pace.next_probe {
                    pace.probing = true;
                    pace.first = None;
                    return self.make_turn(url, true, false);
                }
                let pause = if pace.probing { MAX_PAUSE } else { pace.next_probe - now };
                // Created under the lock: a change after it is not missed.
                (self.changed.notified(), pause)
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn make_turn<'a>(&'a self, url: &'a str, probe: bool, read_through: bool) -> Turn<'a> {
        Turn {
            cold: self,
            url,
            probe: AtomicBool::new(probe),
            read_through,
        }
    }

    /// Blobs currently waited on (for tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.state.lock().blobs.values().filter(|c| !c.gave_up).count()
    }
}

impl Turn<'_> {
    /// The registry answered with a range: the blob is served from its store
    /// now, and the registry's next cold blob may be probed at once.
    pub(super) fn ranges(&self) {
        let was_probe = self.probe.swap(false, Ordering::Relaxed);
        let mut state = self.cold.state.lock();
        let State { blobs, hosts } = &mut *state;
        let removed = blobs.remove(self.url).is_some();
        let h = host(self.url);
        if let Some(pace) = hosts.get_mut(h) {
            if was_probe {
                pace.probing = false;
            }
            if removed {
                pace.next_probe = Instant::now();
            }
            if !pace.probing && !blobs.keys().any(|u| host(u) == h) {
                hosts.remove(h);
            }
        }
        drop(state);
        if removed || was_probe {
            self.cold.changed.notify_waiters();
        }
    }

    /// The registry answered with the whole blob of `size` bytes; true when the
    /// caller should drop the answer and ask again on its next turn, false
    /// when it should read through it.
    pub(super) fn whole(&self, size: u64, cap: Duration) -> bool {
        if self.read_through || size <= SMALL_BLOB || cap.is_zero() {
            return false;
        }
        let was_probe = self.probe.swap(false, Ordering::Relaxed);
        let mut state = self.cold.state.lock();
        let State { blobs, hosts } = &mut *state;
        let now = Instant::now();
        let full = blobs.len() >= MAX_BLOBS;
        let at = |rate: u64| Duration::from_secs_f64(size as f64 / rate as f64);
        let pace = hosts.entry(host(self.url).to_string()).or_insert(Pace {
            pause: MIN_PAUSE,
            next_probe: now,
            probing: false,
            first: Some((now, 0)),
        });
        if was_probe {
            pace.probing = false;
        }
        let wait = match blobs.get_mut(self.url) {
            None if full => false,
            None => {
                if let Some((since, bytes)) = &mut pace.first {
                    *bytes = bytes.saturating_add(size);
                    let wait =
                        Duration::from_secs_f64(*bytes as f64 / GUESS_RATE as f64).clamp(MIN_PAUSE, MAX_FIRST_PAUSE);
                    pace.pause = wait.min(MAX_PAUSE);
                    pace.next_probe = *since + wait;
                }
                let budget = at(FILL_RATE).clamp(MIN_WAIT, cap.max(MIN_WAIT));
                let cold = Cold {
                    since: now,
                    budget,
                    gave_up: false,
                };
                blobs.insert(self.url.to_string(), cold);
                true
            }
            Some(c) if c.gave_up => false,
            Some(c) if now.duration_since(c.since) >= c.budget => {
                c.gave_up = true;
                warn!(blob = %self.url, waited = ?c.budget, "the registry still answers ranges of this blob with the whole blob: reading through it");
                false
            }
            Some(_) => {
                if was_probe {
                    pace.pause = (pace.pause * 2).min(MAX_PAUSE);
                    pace.next_probe = now + pace.pause;
                }
                true
            }
        };
        drop(state);
        self.cold.changed.notify_waiters();
        wait
    }
}

impl Drop for Turn<'_> {
    /// A probe that ended without an answer (an error) hands the turn on.
    fn drop(&mut self) {
        if self.probe.load(Ordering::Relaxed) {
            if let Some(pace) = self.cold.state.lock().hosts.get_mut(host(self.url)) {
                pace.probing = false;
            }
            self.cold.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_blob_not_known_cold_goes_at_once() {
        let cold = ColdBlobs::default();
        let t = cold.turn("u").await;
        assert!(!t.read_through && !t.probe.load(Ordering::Relaxed));
        t.ranges();
        assert_eq!(cold.waiting(), 0);
    }

    #[tokio::test]
    async fn a_small_whole_blob_answer_is_read_through() {
        let cold = ColdBlobs::default();
        assert!(!cold.turn("u").await.whole(SMALL_BLOB, CAP));
        assert_eq!(cold.waiting(), 0);
    }

    #[tokio::test]
    async fn after_a_whole_blob_answer_one_probe_goes_at_a_time_and_a_range_answer_frees_every_reader() {
        let cold = ColdBlobs::default();
        assert!(cold.turn("u").await.whole(64 << 20, CAP));
        let started = Instant::now();
        let probe = cold.turn("u").await;
        assert!(
            started.elapsed() >= Duration::from_millis(995),
            "64 MiB at the guessed 64 MiB/s"
        );
        assert!(probe.probe.load(Ordering::Relaxed));
        // Others wait behind the probe until it is answered with a range.
        let others = async {
            let t = cold.turn("u").await;
            assert!(!t.probe.load(Ordering::Relaxed), "the blob answers ranges: no probe");
            started.elapsed()
        };
        let answer = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            probe.ranges();
        };
        let (waited, ()) = tokio::join!(others, answer);
        assert!(waited >= Duration::from_millis(1250), "waited {waited:?}");
        assert_eq!(cold.waiting(), 0);
    }

    #[tokio::test]
    async fn pauses_double_and_the_wait_is_given_up_after_its_budget() {
        let cold = ColdBlobs::default();
        assert!(
            cold.turn("u").await.whole(4 << 20, CAP),
            "a first whole-blob answer waits"
        );
        let started = Instant::now();
        let mut probes = Vec::new();
        loop {
            let t = cold.turn("u").await;
            probes.push(started.elapsed());
            if !t.whole(4 << 20, CAP) {
                break;
            }
        }
        // Pauses of 250 ms, 500 ms, 1 s, 2 s, 2 s: the fifth probe comes after the 5 s budget.
        assert_eq!(probes.len(), 5, "{probes:?}");
        assert!(
            probes[4] >= MIN_WAIT && probes[4] < Duration::from_secs(6),
            "{probes:?}"
        );
        let t = cold.turn("u").await;
        assert!(t.read_through && !t.whole(4 << 20, CAP));
    }

    #[tokio::test]
    async fn one_probe_goes_to_a_registry_at_a_time_and_a_range_answer_lets_the_next_blob_probe_at_once() {
        let cold = ColdBlobs::default();
        let (a, b) = ("http://r/v2/x/blobs/a", "http://r/v2/x/blobs/b");
        assert!(cold.turn(a).await.whole(16 << 20, CAP));
        assert!(cold.turn(b).await.whole(16 << 20, CAP));
        let probe_a = cold.turn(a).await;
        assert!(probe_a.probe.load(Ordering::Relaxed));
        let started = Instant::now();
        let probe_b = async {
            let t = cold.turn(b).await;
            assert!(t.probe.load(Ordering::Relaxed));
            started.elapsed()
        };
        let answer = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            probe_a.ranges();
        };
        let (waited, ()) = tokio::join!(probe_b, answer);
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(400),
            "b probed {waited:?} after a's probe went, not while it was out nor a pause later"
        );
    }

    #[tokio::test]
    async fn a_registrys_first_probe_waits_for_all_its_cold_blobs_at_the_guessed_rate() {
        let cold = ColdBlobs::default();
        let (a, b) = ("http://r/v2/x/blobs/a", "http://r/v2/x/blobs/b");
        let started = Instant::now();
        assert!(cold.turn(a).await.whole(64 << 20, CAP));
        assert!(cold.turn(b).await.whole(64 << 20, CAP));
        let probe = cold.turn(b).await;
        assert!(probe.probe.load(Ordering::Relaxed));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1990) && waited < Duration::from_millis(2300),
            "128 MiB at 64 MiB/s: {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_probe_that_fails_hands_the_turn_on() {
        let cold = ColdBlobs::default();
        assert!(cold.turn("u").await.whole(64 << 20, CAP));
        drop(cold.turn("u").await);
        let started = Instant::now();
        let t = cold.turn("u").await;
        assert!(t.probe.load(Ordering::Relaxed));
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
