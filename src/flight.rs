//! Single flight: at most one computation in flight per key, shared by
//! everyone who asks for that key meanwhile; optionally the results are kept
//! for a while in a bounded LRU. Used for chunks, spans, manifests, per-image
//! referrers and layer opens, so that no lock is ever held across the work.
//!
//! Two ways in: [`Flights::run`] starts the work as a task of its own (it
//! completes even if the caller that started it goes away), and
//! [`Flights::claim`] hands the caller a [`Lead`] to finish by hand, for work
//! that answers many keys at once (one range request for a run of chunks).

use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A share in a flight: resolves to the value, or `None` when the work ended
/// without one (its task panicked or its lead was dropped).
pub type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

/// How long a finished value is kept (`None`: not kept).
pub type KeepFor<V> = fn(&V) -> Option<Duration>;

/// The work for a key ended without a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the task computing it ended without an answer")]
pub struct Abandoned;

/// One flight per key; `X` is what joiners get besides the flight (for
/// chunks: the cell through which a more urgent joiner raises its priority).
pub struct Flights<K, V, X = ()> {
    inner: Arc<Inner<K, V, X>>,
}

impl<K, V, X> Clone for Flights<K, V, X> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<K, V, X> {
    state: Mutex<State<K, V, X>>,
    keep_for: Option<KeepFor<V>>,
}

struct State<K, V, X> {
    inflight: HashMap<K, (Flight<V>, X)>,
    /// Finished values and when they expire.
    done: Option<LruCache<K, (Instant, V)>>,
}

/// What [`Flights::claim`] found.
pub enum Claim<K: Hash + Eq, V, X> {
    /// A kept value.
    Done(V),
    /// Someone else's flight is under way.
    Joined(Flight<V>, X),
    /// The caller leads a new flight and must finish it.
    Lead(Lead<K, V, X>),
}

/// The duty to finish one flight; dropping it unfinished ends the flight with no value.
pub struct Lead<K: Hash + Eq, V, X> {
    inner: Arc<Inner<K, V, X>>,
    key: K,
    flight: Flight<V>,
    tx: Option<tokio::sync::oneshot::Sender<V>>,
}

impl<K, V, X> Flights<K, V, X>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    X: Clone + Send + Sync + 'static,
{
    /// Deduplication only: nothing is kept once a flight lands.
    pub fn new() -> Self {
        Self::build(None, None)
    }

    /// Keeps up to `capacity` finished values, each for as long as `keep_for` says.
    pub fn caching(capacity: NonZeroUsize, keep_for: KeepFor<V>) -> Self {
        Self::build(Some(LruCache::new(capacity)), Some(keep_for))
    }

