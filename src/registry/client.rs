//! The HTTP side: one shared connection pool, auth, one bounded retry policy
//! per operation ([`super::retry`]), manual redirects checked by
//! [`super::policy`] (never forwarding `Authorization`), bodies read under
//! limits and a stall timer ([`super::body`]), range reads and pushes.

use super::auth::{Challenge, TokenCache};
use super::body::{self, BodyError, BodyLimit};
use super::cold::ColdBlobs;
use super::endpoints::{self, Endpoint, Endpoints, OriginScheme};
use super::hosts::Capabilities;
use super::mirror::{Health, Job};
use super::policy::{self, RedactedUrl};
use super::retry::{Failure, Retry, RetryPolicy};
use super::{Reference, RegistryError};
use crate::credentials::{Chain, Secret};
use crate::digest::Digest;
use crate::metrics::EndpointMetrics;
use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode, Url};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// Slowest transfer rate (bytes per second) whole-body deadlines allow for.
const MIN_RATE: u64 = 64 << 10;

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry (`--plain-http`).
    pub plain_http: bool,
    /// Registries (`host:port`) reached over plain HTTP; loopback ones always are.
    pub insecure: Vec<String>,
    /// Attempts per operation for retryable failures (5xx, 429, resets,
    /// stalls, truncated bodies); the only retry loop, never nested.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt.
    pub backoff: Duration,
    /// A connection that delivers no byte (headers or body) for this long is
    /// dropped, and the attempt retried on a new one.
    pub stall_timeout: Duration,
    /// Bound on one operation, all its attempts and waits included.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// Where credentials come from (kubelet providers, docker config); empty: anonymous.
    pub credentials: Arc<Chain>,
    /// containerd's registry host directory (`hosts.toml` per registry,
    /// mirrors); unset: every registry is reached directly.
    pub config_path: Option<PathBuf>,
    /// Counters per endpoint host (registered by the daemon's metrics, or not).
    pub endpoint_metrics: EndpointMetrics,
    /// How long a blob's range reads may wait for a registry that answered
    /// one of them with the whole blob (a pull-through cache still filling,
    /// see [`super::cold`]) before reading through such answers; zero: never wait.
    pub cold_blob_wait: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            insecure: Vec::new(),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            stall_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            credentials: Arc::new(Chain::default()),
            config_path: None,
            endpoint_metrics: EndpointMetrics::default(),
            cold_blob_wait: Duration::from_secs(30),
        }
    }
}

/// A registry client shared by everything in the process (one connection pool).
pub struct Registry {
    pub(super) opts: RegistryOptions,
    pub(super) retry: RetryPolicy,
    pub(super) tokens: TokenCache,
    /// Registries that asked for basic auth.
    basic: parking_lot::Mutex<HashSet<String>>,
    /// Where each registry's requests go (mirrors, then the registry).
    endpoints: Endpoints,
    pub(super) health: Health,
    pub(super) endpoint_metrics: EndpointMetrics,
    /// Blobs answered with the whole blob where a range was asked for.
    pub(super) cold: ColdBlobs,
}

/// What a request does to a repository, for token scopes.
#[derive(Clone, Copy)]
pub(super) enum Access {
    Pull,
    Push,
}

