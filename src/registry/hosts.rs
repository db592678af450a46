//! containerd's registry host configuration (`config_path`): which
//! directory configures a registry (`<root>/<host>_<port>_`, `<root>/<host>:<port>`,
//! then `<root>/_default`), and what its `hosts.toml` says: mirrors
//! (`[host."URL"]`, in file order) tried before the `server` (the registry
//! itself when absent), each with `capabilities`, `ca`, `client`,
//! `skip_verify`, `header`, `override_path` and `dial_timeout`. Semantics
//! are those of containerd's `remotes/docker/config/hosts.go`; a directory
//! without `hosts.toml` configures the registry's TLS from Docker's
//! certificate files (`*.crt`, `*.cert` + `*.key`).

use std::path::{Path, PathBuf};
use std::time::Duration;
use toml_edit::{DocumentMut, Item, Value};

/// Largest `hosts.toml` read (they are a few lines).
const MAX_FILE: u64 = 1 << 20;

/// What a host may be asked to do (containerd's `HostCapabilities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capabilities(u8);

impl Capabilities {
    pub const PULL: Self = Self(1);
    pub const RESOLVE: Self = Self(2);
    pub const PUSH: Self = Self(4);
    pub const REFERRERS: Self = Self(8);
    /// containerd's default when `capabilities` is absent or empty.
    pub const ALL: Self = Self(15);

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Has every capability of `wanted`.
    pub fn has(self, wanted: Self) -> bool {
        self.0 & wanted.0 == wanted.0
    }

    /// The names, for messages.
    pub fn names(self) -> String {
        let all = [
            (Self::PULL, "pull"),
            (Self::RESOLVE, "resolve"),
            (Self::PUSH, "push"),
            (Self::REFERRERS, "referrers"),
        ];
        let names: Vec<&str> = all.iter().filter(|(c, _)| self.has(*c)).map(|(_, n)| *n).collect();
        names.join(",")
    }
}

/// Where a host is: scheme, `host[:port]` and the API root path (`/v2`
/// unless `override_path`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostUrl {
    pub scheme: String,
    pub host: String,
    pub path: String,
}

/// One entry of a registry's host list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// `None`: the registry itself (no `server`), whose scheme and host the
    /// caller decides.
    pub url: Option<HostUrl>,
    pub capabilities: Option<Capabilities>,
    pub tls: TlsConfig,
    /// Extra request headers (name, values).
    pub header: Vec<(String, Vec<String>)>,
}

impl HostConfig {
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities.unwrap_or(Capabilities::ALL)
    }
}

/// TLS and connection settings of a host: hosts that share them share one HTTP client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// CA certificate files (PEM) trusted besides the built-in roots.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files; no key file: the key is in the certificate file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub skip_verify: Option<bool>,
    pub dial_timeout: Option<Duration>,
}

impl TlsConfig {
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// A host configuration that cannot be used; names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: key {key}: {reason}")]
    Key { path: PathBuf, key: String, reason: String },
}

/// The directories that may configure registry `host`, in containerd's
/// order: `host_port_` (a `host:port` with its colon replaced), `host:port`
/// as written, then `_default`. The first that exists is used.
pub fn host_dirs(root: &Path, host: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(i) = host.rfind(':').filter(|&i| i > 0) {
        dirs.push(root.join(format!("{}_{}_", &host[..i], &host[i + 1..])));
    }
    // A name that is not one path component configures nothing.
    if !host.is_empty() && !host.contains('/') && host != "." && host != ".." {
        dirs.push(root.join(host));
    }
    dirs.push(root.join("_default"));
    dirs
}

/// The host list a directory configures: its `hosts.toml` (mirrors in file
/// order, then the server entry), or without one (or an empty one) a single
/// entry for the registry with Docker's certificate files of the directory.
pub fn load_dir(dir: &Path) -> Result<Vec<HostConfig>, HostsError> {
    let path = dir.join("hosts.toml");
    match read_limited(&path) {
        Ok(text) if !text.trim().is_empty() => parse(&path, &text),
        Ok(_) => cert_files(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => cert_files(dir),
        Err(source) => Err(HostsError::Io { path, source }),
    }
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_FILE).read_to_string(&mut text)?;
    Ok(text)
}

