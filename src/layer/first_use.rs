//! A plain gzip or uncompressed tar layer that no trusted index covers, on its
//! first use on this node (`[index] build_on_first_use`): one streaming
//! download builds its checkpoint index (the build checks the layer digest)
//! and keeps the blob, and the layer is then served through that index from
//! the kept blob. So the node fetches what containerd's unpack would have
//! fetched, once, and the index comes with it: it is kept as built here
//! (trusted) and, with `[index] publish`, pushed to that repository, where
//! nodes listing it in `[index] repositories` find it: from the second node
//! on, the layer is lazy with no indexing step anywhere.
//!
//! Nothing is served before the layer digest is checked, so the integrity
//! policy is unchanged: what a container reads was hashed to the digest the
//! image manifest names.

use super::gzip_index::{index_blob, layout_of, repo_tag, ARTIFACT_TYPE};
use super::{LayerContext, LayerError};
use crate::digest::Digest;
use crate::fetch::{FileSource, KeptBlob};
use crate::index::{gzip, IndexError, LayerIndex};
use crate::progress::Task;
use crate::registry::{LayerDescriptor, Reference, Registry, RegistryError};
use bytes::Bytes;
use futures::StreamExt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{info, warn};

/// Output bytes between checkpoints of an index built on first use (as `streamsnap index`'s default).
pub const FIRST_USE_SPAN: u64 = 4 << 20;
/// Layer bytes between two progress log lines of a streaming build.
const LOG_EVERY: u64 = 256 << 20;

/// How the layers of this node are indexed on first use.
#[derive(Clone, Debug)]
pub struct FirstUse {
    /// Output bytes between checkpoints.
    pub span: u64,
    /// Repository each index built here is pushed to, tagged by layer digest.
    pub publish: Option<Reference>,
}

/// Why a streaming build gave no index.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("layer {layer}: fetching the blob: {source}")]
    Registry {
        layer: Digest,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("layer {layer}: keeping the blob at {path}: {source}")]
    Keep {
        layer: Digest,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: the index build task failed: {reason}")]
    Task { layer: Digest, reason: String },
}

/// What a streaming build made.
pub struct Built {
    /// The index file's bytes (`docs/gzip-index.md`).
    pub bytes: Vec<u8>,
    pub checkpoints: usize,
    pub entries: usize,
}

