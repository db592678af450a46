//! Failover across a registry's endpoints (mirrors first, the registry or
//! its `server` last). One attempt of the client's one retry policy walks
//! the list once: a mirror that fails, for any reason, hands the operation
//! to the next endpoint within the same attempt (so a read in progress
//! completes from the next host instead of failing); the last endpoint's
//! failure is the attempt's, retried by the policy as before. An endpoint
//! that failed as a host (connection, stall, truncation, 5xx) is skipped for
//! [`COOL_DOWN`] by every operation, one that lacked an object (404, denied,
//! bad bytes) for that object only; then it is tried again. Bytes from any
//! endpoint are verified by the caller as before: a mirror can make a read
//! slower, never wrong.

use super::endpoints::Endpoint;
use super::hosts::Capabilities;
use super::retry::{Failure, RetryPolicy};
use super::{Reference, Registry, RegistryError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a failed endpoint is skipped before it is tried again.
pub const COOL_DOWN: Duration = Duration::from_secs(30);
/// Most (endpoint, object) misses remembered; older ones go first.
const MAX_MISSES: usize = 4096;

/// Endpoints (and endpoint-object pairs) skipped until a time.
#[derive(Default)]
pub struct Health {
    hosts: Mutex<HashMap<String, Instant>>,
    misses: Mutex<HashMap<(String, String), Instant>>,
}

impl Health {
    fn skipped(&self, ep: &str, object: &str, now: Instant) -> bool {
        let until = |m: Option<&Instant>| m.is_some_and(|t| *t > now);
        until(self.hosts.lock().get(ep)) || until(self.misses.lock().get(&(ep.to_string(), object.to_string())))
    }

    /// Records a failure; true when the endpoint was not already cooling down.
    fn failed(&self, ep: &str, object: Option<&str>, now: Instant) -> bool {
        let until = now + COOL_DOWN;
        match object {
            None => self.hosts.lock().insert(ep.to_string(), until).is_none_or(|t| t <= now),
            Some(o) => {
                let mut m = self.misses.lock();
                if m.len() >= MAX_MISSES {
                    m.retain(|_, t| *t > now);
                    if m.len() >= MAX_MISSES {
                        m.clear();
                    }
                }
                m.insert((ep.to_string(), o.to_string()), until)
                    .is_none_or(|t| t <= now)
            }
        }
    }
}

/// Did the endpoint fail as a host (every object would fail there now), or
/// only for this object?
fn host_wide(e: &RegistryError) -> bool {
    match e {
        RegistryError::Transport { .. }
        | RegistryError::Body { .. }
        | RegistryError::TimedOut { .. }
        | RegistryError::Setup(_) => true,
        RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
        RegistryError::GaveUp { last, .. } => host_wide(last),
        // A truncated range body.
        RegistryError::BadRange { reason, .. } => reason.starts_with("truncated"),
        _ => false,
    }
}

/// What one operation asks of the endpoints, for choosing them and for messages.
pub(super) struct Job<'a> {
    pub op: &'static str,
    pub repo: &'a Reference,
    pub caps: Capabilities,
    /// The object (a digest, or `manifest <ref>`), for misses and logs.
    pub object: &'a str,
}

impl Registry {
    /// The endpoints of `repo` with `caps`, in order.
    pub(super) fn endpoints_for(
        &self,
        repo: &Reference,
        caps: Capabilities,
    ) -> Result<Vec<Arc<Endpoint>>, RegistryError> {
        let list: Vec<Arc<Endpoint>> = self
            .endpoint_list(repo)
            .iter()
            .filter(|e| e.caps.has(caps))
            .cloned()
            .collect();
        if list.is_empty() {
            return Err(RegistryError::NoEndpoint {
                registry: repo.registry.clone(),
                capability: caps.names(),
            });
        }
        Ok(list)
    }

    /// Runs `job` under `policy` (the one retry loop); each attempt walks
    /// the endpoints once, as the module says.
    pub(super) async fn across<T, F, Fut>(
        &self,
        job: Job<'_>,
        policy: RetryPolicy,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Arc<Endpoint>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let list = self.endpoints_for(job.repo, job.caps)?;
        let last_url = list.last().expect("not empty").base(&job.repo.repository);
        // Misses are per repository: a mirror may hold a blob or tag in one and not another.
        let object = format!("{} {}", job.repo.repository, job.object);
        let (list, job, attempt, object) = (&list, &job, &attempt, object.as_str());
        policy
            .run(job.op, &last_url, |_| async move {
                let n = list.len();
                for (i, ep) in list.iter().enumerate() {
                    let key = ep.key();
                    if i + 1 < n && self.health.skipped(&key, object, Instant::now()) {
                        continue;
                    }
                    let failure = match attempt(Arc::clone(ep)).await {
                        Ok(v) => return Ok(v),
                        Err(f) => f,
                    };
                    self.endpoint_metrics.failure(&ep.host);
                    if i + 1 == n {
                        return Err(failure);
                    }
                    let wide = host_wide(&failure.error);
                    let fresh = self
                        .health
                        .failed(&key, (!wide).then_some(object), Instant::now());
                    let next = list[i + 1].key();
                    if wide && fresh {
                        warn!(op = job.op, image = %job.repo, object = job.object, host = %key, next = %next,
                            error = %failure.error, cool_down = ?COOL_DOWN, "registry host failed: falling over to the next");
                    } else if fresh {
                        info!(op = job.op, image = %job.repo, object = job.object, host = %key, next = %next,
                            error = %failure.error, "registry host cannot serve this object: falling over to the next");
                    }
                }
                unreachable!("the last endpoint is always tried and returns")
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_host_is_skipped_for_the_cool_down_then_tried_again() {
        let h = Health::default();
        let t0 = Instant::now();
        assert!(h.failed("http://m/v2", None, t0));
        assert!(
            !h.failed("http://m/v2", None, t0),
            "already cooling down: no second log line"
        );
        assert!(h.skipped("http://m/v2", "sha256:a", t0 + Duration::from_secs(1)));
        assert!(!h.skipped("http://m/v2", "sha256:a", t0 + COOL_DOWN + Duration::from_millis(1)));
    }

    #[test]
    fn a_missing_object_skips_the_host_for_that_object_only() {
        let h = Health::default();
        let t0 = Instant::now();
        h.failed("http://m/v2", Some("sha256:a"), t0);
        assert!(h.skipped("http://m/v2", "sha256:a", t0));
        assert!(!h.skipped("http://m/v2", "sha256:b", t0));
    }

    #[test]
    fn connection_failures_are_host_wide_and_not_found_is_not() {
        let url = super::super::RedactedUrl::new("http://m/v2/x");
        assert!(host_wide(&RegistryError::Status {
            op: "x",
            url: url.clone(),
            status: 503,
            body: String::new()
        }));
        assert!(!host_wide(&RegistryError::NotFound {
            op: "x",
            url: url.clone()
        }));
        assert!(!host_wide(&RegistryError::Denied {
            op: "x",
            url,
            status: 403,
            registry: "m".into(),
            with: "no credentials".into()
        }));
    }
}
