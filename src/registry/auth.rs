//! Registry authentication: docker `config.json` credentials, the bearer-token
//! challenge flow, and a token cache that refreshes on expiry.

use base64::Engine as _;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// User name and password for basic auth (from docker's `config.json`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

/// Credentials by registry host, read from docker's `config.json` (`auths`, base64 `auth`).
#[derive(Debug, Default, Clone)]
pub struct DockerConfig {
    auths: HashMap<String, Credentials>,
}

#[derive(serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// A docker `config.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("reading docker config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing docker config {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("docker config {path}: entry for {host} has an `auth` that is not base64 user:password")]
    BadAuth { path: PathBuf, host: String },
}

impl DockerConfig {
    /// Loads `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`; absent files mean anonymous.
    pub fn load_default() -> Result<Self, AuthConfigError> {
        let path = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME") {
                Some(home) => PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(Self::default()),
            },
        };
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::load(&path)
    }

    /// Loads one config file.
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let text = std::fs::read(path).map_err(|source| AuthConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ConfigFile = serde_json::from_slice(&text).map_err(|source| AuthConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let host = normalize_host(&key);
            let creds = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    decode_auth(&auth).ok_or_else(|| AuthConfigError::BadAuth {
                        path: path.to_path_buf(),
                        host: key.clone(),
                    })?
                }
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => continue,
            };
            auths.insert(host, creds);
        }
        Ok(Self { auths })
    }

    /// Credentials for a registry host, if any.
    pub fn credentials(&self, registry: &str) -> Option<&Credentials> {
        self.auths.get(&normalize_host(registry))
    }
}

fn decode_auth(auth: &str) -> Option<Credentials> {
    let raw = base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    })
}

/// `https://index.docker.io/v1/` and friends all mean Docker Hub.
fn normalize_host(key: &str) -> String {
    let h = key.trim_start_matches("https://").trim_start_matches("http://");
    let h = h.split('/').next().unwrap_or(h);
    match h {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// Splits `k="v",k2=v2` respecting quotes (scopes contain commas).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value);
    }
    out
}

/// A bearer token and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: String,
    pub expires: Instant,
}

/// The token endpoint's JSON answer.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// Turns the answer into a token; refresh a little before the stated expiry.
    pub fn into_token(self, now: Instant) -> Option<Token> {
        let value = self.token.or(self.access_token)?;
        // The spec's default lifetime is 60 s when none is given.
        let life = Duration::from_secs(self.expires_in.unwrap_or(60).max(10));
        Some(Token {
            value,
            expires: now + life - Duration::from_secs(5),
        })
    }
}

/// Tokens by (registry, scope).
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), Token>>,
}

impl TokenCache {
    /// A still-valid token for this registry and scope.
    pub fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock();
        let t = tokens.get(&(registry.to_string(), scope.to_string()))?;
        (t.expires > Instant::now()).then(|| t.value.clone())
    }

    pub fn put(&self, registry: &str, scope: &str, token: Token) {
        self.tokens
            .lock()
            .insert((registry.to_string(), scope.to_string()), token);
    }

    /// Drops a token the registry refused.
    pub fn forget(&self, registry: &str, scope: &str) {
        self.tokens.lock().remove(&(registry.to_string(), scope.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_comma_in_scope() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.test/token",service="reg",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.test/token".into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            }
        );
    }

    #[test]
    fn basic_challenge() {
        assert_eq!(Challenge::parse(r#"Basic realm="x""#), Some(Challenge::Basic));
    }

    #[test]
    fn docker_config_base64_auth_and_hub_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"r.test:5000":{"auth":"YWxpY2U6czNjcjN0"}}}"#,
        )
        .unwrap();
        let cfg = DockerConfig::load(&path).unwrap();
        assert_eq!(cfg.credentials("docker.io").unwrap().username, "u");
        let c = cfg.credentials("r.test:5000").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cr3t"));
    }

    #[test]
    fn docker_config_with_garbage_auth_is_an_error_naming_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.test":{"auth":"!!!"}}}"#).unwrap();
        let err = DockerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("r.test"), "{err}");
    }

    #[test]
    fn expired_tokens_are_not_returned() {
        let cache = TokenCache::default();
        let past = Instant::now() - Duration::from_secs(1);
        cache.put(
            "r",
            "s",
            Token {
                value: "t".into(),
                expires: past,
            },
        );
        assert_eq!(cache.get("r", "s"), None);
    }
}
