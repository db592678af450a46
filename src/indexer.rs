//! `streamsnap index`: builds the checkpoint index of every plain gzip or
//! uncompressed tar layer of an image (one streaming download each, checked
//! against the layer digest), keeps it in the local index cache (trusted: it
//! was built here) and optionally publishes it as an OCI artifact referring to
//! the image or in an index repository.

use crate::digest::Digest;
use crate::index::{self, gzip, IndexError};
use crate::layer::gzip_index::{layout_of, repo_tag, IndexStore, ARTIFACT_TYPE, LAYER_ANNOTATION};
use crate::layer::{has_estargz_footer, is_gzip, is_plain_tar, ESTARGZ_TOC_DIGEST};
use crate::registry::referrers::{ArtifactBlob, Subject};
use crate::registry::{LayerDescriptor, Platform, Reference, Registry, RegistryError, ResolvedImage};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::io::Read;
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
        blobs.push(ArtifactBlob {
            media_type: ARTIFACT_TYPE.into(),
            data: Bytes::from(data),
            annotations: HashMap::from([(LAYER_ANNOTATION.to_string(), l.to_string())]),
        });
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
    let layout = layout_of(mt);
    let started = std::time::Instant::now();
    let resp = registry
        .open_blob(&image.reference, &layer)
        .await
        .map_err(|source| IndexerError::Registry {
            image: name.clone(),
            source,
        })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    let task = opts.progress.layer(&layer, desc.size);
    let counted = &task;
    let forward = async move {
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            if let Ok(c) = &chunk {
                counted.advance(c.len() as u64);
            }
            // `without_url`: after a redirect the URL may be a presigned one.
            if tx
                .send(chunk.map_err(|e| std::io::Error::other(e.without_url())))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let (l, span) = (layer.clone(), opts.span);
    let build = tokio::task::spawn_blocking(move || {
        let input = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        match layout {
            gzip::Layout::Deflate => gzip::build(&l, span, input),
            gzip::Layout::Stored => gzip::build_stored(&l, span, input),
        }
        .and_then(|(meta, windows)| {
            let bytes =
                gzip::format::write(&meta, &windows).map_err(|e| index::IndexError::layer(&l, e.to_string()))?;
            Ok((meta, bytes))
        })
    });
    let ((), built) = tokio::join!(forward, build);
    let (meta, bytes) = built
        .map_err(|e| IndexerError::Layer {
            image: name.clone(),
            layer: layer.clone(),
            reason: format!("indexer panicked: {e}"),
        })?
        .map_err(|source| IndexerError::Index {
            image: name.clone(),
            source,
        })?;
    task.finish(&format!("indexed: {} checkpoints", meta.checkpoints.len()));
    store.store(&layer, &bytes).map_err(|e| IndexerError::Layer {
        image: name.clone(),
        layer: layer.clone(),
        reason: format!("storing the index: {e}"),
    })?;
    info!(
        checkpoints = meta.checkpoints.len(),
        entries = meta.entries.len(),
        index_bytes = bytes.len(),
        layer_bytes = desc.size,
        secs = started.elapsed().as_secs_f64(),
        "layer indexed"
    );
    Ok(LayerOutcome::Indexed {
        layer,
        layer_size: desc.size,
        index_size: bytes.len() as u64,
        checkpoints: meta.checkpoints.len(),
        entries: meta.entries.len(),
    })
}

/// The layer's bytes as they arrive, for the blocking indexer.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
