//! kubelet credential-provider plugins, as kubelet runs them: the same
//! `CredentialProviderConfig` file (YAML or JSON) and bin
//! dir, a provider asked only for images its `matchImages` match, the plugin
//! exec'd with a `CredentialProviderRequest` on stdin, its
//! `CredentialProviderResponse` kept per `cacheKeyType` key (Image, Registry,
//! Global) for `cacheDuration` (else the provider's `defaultCacheDuration`).
//! So the ECR, GCR and ACR plugins work unchanged. As in kubelet, a plugin
//! that fails is logged and the next source is asked.

use super::exec;
use super::matching::matches;
use super::{Credential, CredentialError, Origin, Secret};
use crate::registry::hosts::go_duration;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

const CONFIG_API_VERSIONS: [&str; 3] = [
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
const PLUGIN_API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];
/// Largest provider config read.
const MAX_CONFIG: u64 = 1 << 20;
/// How long a failed plugin run stands for its registry before the plugin is run again.
const FAILED_RETRY: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    api_version: String,
    kind: String,
    providers: Vec<ProviderSpec>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ProviderSpec {
    name: String,
    match_images: Vec<String>,
    default_cache_duration: String,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    kind: &'static str,
    api_version: &'a str,
    image: &'a str,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    kind: String,
    api_version: String,
    cache_key_type: Option<String>,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthConfig>,
}

