//! The HTTP side: one shared connection pool, auth, retries with backoff,
//! manual redirects (never forwarding `Authorization`), range reads and pushes.

use super::auth::{Challenge, DockerConfig, TokenCache, TokenResponse};
use super::manifest::{self, Fetched, LayerDescriptor, ResolvedImage, MANIFEST_ACCEPT};
use super::{Platform, Reference, RegistryError};
use crate::digest::Digest;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry (`--plain-http`).
    pub plain_http: bool,
    /// Registries (`host:port`) reached over plain HTTP; loopback ones always are.
    pub insecure: Vec<String>,
    /// Attempts per request for retryable failures (5xx, 429, resets, timeouts).
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt.
    pub backoff: Duration,
    /// Limit for one response to start arriving and for gaps inside a body.
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    pub docker_config: DockerConfig,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            insecure: Vec::new(),
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            docker_config: DockerConfig::default(),
        }
    }
}

/// A registry client shared by everything in the process (one connection pool).
pub struct Registry {
    http: reqwest::Client,
    opts: RegistryOptions,
    tokens: TokenCache,
    /// Registries that asked for basic auth.
    basic: parking_lot::Mutex<HashSet<String>>,
}

/// What a request does to a repository, for token scopes.
#[derive(Clone, Copy)]
pub(super) enum Access {
    Pull,
    Push,
}

