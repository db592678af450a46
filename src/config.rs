//! The daemon's configuration: one serde tree from TOML, one typed section per
//! subsystem; unknown keys are errors; every field has a default that works on
//! a single machine. Values are parsed once, here: sizes, durations, platforms
//! and references arrive typed. This module imports no subsystem; each
//! subsystem (or the composition root, [`crate::node`]) builds its own settings
//! from a section.
//!
//! ```toml
//! root = "/var/lib/streamsnap"
//! address = "/run/streamsnap/streamsnap.sock"
//! metrics_address = "127.0.0.1:9580"
//! [registry]
//! insecure = ["host:5000"]
//! platform = "linux/amd64"
//! config_path = "/etc/containerd/certs.d"
//! [cache]
//! disk_size = "10GiB"
//! memory_size = "64MiB"
//! [index]
//! repositories = ["reg:5000/team/indexes"]
//! trust_referrers = false
//! [fetch]
//! read_deadline = 60.0
//! stall_timeout = 10.0
//! read_ahead = "16MiB"
//! [prefetch]
//! timeout = 10.0
//! [background_fill]
//! enabled = false
//! delay = 5.0
//! rate = "100MiB"
//! [profile]
//! quiet = 5.0
//! push = false
//! replay = true
//! replay_budget = "1GiB"
//! [credentials]
//! docker_config = "/root/.docker/config.json"
//! provider_config = "/etc/kubernetes/credential-provider.json"
//! provider_bin_dir = "/usr/libexec/kubernetes/credential-provider"
//! exec_timeout = 30.0
//! [cri]
//! proxy_address = "/run/streamsnap/cri.sock"
//! containerd_address = "/run/containerd/containerd.sock"
//! ```

use crate::registry::{Platform, Reference};
use bytesize::ByteSize;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default config file location.
pub const DEFAULT_PATH: &str = "/etc/streamsnap/config.toml";
/// Largest config file we read (a typo'd path to a huge file fails fast).
const MAX_SIZE: u64 = 1 << 20;

/// The whole configuration of one node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory: metadata, snapshots, cache.
    pub root: PathBuf,
    /// Unix socket containerd connects to.
    pub address: PathBuf,
    /// Serve Prometheus metrics on this TCP address (e.g. "127.0.0.1:9580"); off when unset.
    pub metrics_address: Option<SocketAddr>,
    pub registry: Registry,
    pub cache: Cache,
    pub index: Index,
    pub fetch: Fetch,
    pub prefetch: Prefetch,
    pub background_fill: BackgroundFill,
    pub profile: Profile,
    pub credentials: Credentials,
    pub cri: Cri,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/streamsnap"),
            address: PathBuf::from("/run/streamsnap/streamsnap.sock"),
            metrics_address: None,
            registry: Registry::default(),
            cache: Cache::default(),
            index: Index::default(),
            fetch: Fetch::default(),
            prefetch: Prefetch::default(),
            background_fill: BackgroundFill::default(),
            profile: Profile::default(),
            credentials: Credentials::default(),
            cri: Cri::default(),
        }
    }
}

/// `[registry]`: how registries are reached and which manifest is used.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure: Vec<RegistryHost>,
    /// Platform whose manifest is used when an image is an index.
    pub platform: Platform,
    /// containerd's registry host directory (its CRI `registry.config_path`;
    /// several separated by ':' are searched in order): `<dir>/<host>/hosts.toml`
    /// names mirrors tried before the registry. Unset: registries are reached directly.
    pub config_path: Option<PathBuf>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            platform: "linux/amd64".parse().expect("a valid platform"),
            config_path: None,
        }
    }
}

/// `[cache]`: bounds of the chunk caches.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// Bound of the on-disk chunk cache, e.g. "10GiB".
    #[serde(deserialize_with = "size")]
    pub disk_size: ByteSize,
    /// Bound of the in-memory chunk cache: chunks read ahead, until read, and gzip span outputs.
    #[serde(deserialize_with = "size")]
    pub memory_size: ByteSize,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            disk_size: ByteSize::gib(10),
            memory_size: ByteSize::mib(64),
        }
    }
}

