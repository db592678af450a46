//! Docker's `config.json`, all of it that concerns pulls: `auths` (`auth`
//! base64 user:password, `username`/`password`, `identitytoken`), `credHelpers`
//! (a helper per registry) and `credsStore` (the default helper). The file is
//! read again whenever its modification time or size changes, so credentials
//! written while the daemon runs (`docker login`, a rotated token) are used
//! without a restart. Helper answers are kept for [`HELPER_TTL`].

use super::{helper, normalize_host, Credential, CredentialError, Origin, Secret};
use base64::Engine as _;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tracing::warn;

/// How long a helper's answer is used before the helper is asked again.
pub const HELPER_TTL: Duration = Duration::from_secs(300);
/// Largest config.json read.
const MAX_SIZE: u64 = 4 << 20;

/// One `config.json` (which may not exist yet) and what it says.
pub struct DockerConfig {
    path: PathBuf,
    helper_timeout: Duration,
    file: Mutex<Loaded>,
    helper_answers: Mutex<HashMap<String, Credential>>,
    /// Held while a helper runs: concurrent lookups wait for its answer instead of running it again.
    helper_running: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Loaded {
    /// (mtime, size) of the version last looked at; `None` when there was no file.
    stamp: Option<(SystemTime, u64)>,
    parsed: Parsed,
    /// Whether some version was read (then a broken later one is skipped, not fatal).
    read_once: bool,
}

/// A config file's content, by normalized registry host.
#[derive(Default, Debug)]
struct Parsed {
    auths: HashMap<String, Secret>,
    helpers: HashMap<String, String>,
    store: Option<String>,
}

#[derive(serde::Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl DockerConfig {
    /// The file docker itself reads: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn default_path() -> PathBuf {
        match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir).join("config.json"),
            None => std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(".docker/config.json"),
        }
    }

    /// Reads `path` now (so a broken file fails start-up) and again whenever it changes.
    pub fn open(path: &Path, helper_timeout: Duration) -> Result<Self, CredentialError> {
        let cfg = DockerConfig {
            path: path.to_path_buf(),
            helper_timeout,
            file: Mutex::new(Loaded::default()),
            helper_answers: Mutex::new(HashMap::new()),
            helper_running: tokio::sync::Mutex::new(()),
        };
        cfg.refresh()?;
        Ok(cfg)
    }

    fn origin(&self) -> Origin {
        Origin::new(format!("config.json {}", self.path.display()))
    }

    /// Re-reads the file if its stamp changed since the last read.
    fn refresh(&self) -> Result<(), CredentialError> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(md) => Some((md.modified().unwrap_or(SystemTime::UNIX_EPOCH), md.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.config_error(format!("reading it: {e}"))),
        };
        let mut file = self.file.lock();
        if file.stamp == stamp && file.read_once {
            return Ok(());
        }
        let parsed = match stamp {
            None => Ok(Parsed::default()),
            Some((_, len)) if len > MAX_SIZE => Err(self.config_error("larger than 4 MiB".into())),
            Some(_) => std::fs::read(&self.path)
                .map_err(|e| self.config_error(format!("reading it: {e}")))
                .and_then(|text| self.parse(&text)),
        };
        match parsed {
            Ok(parsed) => {
                *file = Loaded {
                    stamp,
                    parsed,
                    read_once: true,
                };
                // Helpers named by the old file may no longer apply.
                self.helper_answers.lock().clear();
            }
            // At start a broken file is an error; later (a half-written file, an
            // editor's save) the last good content stays in use until the next change.
            Err(e) if !file.read_once => return Err(e),
            Err(e) => {
                warn!(error = %e, "docker config changed but cannot be used; keeping its previous content");
                file.stamp = stamp;
            }
        }
        Ok(())
    }

    fn config_error(&self, reason: String) -> CredentialError {
        CredentialError::Config {
            path: self.path.clone(),
            reason,
        }
    }

    fn parse(&self, text: &[u8]) -> Result<Parsed, CredentialError> {
        let file: ConfigFile =
            serde_json::from_slice(text).map_err(|e| self.config_error(format!("not a docker config: {e}")))?;
        let mut auths = HashMap::new();
        for (key, entry) in file.auths {
            let secret = match entry {
                AuthEntry {
                    identitytoken: Some(t), ..
                } if !t.is_empty() => Secret::IdentityToken(t),
                AuthEntry { auth: Some(a), .. } if !a.is_empty() => decode_auth(&a).ok_or_else(|| {
                    self.config_error(format!(
                        "entry for {key} has an `auth` that is not base64 user:password"
                    ))
                })?,
                AuthEntry {
                    username: Some(username),
                    password: Some(password),
                    ..
                } => Secret::Basic { username, password },
                _ => continue,
            };
            auths.insert(normalize_host(&key), secret);
        }
        let helpers = file
            .cred_helpers
            .into_iter()
            .map(|(k, v)| (normalize_host(&k), v))
            .collect();
        Ok(Parsed {
            auths,
            helpers,
            store: file.creds_store.filter(|s| !s.is_empty()),
        })
    }

    /// Credentials for `registry`: its `credHelpers` helper if it has one,
    /// else its `auths` entry, else the `credsStore` helper.
    pub async fn lookup(&self, registry: &str) -> Result<Option<Credential>, CredentialError> {
        self.refresh()?;
        let host = normalize_host(registry);
        let helper = {
            let file = self.file.lock();
            let p = &file.parsed;
            match (p.helpers.get(&host), p.auths.get(&host), &p.store) {
                (Some(h), _, _) => h.clone(),
                (None, Some(secret), _) => {
                    return Ok(Some(Credential {
                        secret: secret.clone(),
                        origin: self.origin(),
                        expires: None,
                    }))
                }
                (None, None, Some(store)) => store.clone(),
                (None, None, None) => return Ok(None),
            }
        };
        let kept = || {
            let answers = self.helper_answers.lock();
            answers.get(&host).filter(|c| c.is_fresh(Instant::now())).cloned()
        };
        if let Some(c) = kept() {
            return Ok(Some(c));
        }
        let _turn = self.helper_running.lock().await;
        if let Some(c) = kept() {
            return Ok(Some(c));
        }
        let server = match host.as_str() {
            "docker.io" => "https://index.docker.io/v1/",
            h => h,
        };
        let Some(secret) = helper::get(&helper, registry, server, self.helper_timeout).await? else {
            return Ok(None);
        };
        let c = Credential {
            secret,
            origin: helper::origin(&helper),
            expires: Some(Instant::now() + HELPER_TTL),
        };
        self.helper_answers.lock().insert(host, c.clone());
        Ok(Some(c))
    }

    /// Forgets a helper's answer for `registry` (the registry refused it).
    pub fn forget(&self, registry: &str) {
        self.helper_answers.lock().remove(&normalize_host(registry));
    }
}

