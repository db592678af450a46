//! The pull's own `auth`: what kubelet put in a CRI `PullImage` (an
//! `imagePullSecrets` entry, or a token), taken from the request by the CRI
//! proxy (`cri_proxy`) and kept for the layers of that image only.
//!
//! An entry is keyed by the image as the pull named it (registry, repository,
//! tag or digest). While its pull is under way it answers lookups for that
//! tag and learns the manifest digests they carry (containerd prepares the
//! layers inside the pull, and the snapshotter resolves them by tag and
//! manifest digest); after the pull it answers only for those manifests, so
//! another image of the same repository or registry never gets it. Entries are
//! kept in `<root>/credentials/pull/<sha256 of the reference>` (0600, JSON,
//! written durably) so lazily served layers keep reading after a restart, and
//! dropped when no snapshot of the image is left ([`PullAuths::retain_used`]).

use super::{Credential, Origin, Secret};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// Format of the kept files.
const VERSION: u32 = 1;
/// Largest kept file read back (a pull secret is a few hundred bytes).
const MAX_FILE: u64 = 64 << 10;

/// An image as the registry client and the proxy see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageKey {
    /// Registry host (`host[:port]`, `docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path inside it.
    pub repository: String,
    pub tag: Option<String>,
    /// Manifest digest (`sha256:…`).
    pub digest: Option<String>,
}

impl ImageKey {
    /// `host/repository`, as credential sources match images.
    pub fn path(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    fn same_repository(&self, other: &ImageKey) -> bool {
        self.registry == other.registry && self.repository == other.repository
    }
}

impl std::fmt::Display for ImageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A secret as kept on disk.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Basic { username: String, password: String },
    IdentityToken { token: String },
    RegistryToken { token: String },
}

impl From<&Secret> for Stored {
    fn from(s: &Secret) -> Self {
        match s.clone() {
            Secret::Basic { username, password } => Stored::Basic { username, password },
            Secret::IdentityToken(token) => Stored::IdentityToken { token },
            Secret::RegistryToken(token) => Stored::RegistryToken { token },
        }
    }
}

impl From<Stored> for Secret {
    fn from(s: Stored) -> Self {
        match s {
            Stored::Basic { username, password } => Secret::Basic { username, password },
            Stored::IdentityToken { token } => Secret::IdentityToken(token),
            Stored::RegistryToken { token } => Secret::RegistryToken(token),
        }
    }
}

/// One kept file.
#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    image: ImageKey,
    manifests: BTreeSet<String>,
    secret: Stored,
}

struct Entry {
    image: ImageKey,
    secret: Secret,
    /// Manifest digests of the image, learnt while it was pulled.
    manifests: BTreeSet<String>,
    /// Pulls of it under way.
    pulling: usize,
    /// A pull with it succeeded (or it was kept by an earlier process).
    proven: bool,
}

impl Entry {
    /// Does a lookup for `key` concern this image? Learns `key`'s manifest
    /// digest when the pull is under way and the tag matches (true: learnt).
    fn answers(&mut self, key: &ImageKey) -> (bool, bool) {
        if !self.image.same_repository(key) {
            return (false, false);
        }
        if let Some(d) = &key.digest {
            if self.manifests.contains(d) || self.image.digest.as_ref() == Some(d) {
                return (true, false);
            }
        }
        // While the pull runs: its tag; a pull by digest (an index's, say, whose
        // platform manifest the lookups carry) matches lookups without a tag.
        let by_name = self.pulling > 0 && self.image.tag == key.tag;
        if !by_name {
            return (false, false);
        }
        let learnt = key.digest.as_ref().is_some_and(|d| self.manifests.insert(d.clone()));
        (true, learnt)
    }

    /// Is `image` (a lazily served layer's image) this one?
    fn is(&self, image: &ImageKey) -> bool {
        self.image.same_repository(image)
            && image
                .digest
                .as_ref()
                .is_some_and(|d| self.manifests.contains(d) || self.image.digest.as_ref() == Some(d))
    }
}

/// A pull under way, from [`PullAuths::begin`] to [`PullAuths::end`].
pub struct Pulling {
    id: String,
    /// This pull's secret.
    secret: Secret,
    /// The secret it replaced, put back if the pull fails while its own is still there.
    before: Option<Secret>,
}

/// Pull secrets by image, kept under a directory.
pub struct PullAuths {
    dir: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
    /// Held while an entry's file is written or removed (never with `entries`
    /// held across the I/O), so the last write shows the latest state.
    files: Mutex<()>,
}

impl std::fmt::Debug for PullAuths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PullAuths({} images)", self.entries.lock().len())
    }
}

/// The file name of an image's entry: the sha256 of its reference (which may name a user's repository).
fn id_of(image: &ImageKey) -> String {
    hex::encode(Sha256::digest(image.to_string().as_bytes()))
}

