//! Where gzip checkpoint indexes are found: the local index cache
//! (`<state>/indexes`), artifacts referring to the image (referrers API or
//! fallback tag), then configured index repositories, keyed by layer digest.
//! An index that fails its checks is logged, dropped, and the next source is
//! tried; with none, the layer is served as before.

use crate::digest::Digest;
use crate::flight::Flights;
use crate::index::{gzip, LayerIndex};
use crate::registry::referrers::ArtifactLayer;
use crate::registry::{LayerDescriptor, Reference, Registry, RegistryError};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// `artifactType` of index artifacts, and media type of their blobs.
pub const ARTIFACT_TYPE: &str = "application/vnd.streamsnap.gzip-index.v1";
/// Annotation on each blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "io.streamsnap.gzip-index.layer";
/// How long "this image has no index artifact" is believed.
const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// How long the index artifacts found for an image are believed.
const FOUND_KEPT_FOR: Duration = Duration::from_secs(3600);
/// Images whose index artifacts are remembered.
const IMAGES_KEPT: usize = 256;
/// An index larger than this share of its layer (plus 1 MiB) is not fetched.
const MAX_INDEX_SHARE: u64 = 20;

/// Tag of an index artifact in an index repository, one per layer it holds.
pub fn repo_tag(layer: &Digest) -> String {
    format!("gzindex-sha256-{}", layer.hex())
}

/// Index blobs by the layer they index.
type IndexBlobs = Arc<HashMap<Digest, ArtifactLayer>>;
/// What asking the registry for an image's index artifacts gave.
type ImageIndexes = Result<IndexBlobs, Arc<RegistryError>>;

/// Finds, fetches and opens gzip indexes.
pub struct IndexStore {
    dir: PathBuf,
    repos: Vec<Reference>,
    /// Index blobs referring to each image manifest, by layer: asked once per image.
    by_image: Flights<Digest, ImageIndexes>,
}

impl IndexStore {
    pub fn new(dir: PathBuf, repos: Vec<Reference>) -> Self {
        Self {
            dir,
            repos,
            by_image: Flights::caching(NonZeroUsize::new(IMAGES_KEPT).expect("non-zero"), |found| match found {
                Ok(blobs) if blobs.is_empty() => Some(RECHECK_AFTER),
                Ok(_) => Some(FOUND_KEPT_FOR),
                Err(_) => None,
            }),
        }
    }

    /// Local index file of `layer`.
    pub fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("{}.gzindex", layer.hex()))
    }

    /// Stores an index file (atomically) in the local cache.
    pub fn store(&self, layer: &Digest, bytes: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(layer);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The layer's index from the first source that has a valid one: the
    /// local cache, the image's referrers, then each index repository.
    #[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
    pub async fn open(
        &self,
        registry: &Arc<Registry>,
        image: &Reference,
        desc: &LayerDescriptor,
    ) -> Option<LayerIndex> {
        let path = self.path(&desc.digest);
        if path.exists() {
            if let Some(idx) = self.open_file(&path, desc).await {
                return Some(idx);
            }
        }
        if let Some(manifest) = &image.digest {
            match self.image_indexes(registry, image, manifest).await {
                Ok(blobs) => {
                    if let Some(b) = blobs.get(&desc.digest) {
                        if let Some(idx) = self.fetch_and_open(registry, image, b, desc).await {
                            return Some(idx);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "looking for a gzip index next to the image failed"),
            }
        }
        for repo in &self.repos {
            match registry.artifact_layers(repo, &repo_tag(&desc.digest)).await {
                Ok(blobs) => {
                    if let Some(b) = blobs.into_iter().find(|b| indexes(b, &desc.digest)) {
                        if let Some(idx) = self.fetch_and_open(registry, repo, &b, desc).await {
                            return Some(idx);
                        }
                    }
                }
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => warn!(repo = %repo, error = %e, "index repository lookup failed"),
            }
        }
        None
    }

    /// Fetches an index blob from `repo`, keeps it locally and opens it; `None`
    /// (logged) when it cannot be had or fails its checks.
    async fn fetch_and_open(
        &self,
        registry: &Registry,
        repo: &Reference,
        blob: &ArtifactLayer,
        desc: &LayerDescriptor,
    ) -> Option<LayerIndex> {
        if blob.size > desc.size / MAX_INDEX_SHARE + (1 << 20) {
            warn!(repo = %repo, size = blob.size, "gzip index artifact is implausibly large for its layer; ignored");
            return None;
        }
        // At most what the artifact declares (itself capped just above).
        let bytes = match registry.read_blob_capped(repo, &blob.digest, blob.size).await {
            Ok(b) => b,
            Err(e) => {
                warn!(repo = %repo, error = %e, "fetching the gzip index failed");
                return None;
            }
        };
        let path = match self.store(&desc.digest, &bytes) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot store the gzip index");
                return None;
            }
        };
        info!(repo = %repo, index = %blob.digest, bytes = bytes.len(), "gzip index fetched");
        self.open_file(&path, desc).await
    }

    async fn open_file(&self, path: &Path, desc: &LayerDescriptor) -> Option<LayerIndex> {
        let (p, layer, size) = (path.to_path_buf(), desc.digest.clone(), desc.size);
        let opened = tokio::task::spawn_blocking(move || gzip::open(&p, &layer, size)).await;
        match opened {
            Ok(Ok(idx)) => Some(idx),
            Ok(Err(e)) => {
                warn!(error = %e, "gzip index rejected; serving the layer without it");
                let _ = std::fs::remove_file(path);
                None
            }
            Err(e) => {
                warn!(error = %e, "opening the gzip index panicked");
                None
            }
        }
    }

    /// Index blobs of every index artifact referring to the image (asked
    /// once per image, however many of its layers open at once).
    async fn image_indexes(&self, registry: &Arc<Registry>, image: &Reference, manifest: &Digest) -> ImageIndexes {
        let (registry, image, m) = (Arc::clone(registry), image.clone(), manifest.clone());
        let ask = move || async move { referring_indexes(&registry, &image, &m).await.map_err(Arc::new) };
        self.by_image.run(manifest.clone(), ask).await.unwrap_or_else(|e| {
            warn!(error = %e, "looking for gzip indexes next to the image");
            Ok(IndexBlobs::default())
        })
    }
}

/// The index blobs, by layer, of every index artifact whose subject is `manifest`.
async fn referring_indexes(
    registry: &Registry,
    image: &Reference,
    manifest: &Digest,
) -> Result<IndexBlobs, RegistryError> {
    let mut found = HashMap::new();
    for artifact in registry.referrers(image, manifest, ARTIFACT_TYPE).await? {
        for b in registry.artifact_layers(image, &artifact.to_string()).await? {
            let layer = b
                .annotations
                .get(LAYER_ANNOTATION)
                .and_then(|l| l.parse::<Digest>().ok());
            if let (Some(l), true) = (layer, b.media_type == ARTIFACT_TYPE) {
                found.insert(l, b);
            }
        }
    }
    Ok(Arc::new(found))
}

fn indexes(b: &ArtifactLayer, layer: &Digest) -> bool {
    b.media_type == ARTIFACT_TYPE && b.annotations.get(LAYER_ANNOTATION).map(String::as_str) == Some(&layer.to_string())
}
