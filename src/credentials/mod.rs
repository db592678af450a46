//! Registry credentials from the places a node already keeps them, asked in
//! the order a user expects (design §10): kubelet credential-provider plugins
//! ([`kubelet`]), then docker's `config.json` ([`docker`]: `credHelpers`,
//! `auths`, `credsStore`), then anonymous. Each [`Source`] answers "credentials
//! for registry host H and image R" with the time they stop being good; the
//! registry client asks again after that, and after a refusal ([`Chain::forget`]).
//!
//! The pull's own `auth` (the CRI `ImageService` proxy, [`pull`]) is asked
//! first, and answers only for the image that was pulled with it.
//!
//! Secrets never reach a log: [`Secret`]'s `Debug` hides them, and errors name
//! the registry host and the source, never the values.

pub mod docker;
mod exec;
pub mod helper;
pub mod kubelet;
pub mod matching;
pub mod pull;
mod yaml;

pub use exec::ExecError;
pub use pull::{ImageKey, PullAuths};

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// What a source hands over for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// User name and password: HTTP Basic, or the Basic part of a token request.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (docker's `identitytoken`): exchanged at the
    /// token realm with `grant_type=refresh_token`.
    IdentityToken(String),
    /// A bearer token for the registry itself (CRI's `registry_token`), sent as it is.
    RegistryToken(String),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Basic { username, .. } => write!(f, "Basic({username}, <hidden>)"),
            Secret::IdentityToken(_) => f.write_str("IdentityToken(<hidden>)"),
            Secret::RegistryToken(_) => f.write_str("RegistryToken(<hidden>)"),
        }
    }
}

/// Where credentials came from, as errors and logs name it:
/// `config.json /root/.docker/config.json`, `credential helper docker-credential-ecr-login`,
/// `provider ecr-credential-provider`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(String);

impl Origin {
    pub fn new(what: impl Into<String>) -> Self {
        Origin(what.into())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Credentials for one registry, where they came from, and until when they may be used.
#[derive(Debug, Clone)]
pub struct Credential {
    pub secret: Secret,
    pub origin: Origin,
    /// After this the source is asked again; `None`: good until the source changes.
    pub expires: Option<Instant>,
}

impl Credential {
    pub fn is_fresh(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A source that could not answer; names the registry and the source.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credentials for {registry} from {origin}: {reason}")]
    Source {
        registry: String,
        origin: Origin,
        reason: String,
    },
    #[error("credentials for {registry} from {origin}: {source}")]
    Exec {
        registry: String,
        origin: Origin,
        #[source]
        source: ExecError,
    },
    #[error("credential config {path}: {reason}")]
    Config { path: std::path::PathBuf, reason: String },
}

/// One place credentials come from. An enum, not a trait object: the sources
/// are few and known, and each lookup may run a program (async).
pub enum Source {
    /// The auth of the CRI pull of the image (shared with the proxy, which fills it).
    PullAuth(Arc<PullAuths>),
    Kubelet(kubelet::Providers),
    Docker(docker::DockerConfig),
}

impl Source {
    async fn lookup(&self, image: &ImageKey) -> Result<Option<Credential>, CredentialError> {
        match self {
            Source::PullAuth(a) => Ok(a.lookup(image)),
            Source::Kubelet(p) => Ok(p.lookup(&image.registry, &image.path()).await),
            Source::Docker(d) => d.lookup(&image.registry).await,
        }
    }

    fn forget(&self, registry: &str) {
        match self {
            Source::PullAuth(a) => a.forget(registry),
            Source::Kubelet(p) => p.forget(registry),
            Source::Docker(d) => d.forget(registry),
        }
    }
}

/// The sources in order; the first with credentials for a registry wins.
#[derive(Default)]
pub struct Chain {
    sources: Vec<Source>,
}

impl fmt::Debug for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Chain({} sources)", self.sources.len())
    }
}

impl Chain {
    pub fn new(sources: Vec<Source>) -> Self {
        Chain { sources }
    }

    /// Credentials for `image`'s registry when reading `image` (its tag and
    /// manifest digest matter to pull secrets only), or `None` for anonymous access.
    pub async fn lookup(&self, image: &ImageKey) -> Result<Option<Credential>, CredentialError> {
        for source in &self.sources {
            if let Some(c) = source.lookup(image).await? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Drops what the sources keep for `registry`: the registry refused it.
    pub fn forget(&self, registry: &str) {
        for source in &self.sources {
            source.forget(registry);
        }
    }
}

/// `https://index.docker.io/v1/` and friends all mean Docker Hub; a URL means its host.
pub fn normalize_host(key: &str) -> String {
    let h = key.trim_start_matches("https://").trim_start_matches("http://");
    let h = h.split('/').next().unwrap_or(h);
    match h {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_from_debug() {
        let s = Secret::Basic {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        assert_eq!(format!("{s:?}"), "Basic(alice, <hidden>)");
        let t = format!("{:?}", Secret::IdentityToken("refresh-me".into()));
        assert!(!t.contains("refresh-me"), "{t}");
        let t = format!("{:?}", Secret::RegistryToken("bearer-me".into()));
        assert!(!t.contains("bearer-me"), "{t}");
    }

    #[test]
    fn hub_aliases_and_urls_normalize_to_hosts() {
        assert_eq!(normalize_host("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_host("http://r.test:5000/v2/"), "r.test:5000");
        assert_eq!(normalize_host("r.test"), "r.test");
    }

    #[tokio::test]
    async fn an_empty_chain_means_anonymous() {
        let image = ImageKey {
            registry: "r.test".into(),
            repository: "a".into(),
            tag: None,
            digest: None,
        };
        assert!(Chain::default().lookup(&image).await.unwrap().is_none());
    }
}