fn decode_auth(auth: &str) -> Option<Secret> {
    let raw = base64::engine::general_purpose::STANDARD.decode(auth.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(Secret::Basic {
        username: u.to_string(),
        password: p.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(text: &str) -> (tempfile::TempDir, DockerConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, text).unwrap();
        let cfg = DockerConfig::open(&path, Duration::from_secs(5)).unwrap();
        (dir, cfg)
    }

    async fn secret(cfg: &DockerConfig, host: &str) -> Option<Secret> {
        cfg.lookup(host).await.unwrap().map(|c| c.secret)
    }

    fn basic(u: &str, p: &str) -> Option<Secret> {
        Some(Secret::Basic {
            username: u.into(),
            password: p.into(),
        })
    }

    #[tokio::test]
    async fn auths_in_every_form_and_hub_aliases() {
        let (_d, cfg) = open(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},
                "r.test:5000":{"auth":"YWxpY2U6czNjcjN0"},
                "plain.test":{"username":"bob","password":"pw"},
                "oauth.test":{"auth":"dTpw","identitytoken":"refresh"},
                "empty.test":{}}}"#,
        );
        assert_eq!(secret(&cfg, "docker.io").await, basic("u", "p"));
        assert_eq!(secret(&cfg, "r.test:5000").await, basic("alice", "s3cr3t"));
        assert_eq!(secret(&cfg, "plain.test").await, basic("bob", "pw"));
        assert_eq!(
            secret(&cfg, "oauth.test").await,
            Some(Secret::IdentityToken("refresh".into()))
        );
        assert_eq!(secret(&cfg, "empty.test").await, None);
        assert_eq!(secret(&cfg, "other.test").await, None);
        let c = cfg.lookup("plain.test").await.unwrap().unwrap();
        assert!(c.origin.to_string().starts_with("config.json /"), "{}", c.origin);
    }

    #[test]
    fn garbage_auth_is_an_error_naming_the_host_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.test":{"auth":"!!!"}}}"#).unwrap();
        let err = DockerConfig::open(&path, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("r.test") && err.contains("config.json"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_file_is_anonymous_until_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cfg = DockerConfig::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(secret(&cfg, "r.test").await, None);
        std::fs::write(&path, r#"{"auths":{"r.test":{"username":"a","password":"b"}}}"#).unwrap();
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "b"));
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again() {
        let (dir, cfg) = open(r#"{"auths":{"r.test":{"username":"a","password":"old"}}}"#);
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "old"));
        // A different size is a change even within the file system's mtime granularity.
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.test":{"username":"a","password":"newer"}}}"#).unwrap();
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "newer"));
    }

    #[tokio::test]
    async fn a_broken_rewrite_keeps_the_last_good_content_until_the_next_change() {
        let (dir, cfg) = open(r#"{"auths":{"r.test":{"username":"a","password":"good"}}}"#);
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.test":{"username":"a","#).unwrap();
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "good"));
        std::fs::write(&path, r#"{"auths":{"r.test":{"username":"a","password":"fixed"}}}"#).unwrap();
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "fixed"));
    }

    #[tokio::test]
    async fn a_helper_named_for_the_host_wins_over_auths_and_its_failure_names_it() {
        let (_d, cfg) = open(
            r#"{"auths":{"r.test":{"username":"a","password":"b"}},
                "credHelpers":{"r.test":"streamsnap-unit-absent"}}"#,
        );
        let err = cfg.lookup("r.test").await.unwrap_err().to_string();
        assert!(
            err.contains("r.test") && err.contains("docker-credential-streamsnap-unit-absent"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_store_is_asked_only_for_hosts_without_auths() {
        let (_d, cfg) =
            open(r#"{"auths":{"r.test":{"username":"a","password":"b"}},"credsStore":"streamsnap-unit-absent"}"#);
        assert_eq!(secret(&cfg, "r.test").await, basic("a", "b"));
        assert!(cfg.lookup("s.test").await.is_err());
    }
}