/// Streams the layer's blob once into the checkpoint index builder (which
/// checks the layer digest), copying every byte to `keep` if given; the copy
/// is complete and synced when this returns `Ok`.
pub async fn stream_index(
    registry: &Registry,
    image: &Reference,
    desc: &LayerDescriptor,
    span: u64,
    task: &Task,
    keep: Option<&Path>,
) -> Result<Built, BuildError> {
    let layer = desc.digest.clone();
    let kept = match keep {
        Some(path) => Some((
            std::fs::File::create(path).map_err(|source| BuildError::Keep {
                layer: layer.clone(),
                path: path.to_path_buf(),
                source,
            })?,
            path.to_path_buf(),
        )),
        None => None,
    };
    let resp = registry
        .open_blob(image, &layer)
        .await
        .map_err(|source| BuildError::Registry {
            layer: layer.clone(),
            source,
        })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
    let size = desc.size;
    let forward = async move {
        let mut body = resp.bytes_stream();
        let (mut total, mut next_log) = (0u64, LOG_EVERY);
        while let Some(chunk) = body.next().await {
            if let Ok(c) = &chunk {
                task.advance(c.len() as u64);
                total += c.len() as u64;
                if total >= next_log {
                    info!(streamed = total, of = size, "indexing layer");
                    next_log += LOG_EVERY;
                }
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
    let (l, layout) = (layer.clone(), layout_of(&desc.media_type));
    let build = tokio::task::spawn_blocking(move || {
        let mut input = ChannelReader {
            rx,
            current: Bytes::new(),
            keep: kept.map(|(file, path)| (std::io::BufWriter::with_capacity(1 << 20, file), path)),
            kept_error: None,
        };
        let built = match layout {
            gzip::Layout::Deflate => gzip::build(&l, span, &mut input),
            gzip::Layout::Stored => gzip::build_stored(&l, span, &mut input),
        };
        if let Some(source) = input.kept_error.take() {
            let path = input.keep.map(|(_, p)| p).unwrap_or_default();
            return Err(BuildError::Keep { layer: l, path, source });
        }
        let (meta, windows) = built?;
        if let Some((out, path)) = input.keep.take() {
            let synced = out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all());
            synced.map_err(|source| BuildError::Keep {
                layer: l.clone(),
                path,
                source,
            })?;
        }
        let bytes = gzip::format::write(&meta, &windows).map_err(|e| IndexError::layer(&l, e.to_string()))?;
        Ok(Built {
            bytes,
            checkpoints: meta.checkpoints.len(),
            entries: meta.entries.len(),
        })
    });
    let ((), built) = tokio::join!(forward, build);
    built.map_err(|e| BuildError::Task {
        layer,
        reason: e.to_string(),
    })?
}

/// The layer's bytes as they arrive, for the blocking builder; copied to
/// `keep` on the way (a failed copy ends the input, and is reported).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    keep: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
    kept_error: Option<std::io::Error>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    let chunk = chunk?;
                    if let Some((out, _)) = &mut self.keep {
                        if let Err(e) = out.write_all(&chunk) {
                            let message = format!("keeping the blob: {e}");
                            self.kept_error = Some(e);
                            return Err(std::io::Error::other(message));
                        }
                    }
                    self.current = chunk;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

/// Where a layer indexed on first use keeps its blob.
pub fn blob_path(layers_dir: &Path, layer: &Digest) -> PathBuf {
    layers_dir.join(format!("{}.blob", layer.hex()))
}

/// The blob kept for `layer`, if any.
pub fn kept_blob(layers_dir: &Path, layer: &Digest) -> std::io::Result<KeptBlob> {
    let path = blob_path(layers_dir, layer);
    let file = Arc::new(std::fs::File::open(&path)?);
    Ok(KeptBlob(FileSource { path, file }))
}

/// Indexes the layer from one streaming download and opens it through that
/// index, served from the kept blob; publishes the index in the background.
/// `Ok(None)`: the layer cannot be indexed (multi-member gzip, say), which is
/// logged; the caller takes its normal path.
#[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
pub async fn open_indexed_here(
    ctx: &LayerContext,
    first_use: &FirstUse,
    image: &Reference,
    desc: &LayerDescriptor,
) -> Result<Option<(LayerIndex, Arc<KeptBlob>)>, LayerError> {
    let layer = &desc.digest;
    let other = |reason: String| LayerError::Other {
        image: image.to_string(),
        layer: layer.clone(),
        reason,
    };
    std::fs::create_dir_all(&ctx.layers_dir)
        .map_err(|e| other(format!("creating {}: {e}", ctx.layers_dir.display())))?;
    let path = blob_path(&ctx.layers_dir, layer);
    let started = std::time::Instant::now();
    // An index built here needs its blob: rebuilt (one download) when the blob is gone.
    if !path.exists() || !ctx.indexes.path(layer).exists() {
        let partial = ctx.layers_dir.join(format!("{}.blob.partial", layer.hex()));
        let task = crate::progress::Progress::default().layer(layer, desc.size);
        let built = stream_index(&ctx.registry, image, desc, first_use.span, &task, Some(&partial)).await;
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                if matches!(e, BuildError::Index(_)) {
                    warn!(error = %e, "layer cannot be indexed on first use; it takes the normal path");
                    return Ok(None);
                }
                return Err(other(e.to_string()));
            }
        };
        ctx.indexes
            .store(layer, &built.bytes)
            .map_err(|e| other(format!("storing its index: {e}")))?;
        std::fs::rename(&partial, &path).map_err(|e| other(format!("renaming {}: {e}", partial.display())))?;
        info!(
            checkpoints = built.checkpoints,
            entries = built.entries,
            index_bytes = built.bytes.len(),
            layer_bytes = desc.size,
            secs = started.elapsed().as_secs_f64(),
            "layer indexed on first use"
        );
        if let Some(repo) = &first_use.publish {
            tokio::spawn(publish(
                Arc::clone(&ctx.registry),
                repo.clone(),
                layer.clone(),
                built.bytes,
            ));
        }
    }
    let Some(index) = ctx.indexes.open(&ctx.registry, image, desc).await else {
        return Err(other("the index built on first use does not open".into()));
    };
    let kept = kept_blob(&ctx.layers_dir, layer).map_err(|e| other(format!("opening {}: {e}", path.display())))?;
    Ok(Some((index, Arc::new(kept))))
}

/// Pushes one layer's index to `repo`, tagged by its layer digest, where
/// `gzip_index` looks for it. A failure costs only the other nodes' laziness.
async fn publish(registry: Arc<Registry>, repo: Reference, layer: Digest, bytes: Vec<u8>) {
    let blobs = vec![index_blob(&layer, Bytes::from(bytes))];
    match registry
        .push_artifact(&repo, ARTIFACT_TYPE, blobs, None, &[repo_tag(&layer)])
        .await
    {
        Ok(artifact) => info!(layer = %layer, repo = %repo, artifact = %artifact, "gzip index published"),
        Err(e) => warn!(layer = %layer, repo = %repo, error = %e, "publishing the gzip index failed"),
    }
}
