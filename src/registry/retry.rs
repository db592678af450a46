//! The one retry policy of the registry client: a bounded number of attempts
//! with doubling backoff, all inside one deadline. Callers retry whole
//! operations (request and body) here and nowhere else, so retries never nest.

use super::{RedactedUrl, RegistryError};
use std::future::Future;
use std::time::{Duration, Instant};
use tracing::debug;

/// Longest wait a `Retry-After` may ask for.
const MAX_HINT: Duration = Duration::from_secs(30);

/// Whether a failed attempt is worth another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    No,
    /// After the policy's backoff.
    Yes,
    /// After the server's `Retry-After` (capped).
    After(Duration),
}

/// A failed attempt and whether to try again.
#[derive(Debug)]
pub(super) struct Failure {
    pub error: RegistryError,
    pub retry: Retry,
}

impl Failure {
    pub fn retry(error: RegistryError) -> Self {
        Self {
            error,
            retry: Retry::Yes,
        }
    }
}

impl From<RegistryError> for Failure {
    fn from(error: RegistryError) -> Self {
        Self {
            error,
            retry: Retry::No,
        }
    }
}

/// Attempts, backoff and the deadline of one operation.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt (at most 32 times it).
    pub backoff: Duration,
    /// Bound on the whole operation: attempts, body reads and waits.
    pub deadline: Duration,
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        self.backoff * 2u32.saturating_pow(attempt.saturating_sub(1)).min(32)
    }

    /// Runs `attempt` (given its number, from 1) until it succeeds, fails for
    /// good, runs out of attempts, or the deadline passes.
    pub async fn run<T, F, Fut>(&self, op: &'static str, url: &str, mut attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let start = Instant::now();
        let gave_up = |attempts, last: RegistryError| RegistryError::GaveUp {
            op,
            url: RedactedUrl::new(url),
            attempts,
            elapsed: start.elapsed(),
            last: Box::new(last),
        };
        let mut n = 0;
        loop {
            n += 1;
            let remaining = self.deadline.saturating_sub(start.elapsed());
            let failure = match tokio::time::timeout(remaining, attempt(n)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(f)) => f,
                Err(_) => {
                    let late = RegistryError::TimedOut {
                        op,
                        url: RedactedUrl::new(url),
                        deadline: self.deadline,
                    };
                    return Err(gave_up(n, late));
                }
            };
            let delay = match failure.retry {
                Retry::No => return Err(failure.error),
                Retry::Yes => self.backoff(n),
                Retry::After(d) => d.min(MAX_HINT),
            };
            if n >= self.max_attempts || start.elapsed() + delay >= self.deadline {
                return Err(gave_up(n, failure.error));
            }
            debug!(op, url = %RedactedUrl::new(url), attempt = n, error = %failure.error, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy(max_attempts: u32, deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Duration::from_millis(10),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    fn transient() -> Failure {
        Failure::retry(RegistryError::Setup("transient".into()))
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_up_to_the_attempt_limit() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = policy(3, 10_000)
            .run("op", "http://r/x", |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(transient()) }
            })
            .await;
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("3 attempt") && e.contains("transient"), "{e}");
    }

    #[tokio::test]
    async fn a_final_failure_is_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = policy(5, 10_000)
            .run("op", "http://r/x", |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(Failure::from(RegistryError::Setup("final".into()))) }
            })
            .await;
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert!(matches!(r, Err(RegistryError::Setup(_))));
    }

    #[tokio::test]
    async fn a_hanging_attempt_ends_at_the_deadline() {
        let started = Instant::now();
        let r: Result<(), _> = policy(5, 200)
            .run("op", "http://r/x", |_| futures::future::pending())
            .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(r.unwrap_err().to_string().contains("deadline"));
    }

    #[tokio::test]
    async fn no_retry_starts_that_would_end_after_the_deadline() {
        let calls = AtomicU32::new(0);
        let p = RetryPolicy {
            max_attempts: 100,
            backoff: Duration::from_millis(150),
            deadline: Duration::from_millis(400),
        };
        let started = Instant::now();
        let _: Result<(), _> = p
            .run("op", "http://r/x", |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err(transient()) }
            })
            .await;
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(calls.load(Ordering::Relaxed) <= 3);
    }
}
