//! OCI distribution client: manifests (resolved by platform), blob range reads,
//! pushes; auth, retries and redirects are handled in [`client`]; mirrors
//! (containerd's `hosts.toml`) in [`hosts`], `endpoints` and `mirror`.
//!
//! We speak the protocol over reqwest ourselves instead of using a general OCI
//! client crate because the hot path is many small parallel range reads of one
//! blob: we need 206 handling, per-request retries, and redirect handling that
//! keeps the `Range` header but drops `Authorization`.

mod auth;
mod body;
mod client;
mod cold;
mod endpoints;
pub mod hosts;
mod manifest;
mod mirror;
#[cfg(test)]
mod mirror_tests;
pub mod policy;
mod push;
mod range;
mod reference;
pub mod referrers;
mod resolve;
mod retry;
#[cfg(test)]
mod tests;
mod token;

pub use auth::Challenge;
pub use body::{BodyError, BodyLimit};
pub use client::{Registry, RegistryOptions};
pub use manifest::{LayerDescriptor, Platform, PlatformError, ResolvedImage, OCI_MANIFEST};
pub use mirror::COOL_DOWN;
pub use policy::{RedactedUrl, RedirectRefused};
pub use range::{RangeFrom, RangeSink};
pub use reference::{Reference, ReferenceError};

use crate::digest::Digest;
use std::time::Duration;

/// Failures talking to a registry; each names the operation and the object.
/// URLs are redacted (no query string): a redirect may carry a presigned one.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `source` has its URL stripped (`without_url`); `url` says where.
    #[error("{op} {url}: {source}")]
    Transport {
        op: &'static str,
        url: RedactedUrl,
        #[source]
        source: reqwest::Error,
    },
    #[error("{op} {url}: registry answered {status}: {body}")]
    Status {
        op: &'static str,
        url: RedactedUrl,
        status: u16,
        body: String,
    },
    /// `with` says which credentials were refused: "no credentials" or
    /// "credentials from <source>" (never the credentials themselves).
    #[error("{op} {url}: access denied ({status}) with {with}; check the credentials for {registry}")]
    Denied {
        op: &'static str,
        url: RedactedUrl,
        status: u16,
        registry: String,
        with: Box<str>,
    },
    #[error("{op}: {source}")]
    Credentials {
        op: &'static str,
        #[source]
        source: Box<crate::credentials::CredentialError>,
    },
    #[error("{op} {url}: not found (404)")]
    NotFound { op: &'static str, url: RedactedUrl },
    #[error("{op} {url}: reading the body: {source}")]
    Body {
        op: &'static str,
        url: RedactedUrl,
        #[source]
        source: BodyError,
    },
    #[error("{op} {url}: redirect to {target} refused: {source}")]
    Redirect {
        op: &'static str,
        url: RedactedUrl,
        target: RedactedUrl,
        #[source]
        source: RedirectRefused,
    },
    #[error("{op} {url}: no answer within the {deadline:?} deadline")]
    TimedOut {
        op: &'static str,
        url: RedactedUrl,
        deadline: Duration,
    },
    /// Retries ran out (attempts or deadline); `last` is the last attempt's failure.
    #[error("{op} {url}: gave up after {attempts} attempt(s) in {elapsed:.1?}: {last}")]
    GaveUp {
        op: &'static str,
        url: RedactedUrl,
        attempts: u32,
        elapsed: Duration,
        #[source]
        last: Box<RegistryError>,
    },
    #[error("blob {digest} in {repo}: range {offset}+{len}: {reason}")]
    BadRange {
        repo: String,
        digest: Digest,
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("blob {digest} in {repo}: content does not match its digest (got {actual})")]
    DigestMismatch {
        repo: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("manifest of {image}: {reason}")]
    BadManifest { image: String, reason: String },
    #[error("image {image}: no manifest for platform {platform} (available: {available})")]
    NoPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("registry client setup: {0}")]
    Setup(String),
    /// The registry's `hosts.toml` gives no host this operation may use.
    #[error("registry {registry}: no configured host has the capabilities {capability} (hosts.toml)")]
    NoEndpoint { registry: String, capability: String },
    #[error("writing blob {digest} to {path}: {source}")]
    Io {
        digest: Digest,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
