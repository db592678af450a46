//! Start-up profiles: which files (and ranges) containers of an image read,
//! in order, from the image's first mount until reads go quiet. Kept per
//! image in `<state>/profiles/<manifest hex>.json`, publishable next to the
//! image as an OCI artifact, and replayed when the image's layers are mounted
//! on other nodes: the recorded ranges are fetched, in order, before the
//! container asks.
//!
//! A profile only chooses what is prefetched (bytes still come through the
//! layer's own verification), and at most a byte budget of it per layer.
//! Like indexes, profiles are taken from this node's recordings and the
//! operator's listed repositories; ones pushed as referrers of the image only
//! when referrers are trusted, kept apart (`<hex>.referrer.json`).

use super::ProfileUse;
use crate::digest::Digest;
use crate::fetch::{Fetcher, ReadObserver};
use crate::flight::Flights;
use crate::index::{ChunkId, LayerIndex, NodeId};
use crate::metrics::Cause;
use crate::registry::referrers::{ArtifactBlob, Subject};
use crate::registry::{BodyLimit, Reference, Registry, RegistryError};
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// `artifactType` of profile artifacts and media type of their one blob.
pub const ARTIFACT_TYPE: &str = "application/vnd.streamsnap.profile.v1+json";
/// Profile format version.
pub const VERSION: u32 = 1;
/// Largest profile read, local or published (about 100k reads).
pub const MAX_PROFILE: u64 = 16 << 20;
/// A recording that never sees a read ends after this long.
const MAX_IDLE_RECORDING: Duration = Duration::from_secs(600);
/// Blob bytes of chunks asked for together when replaying, and how many such batches at once.
const REPLAY_BATCH: u64 = 8 << 20;
const REPLAY_PARALLEL: usize = 4;

/// A recorded start-up: reads in order, merged where they continue each other.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Profile {
    pub version: u32,
    /// The image manifest the profile was recorded for.
    pub image: Digest,
    #[serde(deserialize_with = "crate::index::limits::bounded_entries")]
    pub reads: Vec<ProfileRead>,
}

/// `len` bytes at `offset` of file `path` (no leading slash) of `layer`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProfileRead {
    pub layer: Digest,
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// Tag of a profile in a configured repository.
pub fn repo_tag(image: &Digest) -> String {
    format!("profile-sha256-{}", image.hex())
}

/// How long "no profile is published for this image" is believed.
const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// Images whose registry lookups are remembered.
const LOOKUPS_KEPT: usize = 256;

/// Records the reads of one image until they go quiet: attached to the
/// fetcher of each of the image's layers as it opens, detached when done.
pub struct Recorder {
    image: Digest,
    reads: Mutex<Vec<(Digest, NodeId, u64, u64)>>,
    indexes: Mutex<HashMap<Digest, Arc<LayerIndex>>>,
    last_read: Mutex<Option<Instant>>,
    fetchers: Mutex<Vec<Weak<Fetcher>>>,
}

impl ReadObserver for Recorder {
    /// A read served to a container.
    fn read(&self, layer: &Digest, node: NodeId, offset: u64, len: u64) {
        let mut reads = self.reads.lock();
        // A read continuing the previous one of the same file extends it.
        if let Some((l, n, o, ln)) = reads.last_mut() {
            if l == layer && *n == node && *o + *ln == offset {
                *ln += len;
                *self.last_read.lock() = Some(Instant::now());
                return;
            }
        }
        reads.push((layer.clone(), node, offset, len));
        *self.last_read.lock() = Some(Instant::now());
    }
}

impl Recorder {
    /// Stops recording: no fetcher tells this recorder of reads any more.
    fn detach(self: &Arc<Self>) {
        let me: Arc<dyn ReadObserver> = Arc::clone(self) as Arc<dyn ReadObserver>;
        for f in self.fetchers.lock().drain(..).filter_map(|f| f.upgrade()) {
            f.detach(&me);
        }
    }