    fn build(done: Option<LruCache<K, (Instant, V)>>, keep_for: Option<KeepFor<V>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    inflight: HashMap::new(),
                    done,
                }),
                keep_for,
            }),
        }
    }

    /// A kept value, a share in the flight under way, or the lead of a new
    /// one (`extra` makes what later joiners of it get).
    pub fn claim(&self, key: &K, extra: impl FnOnce() -> X) -> Claim<K, V, X> {
        let mut state = self.inner.state.lock();
        if let Some(done) = state.done.as_mut() {
            match done.get(key) {
                Some((expires, v)) if *expires > Instant::now() => return Claim::Done(v.clone()),
                Some(_) => drop(done.pop(key)),
                None => {}
            }
        }
        if let Some((flight, x)) = state.inflight.get(key) {
            return Claim::Joined(flight.clone(), x.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let flight: Flight<V> = async move { rx.await.ok() }.boxed().shared();
        state.inflight.insert(key.clone(), (flight.clone(), extra()));
        Claim::Lead(Lead {
            inner: Arc::clone(&self.inner),
            key: key.clone(),
            flight,
            tx: Some(tx),
        })
    }

    /// The value for `key`: kept, in flight, or computed by `work` in a task
    /// of its own (so it completes, and is kept, even if this caller goes away).
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Result<V, Abandoned>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
        X: Default,
    {
        let flight = match self.claim(&key, X::default) {
            Claim::Done(v) => return Ok(v),
            Claim::Joined(flight, _) => flight,
            Claim::Lead(lead) => {
                let flight = lead.flight();
                let fut = work();
                tokio::spawn(async move { lead.finish(fut.await) });
                flight
            }
        };
        flight.await.ok_or(Abandoned)
    }

    /// Forgets a kept value (it turned out stale).
    pub fn forget(&self, key: &K) {
        if let Some(done) = self.inner.state.lock().done.as_mut() {
            done.pop(key);
        }
    }

    /// Flights under way now.
    pub fn in_flight(&self) -> usize {
        self.inner.state.lock().inflight.len()
    }
}

impl<K, V, X> Default for Flights<K, V, X>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    X: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq + Clone, V: Clone, X> Lead<K, V, X> {
    /// The flight this lead will finish (to await it like any joiner).
    pub fn flight(&self) -> Flight<V> {
        self.flight.clone()
    }

    pub fn key(&self) -> &K {
        &self.key
    }

    /// Lands the flight: joiners get `v`, and it is kept if the cache wants it.
    pub fn finish(mut self, v: V) {
        {
            let mut state = self.inner.state.lock();
            state.inflight.remove(&self.key);
            let ttl = self.inner.keep_for.and_then(|keep_for| keep_for(&v));
            if let (Some(done), Some(ttl)) = (state.done.as_mut(), ttl) {
                done.put(self.key.clone(), (Instant::now() + ttl, v.clone()));
            }
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(v);
        }
    }
}

impl<K: Hash + Eq, V, X> Drop for Lead<K, V, X> {
    fn drop(&mut self) {
        // Unfinished: remove the flight; its joiners see the sender gone.
        if self.tx.is_some() {
            self.inner.state.lock().inflight.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        let flights: Flights<u32, u32> = Flights::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let calls = (0..8).map(|_| {
            let runs = Arc::clone(&runs);
            flights.run(7, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                42
            })
        });
        let values = futures::future::join_all(calls).await;
        assert!(values.iter().all(|v| *v == Ok(42)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn without_a_cache_a_landed_flight_runs_again() {
        let flights: Flights<u32, u32> = Flights::new();
        assert_eq!(flights.run(1, || async { 1 }).await, Ok(1));
        assert_eq!(flights.run(1, || async { 2 }).await, Ok(2));
    }

    #[tokio::test]
    async fn kept_values_are_served_until_they_expire() {
        let flights: Flights<u32, u32> = Flights::caching(NonZeroUsize::new(4).unwrap(), |v| {
            (*v > 0).then_some(Duration::from_millis(if *v == 1 { 3_600_000 } else { 1 }))
        });
        assert_eq!(flights.run(1, || async { 1 }).await, Ok(1));
        assert_eq!(flights.run(1, || async { 9 }).await, Ok(1), "kept");
        assert_eq!(flights.run(2, || async { 2 }).await, Ok(2));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(flights.run(2, || async { 3 }).await, Ok(3), "expired");
        assert_eq!(flights.run(5, || async { 0 }).await, Ok(0));
        assert_eq!(flights.run(5, || async { 4 }).await, Ok(4), "not kept");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let flights: Flights<u32, u32> =
            Flights::caching(NonZeroUsize::new(2).unwrap(), |_| Some(Duration::from_secs(60)));
        for k in 0..3 {
            flights.run(k, move || async move { k }).await.unwrap();
        }
        assert_eq!(flights.run(0, || async { 100 }).await, Ok(100), "evicted");
        assert_eq!(flights.run(2, || async { 100 }).await, Ok(2), "kept");
    }

    #[tokio::test]
    async fn a_dropped_lead_abandons_its_joiners_and_frees_the_key() {
        let flights: Flights<u32, u32> = Flights::new();
        let Claim::Lead(lead) = flights.claim(&1, || ()) else {
            panic!("first claim leads")
        };
        let Claim::Joined(flight, ()) = flights.claim(&1, || ()) else {
            panic!("second claim joins")
        };
        drop(lead);
        assert_eq!(flight.await, None);
        assert!(matches!(flights.claim(&1, || ()), Claim::Lead(_)));
    }

    #[tokio::test]
    async fn a_panicking_task_abandons_its_callers() {
        let flights: Flights<u32, u32> = Flights::new();
        let r = flights.run(1, || async { panic!("boom") }).await;
        assert_eq!(r, Err(Abandoned));
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn joiners_get_the_leads_extra() {
        let flights: Flights<u32, u32, u8> = Flights::new();
        let Claim::Lead(lead) = flights.claim(&1, || 7) else {
            panic!("leads")
        };
        let Claim::Joined(flight, x) = flights.claim(&1, || 0) else {
            panic!("joins")
        };
        assert_eq!(x, 7);
        lead.finish(5);
        assert_eq!(flight.await, Some(5));
    }
}
