//! `streamsnap mount`: every layer of an image as a lazy FUSE mount, merged
//! read-only by overlayfs at the user's mount point.

use crate::cache::{DiskCache, MemCache};
use crate::fs::{LayerFs, MountedLayer};
use crate::layer::gzip_index::IndexStore;
use crate::layer::{self, Layer, LayerContext};
use crate::metrics::Metrics;
use crate::overlay;
use crate::prefetch::background::FillConfig;
use crate::prefetch::profile::Profiles;
use crate::registry::{Platform, Reference, Registry};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

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
}

/// How layers are served on this node.
#[derive(Clone, Debug)]
pub struct LayerOptions {
    /// Bound of the on-disk chunk cache.
    pub cache_size: u64,
    /// Bound of the in-memory chunk cache.
    pub mem_size: u64,
    /// Repositories holding gzip indexes by layer digest.
    pub index_repos: Vec<Reference>,
    /// Longest wait for landmark files before a layer counts as mounted.
    pub prefetch_timeout: std::time::Duration,
    pub fill: FillConfig,
    /// Reads quiet for this long end a start-up profile recording.
    pub profile_quiet: std::time::Duration,
    /// Publish profiles next to their images as soon as they are recorded.
    pub profile_push: bool,
    /// Replay known profiles (off: record only).
    pub profile_replay: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        Self {
            cache_size: 10 << 30,
            mem_size: 256 << 20,
            index_repos: Vec::new(),
            prefetch_timeout: std::time::Duration::from_secs(10),
            fill: FillConfig::default(),
            profile_quiet: std::time::Duration::from_secs(5),
            profile_push: false,
            profile_replay: true,
        }
    }
}

/// Shared services for opening layers under one state dir.
pub fn layer_context(
    state: &StateDir,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    opts: LayerOptions,
) -> anyhow::Result<LayerContext> {
    Ok(LayerContext {
        profiles: Arc::new(
            Profiles::new(
                state.profiles(),
                opts.profile_quiet,
                opts.profile_push,
                opts.index_repos.clone(),
            )
            .replaying(opts.profile_replay),
        ),
        prefetch_timeout: opts.prefetch_timeout,
        fill: opts.fill,
        indexes: Arc::new(IndexStore::new(state.indexes(), opts.index_repos)),
        fetch: crate::fetch::Services::new(
            Arc::new(DiskCache::open(&state.cache(), opts.cache_size)?),
            Arc::new(MemCache::new(opts.mem_size)),
            metrics,
        ),
        registry,
        layers_dir: state.layers(),
    })
}

/// A mounted image; dropping it unmounts everything it mounted, top first.
pub struct MountedImage {
    target: PathBuf,
    overlay_mounted: bool,
    pub layers: Vec<Layer>,
    sessions: Vec<(PathBuf, MountedLayer)>,
}

impl MountedImage {
    /// Bytes fetched from the registry by all layers so far.
    pub fn bytes_fetched(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.fetcher.stats.bytes_fetched.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        if self.overlay_mounted {
            if let Err(e) = overlay::unmount(&self.target, false) {
                warn!(target = %self.target.display(), error = %e, "unmount busy, detaching");
                let _ = overlay::unmount(&self.target, true);
            }
        }
        for (dir, session) in self.sessions.drain(..).rev() {
            drop(session);
            if overlay::is_mountpoint(&dir) {
                let _ = overlay::unmount(&dir, true);
            }
        }
    }
}

/// Resolves `image`, opens and FUSE-mounts each layer, and overlays them at `target`.
pub async fn mount_image(
    ctx: &LayerContext,
    state: &StateDir,
    image: &Reference,
    platform: &Platform,
    target: &Path,
) -> anyhow::Result<MountedImage> {
    let resolved = ctx.registry.resolve(image, platform).await?;
    info!(image = %image, manifest = %resolved.manifest_digest, layers = resolved.layers.len(), "resolved image");
    let opened = futures::future::join_all(
        resolved
            .layers
            .iter()
            .map(|d| layer::open(ctx, &resolved.reference, d, layer::Fallback::Download)),
    )
    .await;
    let mut mounted = MountedImage {
        target: target.to_path_buf(),
        overlay_mounted: false,
        layers: Vec::new(),
        sessions: Vec::new(),
    };
    let runtime = tokio::runtime::Handle::current();
    for layer in opened {
        let layer = layer?;
        let dir = state.mounts().join(layer.digest.hex());
        std::fs::create_dir_all(&dir)?;
        if overlay::is_mountpoint(&dir) {
            // Left behind by a run that was killed.
            overlay::unmount(&dir, true)?;
        }
        let fs = LayerFs::new(Arc::clone(&layer.fetcher), runtime.clone());
        let session = fs
            .mount(&dir, &layer.digest.hex()[..12])
            .map_err(|e| anyhow::anyhow!("mounting layer {} at {}: {e}", layer.digest, dir.display()))?;
        info!(layer = %layer.digest, format = ?layer.format, mountpoint = %dir.display(), "layer mounted");
        mounted.sessions.push((dir, session));
        mounted.layers.push(layer);
    }
    let lowers: Vec<PathBuf> = mounted.sessions.iter().rev().map(|(d, _)| d.clone()).collect();
    std::fs::create_dir_all(target)?;
    overlay::mount_readonly(&lowers, target)
        .map_err(|e| anyhow::anyhow!("mounting image {image} at {}: {e}", target.display()))?;
    mounted.overlay_mounted = true;
    info!(image = %image, target = %target.display(), "image mounted");
    Ok(mounted)
}
