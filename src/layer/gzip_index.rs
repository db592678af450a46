//! Where checkpoint indexes (of gzip and of uncompressed tar layers) are
//! found, and which are trusted. An index decides every byte and every mode
//! bit a container sees, and a forger can recompute its span digests, so its
//! checks bind nothing: trust comes from where it came from.
//!
//! Trusted: an index built on this node (`streamsnap index` checks the layer
//! digest while building) or fetched from a repository the operator lists
//! (`[index] repositories`), both kept in `<state>/indexes/<hex>.trusted.gzindex`;
//! and an index the image manifest itself binds: the layer's descriptor names
//! the index blob's digest ([`PINNED_ANNOTATION`]), so pinning the image pins
//! the index (kept as `<hex>.pinned-<index hex>.gzindex`, used only for
//! layers whose descriptor names that digest).
//! Artifacts referring to the image (referrers API or fallback tag) can be
//! pushed by anyone who can push to the image's repository: they are used
//! only when `[index] trust_referrers` is set, and kept apart
//! (`<hex>.referrer.gzindex`) so that turning the switch off stops them.
//! An index that fails its checks is logged, dropped, and the next source is
//! tried; with none, the layer takes the normal path (downloaded whole).
//! `<hex>.gzindex` files of earlier versions, whose source is unknown (they
//! were taken from referrers too), are never opened and are removed when seen.

use crate::digest::Digest;
use crate::flight::Flights;
use crate::index::{gzip, LayerIndex};
use crate::registry::referrers::{ArtifactBlob, ArtifactLayer};
use crate::registry::{BodyLimit, LayerDescriptor, Reference, Registry, RegistryError};
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
/// Layer descriptor annotation in an image manifest: the digest of that
/// layer's index blob, stored in the image's repository.
pub const PINNED_ANNOTATION: &str = "io.streamsnap.gzip-index.digest";
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

/// One index as an artifact blob, annotated with the layer it indexes.
pub fn index_blob(layer: &Digest, data: bytes::Bytes) -> ArtifactBlob {
    ArtifactBlob {
        media_type: ARTIFACT_TYPE.into(),
        data,
        annotations: HashMap::from([(LAYER_ANNOTATION.to_string(), layer.to_string())]),
    }
}

/// Index blobs by the layer they index.
type IndexBlobs = Arc<HashMap<Digest, ArtifactLayer>>;
/// What asking the registry for an image's index artifacts gave.
type ImageIndexes = Result<IndexBlobs, Arc<RegistryError>>;

/// Finds, fetches and opens checkpoint indexes from trusted sources.
pub struct IndexStore {
    dir: PathBuf,
    /// Repositories the operator trusts for indexes.
    repos: Vec<Reference>,
    /// Whether indexes pushed as referrers of the image are used (opt-in).
    trust_referrers: bool,
    /// Index blobs referring to each image manifest, by layer: asked once per image.
    by_image: Flights<Digest, ImageIndexes>,
}

impl IndexStore {
    /// A store over `dir` trusting what is built here, indexes in `repos`,
    /// and, only with `trust_referrers`, indexes referring to the image.
    pub fn new(dir: PathBuf, repos: Vec<Reference>, trust_referrers: bool) -> Self {
        Self {
            dir,
            repos,
            trust_referrers,
            by_image: Flights::caching(NonZeroUsize::new(IMAGES_KEPT).expect("non-zero"), |found| match found {
                Ok(blobs) if blobs.is_empty() => Some(RECHECK_AFTER),
                Ok(_) => Some(FOUND_KEPT_FOR),
                Err(_) => None,
            }),
        }
    }