/// `[index]`: where checkpoint indexes (and start-up profiles) are looked up,
/// and which sources are trusted.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Index {
    /// Repositories (`host/path`) holding checkpoint indexes (and start-up
    /// profiles) by digest. Trusted: list only repositories whose writers
    /// you trust as much as the images themselves.
    pub repositories: Vec<Reference>,
    /// Also use indexes and profiles pushed as referrers of the image (which
    /// anyone able to push to the image's repository can add). Off by default.
    pub trust_referrers: bool,
    /// A plain gzip or uncompressed tar layer no trusted index covers is
    /// downloaded by streamsnap itself, once, building its index and its tar
    /// on the way (checked against the layer digest before anything is
    /// served), and then served from that tar; off: containerd unpacks it
    /// (`serve`) or it is downloaded and unpacked (`mount`).
    pub build_on_first_use: bool,
    /// Repository (`host/path`) every index built on first use is pushed to,
    /// tagged by layer digest: list it in the other nodes' `repositories`.
    pub publish: Option<Reference>,
}

/// `[fetch]`: how long a read may wait on a registry, and how far ahead of it fetches go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Fetch {
    /// Longest wait of a file read on the registry (all retries included)
    /// before it fails with EIO; also bounds every registry operation.
    pub read_deadline: Seconds,
    /// A registry connection that delivers no byte for this long is dropped
    /// and the request retried on a new one.
    pub stall_timeout: Seconds,
    /// Bytes fetched ahead of each sequential reader and held in memory
    /// until read, e.g. "8MiB": less saves memory, at some speed on fast links.
    #[serde(deserialize_with = "size")]
    pub read_ahead: ByteSize,
}

impl Default for Fetch {
    fn default() -> Self {
        Self {
            read_deadline: Seconds::from_secs(60),
            stall_timeout: Seconds::from_secs(10),
            read_ahead: ByteSize::b(crate::fetch::READ_AHEAD),
        }
    }
}

/// `[prefetch]`: landmark and profile prefetch before a layer is reported mounted.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Prefetch {
    /// Longest wait for a layer's landmark files (eStargz `.prefetch.landmark`)
    /// or profile ranges before the layer is reported mounted; 0 disables.
    pub timeout: Seconds,
}

impl Default for Prefetch {
    fn default() -> Self {
        Self {
            timeout: Seconds::from_secs(10),
        }
    }
}

/// `[background_fill]`: the rest of every mounted layer fetched at the lowest priority.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackgroundFill {
    /// Fetch the rest of every mounted layer into the cache in the background.
    pub enabled: bool,
    /// Time after a layer is mounted before its fill starts.
    pub delay: Seconds,
    /// Bandwidth cap of the fill per second, e.g. "100MiB" (unset: none).
    #[serde(deserialize_with = "optional_size")]
    pub rate: Option<ByteSize>,
}

impl Default for BackgroundFill {
    fn default() -> Self {
        Self {
            enabled: false,
            delay: Seconds::from_secs(5),
            rate: None,
        }
    }
}

/// `[profile]`: start-up profiles, recorded and replayed.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// Time without reads that ends the recording of an image's start-up profile.
    pub quiet: Seconds,
    /// Publish each recorded profile next to its image (referrers / fallback tag).
    pub push: bool,
    /// Replay known start-up profiles when layers are mounted.
    pub replay: bool,
    /// Most layer bytes one layer's profile replay may fetch: a profile only
    /// chooses what is prefetched, and only this much of it.
    #[serde(deserialize_with = "size")]
    pub replay_budget: ByteSize,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            quiet: Seconds::from_secs(5),
            push: false,
            replay: true,
            replay_budget: ByteSize::gib(1),
        }
    }
}

