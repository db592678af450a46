//! The daemon's configuration: one serde tree from TOML; unknown keys are
//! errors; every field has a default that works on a single machine.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default config file location.
pub const DEFAULT_PATH: &str = "/etc/streamsnap/config.toml";
/// Largest config file we read (a typo'd path to a huge file fails fast).
const MAX_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State directory: metadata, snapshots, cache.
    pub root: PathBuf,
    /// Unix socket containerd connects to.
    pub address: PathBuf,
    /// Registries (`host:port`) reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Bound of the on-disk chunk cache, e.g. "10GiB".
    pub cache_size: String,
    /// Bound of the in-memory chunk cache.
    pub memory_cache_size: String,
    /// Platform whose manifest is used when an image is an index.
    pub platform: String,
    /// Serve Prometheus metrics on this TCP address (e.g. "127.0.0.1:9580"); off when unset.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Repositories (`host/path`) holding gzip indexes by layer digest, for
    /// images whose own repository users cannot write to.
    pub index_repositories: Vec<String>,
    /// Longest wait, in seconds, for a layer's landmark files (eStargz
    /// `.prefetch.landmark`) before the layer is reported mounted; 0 disables.
    pub prefetch_timeout_secs: f64,
    /// Fetch the rest of every mounted layer into the cache in the background.
    pub background_fill: bool,
    /// Seconds after a layer is mounted before its background fill starts.
    pub background_fill_delay_secs: f64,
    /// Bandwidth cap of background fill per second, e.g. "100MiB" (unset: none).
    pub background_fill_rate: Option<String>,
    /// Seconds without reads that end the recording of an image's start-up profile.
    pub profile_quiet_secs: f64,
    /// Publish each recorded profile next to its image (referrers / fallback tag).
    pub profile_push: bool,
    /// Replay known start-up profiles when layers are mounted.
    pub profile_replay: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/streamsnap"),
            address: PathBuf::from("/run/streamsnap/streamsnap.sock"),
            insecure_registries: Vec::new(),
            cache_size: "10GiB".into(),
            memory_cache_size: "256MiB".into(),
            platform: "linux/amd64".into(),
            metrics_address: None,
            index_repositories: Vec::new(),
            prefetch_timeout_secs: 10.0,
            background_fill: false,
            background_fill_delay_secs: 5.0,
            background_fill_rate: None,
            profile_quiet_secs: 5.0,
            profile_push: false,
            profile_replay: true,
        }
    }
}

/// A config file that cannot be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field} = {value:?}: {reason}")]
    Value {
        path: PathBuf,
        field: &'static str,
        value: String,
        reason: String,
    },
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
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.size("cache_size", &cfg.cache_size, &path)?;
        cfg.size("memory_cache_size", &cfg.memory_cache_size, &path)?;
        if let Some(r) = &cfg.background_fill_rate {
            cfg.size("background_fill_rate", r, &path)?;
        }
        for r in &cfg.index_repositories {
            r.parse::<crate::registry::Reference>()
                .map_err(|e| ConfigError::Value {
                    path: path.clone(),
                    field: "index_repositories",
                    value: r.clone(),
                    reason: e.reason,
                })?;
        }
        Ok(cfg)
    }

    /// `prefetch_timeout_secs` as a duration (negative or NaN: none).
    pub fn prefetch_timeout(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.prefetch_timeout_secs).unwrap_or_default()
    }

    /// How layers are served, from this config.
    pub fn layer_options(&self) -> crate::image_mount::LayerOptions {
        crate::image_mount::LayerOptions {
            cache_size: self.cache_bytes(),
            mem_size: self.memory_cache_bytes(),
            index_repos: self.index_repos(),
            prefetch_timeout: self.prefetch_timeout(),
            fill: self.fill(),
            profile_quiet: std::time::Duration::try_from_secs_f64(self.profile_quiet_secs)
                .unwrap_or(std::time::Duration::from_secs(5)),
            profile_push: self.profile_push,
            profile_replay: self.profile_replay,
        }
    }

    /// The background fill settings (validated at load).
    pub fn fill(&self) -> crate::prefetch::background::FillConfig {
        crate::prefetch::background::FillConfig {
            enabled: self.background_fill,
            delay: std::time::Duration::try_from_secs_f64(self.background_fill_delay_secs).unwrap_or_default(),
            rate: self
                .background_fill_rate
                .as_deref()
                .and_then(|r| r.parse::<bytesize::ByteSize>().ok())
                .map(|b| b.as_u64()),
        }
    }

    /// `index_repositories` as references (validated at load; bad ones skipped).
    pub fn index_repos(&self) -> Vec<crate::registry::Reference> {
        self.index_repositories.iter().filter_map(|r| r.parse().ok()).collect()
    }

    fn size(&self, field: &'static str, value: &str, path: &Path) -> Result<u64, ConfigError> {
        value
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|reason| ConfigError::Value {
                path: path.to_path_buf(),
                field,
                value: value.to_string(),
                reason,
            })
    }

    /// `cache_size` in bytes (validated at load).
    pub fn cache_bytes(&self) -> u64 {
        self.cache_size
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .unwrap_or(10 << 30)
    }

    pub fn memory_cache_bytes(&self) -> u64 {
        self.memory_cache_size
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .unwrap_or(256 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "root = \"/x\"\ncache_sise = \"1GiB\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("cache_sise") && e.contains("c.toml"), "{e}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_but_the_default_may_be_absent() {
        assert!(Config::load(Some(Path::new("/nonexistent/streamsnap.toml"))).is_err());
    }

    #[test]
    fn fields_default_and_sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "insecure_registries = [\"r:5000\"]\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.address, PathBuf::from("/run/streamsnap/streamsnap.sock"));
        assert_eq!(c.insecure_registries, vec!["r:5000"]);
        std::fs::write(&p, "cache_size = \"lots\"\n").unwrap();
        assert!(Config::load(Some(&p)).unwrap_err().to_string().contains("cache_size"));
    }

    #[test]
    fn index_repositories_must_be_references() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "index_repositories = [\"reg:5000/team/indexes\"]\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.index_repos()[0].repository, "team/indexes");
        std::fs::write(&p, "index_repositories = [\"Not A Repo\"]\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("index_repositories") && e.contains("Not A Repo"), "{e}");
    }
}
