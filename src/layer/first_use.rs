//! A plain gzip or uncompressed tar layer that no trusted index covers, on its
//! first use on this node (`[index] build_on_first_use`): one streaming
//! download builds its checkpoint index (the build checks the layer digest)
//! and writes the layer's tar on the way, and the layer is then served from
//! that tar, as containerd would serve its unpacked copy: the node fetches
//! each blob once and inflates it once. The index comes with it: it is kept as
//! built here (trusted) and, with `[index] publish`, pushed to that
//! repository, where nodes listing it in `[index] repositories` find it: from
//! the second node on, the layer is lazy with no indexing step anywhere.
//!
//! Nothing is served before the layer digest is checked, so the integrity
//! policy is unchanged: what a container reads was hashed to the digest the
//! image manifest names.

use super::download::tar_path;
use super::gzip_index::{index_blob, layout_of, repo_tag, ARTIFACT_TYPE};
use super::{LayerContext, LayerError};
use crate::digest::Digest;
use crate::index::{gzip, IndexError};
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
    #[error("layer {layer}: writing its tar at {path}: {source}")]
    Tar {
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
/// checks the layer digest), writing the layer's tar (the inflated output, or
/// the blob itself when uncompressed) to `tar` if given; it is complete and
/// synced when this returns `Ok`.
pub async fn stream_index(
    registry: &Registry,
    image: &Reference,
    desc: &LayerDescriptor,
    span: u64,
    task: &Task,
    tar: Option<&Path>,
) -> Result<Built, BuildError> {
    let layer = desc.digest.clone();
    let kept = match tar {
        Some(path) => Some((
            std::fs::File::create(path).map_err(|source| BuildError::Tar {
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
    let (deadline, stall) = registry.stream_limits(size);
    // The builder sees an error, never more bytes than the descriptor states, a stall or a
    // stream past its deadline (the digest check comes only at the end).
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no byte for {stall:?}, or the stream took over {deadline:?}"),
        )
    };
    let forward = async move {
        let mut body = resp.bytes_stream();
        let (started, mut total) = (tokio::time::Instant::now(), 0u64);
        loop {
            let next = match tokio::time::timeout_at(
                (started + deadline).min(tokio::time::Instant::now() + stall),
                body.next(),
            )
            .await
            {
                Ok(Some(Ok(c))) if total + c.len() as u64 > size => Err(std::io::Error::other(format!(
                    "the blob is longer than the {size} bytes its descriptor states"
                ))),
                Ok(Some(Ok(c))) => Ok(c),
                // reqwest's own read timeout is the stall timer too.
                Ok(Some(Err(e))) if e.is_timeout() => Err(timed_out()),
                // `without_url`: after a redirect the URL may be a presigned one.
                Ok(Some(Err(e))) => Err(std::io::Error::other(with_causes(&e.without_url()))),
                Ok(None) => break,
                Err(_) => Err(timed_out()),
            };
            let failed = next.is_err();
            if let Ok(c) = &next {
                task.advance(c.len() as u64);
                total += c.len() as u64;
            }
            if tx.send(next).await.is_err() || failed {
                break;
            }
        }
    };
    let (l, layout) = (layer.clone(), layout_of(&desc.media_type));
    let build = tokio::task::spawn_blocking(move || {
        let mut input = ChannelReader {
            rx,
            current: Bytes::new(),
            keep: None,
        };
        let mut tar = kept.map(|(file, path)| (std::io::BufWriter::with_capacity(1 << 20, file), path));
        let built = match (layout, &mut tar) {
            (gzip::Layout::Deflate, Some((out, _))) => gzip::build_into(&l, span, &mut input, Some(out)),
            (gzip::Layout::Deflate, None) => gzip::build(&l, span, &mut input),
            (gzip::Layout::Stored, tar) => {
                input.keep = tar.as_mut().map(|(out, _)| out as &mut dyn Write);
                gzip::build_stored(&l, span, &mut input)
            }
        };
        let (meta, windows) = built?;
        if let Some((out, path)) = tar {
            let synced = out.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all());
            synced.map_err(|source| BuildError::Tar {
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

/// An error and its causes on one line (reqwest's own message alone says
/// little: "error decoding response body").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line = format!("{line}: {c}");
        cause = c.source();
    }
    line
}

/// The layer's bytes as they arrive, for the blocking builder; copied to
/// `keep` on the way (an uncompressed layer's tar).
struct ChannelReader<'a> {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    keep: Option<&'a mut dyn Write>,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    let chunk = chunk?;
                    if let Some(out) = &mut self.keep {
                        out.write_all(&chunk)
                            .map_err(|e| std::io::Error::other(format!("writing the layer's tar: {e}")))?;
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

/// Indexes the layer from one streaming download that also leaves its tar
/// where `download::open_unpacked` serves it from; publishes the index in the
/// background. `false`: the layer cannot be indexed (multi-member gzip, bad
/// deflate data), which is logged; the caller takes its normal path.
#[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
pub async fn index_here(
    ctx: &LayerContext,
    first_use: &FirstUse,
    image: &Reference,
    desc: &LayerDescriptor,
) -> Result<bool, LayerError> {
    let layer = &desc.digest;
    let other = |reason: String| LayerError::Other {
        image: image.to_string(),
        layer: layer.clone(),
        reason,
    };
    std::fs::create_dir_all(&ctx.layers_dir)
        .map_err(|e| other(format!("creating {}: {e}", ctx.layers_dir.display())))?;
    let started = std::time::Instant::now();
    let partial = ctx.layers_dir.join(format!("{}.tar.first-use", layer.hex()));
    let task = crate::progress::Progress::default().layer(layer, desc.size);
    let built = match stream_index(&ctx.registry, image, desc, first_use.span, &task, Some(&partial)).await {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            if matches!(e, BuildError::Index(_)) {
                warn!(error = %e, "layer cannot be indexed on first use; it takes the normal path");
                return Ok(false);
            }
            return Err(other(e.to_string()));
        }
    };
    ctx.indexes
        .store(layer, &built.bytes)
        .map_err(|e| other(format!("storing its index: {e}")))?;
    let tar = tar_path(&ctx.layers_dir, layer);
    std::fs::rename(&partial, &tar).map_err(|e| other(format!("renaming {}: {e}", partial.display())))?;
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
    Ok(true)
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