    fn to_profile(&self) -> Profile {
        let indexes = self.indexes.lock();
        let mut paths: HashMap<Digest, HashMap<NodeId, String>> = HashMap::new();
        let reads = self
            .reads
            .lock()
            .iter()
            .filter_map(|(layer, node, offset, len)| {
                let index = indexes.get(layer)?;
                let names = paths.entry(layer.clone()).or_insert_with(|| node_paths(index));
                Some(ProfileRead {
                    layer: layer.clone(),
                    path: names.get(node)?.clone(),
                    offset: *offset,
                    len: *len,
                })
            })
            .collect();
        Profile {
            version: VERSION,
            image: self.image.clone(),
            reads,
        }
    }
}

/// One path per node of a layer (hard links: the first one found).
fn node_paths(index: &LayerIndex) -> HashMap<NodeId, String> {
    let mut out = HashMap::new();
    let mut queue = vec![(0 as NodeId, String::new())];
    while let Some((dir, prefix)) = queue.pop() {
        let Some(n) = index.node(dir) else { continue };
        for (name, kid) in &n.children {
            let path = format!("{prefix}{}", String::from_utf8_lossy(name));
            if out.contains_key(kid) {
                continue;
            }
            if !index.node(*kid).map(|k| k.children.is_empty()).unwrap_or(true) {
                queue.push((*kid, format!("{path}/")));
            }
            out.insert(*kid, path);
        }
    }
    out
}

/// Profiles of one node: recording, storing, finding, publishing.
pub struct Profiles {
    dir: PathBuf,
    /// Reads quiet for this long end a recording.
    quiet: Duration,
    /// Publish a profile next to its image as soon as it is recorded.
    auto_push: bool,
    /// Repositories searched for profiles (tag per image manifest).
    repos: Vec<Reference>,
    recorders: Mutex<HashMap<Digest, Arc<Recorder>>>,
    /// Registry lookups by image manifest: one per image however many layers open.
    lookups: Flights<Digest, Option<Arc<Profile>>>,
    replay: bool,
    /// Whether profiles pushed as referrers of the image are used.
    trust_referrers: bool,
    /// Most blob bytes one layer's replay fetches.
    replay_budget: u64,
}

/// Replay budget per layer when not told otherwise.
pub const DEFAULT_REPLAY_BUDGET: u64 = 1 << 30;

impl Profiles {
    pub fn new(dir: PathBuf, quiet: Duration, auto_push: bool, repos: Vec<Reference>) -> Self {
        Self {
            dir,
            quiet,
            auto_push,
            repos,
            recorders: Mutex::default(),
            lookups: Flights::caching(NonZeroUsize::new(LOOKUPS_KEPT).expect("non-zero"), |found| {
                found.is_none().then_some(RECHECK_AFTER)
            }),
            replay: true,
            trust_referrers: false,
            replay_budget: DEFAULT_REPLAY_BUDGET,
        }
    }

    /// With `false`, known profiles are not replayed (recording goes on).
    pub fn replaying(mut self, replay: bool) -> Self {
        self.replay = replay;
        self
    }

    /// With `true`, profiles pushed as referrers of the image are used too.
    pub fn trusting_referrers(mut self, trust: bool) -> Self {
        self.trust_referrers = trust;
        self
    }

    /// Most blob bytes one layer's replay fetches.
    pub fn with_replay_budget(mut self, bytes: u64) -> Self {
        self.replay_budget = bytes;
        self
    }

    /// The profile recorded here, or fetched from a listed repository.
    pub fn path(&self, image: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", image.hex()))
    }

    /// A profile fetched as a referrer of the image (used only while trusted).
    fn referrer_path(&self, image: &Digest) -> PathBuf {
        self.dir.join(format!("{}.referrer.json", image.hex()))
    }

    /// The local profile of an image from a trusted source.
    pub fn load(&self, image: &Digest) -> Option<Profile> {
        let found = load_from(&self.path(image), image);
        match found {
            None if self.trust_referrers => load_from(&self.referrer_path(image), image),
            _ => found,
        }
    }

