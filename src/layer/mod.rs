//! One lazily served layer: picks the index form for its media type and
//! annotations, builds the index and the fetcher that serves its bytes.

pub mod download;
pub mod first_use;
pub mod gzip_index;
pub mod record;

use crate::digest::Digest;
use crate::fetch::{self, Fetcher, RangeSource, RegistrySource, SourceError};
use crate::index::{self, IndexError, LayerIndex};
use crate::registry::{LayerDescriptor, Reference, Registry, RegistryError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// Chunk size used to split files of tar layers downloaded whole.
pub const TAR_CHUNK_SIZE: u64 = 1 << 20;

/// How a layer is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFormat {
    /// eStargz TOC bound by the `toc.digest` annotation; chunks fetched by
    /// range and verified by `chunkDigest`.
    Estargz,
    /// zstd:chunked TOC bound by its manifest-checksum annotation; likewise.
    ZstdChunked,
    /// Uncompressed tar with a trusted index; spans fetched by range and
    /// checked against the index's span digests.
    Tar,
    /// Unmodified gzip with a checkpoint index; spans fetched by range.
    GzipIndex,
    /// Any other layer: downloaded whole, verified, decompressed locally.
    Downloaded,
    /// Plain gzip or tar whose tar is kept here, unpacked from one download
    /// (digest checked): on first use, its index built on the way, or by an
    /// earlier download; served from that tar.
    Unpacked,
}

/// What everything that opens layers shares.
pub struct LayerContext {
    pub registry: Arc<Registry>,
    /// Caches, request scheduler and metrics every fetcher of the node shares.
    pub fetch: fetch::Services,
    /// Where downloaded layers are kept (decompressed tar per digest).
    pub layers_dir: PathBuf,
    /// Checkpoint indexes of gzip layers.
    pub indexes: Arc<gzip_index::IndexStore>,
    /// Longest wait for landmark files before a layer counts as mounted (0: no prefetch).
    pub prefetch_timeout: std::time::Duration,
    /// Background fill of mounted layers.
    pub fill: crate::prefetch::background::FillConfig,
    /// Start-up profiles: recorded, replayed.
    pub profiles: Arc<crate::prefetch::profile::Profiles>,
    /// Index unindexed plain gzip and tar layers on first use (`[index] build_on_first_use`).
    pub first_use: Option<first_use::FirstUse>,
}

/// A layer ready to mount.
pub struct Layer {
    pub digest: Digest,
    pub format: LayerFormat,
    pub fetcher: Arc<Fetcher>,
    /// The blob's size, from the manifest.
    pub size: u64,
    /// What the landmark prefetch did (`None`: the layer marks no landmark files).
    pub prefetched: Option<crate::prefetch::Prefetched>,
    /// What a start-up profile did when the layer was opened.
    pub profile: crate::prefetch::ProfileUse,
    /// Where the background fill is.
    pub fill: Arc<crate::prefetch::background::FillState>,
}

impl Layer {
    pub fn index(&self) -> &Arc<LayerIndex> {
        self.fetcher.index()
    }
}

/// A layer that cannot be opened; names the image and the layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("image {image}: {source}")]
    Index {
        image: String,
        #[source]
        source: IndexError,
    },
    #[error("image {image}: layer {layer}: {source}")]
    Registry {
        image: String,
        layer: Digest,
        #[source]
        source: RegistryError,
    },
    #[error("image {image}: layer {layer}: {reason}")]
    Other {
        image: String,
        layer: Digest,
        reason: String,
    },
    #[error("image {image}: layer {layer} ({media_type}) cannot be read lazily")]
    NotLazy {
        image: String,
        layer: Digest,
        media_type: String,
    },
}

/// Whether a layer that cannot be read lazily may be downloaded whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Download,
    Refuse,
}

/// Descriptor annotation of eStargz layers.
pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// A gzip-compressed tar layer (OCI or Docker media type).
pub fn is_gzip(media_type: &str) -> bool {
    media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip")
}

fn is_zstd(media_type: &str) -> bool {
    media_type.ends_with("+zstd")
}

pub fn is_plain_tar(media_type: &str) -> bool {
    media_type.ends_with(".tar") || media_type.ends_with("diff.tar")
}

/// Opens one layer of `image`: lazily where its form allows, else by download.
#[tracing::instrument(skip_all, fields(image = %image, layer = %desc.digest))]
pub async fn open(
    ctx: &LayerContext,
    image: &Reference,
    desc: &LayerDescriptor,
    fallback: Fallback,
) -> Result<Layer, LayerError> {
    open_from(ctx, image, desc, fallback, None).await
}

/// Opens a layer served before (a restart, a reboot) from its record alone
/// (`record`): no registry request until a read needs bytes not cached, no
/// prefetch. `None` when there is no usable record.
pub async fn reopen(ctx: &LayerContext, layer: &Digest) -> Option<Result<Layer, LayerError>> {
    let record = record::load(&ctx.layers_dir, layer)?;
    let image: Reference = record.image.parse().ok()?;
    let desc = record.descriptor()?;
    Some(open_from(ctx, &image, &desc, Fallback::Refuse, Some(Arc::new(record))).await)
}

