//! Layers that cannot be read lazily: download once (streaming, digest
//! checked), decompress to a local tar, index it like any tar.

use super::{LayerContext, LayerError, LayerFormat};
use crate::digest::Digest;
use crate::fetch::{FileSource, RangeSource};
use crate::index::{self, LayerIndex};
use crate::registry::{LayerDescriptor, Reference};
use sha2::Digest as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tracing::info;

pub async fn open_downloaded(
    ctx: &LayerContext,
    image: &Reference,
    desc: &LayerDescriptor,
) -> Result<(LayerFormat, LayerIndex, Arc<dyn RangeSource>), LayerError> {
    let layer = desc.digest.clone();
    let other = |reason: String| LayerError::Other {
        image: image.to_string(),
        layer: layer.clone(),
        reason,
    };
    std::fs::create_dir_all(&ctx.layers_dir)
        .map_err(|e| other(format!("creating {}: {e}", ctx.layers_dir.display())))?;
    let tar_path = tar_path(&ctx.layers_dir, &layer);
    if !tar_path.exists() {
        let blob_path = ctx.layers_dir.join(format!("{}.blob.tmp", layer.hex()));
        let tmp = ctx.layers_dir.join(format!("{}.tar.tmp", layer.hex()));
        let unpacked = async {
            download(ctx, image, desc, &blob_path).await?;
            let (b, t, mt) = (blob_path.clone(), tmp.clone(), desc.media_type.clone());
            tokio::task::spawn_blocking(move || decompress(&mt, &b, &t))
                .await
                .map_err(|e| other(e.to_string()))?
                .map_err(|e| other(format!("decompressing: {e}")))
        }
        .await;
        // Nothing half-written stays behind, whatever failed.
        let _ = std::fs::remove_file(&blob_path);
        if let Err(e) = unpacked {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &tar_path).map_err(|e| other(format!("renaming {}: {e}", tmp.display())))?;
    }
    let (idx, source) = open_unpacked(ctx, image, desc)
        .await?
        .ok_or_else(|| other(format!("{} vanished", tar_path.display())))?;
    Ok((LayerFormat::Downloaded, idx, source))
}

/// Where a layer's tar is kept once its blob was downloaded and checked.
pub fn tar_path(layers_dir: &Path, layer: &Digest) -> PathBuf {
    layers_dir.join(format!("{}.tar", layer.hex()))
}

/// The layer from its kept tar (written only after its download hashed to the
/// layer digest), read raw through a `FileSource`; `None` if there is none.
pub async fn open_unpacked(
    ctx: &LayerContext,
    image: &Reference,
    desc: &LayerDescriptor,
) -> Result<Option<(LayerIndex, Arc<dyn RangeSource>)>, LayerError> {
    let layer = &desc.digest;
    let path = tar_path(&ctx.layers_dir, layer);
    let file = match std::fs::File::open(&path) {
        Ok(f) => Arc::new(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LayerError::Other {
                image: image.to_string(),
                layer: layer.clone(),
                reason: format!("opening {}: {e}", path.display()),
            })
        }
    };
    let size = file.metadata().map_err(|e| LayerError::Other {
        image: image.to_string(),
        layer: layer.clone(),
        reason: format!("{}: {e}", path.display()),
    })?;
    let source = Arc::new(FileSource { path, file });
    let read = |offset: u64, len: u64| {
        let source = Arc::clone(&source);
        async move { source.read(offset, len).await }
    };
    let idx = index::tar::index_tar(layer, size.len(), super::TAR_CHUNK_SIZE, read)
        .await
        .map_err(|source| LayerError::Index {
            image: image.to_string(),
            source,
        })?;
    Ok(Some((idx, source)))
}

/// Streams the blob to `path`, hashing as it goes; fails on a digest or size mismatch.
async fn download(
    ctx: &LayerContext,
    image: &Reference,
    desc: &LayerDescriptor,
    path: &Path,
) -> Result<(), LayerError> {
    let layer = &desc.digest;
    let other = |reason: String| LayerError::Other {
        image: image.to_string(),
        layer: layer.clone(),
        reason,
    };
    let mut resp = ctx
        .registry
        .open_blob(image, layer)
        .await
        .map_err(|source| LayerError::Registry {
            image: image.to_string(),
            layer: layer.clone(),
            source,
        })?;
    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(|e| other(format!("creating {}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let mut next_log = 64 << 20;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| other(format!("downloading: {}", e.without_url())))?
    {
        hasher.update(&chunk);
        total += chunk.len() as u64;
        if total > desc.size {
            return Err(other(format!(
                "blob is longer than the {} bytes its descriptor states",
                desc.size
            )));
        }
        out.write_all(&chunk)
            .await
            .map_err(|e| other(format!("writing {}: {e}", path.display())))?;
        if total >= next_log {
            info!(downloaded = total, of = desc.size, "downloading layer");
            next_log += 64 << 20;
        }
    }
    out.flush().await.map_err(|e| other(e.to_string()))?;
    if total != desc.size {
        return Err(other(format!("download truncated: {total} of {} bytes", desc.size)));
    }
    let actual = Digest::from_hasher(hasher);
    if &actual != layer {
        let _ = std::fs::remove_file(path);
        return Err(other(format!("downloaded content hashes to {actual}")));
    }
    Ok(())
}

fn decompress(media_type: &str, from: &Path, to: &Path) -> std::io::Result<()> {
    let input = std::io::BufReader::new(std::fs::File::open(from)?);
    let mut reader: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(input)?)
    } else {
        Box::new(input)
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(to)?);
    std::io::copy(&mut reader, &mut out)?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}