/// Docker's certificate layout: `*.crt` are CAs, `X.cert` a client
/// certificate with its key in `X.key` (or in the certificate file).
pub fn cert_files(dir: &Path) -> Result<Vec<HostConfig>, HostsError> {
    let io = |source| HostsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entry = HostConfig::default();
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => entry.tls.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                let key = key.exists().then_some(key);
                entry.tls.client.push((p, key));
            }
            _ => {}
        }
    }
    Ok(vec![entry])
}

/// Parses a `hosts.toml` (at `path`, for messages and relative paths).
pub fn parse(path: &Path, text: &str) -> Result<Vec<HostConfig>, HostsError> {
    let doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| HostsError::Syntax {
        path: path.to_path_buf(),
        reason: e.message().to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let p = Parser { path, base };
    let root = doc.as_table();
    let mut hosts = Vec::new();
    if let Some(item) = root.get("host") {
        let table = item.as_table_like().ok_or_else(|| p.err("host", "is not a table"))?;
        for (url, entry) in table.iter() {
            let key = format!("host.\"{url}\"");
            let entry = entry.as_table_like().ok_or_else(|| p.err(&key, "is not a table"))?;
            let mut cfg = p.entry(&key, entry, &["server"])?;
            cfg.url = Some(p.url(&key, url, override_path(entry))?);
            hosts.push(cfg);
        }
    }
    let mut server = p.entry("", root, &["host", "server"])?;
    if let Some(s) = root.get("server") {
        let s = s.as_str().ok_or_else(|| p.err("server", "is not a string"))?;
        if !s.is_empty() {
            server.url = Some(p.url("server", s, override_path(root))?);
        }
    }
    hosts.push(server);
    Ok(hosts)
}

fn override_path(t: &dyn toml_edit::TableLike) -> bool {
    t.get("override_path").and_then(Item::as_bool).unwrap_or(false)
}

struct Parser<'a> {
    path: &'a Path,
    base: &'a Path,
}

impl Parser<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> HostsError {
        HostsError::Key {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// `prefix.key`, or `key` at the top level.
    fn key(prefix: &str, key: &str) -> String {
        match prefix {
            "" => key.to_string(),
            p => format!("{p}.{key}"),
        }
    }

    /// The settings of one entry (a `[host."…"]` table or the top level,
    /// whose other keys are in `skip`).
    fn entry(&self, prefix: &str, t: &dyn toml_edit::TableLike, skip: &[&str]) -> Result<HostConfig, HostsError> {
        let mut cfg = HostConfig::default();
        for (k, item) in t.iter() {
            let key = Self::key(prefix, k);
            match k {
                _ if skip.contains(&k) => {}
                "capabilities" => {
                    let mut caps = Capabilities(0);
                    for v in self.strings(&key, item)? {
                        caps = caps.union(match v.to_ascii_lowercase().as_str() {
                            "pull" => Capabilities::PULL,
                            "resolve" => Capabilities::RESOLVE,
                            "push" => Capabilities::PUSH,
                            "referrers" => Capabilities::REFERRERS,
                            other => return Err(self.err(&key, format!("unknown capability {other:?}"))),
                        });
                    }
                    // An empty list means containerd's default, as an absent one.
                    cfg.capabilities = (caps.0 != 0).then_some(caps);
                }
                "ca" => match item.as_str() {
                    Some(s) => cfg.tls.ca = vec![self.abs(s)],
                    None => cfg.tls.ca = self.strings(&key, item)?.iter().map(|s| self.abs(s)).collect(),
                },
                "client" => cfg.tls.client = self.client(&key, item)?,
                "skip_verify" => {
                    cfg.tls.skip_verify = Some(item.as_bool().ok_or_else(|| self.err(&key, "is not a boolean"))?)
                }
                "override_path" => {
                    item.as_bool().ok_or_else(|| self.err(&key, "is not a boolean"))?;
                }
                "dial_timeout" => {
                    let s = item.as_str().ok_or_else(|| self.err(&key, "is not a string"))?;
                    let d = go_duration(s)
                        .ok_or_else(|| self.err(&key, format!("{s:?} is not a duration like \"500ms\" or \"2s\"")))?;
                    cfg.tls.dial_timeout = Some(d);
                }
                "header" => {
                    let h = item.as_table_like().ok_or_else(|| self.err(&key, "is not a table"))?;
                    for (name, v) in h.iter() {
                        let hk = format!("{key}.{name}");
                        let values = match v.as_str() {
                            Some(s) => vec![s.to_string()],
                            None => self.strings(&hk, v)?,
                        };
                        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                            return Err(self.err(&hk, "is not a valid header name"));
                        }
                        if values
                            .iter()
                            .any(|v| reqwest::header::HeaderValue::from_str(v).is_err())
                        {
                            return Err(self.err(&hk, "has a value that is not a valid header value"));
                        }
                        cfg.header.push((name.to_string(), values));
                    }
                }
                // A mirror's own mirrors are not a thing; other keys are typos.
                _ => return Err(self.err(&key, "unknown key")),
            }
        }
        Ok(cfg)
    }