async fn open_from(
    ctx: &LayerContext,
    image: &Reference,
    desc: &LayerDescriptor,
    fallback: Fallback,
    recorded: Option<Arc<record::LayerRecord>>,
) -> Result<Layer, LayerError> {
    let started = Instant::now();
    let name = image.to_string();
    let layer = desc.digest.clone();
    let remote: Arc<dyn RangeSource> = Arc::new(RegistrySource {
        registry: Arc::clone(&ctx.registry),
        repo: image.clone(),
        digest: desc.digest.clone(),
    });
    // Index reads come from the record, or from the registry and are recorded.
    let recorder = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let read = |offset: u64, len: u64| {
        let (remote, recorded, recorder) = (Arc::clone(&remote), recorded.clone(), Arc::clone(&recorder));
        async move {
            if let Some(r) = recorded {
                return r.read(offset, len).ok_or(SourceError::NotRecorded { offset, len });
            }
            let bytes = remote.read(offset, len).await?;
            recorder.lock().push((offset, bytes.to_vec()));
            Ok(bytes)
        }
    };
    let mt = desc.media_type.as_str();
    let index_err = |source| LayerError::Index {
        image: name.clone(),
        source,
    };
    let download = || async {
        match fallback {
            Fallback::Download => download::open_downloaded(ctx, image, desc).await,
            Fallback::Refuse => Err(LayerError::NotLazy {
                image: name.clone(),
                layer: layer.clone(),
                media_type: mt.to_string(),
            }),
        }
    };
    // Served from its kept tar if it has one (unpacked here, digest checked), else lazily
    // under a trusted index, else, with `[index] build_on_first_use`, indexed and unpacked
    // here from one download, else downloaded or refused.
    let (remote_lazy, fresh) = (Arc::clone(&remote), recorded.is_none());
    let local_or_lazy = |lazy: LayerFormat| async move {
        if let Some((idx, tar)) = download::open_unpacked(ctx, image, desc).await? {
            return Ok((LayerFormat::Unpacked, idx, tar));
        }
        if let Some(idx) = ctx.indexes.open(&ctx.registry, image, desc).await {
            return Ok((lazy, idx, remote_lazy));
        }
        if let Some(first) = ctx.first_use.as_ref().filter(|_| fresh) {
            if first_use::index_here(ctx, first, image, desc).await? {
                if let Some((idx, tar)) = download::open_unpacked(ctx, image, desc).await? {
                    return Ok((LayerFormat::Unpacked, idx, tar));
                }
            }
        }
        download().await
    };
    let (format, index, source) = if is_gzip(mt) {
        // eStargz only when the manifest binds its TOC: a footer alone proves nothing.
        match desc.annotations.get(ESTARGZ_TOC_DIGEST) {
            Some(s) => {
                let toc_digest = s.parse::<Digest>().map_err(|e| LayerError::Other {
                    image: name.clone(),
                    layer: layer.clone(),
                    reason: format!("annotation {ESTARGZ_TOC_DIGEST}: {e}"),
                })?;
                let idx = index::estargz::index_estargz(&layer, desc.size, &toc_digest, read)
                    .await
                    .map_err(index_err)?;
                (LayerFormat::Estargz, idx, remote)
            }
            None => local_or_lazy(LayerFormat::GzipIndex).await?,
        }
    } else if is_zstd(mt) {
        if index::zstd_chunked::is_bound(&desc.annotations) {
            let idx = index::zstd_chunked::index_zstd_chunked(&layer, desc.size, &desc.annotations, read)
                .await
                .map_err(index_err)?;
            (LayerFormat::ZstdChunked, idx, remote)
        } else {
            download().await?
        }
    } else if is_plain_tar(mt) {
        // Tar headers and bytes carry no digest of their own: lazily only under
        // a trusted index whose span digests check every byte.
        local_or_lazy(LayerFormat::Tar).await?
    } else {
        return Err(LayerError::Other {
            image: name,
            layer,
            reason: format!("unsupported layer media type {mt}"),
        });
    };
    let index = Arc::new(index);
    info!(
        ?format,
        files = index.nodes.len(),
        content_bytes = index.content_bytes(),
        ms = started.elapsed().as_millis() as u64,
        "layer indexed"
    );
    if recorded.is_none() && format != LayerFormat::Downloaded {
        let rec = record::LayerRecord::new(&name, desc, std::mem::take(&mut *recorder.lock()));
        if let Err(e) = record::save(&ctx.layers_dir, &layer, &rec) {
            warn!(layer = %layer, error = %e, "cannot record the layer: after a reboot it needs the registry to be mounted");
        }
    }
    let fetcher = Fetcher::new(layer.clone(), index, source, &ctx.fetch);
    let mut prefetched = None;
    if !fetcher.index().prefetch.is_empty() && recorded.is_none() {
        prefetched = Some(crate::prefetch::landmarks(&fetcher, ctx.prefetch_timeout).await);
    }
    let mut profile = crate::prefetch::ProfileUse::None;
    if format != LayerFormat::Downloaded && recorded.is_none() {
        profile = ctx
            .profiles
            .on_layer_open(&ctx.registry, image, &fetcher, ctx.prefetch_timeout)
            .await;
    }
    // Runs while the layer is mounted (it holds the fetcher weakly).
    let target = crate::prefetch::background::Target {
        image: name.clone(),
        size: desc.size,
    };
    let fill = Arc::default();
    drop(crate::prefetch::background::spawn_reporting(
        &fetcher,
        ctx.fill.clone(),
        target,
        Arc::clone(&fill),
    ));
    Ok(Layer {
        digest: layer,
        format,
        fetcher,
        size: desc.size,
        prefetched,
        profile,
        fill,
    })
}

/// Does a gzip layer end in an eStargz footer? (One 51-byte range read.)
pub async fn has_estargz_footer(
    registry: &Registry,
    image: &Reference,
    desc: &LayerDescriptor,
) -> Result<bool, RegistryError> {
    let n = index::estargz::FOOTER_SIZE;
    if desc.size < n {
        return Ok(false);
    }
    let tail = registry.read_blob_range(image, &desc.digest, desc.size - n, n).await?;
    Ok(index::estargz::parse_footer(&tail).is_some())
}