impl PullAuths {
    /// Reads the entries kept in `dir` (created 0700 if missing). An unreadable
    /// entry is logged and removed: its image's layers then read as anonymous.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        crate::private::dir(dir)?;
        let mut entries = HashMap::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match read(&path) {
                Ok(f) if f.version == VERSION && id_of(&f.image) == name => {
                    entries.insert(
                        name,
                        Entry {
                            image: f.image,
                            secret: f.secret.into(),
                            manifests: f.manifests,
                            pulling: 0,
                            proven: true,
                        },
                    );
                }
                Ok(_) => {
                    warn!(path = %path.display(), "kept pull secret of another format or name: removed");
                    let _ = std::fs::remove_file(&path);
                }
                Err(reason) => {
                    warn!(path = %path.display(), %reason, "unreadable kept pull secret: removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            entries: Mutex::new(entries),
            files: Mutex::new(()),
        })
    }

    /// A pull of `image` with `secret` starts: the secret answers for it from
    /// now on (replacing what an earlier pull of the same reference left).
    pub fn begin(&self, image: ImageKey, secret: Secret) -> Pulling {
        let id = id_of(&image);
        let before = {
            let mut entries = self.entries.lock();
            let before = entries.get(&id).map(|e| e.secret.clone());
            let entry = entries.entry(id.clone()).or_insert_with(|| Entry {
                image: image.clone(),
                secret: secret.clone(),
                manifests: BTreeSet::new(),
                pulling: 0,
                proven: false,
            });
            entry.secret = secret.clone();
            entry.pulling += 1;
            before
        };
        self.sync(&id);
        Pulling { id, secret, before }
    }

    /// The pull ended. A failed one takes its secret back (a wrong password is
    /// not kept): the secret before it is put back, unless another pull has
    /// replaced it since; an entry no pull proved goes once no pull runs.
    pub fn end(&self, pulling: Pulling, succeeded: bool) {
        {
            let mut entries = self.entries.lock();
            let Some(entry) = entries.get_mut(&pulling.id) else {
                return;
            };
            entry.pulling = entry.pulling.saturating_sub(1);
            if succeeded {
                entry.proven = true;
                return;
            }
            if entry.secret == pulling.secret {
                if let Some(before) = pulling.before {
                    entry.secret = before;
                }
            }
            if !entry.proven && entry.pulling == 0 {
                entries.remove(&pulling.id);
            }
        }
        self.sync(&pulling.id);
    }

    /// Credentials for a read of `key`'s registry for `key`, if a pull of
    /// that image carried some.
    pub fn lookup(&self, key: &ImageKey) -> Option<Credential> {
        let (credential, learnt) = {
            let mut entries = self.entries.lock();
            let found = entries.iter_mut().find_map(|(id, entry)| match entry.answers(key) {
                (true, learnt) => Some((id.clone(), entry, learnt)),
                _ => None,
            });
            let (id, entry, learnt) = found?;
            let credential = Credential {
                secret: entry.secret.clone(),
                origin: Origin::new(format!("pull secret of {}", entry.image)),
                expires: None,
            };
            (credential, learnt.then_some(id))
        };
        if let Some(id) = learnt {
            self.sync(&id);
        }
        Some(credential)
    }

    /// The registry refused credentials: tokens (which expire) of its pulls
    /// are dropped; user names and passwords stay until their image goes, so
    /// that a registry's passing refusal does not cut running containers off
    /// for good (kubelet does not pull a present image again).
    pub fn forget(&self, registry: &str) {
        self.drop_where("pull secret refused by the registry: forgotten", |e| {
            e.image.registry == registry && matches!(e.secret, Secret::RegistryToken(_))
        });
    }

    /// Drops the entries of images no lazily served layer uses any more
    /// (`in_use`: the images of the snapshots left), except pulls under way.
    pub fn retain_used(&self, in_use: &[ImageKey]) {
        self.drop_where("no snapshot of the image is left: its pull secret is dropped", |e| {
            e.pulling == 0 && !in_use.iter().any(|i| e.is(i))
        });
    }

