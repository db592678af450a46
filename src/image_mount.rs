//! `streamsnap mount`: every layer of an image as a lazy FUSE mount, merged
//! read-only by overlayfs at the user's mount point.

use crate::fs::{LayerFs, MountedLayer};
use crate::layer::{self, Layer, LayerContext};
use crate::node::StateDir;
use crate::overlay;
use crate::registry::{Platform, Reference};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

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
        crate::private::dir(&dir)?;
        // Left behind by a run that was killed.
        overlay::unmount_stale(&dir);
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
