//! Where gzip checkpoint indexes are found: the local index cache
//! (`<state>/indexes`), artifacts referring to the image (referrers API or
//! fallback tag), then configured index repositories, keyed by layer digest.
//! An index that fails its checks is logged, dropped, and the next source is
//! tried; with none, the layer is served as before.

use crate::digest::Digest;
use crate::index::{gzip, LayerIndex};
use crate::registry::referrers::ArtifactLayer;
use crate::registry::{LayerDescriptor, Reference, Registry, RegistryError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// `artifactType` of index artifacts, and media type of their blobs.
pub const ARTIFACT_TYPE: &str = "application/vnd.streamsnap.gzip-index.v1";
/// Annotation on each blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "io.streamsnap.gzip-index.layer";
/// How long "this image has no index artifact" is believed.
const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// An index larger than this share of its layer (plus 1 MiB) is not fetched.
const MAX_INDEX_SHARE: u64 = 20;

/// Tag of an index artifact in an index repository, one per layer it holds.
pub fn repo_tag(layer: &Digest) -> String {
    format!("gzindex-sha256-{}", layer.hex())
}

/// Index blobs by the layer they index.
type IndexBlobs = Arc<HashMap<Digest, ArtifactLayer>>;

/// Finds, fetches and opens gzip indexes.
pub struct IndexStore {
    dir: PathBuf,
    repos: Vec<Reference>,
    /// Index blobs referring to each image manifest, by layer, and when asked.
    by_image: tokio::sync::Mutex<HashMap<Digest, (Instant, IndexBlobs)>>,
}

impl IndexStore {
    pub fn new(dir: PathBuf, repos: Vec<Reference>) -> Self {
        Self {
            dir,
            repos,
            by_image: Default::default(),
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

    /// The layer's index from the first source that has a valid one.
    #[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
    pub async fn open(&self, registry: &Registry, image: &Reference, desc: &LayerDescriptor) -> Option<LayerIndex> {
        let path = self.path(&desc.digest);
        if path.exists() {
            if let Some(idx) = self.open_file(&path, desc).await {
                return Some(idx);
            }
        }
        let (repo, blob) = match self.find_remote(registry, image, &desc.digest).await {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, "looking for a gzip index failed; serving the layer without one");
                return None;
            }
        };
        if blob.size > desc.size / MAX_INDEX_SHARE + (1 << 20) {
            warn!(
                size = blob.size,
                "gzip index artifact is implausibly large for its layer; ignored"
            );
            return None;
        }
        let bytes = match registry.read_blob(&repo, &blob.digest).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "fetching the gzip index failed; serving the layer without one");
                return None;
            }
        };
        if let Err(e) = self.store(&desc.digest, &bytes) {
            warn!(error = %e, path = %path.display(), "cannot store the gzip index");
            return None;
        }
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

    /// An index blob for `layer`: referrers of the image, then index repositories.
    async fn find_remote(
        &self,
        registry: &Registry,
        image: &Reference,
        layer: &Digest,
    ) -> Result<Option<(Reference, ArtifactLayer)>, RegistryError> {
        if let Some(manifest) = &image.digest {
            let blobs = self.image_indexes(registry, image, manifest).await?;
            if let Some(b) = blobs.get(layer) {
                return Ok(Some((image.clone(), b.clone())));
            }
        }
        for repo in &self.repos {
            match registry.artifact_layers(repo, &repo_tag(layer)).await {
                Ok(blobs) => {
                    if let Some(b) = blobs.into_iter().find(|b| indexes(b, layer)) {
                        return Ok(Some((repo.clone(), b)));
                    }
                }
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => warn!(repo = %repo, error = %e, "index repository lookup failed"),
            }
        }
        Ok(None)
    }

    /// Index blobs of every index artifact referring to the image (asked once per image).
    async fn image_indexes(
        &self,
        registry: &Registry,
        image: &Reference,
        manifest: &Digest,
    ) -> Result<IndexBlobs, RegistryError> {
        let mut cache = self.by_image.lock().await;
        // An image found without indexes is asked again later: it may have been indexed since.
        cache.retain(|_, (at, m)| !m.is_empty() || at.elapsed() < RECHECK_AFTER);
        if let Some((_, m)) = cache.get(manifest) {
            return Ok(Arc::clone(m));
        }
        let mut found = HashMap::new();
        for artifact in registry.referrers(image, manifest, ARTIFACT_TYPE).await? {
            for b in registry.artifact_layers(image, &artifact.to_string()).await? {
                if let Some(l) = b
                    .annotations
                    .get(LAYER_ANNOTATION)
                    .and_then(|l| l.parse::<Digest>().ok())
                {
                    if b.media_type == ARTIFACT_TYPE {
                        found.insert(l, b);
                    }
                }
            }
        }
        let found = Arc::new(found);
        cache.insert(manifest.clone(), (Instant::now(), Arc::clone(&found)));
        Ok(found)
    }
}

fn indexes(b: &ArtifactLayer, layer: &Digest) -> bool {
    b.media_type == ARTIFACT_TYPE && b.annotations.get(LAYER_ANNOTATION).map(String::as_str) == Some(&layer.to_string())
}
