//! Blobs a registry answered a Range request on with the whole blob.
//!
//! A pull-through cache (docker-registry 2.8 in proxy mode) that does not hold
//! a blob yet answers every GET of it, ranged or not, with the whole blob (200)
//! streamed from its upstream, while one background copy of its own fills its
//! storage; once that copy is in, it answers ranges (206) from disk. Reading
//! such an answer up to a range's offset makes the upstream send the blob's
//! prefix once more per request and per node (an eStargz footer sits at the
//! end of its blob). So the read that gets a whole-blob answer drops it, and
//! the blob's reads wait, one probe at a time with doubling pauses, until the
//! registry answers with a range: the upstream then sends each blob about once
//! however many nodes ask. A registry that keeps answering 200 (one without
//! range support) is read through, as before, once the blob's wait budget is
//! spent (its size at [`FILL_RATE`], at least [`MIN_WAIT`], at most the
//! client's `cold_blob_wait`).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

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
/// Blobs remembered at once; beyond that, whole-blob answers are read through.
const MAX_BLOBS: usize = 1024;

struct Cold {
    since: Instant,
    budget: Duration,
    pause: Duration,
    next_probe: Instant,
    /// A probe of this blob is in flight.
    probing: bool,
    /// The budget ran out: read through the whole-blob answers.
    gave_up: bool,
}

/// The client's cold blobs, by blob URL.
#[derive(Default)]
pub(super) struct ColdBlobs {
    blobs: Mutex<HashMap<String, Cold>>,
    changed: Notify,
}

/// Leave to send one request for a blob; tell how it was answered.
pub(super) struct Turn<'a> {
    cold: &'a ColdBlobs,
    url: &'a str,
    /// This turn is the blob's probe (clears `probing` when done).
    probe: AtomicBool,
    /// Read whole-blob answers through (no wait).
    read_through: bool,
}

impl ColdBlobs {
    /// Waits until a request for `url` may go: at once for a blob not known
    /// cold; else when it is this caller's turn to probe, the blob answers
    /// ranges again, or its wait is given up.
    pub(super) async fn turn<'a>(&'a self, url: &'a str) -> Turn<'a> {
        loop {
            let (notified, pause) = {
                let mut blobs = self.blobs.lock();
                let now = Instant::now();
                let Some(c) = blobs.get_mut(url) else {
                    return self.make_turn(url, false, false);
                };
                if c.gave_up {
                    return self.make_turn(url, false, true);
                }
                if !c.probing && now >= c.next_probe {
                    c.probing = true;
                    return self.make_turn(url, true, false);
                }
                let pause = if c.probing { MAX_PAUSE } else { c.next_probe - now };
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
        self.blobs.lock().values().filter(|c| !c.gave_up).count()
    }
}

impl Turn<'_> {
    /// The registry answered with a range: the blob is served from its store now.
    pub(super) fn ranges(&self) {
        if self.cold.blobs.lock().remove(self.url).is_some() {
            self.cold.changed.notify_waiters();
        }
        self.probe.store(false, Ordering::Relaxed);
    }

    /// The registry answered with the whole blob of `size` bytes; true when the
    /// caller should drop the answer and ask again on its next turn, false
    /// when it should read through it.
    pub(super) fn whole(&self, size: u64, cap: Duration) -> bool {
        if self.read_through || size <= SMALL_BLOB || cap.is_zero() {
            return false;
        }
        let was_probe = self.probe.swap(false, Ordering::Relaxed);
        let mut blobs = self.cold.blobs.lock();
        let now = Instant::now();
        let full = blobs.len() >= MAX_BLOBS;
        let wait = match blobs.get_mut(self.url) {
            None if full => false,
            None => {
                let at = |rate: u64| Duration::from_secs_f64(size as f64 / rate as f64);
                let budget = at(FILL_RATE).clamp(MIN_WAIT, cap.max(MIN_WAIT));
                let pause = at(GUESS_RATE).clamp(MIN_PAUSE, MAX_PAUSE);
                blobs.insert(
                    self.url.to_string(),
                    Cold {
                        since: now,
                        budget,
                        pause,
                        next_probe: now + pause,
                        probing: false,
                        gave_up: false,
                    },
                );
                true
            }
            Some(c) if c.gave_up => false,
            Some(c) if now.duration_since(c.since) >= c.budget => {
                c.gave_up = true;
                c.probing = false;
                false
            }
            Some(c) => {
                if was_probe {
                    c.probing = false;
                    c.pause = (c.pause * 2).min(MAX_PAUSE);
                    c.next_probe = now + c.pause;
                }
                true
            }
        };
        drop(blobs);
        self.cold.changed.notify_waiters();
        wait
    }
}

impl Drop for Turn<'_> {
    /// A probe that ended without an answer (an error) hands the turn on.
    fn drop(&mut self) {
        if self.probe.load(Ordering::Relaxed) {
            if let Some(c) = self.cold.blobs.lock().get_mut(self.url) {
                c.probing = false;
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
