//! `streamsnap index`: builds the checkpoint index of every plain gzip or
//! uncompressed tar layer of an image (one streaming download each, checked
//! against the layer digest), keeps it in the local index cache (trusted: it
//! was built here) and optionally publishes it as an OCI artifact referring to
//! the image or in an index repository.

use crate::digest::Digest;
use crate::index::IndexError;
use crate::layer::first_use::{stream_index, BuildError};
use crate::layer::gzip_index::{index_blob, repo_tag, IndexStore, ARTIFACT_TYPE};
use crate::layer::{has_estargz_footer, is_gzip, is_plain_tar, ESTARGZ_TOC_DIGEST};
use crate::registry::referrers::Subject;
use crate::registry::{LayerDescriptor, Platform, Reference, Registry, RegistryError, ResolvedImage};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tracing::info;

/// Layers indexed at once (each keeps a core busy inflating and hashing).
const PARALLEL_LAYERS: usize = 2;

pub struct IndexOptions {
    /// Output bytes between checkpoints.
    pub span: u64,
    /// Layers smaller than this are left to be fetched whole.
    pub min_layer_size: u64,
    pub platform: Platform,
    /// Publish next to the image (referrers, fallback tag).
    pub push: bool,
    /// Publish in this repository instead, tagged per layer.
    pub index_repo: Option<Reference>,
    /// Where the layers' downloads show their progress.
    pub progress: crate::progress::Progress,
}

/// What happened to one layer.
#[derive(Debug)]
pub enum LayerOutcome {
    Indexed {
        layer: Digest,
        layer_size: u64,
        index_size: u64,
        checkpoints: usize,
        entries: usize,
    },
    Skipped {
        layer: Digest,
        reason: String,
    },
}

#[derive(Debug)]
pub struct IndexReport {
    pub layers: Vec<LayerOutcome>,
    /// Where the artifact went: repository and manifest digest.
    pub pushed: Option<(Reference, Digest)>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    #[error("image {image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error("image {image}: {source}")]
    Index {
        image: String,
        #[source]
        source: IndexError,
    },
    #[error("image {image}: layer {layer}: {reason}")]
    Layer {
        image: String,
        layer: Digest,
        reason: String,
    },
}

/// Indexes `image` into `store` and publishes the result as asked.
#[tracing::instrument(skip_all, fields(image = %image))]
pub async fn index_image(
    registry: &Registry,
    store: &IndexStore,
    image: &Reference,
    opts: &IndexOptions,
) -> Result<IndexReport, IndexerError> {
    let name = image.to_string();
    let reg_err = |source| IndexerError::Registry {
        image: name.clone(),
        source,
    };
    let resolved = registry.resolve(image, &opts.platform).await.map_err(reg_err)?;
    let layers: Vec<LayerOutcome> = futures::stream::iter(resolved.layers.iter())
        .map(|desc| index_layer(registry, store, &resolved, desc, opts))
        .buffered(PARALLEL_LAYERS)
        .try_collect()
        .await?;
    let indexed: Vec<&Digest> = layers
        .iter()
        .filter_map(|l| match l {
            LayerOutcome::Indexed { layer, .. } => Some(layer),
            LayerOutcome::Skipped { .. } => None,
        })
        .collect();
    let target = match (&opts.index_repo, opts.push) {
        (Some(repo), _) => Some(repo.clone()),
        (None, true) => Some(Reference {
            tag: None,
            digest: None,
            ..image.clone()
        }),
        (None, false) => None,
    };
    let pushed = match target {
        Some(repo) if !indexed.is_empty() => {
            let digest = publish(registry, store, &resolved, &indexed, &repo, opts.index_repo.is_some())
                .await
                .map_err(reg_err)?;
            info!(repo = %repo, artifact = %digest, layers = indexed.len(), "gzip index published");
            Some((repo, digest))
        }
        _ => None,
    };
    Ok(IndexReport { layers, pushed })
}

async fn publish(
    registry: &Registry,
    store: &IndexStore,
    image: &ResolvedImage,
    layers: &[&Digest],
    repo: &Reference,
    tag_layers: bool,
) -> Result<Digest, RegistryError> {
    let mut blobs = Vec::with_capacity(layers.len());
    for l in layers {
        let path = store.path(l);
        let data = std::fs::read(&path).map_err(|source| RegistryError::Io {
            digest: (*l).clone(),
            path,
            source,
        })?;
        blobs.push(index_blob(l, Bytes::from(data)));
    }
    let subject = Subject {
        digest: image.manifest_digest.clone(),
        size: image.manifest.len() as u64,
        media_type: image.media_type.clone(),
    };
    let tags: Vec<String> = if tag_layers {
        layers.iter().map(|l| repo_tag(l)).collect()
    } else {
        Vec::new()
    };
    registry
        .push_artifact(repo, ARTIFACT_TYPE, blobs, Some(&subject), &tags)
        .await
}

#[tracing::instrument(skip_all, fields(layer = %desc.digest))]
async fn index_layer(
    registry: &Registry,
    store: &IndexStore,
    image: &ResolvedImage,
    desc: &LayerDescriptor,
    opts: &IndexOptions,
) -> Result<LayerOutcome, IndexerError> {
    let name = image.reference.to_string();
    let layer = desc.digest.clone();
    let skipped = |reason: &str| {
        Ok(LayerOutcome::Skipped {
            layer: layer.clone(),
            reason: reason.to_string(),
        })
    };
    let mt = desc.media_type.as_str();
    if !is_gzip(mt) && !is_plain_tar(mt) {
        return skipped("not a gzip or uncompressed tar layer");
    }
    if desc.size < opts.min_layer_size {
        return skipped("under the minimum size: fetched whole");
    }
    if is_gzip(mt) {
        if desc.annotations.contains_key(ESTARGZ_TOC_DIGEST) {
            return skipped("eStargz: served from its own TOC");
        }
        if has_estargz_footer(registry, &image.reference, desc)
            .await
            .unwrap_or(false)
        {
            return skipped("eStargz without a TOC digest annotation (multi-member gzip): fetched whole");
        }
    }
    let started = std::time::Instant::now();
    let task = opts.progress.layer(&layer, desc.size);
    let built = stream_index(registry, &image.reference, desc, opts.span, &task, None)
        .await
        .map_err(|e| match e {
            BuildError::Registry { source, .. } => IndexerError::Registry {
                image: name.clone(),
                source,
            },
            BuildError::Index(source) => IndexerError::Index {
                image: name.clone(),
                source,
            },
            other => IndexerError::Layer {
                image: name.clone(),
                layer: layer.clone(),
                reason: other.to_string(),
            },
        })?;
    let (checkpoints, entries, bytes) = (built.checkpoints, built.entries, built.bytes);
    task.finish(&format!("indexed: {checkpoints} checkpoints"));
    store.store(&layer, &bytes).map_err(|e| IndexerError::Layer {
        image: name.clone(),
        layer: layer.clone(),
        reason: format!("storing the index: {e}"),
    })?;
    info!(
        checkpoints,
        entries,
        index_bytes = bytes.len(),
        layer_bytes = desc.size,
        secs = started.elapsed().as_secs_f64(),
        "layer indexed"
    );
    Ok(LayerOutcome::Indexed {
        layer,
        layer_size: desc.size,
        index_size: bytes.len() as u64,
        checkpoints,
        entries,
    })
}