#[derive(serde::Deserialize)]
struct AuthConfig {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// One configured plugin.
struct Provider {
    name: String,
    program: PathBuf,
    match_images: Vec<String>,
    default_cache: Duration,
    api_version: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Held while the plugin runs: callers who find no cached answer meanwhile
    /// wait for this run's answer instead of starting their own (as kubelet's singleflight).
    running: tokio::sync::Mutex<()>,
}

/// A plugin's answer, kept until `expires`: credentials by the pattern they apply to.
struct Answer {
    auth: Vec<(String, Secret)>,
    expires: Instant,
}

/// The configured plugins and their cached answers.
pub struct Providers {
    providers: Vec<Provider>,
    timeout: Duration,
    /// By (provider index, cache key: the image, the registry or "" for Global).
    cache: Mutex<HashMap<(usize, String), Answer>>,
}

impl Providers {
    /// Reads kubelet's `CredentialProviderConfig` at `config`; plugins are
    /// `bin_dir/<name>`. Errors name the file and the provider.
    pub fn load(config: &Path, bin_dir: &Path, timeout: Duration) -> Result<Self, CredentialError> {
        let bad = |reason: String| CredentialError::Config {
            path: config.to_path_buf(),
            reason,
        };
        let text = std::fs::File::open(config)
            .and_then(|f| {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_CONFIG + 1), &mut buf)?;
                Ok(buf)
            })
            .map_err(|e| bad(format!("reading it: {e}")))?;
        if text.len() as u64 > MAX_CONFIG {
            return Err(bad("larger than 1 MiB".into()));
        }
        let text = String::from_utf8(text).map_err(|e| bad(format!("not text: {e}")))?;
        // JSON as it is (exact errors); anything else as YAML, kubelet's usual form.
        let value = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => v,
            Err(_) => super::yaml::to_json(&text).map_err(|e| bad(format!("not YAML or JSON: {e}")))?,
        };
        let file: ConfigFile =
            serde_json::from_value(value).map_err(|e| bad(format!("not a CredentialProviderConfig: {e}")))?;
        if file.kind != "CredentialProviderConfig" || !CONFIG_API_VERSIONS.contains(&file.api_version.as_str()) {
            return Err(bad(format!(
                "kind {} apiVersion {} is not a kubelet CredentialProviderConfig",
                file.kind, file.api_version
            )));
        }
        let mut providers = Vec::new();
        for p in file.providers {
            let named = |reason: &str| bad(format!("provider {:?}: {reason}", p.name));
            if p.name.is_empty() || p.name.contains('/') || p.name == "." || p.name == ".." {
                return Err(named("name must be a file name in the bin dir"));
            }
            if p.match_images.is_empty() {
                return Err(named("matchImages is empty"));
            }
            if !PLUGIN_API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(named(&format!(
                    "apiVersion {} is not a credential provider API",
                    p.api_version
                )));
            }
            let default_cache = go_duration(&p.default_cache_duration).ok_or_else(|| {
                named(&format!(
                    "defaultCacheDuration {:?} is not a duration",
                    p.default_cache_duration
                ))
            })?;
            providers.push(Provider {
                program: bin_dir.join(&p.name),
                name: p.name,
                match_images: p.match_images,
                default_cache,
                api_version: p.api_version,
                args: p.args,
                env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
                running: tokio::sync::Mutex::new(()),
            });
        }
        Ok(Providers {
            providers,
            timeout,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials for `image` on `registry` from the first matching provider
    /// that has some (cached, or asked now).
    pub async fn lookup(&self, registry: &str, image: &str) -> Option<Credential> {
        for (i, p) in self.providers.iter().enumerate() {
            if !p.match_images.iter().any(|m| matches(m, image)) {
                continue;
            }
            if let Some(answer) = self.cached(i, registry, image) {
                match answer {
                    Some(c) => return Some(c),
                    None => continue,
                }
            }
            let _turn = p.running.lock().await;
            // The run we waited for may have answered for this image.
            if let Some(answer) = self.cached(i, registry, image) {
                match answer {
                    Some(c) => return Some(c),
                    None => continue,
                }
            }
            match self.ask(i, p, registry, image).await {
                Ok(Some(c)) => return Some(c),
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, retry_in = ?FAILED_RETRY, "credential provider failed; trying the next source");
                    // Not again on every request meanwhile (Basic auth asks per request).
                    let empty = Answer {
                        auth: Vec::new(),
                        expires: Instant::now() + FAILED_RETRY,
                    };
                    self.cache.lock().insert((i, registry.to_string()), empty);
                }
            }
        }
        None
    }

    /// Provider `i`'s fresh answer for `image` (by image, registry, then global
    /// key, as kubelet looks): `Some(None)` when that answer has nothing for it.
    fn cached(&self, i: usize, registry: &str, image: &str) -> Option<Option<Credential>> {
        let now = Instant::now();
        let cache = self.cache.lock();
        [image, registry, ""].iter().find_map(|key| {
            let a = cache.get(&(i, key.to_string())).filter(|a| a.expires > now)?;
            Some(pick(&a.auth, image).map(|secret| Credential {
                secret,
                origin: origin(&self.providers[i].name),
                expires: Some(a.expires),
            }))
        })
    }

    async fn ask(
        &self,
        i: usize,
        p: &Provider,
        registry: &str,
        image: &str,
    ) -> Result<Option<Credential>, CredentialError> {
        let failed = |reason: String| CredentialError::Source {
            registry: registry.to_string(),
            origin: origin(&p.name),
            reason,
        };
        let request = serde_json::to_vec(&Request {
            kind: "CredentialProviderRequest",
            api_version: &p.api_version,
            image,
        })
        .expect("serializable request");
        let out = exec::run(&p.program, &p.args, &p.env, &request, self.timeout)
            .await
            .map_err(|source| CredentialError::Exec {
                registry: registry.to_string(),
                origin: origin(&p.name),
                source,
            })?;
        if !out.status.success() {
            return Err(failed(format!("exited with {}: {}", out.status, out.stderr)));
        }
        let r: Response = serde_json::from_slice(&out.stdout)
            .map_err(|e| failed(format!("answer is not a CredentialProviderResponse: {e}")))?;
        if r.kind != "CredentialProviderResponse" || r.api_version != p.api_version {
            return Err(failed(format!(
                "answered kind {} apiVersion {}, expected CredentialProviderResponse {}",
                r.kind, r.api_version, p.api_version
            )));
        }
        let key = match r.cache_key_type.as_deref() {
            Some("Image") => image.to_string(),
            Some("Registry") => registry.to_string(),
            Some("Global") => String::new(),
            other => {
                return Err(failed(format!(
                    "cacheKeyType {other:?} is not Image, Registry or Global"
                )))
            }
        };
        let life = match &r.cache_duration {
            Some(d) => go_duration(d).ok_or_else(|| failed(format!("cacheDuration {d:?} is not a duration")))?,
            None => p.default_cache,
        };
        let auth: Vec<(String, Secret)> = r
            .auth
            .into_iter()
            .map(|(pattern, a)| {
                let secret = Secret::Basic {
                    username: a.username,
                    password: a.password,
                };
                (pattern, secret)
            })
            .collect();
        let expires = Instant::now() + life;
        let picked = pick(&auth, image);
        debug!(provider = %p.name, registry, entries = auth.len(), ?life, found = picked.is_some(), "credential provider answered");
        if !life.is_zero() {
            self.cache.lock().insert((i, key), Answer { auth, expires });
        }
        Ok(picked.map(|secret| Credential {
            secret,
            origin: origin(&p.name),
            expires: Some(expires),
        }))
    }

    /// Drops cached answers keyed by `registry` or by its images.
    pub fn forget(&self, registry: &str) {
        let prefix = format!("{registry}/");
        self.cache
            .lock()
            .retain(|(_, key), _| key != registry && !key.starts_with(&prefix));
    }
}

fn origin(name: &str) -> Origin {
    Origin::new(format!("provider {name}"))
}

