//! The node's request scheduler: every range request to a remote source
//! waits here for admission, so that priority is something requests wait in,
//! not a label. Causes rank on-demand > read-ahead > prefetch > background
//! (the order of [`Cause`]'s variants):
//! - no request is admitted while a more urgent one is waiting;
//! - on-demand and read-ahead requests are admitted at once, up to
//!   [`MAX_IN_FLIGHT`] requests of all causes together;
//! - prefetch and background requests together keep at most [`LOW_BUDGET`]
//!   bytes in flight (a larger request only when none is), so an urgent read
//!   shares the link with at most one request's worth of them;
//! - background requests start only when nothing more urgent is in flight.
//!
//! A flight joined by a more urgent reader has its [`Urgency`] raised, so a
//! read never waits behind the low priority of a fetch it shares.

use crate::metrics::{Cause, Metrics};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// Requests in flight at most, all causes together.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes of prefetch and background requests in flight at most (one largest request).
pub const LOW_BUDGET: u64 = super::MAX_REQUEST;

const CAUSES: [Cause; 4] = [Cause::OnDemand, Cause::ReadAhead, Cause::Prefetch, Cause::Background];

/// The cause a flight is scheduled as; joiners may make it more urgent.
#[derive(Debug)]
pub struct Urgency(AtomicU8);

impl Urgency {
    pub fn new(cause: Cause) -> Arc<Self> {
        Arc::new(Self(AtomicU8::new(rank(cause))))
    }

    pub fn get(&self) -> Cause {
        CAUSES[self.0.load(Ordering::Acquire) as usize]
    }

    /// Makes the flight at least as urgent as `cause`; true when it changed.
    pub fn raise(&self, cause: Cause) -> bool {
        self.0.fetch_min(rank(cause), Ordering::AcqRel) > rank(cause)
    }
}

fn rank(c: Cause) -> u8 {
    CAUSES.iter().position(|x| *x == c).expect("every cause ranks") as u8
}

fn is_low(c: Cause) -> bool {
    matches!(c, Cause::Prefetch | Cause::Background)
}

#[derive(Default)]
struct State {
    next_ticket: u64,
    /// Requests waiting for admission, with their (changeable) urgency.
    waiting: Vec<(u64, Arc<Urgency>)>,
    in_flight: [usize; 4],
    low_bytes: u64,
}

impl State {
    fn admissible(&self, ticket: u64, cause: Cause, bytes: u64) -> bool {
        let total: usize = self.in_flight.iter().sum();
        let r = rank(cause) as usize;
        let more_urgent_waiting = self
            .waiting
            .iter()
            .any(|(t, u)| *t != ticket && (rank(u.get()) as usize) < r);
        if total >= MAX_IN_FLIGHT || more_urgent_waiting {
            return false;
        }
        let low_fits = self.low_bytes == 0 || self.low_bytes + bytes <= LOW_BUDGET;
        match cause {
            Cause::OnDemand | Cause::ReadAhead => true,
            Cause::Prefetch => low_fits,
            Cause::Background => low_fits && self.in_flight[..r].iter().all(|n| *n == 0),
        }
    }

    /// On-demand requests waiting or in flight: reads waiting on the registry.
    fn on_demand(&self) -> i64 {
        let waiting = self.waiting.iter().filter(|(_, u)| u.get() == Cause::OnDemand).count();
        (waiting + self.in_flight[0]) as i64
    }
}

/// Admission of range requests, shared by every layer of the node.
pub struct Scheduler {
    state: Mutex<State>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

/// Admission of one request; dropping it lets the next one in.
pub struct Permit {
    sched: Arc<Scheduler>,
    cause: Cause,
    bytes: u64,
}

impl Scheduler {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            changed: Notify::new(),
            metrics,
        })
    }

    /// Waits until a request of `bytes` at `urgency` may go.
    pub async fn admit(self: &Arc<Self>, urgency: &Arc<Urgency>, bytes: u64) -> Permit {
        let ticket = {
            let mut s = self.state.lock();
            s.next_ticket += 1;
            let t = s.next_ticket;
            s.waiting.push((t, Arc::clone(urgency)));
            t
        };
        // Leaves the queue even if the caller goes away while waiting.
        let mut queued = Queued { sched: self, ticket };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.state.lock();
                let cause = urgency.get();
                if s.admissible(ticket, cause, bytes) {
                    s.waiting.retain(|(t, _)| *t != ticket);
                    s.in_flight[rank(cause) as usize] += 1;
                    if is_low(cause) {
                        s.low_bytes += bytes;
                    }
                    self.metrics.set_reads_waiting(s.on_demand());
                    queued.ticket = 0;
                    drop(s);
                    // Leaving the queue may let a less urgent request in.
                    self.changed.notify_waiters();
                    return Permit {
                        sched: Arc::clone(self),
                        cause,
                        bytes,
                    };
                }
                self.metrics.set_reads_waiting(s.on_demand());
            }
            changed.await;
        }
    }

    /// A waiting request's urgency was raised: look again.
    pub fn raised(&self) {
        self.changed.notify_waiters();
    }

    /// Requests in flight now, by cause (tests and benchmarks).
    pub fn in_flight(&self, cause: Cause) -> usize {
        self.state.lock().in_flight[rank(cause) as usize]
    }
}

