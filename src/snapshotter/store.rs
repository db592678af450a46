//! Crash-safe snapshot metadata on redb: an embedded, pure-Rust, ACID
//! key-value store (copy-on-write B-trees, fsync'd commits), so a crash
//! leaves either the old or the new state, never a torn record.

use super::{Kind, SnapshotError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A lazily served layer behind a committed snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteLayer {
    /// Image reference (with manifest digest) the layer was pulled for.
    pub image: String,
    /// The layer's digest.
    pub layer: String,
}

/// What is stored per snapshot key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created_ns: i128,
    pub updated_ns: i128,
    /// Disk usage frozen at commit (committed snapshots).
    pub size: i64,
    pub inodes: i64,
    pub remote: Option<RemoteLayer>,
}

/// The metadata database.
pub struct Store {
    db: Database,
}

fn internal(what: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(format!("metadata store: {what}: {e}"))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let db = Database::create(path).map_err(|e| internal(&format!("opening {}", path.display()), e))?;
        let tx = db.begin_write().map_err(|e| internal("begin", e))?;
        tx.open_table(SNAPSHOTS).map_err(|e| internal("snapshots table", e))?;
        tx.open_table(META).map_err(|e| internal("meta table", e))?;
        tx.commit().map_err(|e| internal("commit", e))?;
        Ok(Self { db })
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let tx = self.db.begin_read().map_err(|e| internal("begin read", e))?;
        let t = tx.open_table(SNAPSHOTS).map_err(|e| internal("open", e))?;
        match t.get(key).map_err(|e| internal("get", e))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(|e| internal(&format!("record {key:?}"), e))?,
            )),
            None => Ok(None),
        }
    }

    /// Every (key, record), in key order.
    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let tx = self.db.begin_read().map_err(|e| internal("begin read", e))?;
        let t = tx.open_table(SNAPSHOTS).map_err(|e| internal("open", e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| internal("iterate", e))? {
            let (k, v) = item.map_err(|e| internal("iterate", e))?;
            let rec = serde_json::from_slice(v.value()).map_err(|e| internal(&format!("record {:?}", k.value()), e))?;
            out.push((k.value().to_string(), rec));
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction; nothing is stored unless it returns Ok.
    pub fn write<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<T, SnapshotError>) -> Result<T, SnapshotError> {
        let tx = self.db.begin_write().map_err(|e| internal("begin write", e))?;
        let out = {
            let mut txn = Txn {
                snapshots: tx.open_table(SNAPSHOTS).map_err(|e| internal("open", e))?,
                meta: tx.open_table(META).map_err(|e| internal("open", e))?,
            };
            f(&mut txn)?
        };
        tx.commit().map_err(|e| internal("commit", e))?;
        Ok(out)
    }
}

/// Operations inside one write transaction.
pub struct Txn<'a> {
    snapshots: redb::Table<'a, &'static str, &'static [u8]>,
    meta: redb::Table<'a, &'static str, u64>,
}

impl Txn<'_> {
    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        match self.snapshots.get(key).map_err(|e| internal("get", e))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(|e| internal(&format!("record {key:?}"), e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, key: &str, rec: &Record) -> Result<(), SnapshotError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| internal("encode", e))?;
        self.snapshots
            .insert(key, bytes.as_slice())
            .map_err(|e| internal("insert", e))?;
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), SnapshotError> {
        self.snapshots.remove(key).map_err(|e| internal("remove", e))?;
        Ok(())
    }

    /// Does any snapshot name `key` as its parent?
    pub fn has_children(&self, key: &str) -> Result<bool, SnapshotError> {
        for item in self.snapshots.iter().map_err(|e| internal("iterate", e))? {
            let (_, v) = item.map_err(|e| internal("iterate", e))?;
            let rec: Record = serde_json::from_slice(v.value()).map_err(|e| internal("decode", e))?;
            if rec.parent.as_deref() == Some(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A fresh snapshot id (never reused).
    pub fn next_id(&mut self) -> Result<u64, SnapshotError> {
        let id = self
            .meta
            .get("next_id")
            .map_err(|e| internal("next id", e))?
            .map(|v| v.value())
            .unwrap_or(1);
        self.meta
            .insert("next_id", id + 1)
            .map_err(|e| internal("next id", e))?;
        Ok(id)
    }
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}