/// The entry of an `auth` map that applies to `image`: the most specific
/// (longest) matching pattern.
fn pick(auth: &[(String, Secret)], image: &str) -> Option<Secret> {
    auth.iter()
        .filter(|(pattern, _)| matches(pattern, image))
        .max_by_key(|(pattern, _)| pattern.len())
        .map(|(_, s)| s.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("5m0s"), Some(Duration::from_secs(300)));
        assert_eq!(go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("12"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("1d"), None);
    }

    fn setup(plugin: &str, config: &str) -> (tempfile::TempDir, Result<Providers, CredentialError>) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let p = bin.join("test-provider");
        std::fs::write(&p, format!("#!/bin/sh\n{plugin}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(&cfg, config).unwrap();
        let providers = Providers::load(&cfg, &bin, Duration::from_secs(5));
        (dir, providers)
    }

    fn config(match_images: &str) -> String {
        format!(
            r#"{{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[
            {{"name":"test-provider","matchImages":[{match_images}],"defaultCacheDuration":"10m",
              "apiVersion":"credentialprovider.kubelet.k8s.io/v1","args":["get-credentials"],
              "env":[{{"name":"WHO","value":"bob"}}]}}]}}"#
        )
    }

    /// Logs its request to $0.log; answers for *.test with user $WHO.
    const PLUGIN: &str = r#"cat >> "$0.log"; echo >> "$0.log"
echo "{\"kind\":\"CredentialProviderResponse\",\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",
 \"cacheKeyType\":\"Registry\",\"auth\":{\"*.test\":{\"username\":\"$WHO\",\"password\":\"$1\"}}}""#;

    #[tokio::test]
    async fn a_matching_provider_is_asked_once_per_cache_key_with_args_and_env() {
        let (dir, providers) = setup(PLUGIN, &config(r#""*.test""#));
        let providers = providers.unwrap();
        let c = providers.lookup("r.test", "r.test/team/app").await.unwrap();
        assert_eq!(
            c.secret,
            Secret::Basic {
                username: "bob".into(),
                password: "get-credentials".into()
            }
        );
        assert_eq!(c.origin.to_string(), "provider test-provider");
        // cacheKeyType Registry: another image on the same registry uses the cached answer.
        assert!(providers.lookup("r.test", "r.test/other").await.is_some());
        let log = std::fs::read_to_string(dir.path().join("bin/test-provider.log")).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        let req: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        assert_eq!(req["kind"], "CredentialProviderRequest");
        assert_eq!(req["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
        assert_eq!(req["image"], "r.test/team/app");
        // After a refusal the provider is asked again.
        providers.forget("r.test");
        providers.lookup("r.test", "r.test/other").await.unwrap();
        let log = std::fs::read_to_string(dir.path().join("bin/test-provider.log")).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_plugin_run() {
        let slow = format!("sleep 0.3\n{PLUGIN}");
        let (dir, providers) = setup(&slow, &config(r#""*.test""#));
        let providers = providers.unwrap();
        let lookups = (0..8).map(|i| {
            let image = format!("r.test/app{i}");
            let providers = &providers;
            async move { providers.lookup("r.test", &image).await }
        });
        let answers = futures::future::join_all(lookups).await;
        assert!(answers.iter().all(Option::is_some));
        let log = std::fs::read_to_string(dir.path().join("bin/test-provider.log")).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
    }

    #[tokio::test]
    async fn images_not_matched_never_reach_the_provider() {
        let (dir, providers) = setup(PLUGIN, &config(r#""only.example""#));
        assert!(providers.unwrap().lookup("r.test", "r.test/app").await.is_none());
        assert!(!dir.path().join("bin/test-provider.log").exists());
    }

    #[tokio::test]
    async fn a_failing_provider_gives_no_credentials_and_is_not_rerun_at_once() {
        let (dir, providers) = setup(r#"echo run >> "$0.log"; echo boom >&2; exit 1"#, &config(r#""*.test""#));
        let providers = providers.unwrap();
        assert!(providers.lookup("r.test", "r.test/app").await.is_none());
        assert!(providers.lookup("r.test", "r.test/app").await.is_none());
        let runs = std::fs::read_to_string(dir.path().join("bin/test-provider.log")).unwrap();
        assert_eq!(runs.lines().count(), 1, "{runs}");
    }

    #[test]
    fn config_errors_name_the_file_and_the_provider() {
        let bad = config(r#""*.test""#).replace("\"10m\"", "\"ten minutes\"");
        let (_dir, p) = setup(PLUGIN, &bad);
        let err = p.err().unwrap().to_string();
        assert!(
            err.contains("config.json") && err.contains("test-provider") && err.contains("ten minutes"),
            "{err}"
        );
        let (_dir, p) = setup(
            PLUGIN,
            &config(r#""*.test""#).replace("\"args\"", "\"tokenAttributes\":{},\"args\""),
        );
        assert!(p.err().unwrap().to_string().contains("tokenAttributes"));
    }
}
