//! The snapshotter's part of `streamsnap status`: every layer behind a
//! committed snapshot, by image, from the mounted layers (their fetchers,
//! landmark prefetch, fill and cached bytes) and the snapshot store (layers
//! containerd unpacked itself, snapshots not mounted again yet).

use super::{RemoteLayers, RemountState};
use crate::endpoint::StatusSource;
use crate::fetch::Proof;
use crate::layer::{Layer, LayerFormat};
use crate::prefetch::background::{FillEnd, FillPhase};
use crate::prefetch::ProfileUse;
use crate::snapshotter::{Kind, Snapshots};
use crate::status::{CacheUse, Fill, Form, ImageStatus, LayerStatus, NodeStatus, Prefetch, Profile, Served};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::warn;

/// The daemon's status: its lazily served layers and its snapshot store.
pub struct DaemonStatus {
    pub remote: Arc<RemoteLayers>,
    pub snapshots: Arc<Snapshots>,
}

impl StatusSource for DaemonStatus {
    fn status(&self) -> NodeStatus {
        let mut s = self.remote.status(&self.snapshots);
        s.ready = self.not_ready().is_none();
        s
    }

    fn not_ready(&self) -> Option<String> {
        let n = self.remote.remounts_pending();
        (n > 0).then(|| format!("{n} lazily served snapshots are still being mounted again after the restart"))
    }
}

impl RemoteLayers {
    /// Snapshots whose re-mount after the restart is under way.
    fn remounts_pending(&self) -> usize {
        self.remounts
            .lock()
            .values()
            .filter(|r| matches!(r.state, RemountState::Pending(_)))
            .count()
    }

    /// Every committed layer snapshot, grouped by image in snapshot order (the
    /// image's lower layers first); `ready` is left to the caller.
    pub fn status(&self, snapshots: &Snapshots) -> NodeStatus {
        let mut records = snapshots.records().unwrap_or_else(|e| {
            warn!(error = %e, "cannot list snapshots for the status");
            Vec::new()
        });
        records.sort_by_key(|(_, r)| r.id);
        let mut images: Vec<ImageStatus> = Vec::new();
        {
            let mounts = self.mounts.lock();
            for (_, rec) in records {
                let (image, layer) = match (&rec.remote, rec.kind) {
                    (Some(remote), _) => {
                        let layer = match mounts.get(&rec.id) {
                            Some((_, layer)) => self.layer_status(layer),
                            None => not_mounted(&remote.layer),
                        };
                        (remote.image.clone(), layer)
                    }
                    // containerd unpacked it: the Prepare's labels named the image and layer.
                    (None, Kind::Committed) => match RemoteLayers::target(&rec.labels) {
                        Some(t) => (t.image.to_string(), unpacked(&t.layer.to_string())),
                        None => continue,
                    },
                    (None, _) => continue,
                };
                match images.iter_mut().find(|i| i.image == image) {
                    Some(i) => i.layers.push(layer),
                    None => images.push(ImageStatus {
                        image,
                        layers: vec![layer],
                    }),
                }
            }
        }
        let disk = &self.ctx.fetch.disk;
        NodeStatus {
            ready: false,
            cache: CacheUse {
                used_bytes: disk.total_bytes(),
                limit_bytes: disk.limit(),
            },
            images,
        }
    }

    fn layer_status(&self, layer: &Layer) -> LayerStatus {
        let (form, served) = match layer.format {
            LayerFormat::Estargz => (Form::Estargz, Served::Lazy),
            LayerFormat::ZstdChunked => (Form::ZstdChunked, Served::Lazy),
            LayerFormat::GzipIndex => (Form::GzipIndex, Served::Indexed),
            LayerFormat::Tar => (Form::TarIndex, Served::Indexed),
            LayerFormat::Downloaded => (Form::Plain, Served::Downloaded),
            LayerFormat::Unpacked => (Form::Plain, Served::UnpackedHere),
        };
        let prefetch = match &layer.prefetched {
            None => Prefetch::None,
            Some(p) if p.complete => Prefetch::Complete {
                files: p.files,
                bytes: p.bytes,
            },
            Some(p) => Prefetch::TimedOut {
                files: p.files,
                bytes: p.bytes,
            },
        };
        let profile = match layer.profile {
            ProfileUse::None => Profile::None,
            ProfileUse::Recorded => Profile::Recorded,
            ProfileUse::Replayed { chunks, complete } => Profile::Replayed { chunks, complete },
        };
        let fill = match layer.fetcher.quarantined() {
            Some(reason) => Fill::Quarantined {
                reason: reason.to_string(),
            },
            None => fill(layer.fill.phase()),
        };
        LayerStatus {
            digest: layer.digest.to_string(),
            form,
            served,
            fetched_bytes: layer.fetcher.stats.bytes_fetched.load(Ordering::Relaxed),
            size_bytes: layer.size,
            cached_bytes: self.ctx.fetch.disk.layer_bytes(&layer.digest),
            prefetch,
            profile,
            fill,
        }
    }
}

fn fill(phase: FillPhase) -> Fill {
    match phase {
        FillPhase::Off => Fill::Off,
        FillPhase::Waiting => Fill::Waiting,
        FillPhase::Running => Fill::Running,
        FillPhase::Ended(end) => match end {
            FillEnd::Complete { proof, .. } => Fill::Complete {
                proof: match proof {
                    Proof::LayerDigest => "layer_digest",
                    Proof::Recorded => "recorded",
                }
                .into(),
            },
            FillEnd::Quarantined(reason) => Fill::Quarantined { reason },
            FillEnd::Unmounted => Fill::Unmounted,
            FillEnd::CacheTooSmall => Fill::CacheTooSmall,
            FillEnd::Failed(reason) => Fill::Failed { reason },
        },
    }
}

fn not_mounted(digest: &str) -> LayerStatus {
    LayerStatus {
        served: Served::NotMounted,
        ..unpacked(digest)
    }
}

fn unpacked(digest: &str) -> LayerStatus {
    LayerStatus {
        digest: digest.to_string(),
        form: Form::Plain,
        served: Served::UnpackedByContainerd,
        fetched_bytes: 0,
        size_bytes: 0,
        cached_bytes: 0,
        prefetch: Prefetch::None,
        profile: Profile::None,
        fill: Fill::Off,
    }
}