struct Queued<'a> {
    sched: &'a Scheduler,
    ticket: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.ticket != 0 {
            let mut s = self.sched.state.lock();
            s.waiting.retain(|(t, _)| *t != self.ticket);
            self.sched.metrics.set_reads_waiting(s.on_demand());
            drop(s);
            self.sched.changed.notify_waiters();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.sched.state.lock();
        s.in_flight[rank(self.cause) as usize] -= 1;
        if is_low(self.cause) {
            s.low_bytes -= self.bytes;
        }
        self.sched.metrics.set_reads_waiting(s.on_demand());
        drop(s);
        self.sched.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sched() -> Arc<Scheduler> {
        Scheduler::new(Metrics::new())
    }

    /// Does `admit` finish within a few milliseconds?
    async fn admitted(s: &Arc<Scheduler>, cause: Cause, bytes: u64) -> Option<Permit> {
        tokio::time::timeout(Duration::from_millis(20), s.admit(&Urgency::new(cause), bytes))
            .await
            .ok()
    }

    #[tokio::test]
    async fn on_demand_requests_go_at_once_beside_low_priority_ones() {
        let s = sched();
        let _p = admitted(&s, Cause::Prefetch, LOW_BUDGET)
            .await
            .expect("prefetch admitted");
        assert!(admitted(&s, Cause::OnDemand, 1 << 20).await.is_some());
    }

    #[tokio::test]
    async fn low_priority_requests_keep_to_one_requests_worth_of_bytes() {
        let s = sched();
        let _a = admitted(&s, Cause::Prefetch, LOW_BUDGET / 2).await.expect("first");
        let _b = admitted(&s, Cause::Prefetch, LOW_BUDGET / 2)
            .await
            .expect("second fits");
        assert!(admitted(&s, Cause::Prefetch, 1).await.is_none(), "budget spent");
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_goes_alone() {
        let s = sched();
        let big = admitted(&s, Cause::Prefetch, LOW_BUDGET * 2).await.expect("alone");
        assert!(admitted(&s, Cause::Prefetch, 1).await.is_none());
        drop(big);
        assert!(admitted(&s, Cause::Prefetch, 1).await.is_some());
    }

    #[tokio::test]
    async fn background_waits_while_anything_more_urgent_is_in_flight() {
        let s = sched();
        let read = admitted(&s, Cause::OnDemand, 1).await.expect("read");
        let bg = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.admit(&Urgency::new(Cause::Background), 1).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(s.in_flight(Cause::Background), 0);
        drop(read);
        let _bg = tokio::time::timeout(Duration::from_secs(1), bg).await.unwrap().unwrap();
        assert_eq!(s.in_flight(Cause::Background), 1);
    }

    #[tokio::test]
    async fn a_raised_urgency_admits_a_waiting_request() {
        let s = sched();
        let _read = admitted(&s, Cause::OnDemand, 1).await.expect("read");
        let urgency = Urgency::new(Cause::Background);
        let waiting = {
            let (s, u) = (Arc::clone(&s), Arc::clone(&urgency));
            tokio::spawn(async move { s.admit(&u, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert!(urgency.raise(Cause::OnDemand));
        s.raised();
        let p = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.cause, Cause::OnDemand);
    }

    #[tokio::test]
    async fn nothing_less_urgent_passes_a_waiting_request() {
        let s = sched();
        let ahead = Urgency::new(Cause::ReadAhead);
        let mut permits: Vec<Permit> = futures::future::join_all((0..MAX_IN_FLIGHT).map(|_| s.admit(&ahead, 1))).await;
        let read = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.admit(&Urgency::new(Cause::OnDemand), 1).await })
        };
        let ahead = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.admit(&Urgency::new(Cause::ReadAhead), 1).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(permits.pop());
        let _read = tokio::time::timeout(Duration::from_secs(1), read)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!ahead.is_finished(), "the read took the free place");
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_queue() {
        let s = sched();
        let _read = admitted(&s, Cause::OnDemand, 1).await.expect("read");
        assert!(admitted(&s, Cause::Background, 1).await.is_none());
        assert!(s.state.lock().waiting.is_empty());
    }
}
