//! OCI distribution client: manifests (resolved by platform), blob range reads,
//! pushes; auth, retries and redirects are handled in [`client`].
//!
//! We speak the protocol over reqwest ourselves instead of using a general OCI
//! client crate because the hot path is many small parallel range reads of one
//! blob: we need 206 handling, per-request retries, and redirect handling that
//! keeps the `Range` header but drops `Authorization`.

mod auth;
mod bounded;
mod client;
mod manifest;
mod reference;
pub mod referrers;

pub use auth::{Challenge, Credentials, DockerConfig};
pub use bounded::CappedReadError;
pub use client::{Registry, RegistryOptions};
pub use manifest::{LayerDescriptor, Platform, PlatformError, ResolvedImage, OCI_MANIFEST};
pub use reference::{Reference, ReferenceError};

use crate::digest::Digest;

/// Failures talking to a registry; each names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{op} {url}: {source}")]
    Transport {
        op: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{op} {url}: registry answered {status}: {body}")]
    Status {
        op: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{op} {url}: access denied ({status}); check the credentials for {registry}")]
    Denied {
        op: &'static str,
        url: String,
        status: u16,
        registry: String,
    },
    #[error("{op} {url}: not found (404)")]
    NotFound { op: &'static str, url: String },
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
    #[error("writing blob {digest} to {path}: {source}")]
    Io {
        digest: Digest,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