impl Registry {
    pub fn new(opts: RegistryOptions) -> Result<Self, RegistryError> {
        let (connect, stall) = (opts.connect_timeout, opts.stall_timeout);
        let builder = move || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(connect)
                // Per socket read: catches a silent server while headers are awaited;
                // body reads also run under our own stall timer (`body`).
                .read_timeout(stall)
                .pool_max_idle_per_host(64)
                .tcp_nodelay(true)
        };
        let http = builder()
            .build()
            .map_err(|e| RegistryError::Setup(e.without_url().to_string()))?;
        let retry = RetryPolicy {
            max_attempts: opts.max_attempts.max(1),
            backoff: opts.backoff,
            deadline: opts.deadline,
        };
        let endpoints = Endpoints::new(opts.config_path.clone(), http.clone(), move |tls| {
            endpoints::tls_client(builder(), tls)
        });
        Ok(Self {
            retry,
            tokens: TokenCache::default(),
            basic: Default::default(),
            endpoints,
            health: Health::default(),
            cold: ColdBlobs::default(),
            endpoint_metrics: opts.endpoint_metrics.clone(),
            opts,
        })
    }

    /// Every endpoint of `repo`'s registry, mirrors first.
    pub(super) fn endpoint_list(&self, repo: &Reference) -> Arc<[Arc<Endpoint>]> {
        let origin = OriginScheme {
            plain_http: self.opts.plain_http,
            insecure: &self.opts.insecure,
        };
        self.endpoints.list(repo, &origin)
    }

    /// Where pushes and other single-host operations go: the registry
    /// itself, or the `server` its `hosts.toml` names.
    pub(super) fn origin(&self, repo: &Reference) -> Arc<Endpoint> {
        Arc::clone(
            self.endpoint_list(repo)
                .last()
                .expect("a host list ends with the server"),
        )
    }

    pub(super) fn base_url(&self, r: &Reference) -> String {
        self.origin(r).base(&r.repository)
    }

    pub(super) fn stall(&self) -> Duration {
        self.opts.stall_timeout
    }

    /// How long a stream of `bytes` opened with [`Registry::open_blob`] may
    /// take, and may go without a byte, before its reader gives up.
    pub fn stream_limits(&self, bytes: u64) -> (Duration, Duration) {
        (self.policy_for(bytes).deadline, self.opts.stall_timeout)
    }

    /// The retry policy for an operation moving up to `bytes` in one body: a
    /// whole layer may take longer than a read may wait, so its deadline
    /// allows for `MIN_RATE` (the stall timer still drops a silent connection).
    pub(super) fn policy_for(&self, bytes: u64) -> RetryPolicy {
        let transfer = Duration::from_secs(bytes / MIN_RATE);
        RetryPolicy {
            deadline: self.retry.deadline.max(transfer),
            ..self.retry
        }
    }

    /// A whole GET body under `limit` (and its content type) of `tail` in
    /// the job's repository, from the first endpoint that serves it: request
    /// and body are one attempt, retried together when the connection fails.
    pub(super) async fn fetch_body(
        &self,
        job: Job<'_>,
        tail: &str,
        headers: HeaderMap,
        limit: BodyLimit,
    ) -> Result<(Bytes, Option<String>), RegistryError> {
        let (op, repo) = (job.op, job.repo);
        let headers = &headers;
        self.across(job, self.policy_for(limit.max), |ep| {
            let headers = headers.clone();
            async move {
                let url = &ep.url(&repo.repository, tail);
                let resp = self
                    .send_once(op, repo, &ep, Access::Pull, Method::GET, url, headers, None)
                    .await?;
                let ctype = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let final_url = RedactedUrl::new(resp.url().as_str());
                match body::read_limited(resp, limit, self.stall()).await {
                    Ok(b) => {
                        self.endpoint_metrics.served(&ep.host, b.len() as u64);
                        Ok((b, ctype))
                    }
                    Err(source) => {
                        let retry = !matches!(source, BodyError::TooLarge { .. });
                        let error = RegistryError::Body {
                            op,
                            url: final_url,
                            source,
                        };
                        Err(match retry {
                            true => Failure::retry(error),
                            false => error.into(),
                        })
                    }
                }
            }
        })
        .await
    }

    /// Opens a whole blob for streaming (caller verifies its digest and bounds its length).
    /// (The first endpoint that answers serves the whole stream.)
    pub async fn open_blob(&self, repo: &Reference, digest: &Digest) -> Result<Response, RegistryError> {
        const OP: &str = "downloading blob";
        let object = digest.to_string();
        let job = Job {
            op: OP,
            repo,
            caps: Capabilities::PULL,
            object: &object,
        };
        self.across(job, self.retry, |ep| async move {
            let url = ep.url(&repo.repository, &format!("blobs/{digest}"));
            let resp = self
                .send_once(OP, repo, &ep, Access::Pull, Method::GET, &url, HeaderMap::new(), None)
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(RegistryError::Status {
                    op: OP,
                    url: RedactedUrl::new(&url),
                    status: resp.status().as_u16(),
                    body: String::new(),
                }
                .into());
            }
            Ok(resp)
        })
        .await
    }

    /// Reads a whole blob of at most `limit` bytes (configs, profiles,
    /// indexes) and verifies it.
    pub async fn read_blob(&self, repo: &Reference, digest: &Digest, limit: BodyLimit) -> Result<Bytes, RegistryError> {
        let object = digest.to_string();
        let job = Job {
            op: "downloading blob",
            repo,
            caps: Capabilities::PULL,
            object: &object,
        };
        let (body, _) = self
            .fetch_body(job, &format!("blobs/{digest}"), HeaderMap::new(), limit)
            .await?;
        let actual = Digest::of(&body);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                repo: repo.to_string(),
                digest: digest.clone(),
                actual,
            });
        }
        Ok(body)
    }

    /// Sends one request with auth, retries and redirects; returns any
    /// response that is not a retryable failure, an auth failure or a 404.
    /// For requests whose body is not read here (pushes, streamed blobs).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send(
        &self,
        op: &'static str,
        repo: &Reference,
        access: Access,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response, RegistryError> {
        let ep = self.origin(repo);
        self.policy_for(body.as_ref().map_or(0, |b| b.len() as u64))
            .run(op, url, |_| {
                self.send_once(
                    op,
                    repo,
                    &ep,
                    access,
                    method.clone(),
                    url,
                    headers.clone(),
                    body.clone(),
                )
            })
            .await
    }

    /// One attempt at endpoint `ep`: the request (with the endpoint's
    /// headers and credentials), its auth round trips and redirects (each
    /// bounded), no retry; a failure says whether another attempt may help.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_once(
        &self,
        op: &'static str,
        repo: &Reference,
        ep: &Endpoint,
        access: Access,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Response, Failure> {
        let scope = match access {
            Access::Pull => format!("repository:{}:pull", repo.repository),
            Access::Push => format!("repository:{}:pull,push", repo.repository),
        };
        let host = ep.auth_host.as_str();
        let mut auth_tries = 0;
        let mut url = url.to_string();
        let mut authorized = true; // false after any redirect: blob storage never sees our credentials
        let mut redirects = 0;
        // What the last authorized attempt carried, for a denial's message.
        let mut used: Option<String> = None;
        loop {
            let redacted = || RedactedUrl::new(&url);
            let mut req = ep.client.request(method.clone(), &url).headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if authorized {
                for (name, value) in &ep.headers {
                    req = req.header(name, value);
                }
                let basic = self.basic.lock().contains(host);
                if let Some(token) = self.tokens.get(host, &scope) {
                    req = req.bearer_auth(token);
                    used.get_or_insert_with(|| "a bearer token".to_string());
                } else if basic {
                    if let Some(c) = self.credential(op, repo, ep).await? {
                        if let Secret::Basic { username, password } = &c.secret {
                            req = req.basic_auth(username, Some(password));
                        }
                        used = Some(format!("credentials from {}", c.origin));
                    }
                }
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Err(Failure::retry(RegistryError::Transport {
                        op,
                        url: redacted(),
                        source: e.without_url(),
                    }))
                }
            };
            let status = resp.status();
            if status.is_redirection() {
                let Some(loc) = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                    return Err(self.status_error(op, &url, status, "redirect without Location").into());
                };
                redirects += 1;
                if redirects > 5 {
                    return Err(self.status_error(op, &url, status, "too many redirects").into());
                }
                let next = self.checked_redirect(op, repo, ep, &url, loc).await?;
                authorized = false;
                url = next;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && authorized && auth_tries < 2 {
                auth_tries += 1;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                match challenge {
                    // Also how an expired token is replaced mid-read: the retry carries the new one.
                    Some(Challenge::Bearer { realm, service, .. }) => {
                        self.tokens.forget(host, &scope);
                        used = Some(self.bearer(op, repo, ep, &realm, service.as_deref(), &scope).await?);
                        continue;
                    }
                    Some(Challenge::Basic) => {
                        let has_basic = self
                            .credential(op, repo, ep)
                            .await?
                            .is_some_and(|c| matches!(c.secret, Secret::Basic { .. }));
                        if has_basic {
                            self.basic.lock().insert(host.to_string());
                            continue;
                        }
                    }
                    None => {}
                }
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                if used.is_some() {
                    // Ask the sources again next time: a helper or provider may have rotated.
                    self.opts.credentials.forget(host);
                }
                return Err(RegistryError::Denied {
                    op,
                    url: redacted(),
                    status: status.as_u16(),
                    registry: host.to_string(),
                    with: used.unwrap_or_else(|| "no credentials".to_string()).into(),
                }
                .into());
            }
            if status == StatusCode::NOT_FOUND {
                return Err(RegistryError::NotFound { op, url: redacted() }.into());
            }
            if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                return Ok(resp);
            }
            let hinted = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            debug!(url = %redacted(), %status, "retryable status");
            // Storage behind a redirect may echo its signature in an error body.
            let text = match authorized {
                true => body::error_text(resp, self.stall()).await,
                false => String::from("(body of a redirect target not shown)"),
            };
            return Err(Failure {
                error: self.status_error(op, &url, status, &snippet(&text)),
                retry: hinted.map_or(Retry::Yes, Retry::After),
            });
        }
    }

    fn status_error(&self, op: &'static str, url: &str, status: StatusCode, body: &str) -> RegistryError {
        RegistryError::Status {
            op,
            url: RedactedUrl::new(url),
            status: status.as_u16(),
            body: body.to_string(),
        }
    }

    /// The absolute target of a redirect from `from`, if policy allows it:
    /// http(s) only, and no node-local address unless the registry is on one.
    async fn checked_redirect(
        &self,
        op: &'static str,
        repo: &Reference,
        ep: &Endpoint,
        from: &str,
        location: &str,
    ) -> Result<String, RegistryError> {
        let next = absolute_url(from, location);
        let refused = |source| RegistryError::Redirect {
            op,
            url: RedactedUrl::new(from),
            target: RedactedUrl::new(&next),
            source,
        };
        let target = Url::parse(&next).map_err(|_| refused(policy::RedirectRefused::NoHost))?;
        let registry = Url::parse(&ep.base(&repo.repository)).map_err(|_| refused(policy::RedirectRefused::NoHost))?;
        if let Err(why) = policy::check_redirect(&registry, &target).await {
            warn!(op, url = %RedactedUrl::new(from), target = %RedactedUrl::new(&next), reason = %why, "redirect refused");
            return Err(refused(why));
        }
        Ok(next)
    }
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v.trim()).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

pub(super) fn absolute_url(base: &str, location: &str) -> String {
    match reqwest::Url::parse(base).and_then(|b| b.join(location)) {
        Ok(u) => u.to_string(),
        Err(_) => location.to_string(),
    }
}

fn snippet(body: &str) -> String {
    let s: String = body.chars().take(300).collect();
    s.replace('\n', " ")
}

pub(super) async fn expect_success(
    op: &'static str,
    url: &str,
    resp: Response,
    stall: Duration,
) -> Result<(), RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = body::error_text(resp, stall).await;
    Err(RegistryError::Status {
        op,
        url: RedactedUrl::new(url),
        status: status.as_u16(),
        body: snippet(&body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
    }

    #[test]
    fn relative_locations_resolve_against_the_request() {
        assert_eq!(
            absolute_url("http://h:1/v2/r/blobs/uploads/", "/v2/r/blobs/uploads/abc?x=1"),
            "http://h:1/v2/r/blobs/uploads/abc?x=1"
        );
    }
}