    /// Local index file of `layer` from a trusted source (built here, or from
    /// a listed repository).
    pub fn path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("{}.trusted.gzindex", layer.hex()))
    }

    /// Local index file of `layer` found as a referrer of its image: opened
    /// only while referrers are trusted.
    pub fn referrer_path(&self, layer: &Digest) -> PathBuf {
        self.dir.join(format!("{}.referrer.gzindex", layer.hex()))
    }

    /// Stores an index file built on this node (or fetched from a trusted
    /// repository), atomically, in the local cache.
    pub fn store(&self, layer: &Digest, bytes: &[u8]) -> std::io::Result<PathBuf> {
        store_at(&self.dir, &self.path(layer), bytes)
    }

    /// Local index file of `layer` bound by its image manifest to `index`.
    fn pinned_path(&self, layer: &Digest, index: &Digest) -> PathBuf {
        self.dir.join(format!("{}.pinned-{}.gzindex", layer.hex(), index.hex()))
    }

    /// The layer's index from the first trusted source that has a valid one:
    /// the local cache, the index the manifest pins, each listed index
    /// repository, then (only when referrers are trusted) the image's referrers.
    #[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
    pub async fn open(
        &self,
        registry: &Arc<Registry>,
        image: &Reference,
        desc: &LayerDescriptor,
    ) -> Option<LayerIndex> {
        // Kept by an earlier version from any source, referrers included: not trusted.
        let _ = std::fs::remove_file(self.dir.join(format!("{}.gzindex", desc.digest.hex())));
        let path = self.path(&desc.digest);
        if path.exists() {
            if let Some(idx) = self.open_file(&path, desc).await {
                return Some(idx);
            }
        }
        if let Some(pinned) = desc.annotations.get(PINNED_ANNOTATION) {
            match pinned.parse::<Digest>() {
                Ok(index) => {
                    let path = self.pinned_path(&desc.digest, &index);
                    if path.exists() {
                        if let Some(idx) = self.open_file(&path, desc).await {
                            return Some(idx);
                        }
                    }
                    if let Some(idx) = self.fetch_and_open(registry, image, &index, None, desc, &path).await {
                        return Some(idx);
                    }
                }
                Err(e) => warn!(error = %e, "annotation {PINNED_ANNOTATION} is not a digest; ignored"),
            }
        }
        for repo in &self.repos {
            match registry.artifact_layers(repo, &repo_tag(&desc.digest)).await {
                Ok(blobs) => {
                    if let Some(b) = blobs.into_iter().find(|b| indexes(b, &desc.digest)) {
                        if let Some(idx) = self
                            .fetch_and_open(registry, repo, &b.digest, Some(b.size), desc, &path)
                            .await
                        {
                            return Some(idx);
                        }
                    }
                }
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => warn!(repo = %repo, error = %e, "index repository lookup failed"),
            }
        }
        if !self.trust_referrers {
            return None;
        }
        let path = self.referrer_path(&desc.digest);
        if path.exists() {
            if let Some(idx) = self.open_file(&path, desc).await {
                return Some(idx);
            }
        }
        if let Some(manifest) = &image.digest {
            match self.image_indexes(registry, image, manifest).await {
                Ok(blobs) => {
                    if let Some(b) = blobs.get(&desc.digest) {
                        warn!(index = %b.digest, "using a gzip index pushed as a referrer of the image (trust_referrers is set)");
                        if let Some(idx) = self
                            .fetch_and_open(registry, image, &b.digest, Some(b.size), desc, &path)
                            .await
                        {
                            return Some(idx);
                        }
                    }
                }
                Err(e) => warn!(error = %e, "looking for a gzip index next to the image failed"),
            }
        }
        None
    }

    /// Fetches index blob `digest` (of `size` bytes, when known) from `repo`
    /// (the read checks the digest), keeps it locally at `dest` and opens it;
    /// `None` (logged) when it cannot be had or fails its checks.
    async fn fetch_and_open(
        &self,
        registry: &Registry,
        repo: &Reference,
        digest: &Digest,
        size: Option<u64>,
        desc: &LayerDescriptor,
        dest: &Path,
    ) -> Option<LayerIndex> {
        let most = desc.size / MAX_INDEX_SHARE + (1 << 20);
        if size.is_some_and(|s| s > most) {
            warn!(repo = %repo, size, "gzip index artifact is implausibly large for its layer; ignored");
            return None;
        }
        // Never more than `most`: a size the descriptor states is at most that.
        let limit = BodyLimit::new("gzip index", size.unwrap_or(most));
        let bytes = match registry.read_blob(repo, digest, limit).await {
            Ok(b) => b,
            Err(e) => {
                warn!(repo = %repo, index = %digest, error = %e, "fetching the gzip index failed");
                return None;
            }
        };
        let path = match store_at(&self.dir, dest, &bytes) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot store the gzip index");
                return None;
            }
        };
        info!(repo = %repo, index = %digest, bytes = bytes.len(), "gzip index fetched");
        self.open_file(&path, desc).await
    }

    async fn open_file(&self, path: &Path, desc: &LayerDescriptor) -> Option<LayerIndex> {
        let (p, layer, size) = (path.to_path_buf(), desc.digest.clone(), desc.size);
        let layout = layout_of(&desc.media_type);
        let opened = tokio::task::spawn_blocking(move || gzip::open(&p, &layer, size, layout)).await;
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

/// Writes `bytes` to `path` in `dir` through a temporary name.
fn store_at(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(path.to_path_buf())
}

/// How an index of a layer of this media type maps onto its blob.
pub fn layout_of(media_type: &str) -> gzip::Layout {
    if super::is_plain_tar(media_type) {
        gzip::Layout::Stored
    } else {
        gzip::Layout::Deflate
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A gzip layer of one file, its descriptor, and its index file's bytes.
    fn indexed_layer() -> (LayerDescriptor, Vec<u8>) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/greeting", &b"hello"[..]).unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&b.into_inner().unwrap()).unwrap();
        let gz = e.finish().unwrap();
        let digest = Digest::of(&gz);
        let (meta, windows) = gzip::build(&digest, 1 << 20, &gz[..]).unwrap();
        let desc = LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest,
            size: gz.len() as u64,
            annotations: HashMap::new(),
        };
        (desc, gzip::format::write(&meta, &windows).unwrap())
    }

    #[tokio::test]
    async fn an_index_kept_from_a_referrer_is_opened_only_while_referrers_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (desc, bytes) = indexed_layer();
        let registry = Arc::new(Registry::new(Default::default()).unwrap());
        // No manifest digest: nothing is asked of a registry.
        let image: Reference = "localhost:1/app:v1".parse().unwrap();
        let untrusting = IndexStore::new(dir.path().into(), Vec::new(), false);
        store_at(dir.path(), &untrusting.referrer_path(&desc.digest), &bytes).unwrap();
        assert!(untrusting.open(&registry, &image, &desc).await.is_none());
        let trusting = IndexStore::new(dir.path().into(), Vec::new(), true);
        assert!(trusting.open(&registry, &image, &desc).await.is_some());
    }

    #[tokio::test]
    async fn an_index_kept_by_an_earlier_version_is_not_trusted_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (desc, bytes) = indexed_layer();
        let registry = Arc::new(Registry::new(Default::default()).unwrap());
        let image: Reference = "localhost:1/app:v1".parse().unwrap();
        let legacy = dir.path().join(format!("{}.gzindex", desc.digest.hex()));
        std::fs::write(&legacy, &bytes).unwrap();
        let store = IndexStore::new(dir.path().into(), Vec::new(), false);
        assert!(store.open(&registry, &image, &desc).await.is_none());
        assert!(!legacy.exists());
    }

    #[tokio::test]
    async fn an_index_built_here_is_trusted_without_any_repository() {
        let dir = tempfile::tempdir().unwrap();
        let (desc, bytes) = indexed_layer();
        let registry = Arc::new(Registry::new(Default::default()).unwrap());
        let image: Reference = "localhost:1/app:v1".parse().unwrap();
        let store = IndexStore::new(dir.path().into(), Vec::new(), false);
        store.store(&desc.digest, &bytes).unwrap();
        assert!(store.open(&registry, &image, &desc).await.is_some());
    }
}