/// `[credentials]`: where registry credentials come from besides anonymous
/// access: kubelet credential-provider plugins (off unless both provider keys
/// are set), then docker's config.json.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    /// docker's config.json, re-read when it changes (unset: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// kubelet's `CredentialProviderConfig` (its `--image-credential-provider-config`).
    pub provider_config: Option<PathBuf>,
    /// Where its plugins are (kubelet's `--image-credential-provider-bin-dir`).
    pub provider_bin_dir: Option<PathBuf>,
    /// Longest run of a credential helper or provider plugin before it is killed.
    pub exec_timeout: Seconds,
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            docker_config: None,
            provider_config: None,
            provider_bin_dir: None,
            exec_timeout: Seconds::from_secs(30),
        }
    }
}

/// `[cri]`: CRI's ImageService served on a socket of ours in front of
/// containerd's (kubelet's `--image-service-endpoint`), so that each pull's
/// own auth reaches the lazily served layers of its image. Off unless
/// `proxy_address` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cri {
    /// The proxy's unix socket (e.g. `/run/streamsnap/cri.sock`).
    pub proxy_address: Option<PathBuf>,
    /// containerd's socket, where every call goes on.
    pub containerd_address: PathBuf,
}

impl Default for Cri {
    fn default() -> Self {
        Self {
            proxy_address: None,
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

/// A size written as a string with a unit ("10GiB", "1.5 MB") or a number of
/// bytes; a bad one is refused with the reason.
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a size: a string such as \"10GiB\" or a number of bytes")]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bytes(b) => Ok(ByteSize(b)),
        Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

fn optional_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    size(d).map(Some)
}

/// A duration written as a non-negative, finite number of seconds (`2`, `0.5`),
/// in the config file and on the command line alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub Duration);

impl Seconds {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    fn from_f64(secs: f64) -> Result<Self, ValueError> {
        Duration::try_from_secs_f64(secs)
            .map(Self)
            .map_err(|_| ValueError::Seconds(secs))
    }
}

impl From<Seconds> for Duration {
    fn from(s: Seconds) -> Self {
        s.0
    }
}

impl FromStr for Seconds {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let secs: f64 = s.trim().parse().map_err(|_| ValueError::NotSeconds(s.to_string()))?;
        Self::from_f64(secs)
    }
}

/// A value of the config file or command line that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("{0}: expected a non-negative, finite number of seconds")]
    Seconds(f64),
    #[error("{0:?}: expected a number of seconds")]
    NotSeconds(String),
    #[error("invalid registry {host:?}: {why}")]
    RegistryHost { host: String, why: &'static str },
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // f64 accepts TOML integers too (`delay = 5`).
        Self::from_f64(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A registry named as `host[:port]` (no scheme, no path), e.g. `reg.local:5000`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryHost(String);

impl RegistryHost {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RegistryHost {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let err = |why: &'static str| ValueError::RegistryHost {
            host: s.to_string(),
            why,
        };
        if s.contains('/') {
            return Err(err("expected host[:port], without scheme or path"));
        }
        let (host, port) = match s.rsplit_once(':') {
            // `[::1]` has colons but no port.
            Some((h, p)) if !p.ends_with(']') => (h, Some(p)),
            _ => (s, None),
        };
        let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
        let host_ok =
            bracketed || (!host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)));
        if !host_ok {
            return Err(err("expected host[:port], without scheme or path"));
        }
        if let Some(p) = port {
            p.parse::<u16>().map_err(|_| err("invalid port"))?;
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RegistryHost {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A config file that cannot be used; names the file (and, for a bad value, the key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path`; a missing default file means defaults, a missing explicit one is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        if md.len() > MAX_SIZE {
            return Err(ConfigError::TooLarge { path });
        }
        // The cap holds while reading too: a file may grow, or be a device.
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_SIZE + 1), &mut bytes))
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_SIZE {
            return Err(ConfigError::TooLarge { path });
        }
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &path)
    }

    /// Parses config text read from `path` (public for the fuzz targets).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // toml's error quotes the offending line (key and value).
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