    fn store(&self, profile: &Profile) -> std::io::Result<()> {
        self.store_at(&self.path(&profile.image), profile)
    }

    fn store_at(&self, path: &Path, profile: &Profile) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(profile).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }

    /// Called for each layer of `image` when it is opened: replays a known
    /// profile (waiting at most `timeout`), or starts recording one.
    pub async fn on_layer_open(
        self: &Arc<Self>,
        registry: &Arc<Registry>,
        image: &Reference,
        fetcher: &Arc<Fetcher>,
        timeout: Duration,
    ) -> ProfileUse {
        let Some(manifest) = image.digest.clone() else {
            return ProfileUse::None;
        };
        let profile = match self.load(&manifest) {
            Some(p) => Some(Arc::new(p)),
            None if self.replay => {
                let (this, registry, image, m) =
                    (Arc::clone(self), Arc::clone(registry), image.clone(), manifest.clone());
                let lookup = move || async move { this.fetch(&registry, &image, &m).await.map(Arc::new) };
                self.lookups.run(manifest.clone(), lookup).await.ok().flatten()
            }
            None => None,
        };
        match profile {
            Some(p) if self.replay => replay(fetcher, &p, timeout, self.replay_budget).await,
            Some(_) => ProfileUse::None,
            None => {
                self.record(registry, image, &manifest, fetcher);
                ProfileUse::Recorded
            }
        }
    }

    fn record(
        self: &Arc<Self>,
        registry: &Arc<Registry>,
        image: &Reference,
        manifest: &Digest,
        fetcher: &Arc<Fetcher>,
    ) {
        let (recorder, new) = {
            let mut recorders = self.recorders.lock();
            let (recorder, new) = match recorders.get(manifest) {
                Some(r) => (Arc::clone(r), false),
                None => {
                    let r = Arc::new(Recorder {
                        image: manifest.clone(),
                        reads: Mutex::default(),
                        indexes: Mutex::default(),
                        last_read: Mutex::default(),
                        fetchers: Mutex::default(),
                    });
                    recorders.insert(manifest.clone(), Arc::clone(&r));
                    (r, true)
                }
            };
            // Attached under the map's lock: a recording that ends takes it
            // out of the map first, so it detaches from every fetcher it got.
            recorder
                .indexes
                .lock()
                .insert(fetcher.layer().clone(), Arc::clone(fetcher.index()));
            recorder.fetchers.lock().push(Arc::downgrade(fetcher));
            fetcher.attach(Arc::clone(&recorder) as Arc<dyn ReadObserver>);
            (recorder, new)
        };
        if new {
            info!(image = %image, "recording the start-up profile");
            let (this, registry, image) = (Arc::clone(self), Arc::clone(registry), image.clone());
            tokio::spawn(async move { this.finish_recording(&registry, &image, recorder).await });
        }
    }

    /// Waits until reads go quiet, then keeps (and maybe publishes) the profile.
    async fn finish_recording(&self, registry: &Registry, image: &Reference, recorder: Arc<Recorder>) {
        let started = Instant::now();
        loop {
            tokio::time::sleep(self.quiet / 4).await;
            let last = *recorder.last_read.lock();
            match last {
                Some(t) if t.elapsed() >= self.quiet => break,
                None if started.elapsed() > MAX_IDLE_RECORDING => {
                    self.recorders.lock().remove(&recorder.image);
                    recorder.detach();
                    return;
                }
                _ => {}
            }
        }
        self.recorders.lock().remove(&recorder.image);
        recorder.detach();
        let profile = recorder.to_profile();
        let bytes: u64 = profile.reads.iter().map(|r| r.len).sum();
        if let Err(e) = self.store(&profile) {
            warn!(image = %image, error = %e, "cannot keep the start-up profile");
            return;
        }
        info!(image = %image, reads = profile.reads.len(), bytes, "start-up profile recorded");
        if self.auto_push {
            match self.push(registry, image, None).await {
                Ok(d) => info!(image = %image, artifact = %d, "start-up profile published"),
                Err(e) => warn!(image = %image, error = %e, "publishing the start-up profile failed"),
            }
        }
    }

    /// Publishes the local profile of `image` (resolved to its manifest):
    /// next to the image, or in `repo` tagged by manifest digest.
    pub async fn push(
        &self,
        registry: &Registry,
        image: &Reference,
        repo: Option<&Reference>,
    ) -> Result<Digest, ProfileError> {
        let manifest = image
            .digest
            .clone()
            .ok_or_else(|| ProfileError::NotResolved(image.to_string()))?;
        let path = self.path(&manifest);
        let data = std::fs::read(&path).map_err(|e| ProfileError::Missing {
            image: image.to_string(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let (body, ctype, _) = registry.fetch_manifest(image, &manifest.to_string()).await?;
        let subject = Subject {
            digest: manifest.clone(),
            size: body.len() as u64,
            media_type: ctype.unwrap_or_else(|| crate::registry::OCI_MANIFEST.to_string()),
        };
        let blob = ArtifactBlob {
            media_type: ARTIFACT_TYPE.into(),
            data: Bytes::from(data),
            annotations: HashMap::new(),
        };
        let target = repo.cloned().unwrap_or_else(|| Reference {
            tag: None,
            digest: None,
            ..image.clone()
        });
        let tags = match repo {
            Some(_) => vec![repo_tag(&manifest)],
            None => Vec::new(),
        };
        Ok(registry
            .push_artifact(&target, ARTIFACT_TYPE, vec![blob], Some(&subject), &tags)
            .await?)
    }

    /// A profile published for the image (listed repositories; referrers and
    /// fallback tag only when trusted), kept locally once found.
    async fn fetch(&self, registry: &Registry, image: &Reference, manifest: &Digest) -> Option<Profile> {
        let mut places: Vec<(Reference, String, PathBuf)> = Vec::new();
        places.extend(
            self.repos
                .iter()
                .map(|r| (r.clone(), repo_tag(manifest), self.path(manifest))),
        );
        if self.trust_referrers {
            match registry.referrers(image, manifest, ARTIFACT_TYPE).await {
                Ok(found) => places.extend(
                    found
                        .into_iter()
                        .map(|d| (image.clone(), d.to_string(), self.referrer_path(manifest))),
                ),
                Err(e) => warn!(image = %image, error = %e, "looking for a start-up profile failed"),
            }
        }
        for (repo, reference, keep_at) in places {
            let Ok(blobs) = registry.artifact_layers(&repo, &reference).await else {
                continue;
            };
            let Some(b) = blobs.into_iter().find(|b| b.media_type == ARTIFACT_TYPE) else {
                continue;
            };
            if b.size > MAX_PROFILE {
                warn!(image = %image, repo = %repo, size = b.size, "profile artifact is over the size limit; ignored");
                continue;
            }
            // No more than the descriptor declares, whatever the registry sends.
            let data = match registry
                .read_blob(&repo, &b.digest, BodyLimit::new("start-up profile", b.size))
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    warn!(image = %image, repo = %repo, error = %e, "fetching the profile artifact failed; ignored");
                    continue;
                }
            };
            match parse(&data) {
                Ok(p) if p.version == VERSION && &p.image == manifest => {
                    if let Err(e) = self.store_at(&keep_at, &p) {
                        warn!(error = %e, "cannot keep the fetched profile");
                    }
                    info!(image = %image, repo = %repo, reads = p.reads.len(), "start-up profile fetched");
                    return Some(p);
                }
                _ => warn!(image = %image, repo = %repo, "profile artifact does not fit this image; ignored"),
            }
        }
        None
    }
}

