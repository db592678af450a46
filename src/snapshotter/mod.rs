//! The snapshotter's logic, in plain Rust: keys, parents, kinds, labels,
//! usage and mounts with the semantics of containerd's overlayfs
//! snapshotter. The gRPC adapter ([`service`]) only translates.
//!
//! Layout under the root: `metadata.redb`, `snapshots/<id>/fs` (the
//! snapshot's files; for a lazily served layer, its FUSE mount) and
//! `snapshots/<id>/work` (overlayfs work dir of active snapshots); a lazily
//! served layer's `snapshots/<id>/passthrough` (`fs::BackingRecord`).

pub mod filters;
pub mod remote;
pub mod service;
mod store;

pub use store::{Record, RemoteLayer};

use filters::{Fields, Filter};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use store::Store;

/// Snapshot kinds, as containerd has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// What Stat, Update and List return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub created_ns: i128,
    pub updated_ns: i128,
    pub labels: BTreeMap<String, String>,
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "name" => Some(self.name.clone()),
            // Roots have an empty parent, so `parent==""` selects them.
            [f] if f == "parent" => Some(self.parent.clone().unwrap_or_default()),
            [f] if f == "kind" => Some(self.kind.as_str().to_string()),
            [f, key @ ..] if f == "labels" && !key.is_empty() => self.labels.get(&key.join(".")).cloned(),
            _ => None,
        }
    }
}

/// A mount for containerd to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Failures, by the gRPC code containerd expects for each.
#[derive(Debug, thiserror::Error, Clone)]
pub enum SnapshotError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}: failed precondition")]
    FailedPrecondition(String),
    #[error("{0}: invalid argument")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
    /// A layer that cannot be served lazily.
    #[error(transparent)]
    Remote(std::sync::Arc<remote::RemoteError>),
}

/// Largest label key plus value, as containerd's metadata store allows.
const MAX_LABEL_SIZE: usize = 4096;

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Internal(format!("{what} {}: {e}", path.display()))
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), SnapshotError> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            return Err(SnapshotError::InvalidArgument(format!(
                "label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {}",
                &k[..k.len().min(64)]
            )));
        }
    }
    Ok(())
}

/// Snapshots under one root directory.
pub struct Snapshots {
    root: PathBuf,
    store: Store,
    /// Overlayfs knows `index=off` (then we pass it, as containerd does).
    index_off: bool,
    /// Ids reserved for remote snapshots being mounted (cleanup leaves them alone).
    reserved: parking_lot::Mutex<HashSet<u64>>,
}

impl Snapshots {
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        // Owner-only: the snapshots hold what containers may run (setuid binaries, devices).
        for dir in [root, &root.join("snapshots")] {
            crate::private::dir(dir).map_err(|e| io_err("creating", dir, e))?;
        }
        let store = Store::open(&root.join("metadata.redb"))?;
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        Ok(Self {
            root: root.to_path_buf(),
            store,
            index_off,
            reserved: Default::default(),
        })
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The directory holding snapshot `id`'s files.
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn info(key: &str, r: &Record) -> Info {
        Info {
            name: key.to_string(),
            parent: r.parent.clone(),
            kind: r.kind,
            created_ns: r.created_ns,
            updated_ns: r.updated_ns,
            labels: r.labels.clone(),
        }
    }

    fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        self.store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))
    }

    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("snapshot key is empty".into()));
        }
        validate_labels(&labels)?;
        let labels = non_empty(labels);
        let rec = self.store.write(|tx| {
            // containerd's order: parent exists, parent is committed, key is free.
            let parent = if parent.is_empty() {
                None
            } else {
                let p = tx
                    .get(parent)?
                    .ok_or_else(|| SnapshotError::NotFound(format!("parent snapshot {parent}")))?;
                if p.kind != Kind::Committed {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "parent {parent} is not a committed snapshot"
                    )));
                }
                Some(parent.to_string())
            };
            if tx.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {key}")));
            }
            let id = tx.next_id()?;
            let now = now_ns();
            let rec = Record {
                id,
                kind,
                parent,
                labels,
                created_ns: now,
                updated_ns: now,
                size: 0,
                inodes: 0,
                remote: None,
            };
            // Directories first: a crash before the commit leaves only an orphan that cleanup removes.
            let dir = self.dir(id);
            make_dir(&dir.join("fs"))?;
            if kind == Kind::Active {
                make_dir(&dir.join("work"))?;
            }
            tx.put(key, &rec)?;
            Ok(rec)
        })?;
        self.mounts_of(&rec)
    }

    /// Mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let rec = self.get(key)?;
        if rec.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed, not active or view"
            )));
        }
        self.mounts_of(&rec)
    }

    /// Ids of snapshot `key` and its parent chain, nearest first.
    pub fn chain_ids(&self, key: &str) -> Result<Vec<u64>, SnapshotError> {
        let rec = self.get(key)?;
        let mut ids = vec![rec.id];
        ids.extend(self.parent_ids(&rec)?);
        Ok(ids)
    }

    /// Ids of the parent chain, nearest first.
    fn parent_ids(&self, rec: &Record) -> Result<Vec<u64>, SnapshotError> {
        let mut ids = Vec::new();
        let mut next = rec.parent.clone();
        while let Some(p) = next {
            let r = self.get(&p)?;
            ids.push(r.id);
            next = r.parent;
        }
        Ok(ids)
    }

    fn mounts_of(&self, rec: &Record) -> Result<Vec<Mount>, SnapshotError> {
        let parents = self.parent_ids(rec)?;
        let path = |id: u64| self.fs_path(id).display().to_string();
        let bind = |src: String, mode: &str| {
            vec![Mount {
                fs_type: "bind".into(),
                source: src,
                options: vec![mode.into(), "rbind".into()],
            }]
        };
        if parents.is_empty() {
            let mode = if rec.kind == Kind::Active { "rw" } else { "ro" };
            return Ok(bind(path(rec.id), mode));
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if rec.kind == Kind::Active {
            options.push(format!("workdir={}", self.dir(rec.id).join("work").display()));
            options.push(format!("upperdir={}", path(rec.id)));
        } else if parents.len() == 1 {
            return Ok(bind(path(parents[0]), "ro"));
        }
        let lowers: Vec<String> = parents.iter().map(|id| path(*id)).collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        Ok(vec![Mount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options,
        }])
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapshotError> {
        validate_labels(&labels)?;
        let labels = non_empty(labels);
        // containerd's order: key exists, name is free, key is active.
        let rec = self.get(key)?;
        if self.store.get(name)?.is_some() {
            return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
        }
        if rec.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let (size, inodes) = disk_usage(&self.fs_path(rec.id));
        self.store.write(|tx| {
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
            }
            let cur = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            let now = now_ns();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created_ns: now,
                updated_ns: now,
                size,
                inodes,
                ..cur
            };
            tx.delete(key)?;
            tx.put(name, &committed)
        })?;
        // The work dir is only needed while the snapshot can still be written.
        let _ = std::fs::remove_dir_all(self.dir(rec.id).join("work"));
        Ok(())
    }

    /// Reserves an id (and an empty `fs` dir) for a committed snapshot
    /// `name` whose files will be a lazily served layer: checks that `name`
    /// is free and `parent` committed. The caller mounts the layer at
    /// [`Self::fs_path`], outside any transaction, then calls
    /// [`Self::commit_remote`] (or [`Self::release_reserved`] on failure).
    pub fn reserve_remote(&self, name: &str, parent: &str) -> Result<u64, SnapshotError> {
        let id = self.store.write(|tx| {
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
            }
            remote_parent(tx, parent)?;
            tx.next_id()
        })?;
        self.reserved.lock().insert(id);
        if let Err(e) = make_dir(&self.fs_path(id)) {
            self.release_reserved(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Records the committed snapshot reserved as `id`, its layer mounted.
    pub fn commit_remote(
        &self,
        name: &str,
        parent: &str,
        id: u64,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<(), SnapshotError> {
        validate_labels(&labels)?;
        let result = self.store.write(|tx| {
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
            }
            let parent = remote_parent(tx, parent)?;
            let now = now_ns();
            tx.put(
                name,
                &Record {
                    id,
                    kind: Kind::Committed,
                    parent,
                    labels,
                    created_ns: now,
                    updated_ns: now,
                    size: 0,
                    inodes: 0,
                    remote: Some(remote),
                },
            )
        });
        self.reserved.lock().remove(&id);
        result
    }

    /// Gives up a reserved id: its directory goes (its mount must be gone).
    pub fn release_reserved(&self, id: u64) {
        self.reserved.lock().remove(&id);
        self.forget_dir(id);
    }

    /// Removes a snapshot without children; returns its record so the caller can
    /// release what backs it (a layer mount).
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let rec = self.store.write(|tx| {
            let rec = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            if tx.has_children(key)? {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key}: it has children"
                )));
            }
            tx.delete(key)?;
            Ok(rec)
        })?;
        if rec.remote.is_none() {
            let _ = std::fs::remove_dir_all(self.dir(rec.id));
        }
        Ok(rec)
    }

    /// Deletes the directory of a removed remote snapshot once its mount is gone.
    pub fn forget_dir(&self, id: u64) {
        let _ = std::fs::remove_dir_all(self.dir(id));
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(Self::info(key, &self.get(key)?))
    }

    /// Updates labels: all of them (no paths, or `labels`) or single ones (`labels.KEY`).
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info, SnapshotError> {
        validate_labels(&info.labels)?;
        let key = info.name.as_str();
        self.store.write(|tx| {
            let mut rec = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound(format!("snapshot {key}")))?;
            if paths.is_empty() {
                rec.labels = non_empty(info.labels.clone());
            }
            for p in paths {
                if p == "labels" {
                    rec.labels = non_empty(info.labels.clone());
                } else if let Some(label) = p.strip_prefix("labels.") {
                    match info.labels.get(label).filter(|v| !v.is_empty()) {
                        Some(v) => rec.labels.insert(label.to_string(), v.clone()),
                        None => rec.labels.remove(label),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update {p:?} field on snapshot {key:?}"
                    )));
                }
            }
            rec.updated_ns = now_ns();
            tx.put(key, &rec)?;
            Ok(Self::info(key, &rec))
        })
    }

    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filter = Filter::parse(filters)?;
        Ok(self
            .store
            .all()?
            .iter()
            .map(|(k, r)| Self::info(k, r))
            .filter(|i| filter.matches(i))
            .collect())
    }

    /// Every record, for re-mounting lazily served layers after a restart.
    pub fn records(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        self.store.all()
    }

    /// Bytes and inodes used: measured for active snapshots, frozen at commit otherwise.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapshotError> {
        let rec = self.get(key)?;
        Ok(match rec.kind {
            Kind::Active => disk_usage(&self.fs_path(rec.id)),
            _ => (rec.size, rec.inodes),
        })
    }

    /// Removes snapshot directories no record refers to (left by crashes or removals).
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        let mut live: HashSet<String> = self.store.all()?.into_iter().map(|(_, r)| r.id.to_string()).collect();
        live.extend(self.reserved.lock().iter().map(|id| id.to_string()));
        let dir = self.root.join("snapshots");
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err("reading", &dir, e))? {
            let entry = entry.map_err(|e| io_err("reading", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                let fs = entry.path().join("fs");
                crate::overlay::unmount_stale(&fs);
                std::fs::remove_dir_all(entry.path()).map_err(|e| io_err("removing", &entry.path(), e))?;
            }
        }
        Ok(())
    }
}

/// The parent of a remote snapshot: none, or a committed snapshot.
fn remote_parent(tx: &store::Txn<'_>, parent: &str) -> Result<Option<String>, SnapshotError> {
    match parent {
        "" => Ok(None),
        p => match tx.get(p)? {
            Some(r) if r.kind == Kind::Committed => Ok(Some(p.to_string())),
            Some(_) => Err(SnapshotError::InvalidArgument(format!(
                "parent {p} is not a committed snapshot"
            ))),
            None => Err(SnapshotError::NotFound(format!("parent snapshot {p}"))),
        },
    }
}

/// Labels with empty values are not stored (an empty value deletes).
fn non_empty(mut labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// A snapshot directory: 0755 whatever the daemon's umask.
fn make_dir(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| io_err("creating", path, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| io_err("chmod", path, e))
}

/// Size (bytes of distinct inodes) and inode count of a tree, not crossing mounts.
fn disk_usage(root: &Path) -> (i64, i64) {
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return (0, 0);
    };
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != top.dev() || !seen.insert(md.ino()) {
            continue;
        }
        size += (md.blocks() * 512) as i64;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    (size, seen.len() as i64)
}

#[cfg(test)]
mod tests;