impl Registry {
    pub fn new(opts: RegistryOptions) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| RegistryError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            opts,
            tokens: TokenCache::default(),
            basic: Default::default(),
        })
    }

    pub(super) fn base_url(&self, r: &Reference) -> String {
        let plain = self.opts.plain_http || r.is_loopback() || self.opts.insecure.iter().any(|h| h == &r.registry);
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", r.api_host(), r.repository)
    }

    /// Resolves a reference to one platform's image manifest.
    pub async fn resolve(&self, image: &Reference, platform: &Platform) -> Result<ResolvedImage, RegistryError> {
        let name = image.to_string();
        let (body, ctype, digest) = self.fetch_manifest(image, &image.manifest_ref()).await?;
        let (body, ctype, digest, m) = match manifest::parse(&name, ctype.as_deref(), &body)? {
            Fetched::Manifest(m) => (body, ctype, digest, m),
            Fetched::Index(idx) => {
                let d = manifest::select_platform(&name, &idx, platform)?;
                let (body, ctype, digest) = self.fetch_manifest(image, &d.to_string()).await?;
                match manifest::parse(&name, ctype.as_deref(), &body)? {
                    Fetched::Manifest(m) => (body, ctype, digest, m),
                    Fetched::Index(_) => {
                        return Err(RegistryError::BadManifest {
                            image: name,
                            reason: format!("index entry {d} is itself an index"),
                        })
                    }
                }
            }
        };
        let layers: Vec<LayerDescriptor> = manifest::layers_of(&name, &m)?;
        Ok(ResolvedImage {
            reference: image.with_digest(digest.clone()),
            manifest_digest: digest,
            media_type: m
                .media_type()
                .as_ref()
                .map(|t| t.to_string())
                .or(ctype)
                .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string()),
            config: manifest::digest_of(&name, m.config().digest().as_ref())?,
            manifest: body,
            layers,
        })
    }

    /// Fetches a manifest by tag or digest; verifies the content when asked by digest.
    pub async fn fetch_manifest(
        &self,
        image: &Reference,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>, Digest), RegistryError> {
        const OP: &str = "fetching manifest";
        let url = format!("{}/manifests/{reference}", self.base_url(image));
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self
            .send(OP, image, Access::Pull, Method::GET, &url, headers, None)
            .await?;
        let ctype = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.bytes().await.map_err(|source| RegistryError::Transport {
            op: OP,
            url: url.clone(),
            source,
        })?;
        if body.len() > 4 << 20 {
            return Err(RegistryError::BadManifest {
                image: image.to_string(),
                reason: format!("manifest of {} bytes is over the 4 MiB limit", body.len()),
            });
        }
        let actual = Digest::of(&body);
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != actual {
                return Err(RegistryError::BadManifest {
                    image: image.to_string(),
                    reason: format!("content at {expected} hashes to {actual}"),
                });
            }
        }
        Ok((body.to_vec(), ctype, actual))
    }

    /// Reads `len` bytes at `offset` of a blob; exactly those bytes or an error.
    pub async fn read_blob_range(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        const OP: &str = "reading blob range";
        let bad = |reason: String| RegistryError::BadRange {
            repo: repo.to_string(),
            digest: digest.clone(),
            offset,
            len,
            reason,
        };
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = format!("{}/blobs/{digest}", self.base_url(repo));
        let mut last_err = None;
        for attempt in 0..self.opts.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            let mut headers = HeaderMap::new();
            let range = format!("bytes={}-{}", offset, offset + len - 1);
            headers.insert(RANGE, HeaderValue::from_str(&range).expect("ascii range"));
            let resp = self
                .send(OP, repo, Access::Pull, Method::GET, &url, headers, None)
                .await?;
            let status = resp.status();
            // A registry may ignore Range and send the whole blob (200): skip to the offset.
            let skip = match status {
                StatusCode::PARTIAL_CONTENT => {
                    let start = content_range_start(resp.headers());
                    if start != Some(offset) {
                        return Err(bad(format!("server answered Content-Range start {start:?}")));
                    }
                    0
                }
                StatusCode::OK => offset,
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    return Err(bad("range not satisfiable: the blob is shorter".into()))
                }
                s => return Err(bad(format!("unexpected status {s}"))),
            };
            match read_exact_body(resp, skip, len).await {
                Ok(b) if b.len() as u64 == len => return Ok(b),
                Ok(b) => {
                    warn!(%digest, offset, len, got = b.len(), "short blob range read, retrying");
                    last_err = Some(bad(format!("truncated: body ended after {} of {len} bytes", b.len())));
                }
                Err((got, e)) => {
                    warn!(%digest, offset, len, got, error = %e, "blob range read failed, retrying");
                    last_err = Some(bad(format!(
                        "truncated: connection failed after {got} of {len} bytes ({e})"
                    )));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| bad("no attempts made".into())))
    }

    /// Opens a whole blob for streaming (caller verifies its digest).
    pub async fn open_blob(&self, repo: &Reference, digest: &Digest) -> Result<Response, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base_url(repo));
        let resp = self
            .send(
                "downloading blob",
                repo,
                Access::Pull,
                Method::GET,
                &url,
                HeaderMap::new(),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(RegistryError::Status {
                op: "downloading blob",
                url,
                status: resp.status().as_u16(),
                body: String::new(),
            });
        }
        Ok(resp)
    }

    /// Reads a whole small blob (configs, TOCs) and verifies it.
    pub async fn read_blob(&self, repo: &Reference, digest: &Digest) -> Result<Bytes, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base_url(repo));
        let resp = self.open_blob(repo, digest).await?;
        let body = resp.bytes().await.map_err(|source| RegistryError::Transport {
            op: "downloading blob",
            url,
            source,
        })?;
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

    /// Uploads a blob (monolithic POST + PUT) unless the registry has it.
    pub async fn push_blob(&self, repo: &Reference, data: Bytes) -> Result<Digest, RegistryError> {
        const OP: &str = "pushing blob";
        let digest = Digest::of(&data);
        let base = self.base_url(repo);
        let head_url = format!("{base}/blobs/{digest}");
        let head = self
            .send(OP, repo, Access::Push, Method::HEAD, &head_url, HeaderMap::new(), None)
            .await;
        if matches!(&head, Ok(r) if r.status() == StatusCode::OK) {
            return Ok(digest);
        }
        let start_url = format!("{base}/blobs/uploads/");
        let resp = self
            .send(
                OP,
                repo,
                Access::Push,
                Method::POST,
                &start_url,
                HeaderMap::new(),
                Some(Bytes::new()),
            )
            .await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Status {
                op: OP,
                url: start_url.clone(),
                status: resp.status().as_u16(),
                body: "upload started without a Location header".into(),
            })?;
        let mut put_url = absolute_url(&start_url, location);
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str(&format!("digest={digest}"));
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let resp = self
            .send(OP, repo, Access::Push, Method::PUT, &put_url, headers, Some(data))
            .await?;
        expect_success(OP, &put_url, resp).await?;
        Ok(digest)
    }

    /// Uploads a manifest under a tag or its digest.
    pub async fn push_manifest(
        &self,
        repo: &Reference,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, RegistryError> {
        const OP: &str = "pushing manifest";
        let digest = Digest::of(&body);
        let url = format!("{}/manifests/{reference}", self.base_url(repo));
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| RegistryError::Setup(e.to_string()))?,
        );
        let resp = self
            .send(OP, repo, Access::Push, Method::PUT, &url, headers, Some(body))
            .await?;
        expect_success(OP, &url, resp).await?;
        Ok(digest)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.opts.backoff * 2u32.saturating_pow(attempt.saturating_sub(1)).min(32)
    }

    /// Sends one request with auth, retries and redirects; returns any
    /// response that is not a retryable failure, an auth failure or a 404.
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
        let scope = match access {
            Access::Pull => format!("repository:{}:pull", repo.repository),
            Access::Push => format!("repository:{}:pull,push", repo.repository),
        };
        let host = repo.registry.as_str();
        let mut auth_tries = 0;
        let mut attempt = 0;
        let mut url = url.to_string();
        let mut authorized = true; // false after a redirect to blob storage
        let mut redirects = 0;
        loop {
            let mut req = self.http.request(method.clone(), &url).headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if authorized {
                if let Some(token) = self.tokens.get(host, &scope) {
                    req = req.bearer_auth(token);
                } else if self.basic.lock().contains(host) {
                    if let Some(c) = self.opts.docker_config.credentials(host) {
                        req = req.basic_auth(&c.username, Some(&c.password));
                    }
                }
            }
            let retry_delay = match req.send().await {
                Err(e) => {
                    if attempt + 1 >= self.opts.max_attempts {
                        return Err(RegistryError::Transport { op, url, source: e });
                    }
                    debug!(%url, error = %e, "request failed, retrying");
                    self.backoff(attempt + 1)
                }
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_redirection() {
                        let Some(loc) = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                            return Err(RegistryError::Status {
                                op,
                                url,
                                status: status.as_u16(),
                                body: "redirect without Location".into(),
                            });
                        };
                        redirects += 1;
                        if redirects > 5 {
                            return Err(RegistryError::Status {
                                op,
                                url,
                                status: status.as_u16(),
                                body: "too many redirects".into(),
                            });
                        }
                        let next = absolute_url(&url, loc);
                        // Blob storage behind a redirect must not see our registry credentials.
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
                            Some(Challenge::Bearer { realm, service, .. }) => {
                                self.tokens.forget(host, &scope);
                                self.fetch_token(op, host, &realm, service.as_deref(), &scope).await?;
                                continue;
                            }
                            Some(Challenge::Basic) if self.opts.docker_config.credentials(host).is_some() => {
                                self.basic.lock().insert(host.to_string());
                                continue;
                            }
                            _ => {}
                        }
                    }
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(RegistryError::Denied {
                            op,
                            url,
                            status: status.as_u16(),
                            registry: host.to_string(),
                        });
                    }
                    if status == StatusCode::NOT_FOUND {
                        return Err(RegistryError::NotFound { op, url });
                    }
                    let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !retryable {
                        return Ok(resp);
                    }
                    if attempt + 1 >= self.opts.max_attempts {
                        let body = resp.text().await.unwrap_or_default();
                        return Err(RegistryError::Status {
                            op,
                            url,
                            status: status.as_u16(),
                            body: snippet(&body),
                        });
                    }
                    let hinted = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    debug!(%url, %status, "retryable status");
                    hinted
                        .unwrap_or_else(|| self.backoff(attempt + 1))
                        .min(Duration::from_secs(30))
                }
            };
            attempt += 1;
            tokio::time::sleep(retry_delay).await;
        }
    }

    async fn fetch_token(
        &self,
        op: &'static str,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(), RegistryError> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = self.opts.docker_config.credentials(host) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let url = realm.to_string();
        let resp = req.send().await.map_err(|source| RegistryError::Transport {
            op,
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(RegistryError::Denied {
                op,
                url,
                status: status.as_u16(),
                registry: host.to_string(),
            });
        }
        let body = resp.bytes().await.map_err(|source| RegistryError::Transport {
            op,
            url: url.clone(),
            source,
        })?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| RegistryError::Status {
            op,
            url: url.clone(),
            status: status.as_u16(),
            body: format!("token response is not JSON: {e}"),
        })?;
        let token = parsed.into_token(Instant::now()).ok_or_else(|| RegistryError::Status {
            op,
            url,
            status: status.as_u16(),
            body: "token response without a token".into(),
        })?;
        self.tokens.put(host, scope, token);
        Ok(())
    }
}