/// A stored profile of `image`, if it is one and for that image.
fn load_from(path: &Path, image: &Digest) -> Option<Profile> {
    let text = read_capped(path).ok()?;
    match parse(&text) {
        Ok(p) if p.version == VERSION && &p.image == image => Some(p),
        Ok(_) => {
            warn!(image = %image, "profile of another image or version ignored");
            None
        }
        Err(e) => {
            warn!(image = %image, error = %e, "unreadable profile ignored");
            None
        }
    }
}

/// The chunks of this layer a profile asks for, in profile order, without
/// repeats, until their blob bytes would pass `budget`.
pub fn replay_chunks(index: &LayerIndex, layer: &Digest, profile: &Profile, budget: u64) -> Vec<ChunkId> {
    let mut seen = HashSet::new();
    let mut ids: Vec<ChunkId> = Vec::new();
    let mut bytes = 0u64;
    for r in profile.reads.iter().filter(|r| &r.layer == layer) {
        let Some(node) = index.resolve(&r.path) else { continue };
        for id in index.chunks_for_range(node, r.offset, r.len) {
            if !seen.insert(id) {
                continue;
            }
            bytes = bytes.saturating_add(index.chunks[id as usize].blob_len);
            if bytes > budget {
                warn!(layer = %layer, budget, "start-up profile asks for more than the replay budget; the rest is fetched on demand");
                return ids;
            }
            ids.push(id);
        }
    }
    ids
}

