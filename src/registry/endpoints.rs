//! A registry host turned into the ordered list of endpoints requests go
//! to: the mirrors its `hosts.toml` names (under `config_path`), then its
//! `server` or the registry itself. Lists are cached per registry host and
//! built again when a stat of the configuration shows a change (checked on
//! every operation: a few `stat` calls). Hosts with the same TLS settings
//! share one HTTP client (one connection pool).

use super::hosts::{self, Capabilities, HostConfig, TlsConfig};
use super::Reference;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Docker Hub's reference host and its API host.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// One place requests for a registry's content may go.
pub struct Endpoint {
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
    /// API root path (`/v2`, or what `override_path` says).
    pub path: String,
    pub caps: Capabilities,
    /// Sent with every request to this endpoint (not to redirect targets).
    pub headers: HeaderMap,
    pub client: reqwest::Client,
    /// The registry a mirror stands in for (containerd's `ns` query parameter).
    pub ns: Option<String>,
    /// Whose credentials and tokens requests carry: the endpoint's own host
    /// (`docker.io` for Docker Hub's API host), as containerd does.
    pub auth_host: String,
    /// The names a token realm may share to get Basic credentials.
    pub own_hosts: Vec<String>,
}

impl Endpoint {
    /// `scheme://host/path`, for health keys and messages.
    pub fn key(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }

    /// The URL of `tail` (e.g. `blobs/<digest>`) in `repository`, with `ns=` for a mirror.
    pub fn url(&self, repository: &str, tail: &str) -> String {
        let mut u = format!("{}/{repository}/{tail}", self.key());
        if let Some(ns) = &self.ns {
            u.push_str("?ns=");
            u.push_str(&encode_query(ns));
        }
        u
    }

    /// The repository's base URL (`…/v2/<repository>`), without `ns`.
    pub fn base(&self, repository: &str) -> String {
        format!("{}/{repository}", self.key())
    }
}

fn encode_query(s: &str) -> String {
    let mut u = reqwest::Url::parse("http://q.invalid/").expect("a valid URL");
    u.query_pairs_mut().append_pair("v", s);
    u.query().unwrap_or_default()["v=".len()..].to_string()
}

/// How the registry itself is reached when no `server` says otherwise.
pub struct OriginScheme<'a> {
    pub plain_http: bool,
    pub insecure: &'a [String],
}

/// Makes an HTTP client for a host's TLS settings.
type BuildClient = dyn Fn(&TlsConfig) -> Result<reqwest::Client, String> + Send + Sync;

/// The endpoint lists of every registry host seen, kept fresh.
pub struct Endpoints {
    config_path: Option<PathBuf>,
    /// The client of hosts without TLS settings of their own.
    default: reqwest::Client,
    build: Box<BuildClient>,
    clients: Mutex<HashMap<TlsConfig, reqwest::Client>>,
    lists: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    stamp: Stamp,
    list: Arc<[Arc<Endpoint>]>,
}

/// What was seen of the configuration: which directory applies and the
/// change times of it and its `hosts.toml` (`None`: no directory applies).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp(Option<Seen>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    dir: PathBuf,
    /// mtime (s, ns) and inode of the directory.
    dir_times: (i64, i64, u64),
    /// mtime (s, ns), inode and size of `hosts.toml`, if there is one.
    file: Option<(i64, i64, u64, u64)>,
}