    /// An array of strings.
    fn strings(&self, key: &str, item: &Item) -> Result<Vec<String>, HostsError> {
        let arr = item
            .as_array()
            .ok_or_else(|| self.err(key, "is not an array of strings"))?;
        arr.iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.err(key, "is not an array of strings"))
    }

    /// `client`: a path, an array of paths, or an array of [cert, key] pairs
    /// (an empty key: the key is in the certificate file).
    fn client(&self, key: &str, item: &Item) -> Result<Vec<(PathBuf, Option<PathBuf>)>, HostsError> {
        if let Some(s) = item.as_str() {
            return Ok(vec![(self.abs(s), None)]);
        }
        let arr = item
            .as_array()
            .ok_or_else(|| self.err(key, "is not a path, an array of paths or of [cert, key] pairs"))?;
        let mut out = Vec::new();
        for v in arr.iter() {
            match v {
                Value::String(s) => out.push((self.abs(s.value()), None)),
                Value::Array(pair) => {
                    let parts: Option<Vec<&str>> = pair.iter().map(Value::as_str).collect();
                    match parts.as_deref() {
                        Some([cert, key_file]) => {
                            out.push((self.abs(cert), (!key_file.is_empty()).then(|| self.abs(key_file))))
                        }
                        _ => return Err(self.err(key, "a pair must be [certificate, key] (two strings)")),
                    }
                }
                _ => return Err(self.err(key, "entries must be paths or [cert, key] pairs")),
            }
        }
        Ok(out)
    }

    /// Paths in the file are relative to its directory.
    fn abs(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// containerd's URL rules: no scheme means https; the path is cleaned and
    /// gets `/v2` appended unless it ends with it or `override_path` is set.
    fn url(&self, key: &str, s: &str, override_path: bool) -> Result<HostUrl, HostsError> {
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("https://{s}")
        };
        let u = reqwest::Url::parse(&with_scheme).map_err(|e| self.err(key, format!("{s:?} is not a URL: {e}")))?;
        let scheme = u.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(self.err(key, format!("{s:?}: scheme must be http or https")));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| self.err(key, format!("{s:?} has no host")))?;
        let host = match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut path = clean_path(u.path());
        if !override_path && !path.ends_with("/v2") {
            path.push_str("/v2");
        }
        Ok(HostUrl {
            scheme: scheme.to_string(),
            host,
            path,
        })
    }
}

/// Go's `path.Clean` for an absolute URL path, without a trailing slash
/// (the root is "").
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.iter().map(|s| format!("/{s}")).collect()
}

/// A Go duration string (`time.ParseDuration`, as containerd's hosts.toml and kubelet's
/// credential-provider config write them): decimal numbers with units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, e.g. "300ms", "1.5s", "1m30s".
pub fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos = match &rest[..u] {
            "ns" => 1e0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[u..];
        total += value * nanos;
    }
    (total.is_finite() && total < 1e18).then(|| Duration::from_nanos(total as u64))
}

#[cfg(test)]
#[path = "hosts_tests.rs"]
mod tests;