    fn drop_where(&self, why: &'static str, gone: impl Fn(&Entry) -> bool) {
        let ids: Vec<String> = {
            let mut entries = self.entries.lock();
            let ids: Vec<String> = entries
                .iter()
                .filter(|(_, e)| gone(e))
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                if let Some(e) = entries.remove(id) {
                    info!(image = %e.image, "{why}");
                }
            }
            ids
        };
        ids.iter().for_each(|id| self.sync(id));
    }

    /// How many images have a pull secret (for tests and status).
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes `id`'s file say what its entry says now (written durably, or
    /// removed when the entry is gone). A failure is logged: the pull goes on,
    /// and the secret then lasts only as long as this process.
    fn sync(&self, id: &str) {
        let _files = self.files.lock();
        let file = self.entries.lock().get(id).map(|e| File {
            version: VERSION,
            image: e.image.clone(),
            manifests: e.manifests.clone(),
            secret: Stored::from(&e.secret),
        });
        let done = match &file {
            Some(f) => write(&self.dir, id, f),
            None => match std::fs::remove_file(self.dir.join(id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = done {
            let image = file.map_or_else(|| id.to_string(), |f| f.image.to_string());
            warn!(%image, dir = %self.dir.display(), error = %e, "could not keep the pull secret's file in step: it lasts as long as this process");
        }
    }
}

fn read(path: &Path) -> Result<File, String> {
    use std::io::Read as _;
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE).read_to_end(&mut text))
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

/// Temp file (0600), fsync, rename, fsync of the directory.
fn write(dir: &Path, id: &str, file: &File) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{id}.tmp"));
    let mut f = crate::private::create(&tmp)?;
    f.write_all(&serde_json::to_vec(file).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(id))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(repo: &str, tag: Option<&str>, digest: Option<&str>) -> ImageKey {
        ImageKey {
            registry: "r.test:5000".into(),
            repository: repo.into(),
            tag: tag.map(Into::into),
            digest: digest.map(Into::into),
        }
    }

    fn basic(p: &str) -> Secret {
        Secret::Basic {
            username: "alice".into(),
            password: p.into(),
        }
    }

    const M1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const M2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn a_pull_answers_for_its_manifests_only_and_outlives_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        let p = auths.begin(key("app", Some("v1"), None), basic("pw"));
        // During the pull: by tag, learning the manifest.
        let c = auths.lookup(&key("app", Some("v1"), Some(M1))).unwrap();
        assert_eq!(c.secret, basic("pw"));
        assert_eq!(c.origin.to_string(), "pull secret of r.test:5000/app:v1");
        auths.end(p, true);
        // After: the manifest learnt, nothing else of the registry.
        assert!(auths.lookup(&key("app", Some("v1"), Some(M1))).is_some());
        assert!(auths.lookup(&key("app", Some("v1"), Some(M2))).is_none());
        assert!(auths.lookup(&key("app", Some("v2"), None)).is_none());
        assert!(auths.lookup(&key("other", Some("v1"), Some(M1))).is_none());
        // Kept 0600 and read back by the next process.
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(files.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(files[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let again = PullAuths::open(dir.path()).unwrap();
        assert_eq!(again.lookup(&key("app", None, Some(M1))).unwrap().secret, basic("pw"));
        // Dropped with the image's last snapshot, file included.
        again.retain_used(&[key("app", Some("v1"), Some(M2))]);
        assert!(again.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_pull_by_index_digest_learns_the_platform_manifest_its_layers_name() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        let p = auths.begin(key("app", None, Some(M1)), basic("pw"));
        assert!(auths.lookup(&key("app", None, Some(M2))).is_some());
        let m3 = "sha256:3333333333333333333333333333333333333333333333333333333333333333";
        assert!(auths.lookup(&key("app", Some("v1"), Some(m3))).is_none());
        auths.end(p, true);
        assert!(auths.lookup(&key("app", None, Some(M2))).is_some());
        assert!(auths.lookup(&key("app", None, Some(M1))).is_some());
    }

    #[test]
    fn a_failed_pull_keeps_nothing_or_what_was_there_before() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        let p = auths.begin(key("app", Some("v1"), None), basic("wrong"));
        auths.end(p, false);
        assert!(auths.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let p = auths.begin(key("app", Some("v1"), None), basic("right"));
        auths.lookup(&key("app", Some("v1"), Some(M1)));
        auths.end(p, true);
        let p = auths.begin(key("app", Some("v1"), None), basic("wrong"));
        auths.end(p, false);
        assert_eq!(
            auths.lookup(&key("app", None, Some(M1))).unwrap().secret,
            basic("right")
        );
    }

    #[test]
    fn concurrent_pulls_of_one_image_keep_the_secret_that_worked() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        let wrong = auths.begin(key("app", Some("v1"), None), basic("wrong"));
        let right = auths.begin(key("app", Some("v1"), None), basic("right"));
        assert!(auths.lookup(&key("app", Some("v1"), Some(M1))).is_some());
        auths.end(right, true);
        auths.end(wrong, false);
        assert_eq!(
            auths.lookup(&key("app", None, Some(M1))).unwrap().secret,
            basic("right")
        );
        // A later pull that fails puts the proven secret back, on disk too.
        let bad = auths.begin(key("app", Some("v1"), None), basic("bad"));
        auths.end(bad, false);
        let again = PullAuths::open(dir.path()).unwrap();
        assert_eq!(
            again.lookup(&key("app", None, Some(M1))).unwrap().secret,
            basic("right")
        );
    }

    #[test]
    fn pulls_under_way_are_not_dropped_and_refused_tokens_are() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        let p = auths.begin(key("app", None, Some(M1)), Secret::RegistryToken("t".into()));
        auths.retain_used(&[]);
        assert_eq!(auths.len(), 1);
        auths.end(p, true);
        auths.forget("elsewhere.test");
        assert_eq!(auths.len(), 1);
        auths.forget("r.test:5000");
        assert!(auths.is_empty());
    }

    #[test]
    fn debug_and_kept_names_show_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let auths = PullAuths::open(dir.path()).unwrap();
        auths.begin(key("app", Some("v1"), None), basic("s3cret"));
        assert!(!format!("{auths:?}").contains("s3cret"));
        let name = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        assert!(!name.to_string_lossy().contains("app"));
    }
}