/// Fetches the profile's ranges of this layer, in profile order, at prefetch
/// priority, in large batches, at most `budget` blob bytes; waits at most
/// `timeout` (the rest goes on).
pub async fn replay(fetcher: &Arc<Fetcher>, profile: &Profile, timeout: Duration, budget: u64) -> ProfileUse {
    let index = fetcher.index();
    let ids = replay_chunks(index, fetcher.layer(), profile, budget);
    let chunks = ids.len();
    if ids.is_empty() {
        return ProfileUse::None;
    }
    let mut batches: Vec<Vec<ChunkId>> = vec![Vec::new()];
    let mut bytes = 0;
    for id in ids {
        let len = index.chunks[id as usize].blob_len;
        if bytes + len > REPLAY_BATCH && !batches.last().expect("a batch").is_empty() {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        batches.last_mut().expect("a batch").push(id);
    }
    let started = Instant::now();
    let this = Arc::clone(fetcher);
    let task = tokio::spawn(async move {
        futures::stream::iter(batches)
            .map(|b| {
                let f = Arc::clone(&this);
                async move { f.chunks(None, b, Cause::Prefetch).await }
            })
            .buffered(REPLAY_PARALLEL)
            .filter_map(|r| async move { r.err() })
            .collect::<Vec<_>>()
            .await
    });
    let complete = match tokio::time::timeout(timeout, task).await {
        Ok(Ok(errors)) if errors.is_empty() => true,
        Ok(Ok(errors)) => {
            warn!(layer = %fetcher.layer(), error = %errors[0], "profile replay failed in part; reads fetch on demand");
            false
        }
        _ => false,
    };
    info!(
        layer = %fetcher.layer(),
        chunks,
        complete,
        ms = started.elapsed().as_millis() as u64,
        "start-up profile replayed"
    );
    ProfileUse::Replayed { chunks, complete }
}

/// A profile that cannot be published; names the image.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("image {0}: not resolved to a manifest digest")]
    NotResolved(String),
    #[error("image {image}: no local start-up profile at {path}: {reason}")]
    Missing {
        image: String,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses a profile document (public for the fuzz targets).
pub fn parse(text: &[u8]) -> Result<Profile, serde_json::Error> {
    serde_json::from_slice(text)
}

/// A local profile file's bytes, refused past [`MAX_PROFILE`].
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    crate::index::limits::read_capped(file, MAX_PROFILE)
        .map_err(|e| e.unwrap_or_else(|| std::io::Error::other(format!("profile is over {MAX_PROFILE} bytes"))))
}

/// Reads a stored profile (for `streamsnap profile show`).
pub fn read_file(path: &Path) -> Result<Profile, ProfileError> {
    let text = read_capped(path).map_err(|source| ProfileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|source| ProfileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