impl Endpoints {
    /// `build` makes a client for TLS settings (CA, client certificate,
    /// skip_verify, dial timeout); `default` serves hosts without any.
    pub fn new(
        config_path: Option<PathBuf>,
        default: reqwest::Client,
        build: impl Fn(&TlsConfig) -> Result<reqwest::Client, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            config_path,
            default,
            build: Box::new(build),
            clients: Mutex::new(HashMap::new()),
            lists: Mutex::new(HashMap::new()),
        }
    }

    /// The endpoints of `repo`'s registry, mirrors first, the registry (or
    /// its `server`) last; never empty.
    pub fn list(&self, repo: &Reference, origin: &OriginScheme<'_>) -> Arc<[Arc<Endpoint>]> {
        let registry = repo.registry.as_str();
        let stamp = self.stamp(registry);
        if let Some(c) = self.lists.lock().get(registry) {
            if c.stamp == stamp {
                return Arc::clone(&c.list);
            }
        }
        let list: Arc<[Arc<Endpoint>]> = self.build_list(repo, &stamp, origin).into();
        if stamp.0.is_some() {
            let names: Vec<String> = list.iter().map(|e| e.key()).collect();
            info!(registry, endpoints = %names.join(" "), "registry hosts configured");
        }
        self.lists.lock().insert(
            registry.to_string(),
            Cached {
                stamp,
                list: Arc::clone(&list),
            },
        );
        list
    }

    fn stamp(&self, registry: &str) -> Stamp {
        let Some(root) = &self.config_path else {
            return Stamp(None);
        };
        let times = |m: &std::fs::Metadata| (m.mtime(), m.mtime_nsec(), m.ino());
        // Several roots separated by ':' (as containerd's CRI takes them): the first hit wins.
        let dirs = std::env::split_paths(root).flat_map(|r| hosts::host_dirs(&r, registry));
        for dir in dirs {
            if let Ok(m) = std::fs::metadata(&dir) {
                let file = std::fs::metadata(dir.join("hosts.toml"))
                    .ok()
                    .map(|f| (f.mtime(), f.mtime_nsec(), f.ino(), f.len()));
                return Stamp(Some(Seen {
                    dir,
                    dir_times: times(&m),
                    file,
                }));
            }
        }
        Stamp(None)
    }

    fn build_list(&self, repo: &Reference, stamp: &Stamp, origin: &OriginScheme<'_>) -> Vec<Arc<Endpoint>> {
        let configs = match &stamp.0 {
            Some(seen) => load(&seen.dir),
            None => vec![HostConfig::default()],
        };
        configs
            .into_iter()
            .map(|c| self.endpoint(repo, c, origin))
            .map(Arc::new)
            .collect()
    }

    fn endpoint(&self, repo: &Reference, c: HostConfig, origin: &OriginScheme<'_>) -> Endpoint {
        let registry = repo.registry.as_str();
        let caps = c.capabilities();
        let (scheme, host, path) = match c.url {
            Some(u) => (u.scheme, u.host, u.path),
            None => {
                let plain = origin.plain_http || repo.is_loopback() || origin.insecure.iter().any(|h| h == registry);
                let scheme = if plain { "http" } else { "https" };
                (scheme.to_string(), repo.api_host().to_string(), "/v2".to_string())
            }
        };
        let client = match self.client(&c.tls) {
            Ok(client) => client,
            Err(e) => {
                // Stricter than configured (built-in roots only): fails rather than trusts.
                warn!(registry, host = %host, error = %e, "TLS settings of a registry host cannot be used: default TLS instead");
                self.default.clone()
            }
        };
        let mut headers = HeaderMap::new();
        for (name, values) in &c.header {
            // Checked when parsed.
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            for v in values {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.append(name.clone(), v);
                }
            }
        }
        let is_origin = host == registry || (registry == DOCKER_HUB && host == DOCKER_HUB_API);
        let auth_host = if host == DOCKER_HUB_API {
            DOCKER_HUB.to_string()
        } else {
            host.clone()
        };
        let own_hosts = if is_origin {
            vec![registry.to_string(), repo.api_host().to_string()]
        } else {
            vec![host.clone()]
        };
        Endpoint {
            scheme,
            path,
            caps,
            headers,
            client,
            ns: (!is_origin).then(|| registry.to_string()),
            auth_host,
            own_hosts,
            host,
        }
    }

    fn client(&self, tls: &TlsConfig) -> Result<reqwest::Client, String> {
        if tls.is_default() {
            return Ok(self.default.clone());
        }
        if let Some(c) = self.clients.lock().get(tls) {
            return Ok(c.clone());
        }
        let c = (self.build)(tls)?;
        self.clients.lock().insert(tls.clone(), c.clone());
        Ok(c)
    }
}

/// A directory's host list; a `hosts.toml` that cannot be used is logged and
/// the directory's certificate files apply instead (containerd's fallback),
/// so a broken file never stops pulls from the registry itself.
fn load(dir: &Path) -> Vec<HostConfig> {
    match hosts::load_dir(dir) {
        Ok(list) => list,
        Err(e) => {
            warn!(error = %e, "hosts.toml ignored: using the registry itself");
            hosts::cert_files(dir).unwrap_or_else(|_| vec![HostConfig::default()])
        }
    }
}

