//! The composition root: what one node's layers share (registry client, disk
//! and memory caches, gzip index store, start-up profiles, fill settings,
//! metrics), built from the typed [`Config`]. `serve` and `mount` both start
//! here, so a layer is served the same way by either. A state dir has one
//! owner at a time (`lock`): building a context takes the owner's lock as proof.

pub mod lock;

pub use lock::{LockError, StateLock};

use crate::cache::{DiskCache, MemCache};
use crate::config::{self, Config};
use crate::credentials::docker::DockerConfig;
use crate::credentials::kubelet::Providers;
use crate::credentials::{Chain, PullAuths, Source};
use crate::layer::first_use::{FirstUse, FIRST_USE_SPAN};
use crate::layer::gzip_index::IndexStore;
use crate::layer::LayerContext;
use crate::metrics::{EndpointMetrics, Metrics};
use crate::prefetch::background::FillConfig;
use crate::prefetch::profile::Profiles;
use crate::registry::{Registry, RegistryOptions};
use std::path::PathBuf;
use std::sync::Arc;

/// Where a state dir keeps things.
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }
    pub fn mounts(&self) -> PathBuf {
        self.root.join("mnt")
    }
    pub fn indexes(&self) -> PathBuf {
        self.root.join("indexes")
    }
    pub fn profiles(&self) -> PathBuf {
        self.root.join("profiles")
    }
    /// Pull secrets of CRI pulls, one file per image (`credentials::pull`).
    pub fn pull_auths(&self) -> PathBuf {
        self.root.join("credentials").join("pull")
    }
}

/// The registry client: credentials from `[credentials]`; plain HTTP for loopback
/// registries, the `insecure` ones, and with `plain_http` (one-shot
/// commands' `--plain-http`) every registry; every operation bounded by
/// `[fetch] read_deadline`, every connection by `stall_timeout`.
pub fn registry(config: &Config, plain_http: bool) -> anyhow::Result<Registry> {
    registry_with(config, plain_http, EndpointMetrics::default(), None)
}

/// Read-ahead of every sequential reader, bounded: it is held in memory per reader.
fn read_ahead(fetch: &crate::config::Fetch) -> anyhow::Result<u64> {
    const MAX: u64 = 1 << 30;
    let bytes = fetch.read_ahead.as_u64();
    anyhow::ensure!(
        bytes <= MAX,
        "[fetch] read_ahead is {bytes} bytes: at most 1GiB (held in memory per reader)"
    );
    Ok(bytes)
}

/// [`registry`], counting bytes and failures per endpoint host into `counters`
/// (`Metrics::endpoints`; mirrors come from `[registry] config_path`) and asking
/// `pull_auths` (the CRI pulls' own auth, `serve`) before every other source.
pub fn registry_with(
    config: &Config,
    plain_http: bool,
    counters: EndpointMetrics,
    pull_auths: Option<Arc<PullAuths>>,
) -> anyhow::Result<Registry> {
    let (cfg, fetch) = (&config.registry, &config.fetch);
    anyhow::ensure!(
        !fetch.read_deadline.0.is_zero() && !fetch.stall_timeout.0.is_zero(),
        "[fetch] read_deadline and stall_timeout must be more than 0 seconds"
    );
    Ok(Registry::new(RegistryOptions {
        plain_http,
        insecure: cfg.insecure.iter().map(|h| h.as_str().to_string()).collect(),
        credentials: Arc::new(credentials(&config.credentials, pull_auths)?),
        deadline: fetch.read_deadline.into(),
        stall_timeout: fetch.stall_timeout.into(),
        config_path: cfg.config_path.clone(),
        endpoint_metrics: counters,
        ..Default::default()
    })?)
}

/// The credential sources in the order of design §10: the CRI pull's own auth
/// (when given), then what `[credentials]` names: kubelet credential-provider
/// plugins, then docker's config.json.
pub fn credentials(cfg: &config::Credentials, pull_auths: Option<Arc<PullAuths>>) -> anyhow::Result<Chain> {
    let timeout = cfg.exec_timeout.into();
    let mut sources: Vec<Source> = pull_auths.into_iter().map(Source::PullAuth).collect();
    match (&cfg.provider_config, &cfg.provider_bin_dir) {
        (Some(config), Some(bin)) => sources.push(Source::Kubelet(Providers::load(config, bin, timeout)?)),
        (None, None) => {}
        _ => anyhow::bail!("[credentials] provider_config and provider_bin_dir are set together or not at all"),
    }
    let docker = cfg.docker_config.clone().unwrap_or_else(DockerConfig::default_path);
    sources.push(Source::Docker(DockerConfig::open(&docker, timeout)?));
    Ok(Chain::new(sources))
}

/// What every layer opened on this node shares, under the state dir `owner` holds.
pub fn layer_context(
    config: &Config,
    owner: &StateLock,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<LayerContext> {
    // The lock created the root owner-only (0700): cache files and mount points
    // must not be reachable by host users.
    let state = StateDir {
        root: owner.root().to_path_buf(),
    };
    let repos = &config.index.repositories;
    let trust_referrers = config.index.trust_referrers;
    Ok(LayerContext {
        profiles: Arc::new(
            Profiles::new(
                state.profiles(),
                config.profile.quiet.into(),
                config.profile.push,
                repos.clone(),
            )
            .replaying(config.profile.replay)
            .trusting_referrers(trust_referrers)
            .with_replay_budget(config.profile.replay_budget.as_u64()),
        ),
        prefetch_timeout: config.prefetch.timeout.into(),
        fill: FillConfig::from(&config.background_fill),
        indexes: Arc::new(IndexStore::new(state.indexes(), repos.clone(), trust_referrers)),
        fetch: crate::fetch::Services::new(
            Arc::new(DiskCache::open(&state.cache(), config.cache.disk_size.as_u64())?),
            Arc::new(MemCache::new(config.cache.memory_size.as_u64())),
            metrics,
        )
        .with_read_deadline(config.fetch.read_deadline.into())
        .with_read_ahead(read_ahead(&config.fetch)?),
        registry,
        layers_dir: state.layers(),
        first_use: config.index.build_on_first_use.then(|| FirstUse {
            span: FIRST_USE_SPAN,
            publish: config.index.publish.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;

    #[test]
    fn a_read_ahead_over_1gib_is_refused_naming_the_key() {
        let mut fetch = crate::config::Fetch::default();
        assert_eq!(read_ahead(&fetch).unwrap(), crate::fetch::READ_AHEAD);
        fetch.read_ahead = ByteSize::gib(2);
        let e = read_ahead(&fetch).unwrap_err().to_string();
        assert!(e.contains("[fetch] read_ahead"), "{e}");
    }
}