/// Reads a body, dropping `skip` bytes first, keeping at most `len`.
async fn read_exact_body(mut resp: Response, mut skip: u64, len: u64) -> Result<Bytes, (usize, reqwest::Error)> {
    let mut out = bytes::BytesMut::with_capacity(len.min(64 << 20) as usize);
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err((out.len(), e)),
        };
        let mut chunk = &chunk[..];
        if skip > 0 {
            let n = skip.min(chunk.len() as u64) as usize;
            chunk = &chunk[n..];
            skip -= n as u64;
        }
        let want = (len - out.len() as u64) as usize;
        out.extend_from_slice(&chunk[..chunk.len().min(want)]);
        if out.len() as u64 == len {
            break;
        }
    }
    Ok(out.freeze())
}

fn content_range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v.trim()).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

fn absolute_url(base: &str, location: &str) -> String {
    match reqwest::Url::parse(base).and_then(|b| b.join(location)) {
        Ok(u) => u.to_string(),
        Err(_) => location.to_string(),
    }
}

fn snippet(body: &str) -> String {
    let s: String = body.chars().take(300).collect();
    s.replace('\n', " ")
}

pub(super) async fn expect_success(op: &'static str, url: &str, resp: Response) -> Result<(), RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    Err(RegistryError::Status {
        op,
        url: url.to_string(),
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

    #[test]
    fn content_range_start_parses() {
        let mut h = HeaderMap::new();
        h.insert(
            reqwest::header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 10-19/100"),
        );
        assert_eq!(content_range_start(&h), Some(10));
    }
}