/// Builds a client for `tls` on top of `base` settings: extra CA roots,
/// a client certificate (the first pair; reqwest takes one identity),
/// `skip_verify`, and `dial_timeout` as the connect timeout.
pub fn tls_client(base: reqwest::ClientBuilder, tls: &TlsConfig) -> Result<reqwest::Client, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let mut b = base;
    for ca in &tls.ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .map_err(|e| format!("{}: not PEM certificates: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", ca.display()));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = tls.client.first() {
        let mut pem = read(cert)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(read(key)?);
        }
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("{}: not a certificate and key in PEM: {e}", cert.display()))?;
        b = b.identity(id);
        if tls.client.len() > 1 {
            warn!(cert = %cert.display(), "only the first client certificate of a host is used");
        }
    }
    if tls.skip_verify == Some(true) {
        b = b.danger_accept_invalid_certs(true);
    }
    if let Some(d) = tls.dial_timeout {
        b = b.connect_timeout(d.max(Duration::from_millis(1)));
    }
    b.build().map_err(|e| e.without_url().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(root: &Path) -> Endpoints {
        Endpoints::new(Some(root.to_path_buf()), reqwest::Client::new(), |_| {
            Ok(reqwest::Client::new())
        })
    }

    const ORIGIN: OriginScheme<'static> = OriginScheme {
        plain_http: false,
        insecure: &[],
    };

    fn keys(list: &[Arc<Endpoint>]) -> Vec<String> {
        list.iter().map(|e| e.key()).collect()
    }

    #[test]
    fn without_configuration_the_registry_itself_is_the_only_endpoint() {
        let e = Endpoints::new(None, reqwest::Client::new(), |_| unreachable!());
        let r: Reference = "r.test:5000/a/b:1".parse().unwrap();
        let list = e.list(&r, &ORIGIN);
        assert_eq!(keys(&list), vec!["https://r.test:5000/v2"]);
        assert_eq!(list[0].url("a/b", "blobs/x"), "https://r.test:5000/v2/a/b/blobs/x");
        let hub: Reference = "busybox".parse().unwrap();
        let list = e.list(&hub, &ORIGIN);
        assert_eq!(keys(&list), vec!["https://registry-1.docker.io/v2"]);
        assert_eq!(list[0].auth_host, "docker.io");
        assert!(list[0].ns.is_none());
    }

    #[test]
    fn mirrors_get_ns_and_their_own_credentials_and_the_registry_comes_last() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("r.test_5000_");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            "[host.\"http://127.0.0.1:30020\"]\ncapabilities = [\"pull\"]\n[host.\"http://127.0.0.1:30020\".header]\nx-a = \"1\"\n",
        )
        .unwrap();
        let e = endpoints(d.path());
        let r: Reference = "r.test:5000/a/b:1".parse().unwrap();
        let list = e.list(&r, &ORIGIN);
        assert_eq!(keys(&list), vec!["http://127.0.0.1:30020/v2", "https://r.test:5000/v2"]);
        assert_eq!(
            list[0].url("a/b", "manifests/1"),
            "http://127.0.0.1:30020/v2/a/b/manifests/1?ns=r.test%3A5000"
        );
        assert_eq!(list[0].auth_host, "127.0.0.1:30020");
        assert_eq!(list[0].headers.get("x-a").unwrap(), "1");
        assert_eq!(list[0].caps, Capabilities::PULL);
        assert_eq!(list[1].auth_host, "r.test:5000");
        assert!(list[1].ns.is_none());
    }

    #[test]
    fn a_changed_hosts_toml_is_read_again_and_default_applies_to_others() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("_default");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), "server = \"https://only.test\"\n").unwrap();
        let e = endpoints(d.path());
        let r: Reference = "other.test/a:1".parse().unwrap();
        assert_eq!(keys(&e.list(&r, &ORIGIN)), vec!["https://only.test/v2"]);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("hosts.toml"), "[host.\"https://m.test\"]\n").unwrap();
        assert_eq!(
            keys(&e.list(&r, &ORIGIN)),
            vec!["https://m.test/v2", "https://other.test/v2"]
        );
    }

    #[test]
    fn several_roots_are_searched_in_order() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dir = b.path().join("r.test");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), "server = \"https://b.test\"\n").unwrap();
        let roots = std::env::join_paths([a.path(), b.path()]).unwrap();
        let e = endpoints(Path::new(&roots));
        let r: Reference = "r.test/a:1".parse().unwrap();
        assert_eq!(keys(&e.list(&r, &ORIGIN)), vec!["https://b.test/v2"]);
    }

    #[test]
    fn a_broken_hosts_toml_leaves_the_registry_itself() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("r.test");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), "[host.\"https://m.test\"]\ncapabilities = 7\n").unwrap();
        let r: Reference = "r.test/a:1".parse().unwrap();
        assert_eq!(keys(&endpoints(d.path()).list(&r, &ORIGIN)), vec!["https://r.test/v2"]);
    }

    #[test]
    fn loopback_and_insecure_registries_are_plain_http_but_mirrors_keep_their_scheme() {
        let e = Endpoints::new(None, reqwest::Client::new(), |_| unreachable!());
        let r: Reference = "127.0.0.1:5000/a:1".parse().unwrap();
        assert_eq!(keys(&e.list(&r, &ORIGIN)), vec!["http://127.0.0.1:5000/v2"]);
        let insecure = ["r.test:80".to_string()];
        let r: Reference = "r.test:80/a:1".parse().unwrap();
        let o = OriginScheme {
            plain_http: false,
            insecure: &insecure,
        };
        assert_eq!(keys(&e.list(&r, &o)), vec!["http://r.test:80/v2"]);
    }

    #[test]
    fn tls_settings_that_cannot_be_read_name_the_file() {
        let tls = TlsConfig {
            ca: vec![PathBuf::from("/nonexistent/ca.pem")],
            ..Default::default()
        };
        let e = tls_client(reqwest::Client::builder(), &tls).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let tls = TlsConfig {
            ca: vec![bad.clone()],
            ..Default::default()
        };
        assert!(tls_client(reqwest::Client::builder(), &tls)
            .unwrap_err()
            .contains("bad.pem"));
        let ok = TlsConfig {
            skip_verify: Some(true),
            dial_timeout: Some(Duration::from_millis(200)),
            ..Default::default()
        };
        assert!(tls_client(reqwest::Client::builder(), &ok).is_ok());
    }
}
