//! Which nodes of a mount are open in passthrough mode, and under which
//! backing id, kept in a file beside the mount for the process that takes
//! the mount over.
//!
//! The kernel ties an inode open in passthrough mode to its backing file:
//! while one such open lasts, a page-cache open of the inode fails with EIO,
//! and so does a passthrough open under another backing id. A process that
//! takes a connection over knows neither, so it would break the next open of
//! a file a container holds (a second worker loading the same weights). The
//! backing ids live in the connection, not in the process, so the next
//! process answers those nodes' opens with the same ids, kept until the
//! mount goes.
//!
//! The file is written before an open is answered with a new id and before
//! an id is closed, so after a SIGKILL it lists every id an inode may be
//! tied to (and at worst one more, never closed: harmless).

use crate::index::NodeId;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use tracing::warn;

/// Largest record read back: a line per large file open in passthrough mode.
const MAX_RECORD: u64 = 1 << 20;

/// The record file of one mount: a line `<node> <backing id>` per node.
pub struct BackingRecord {
    path: PathBuf,
}

impl BackingRecord {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ids of the earlier process, for nodes below `nodes`. A missing file
    /// is an empty record; a malformed line is skipped with a warning (its
    /// node is then served through the page cache, as before records).
    pub fn load(&self, nodes: usize) -> BTreeMap<NodeId, u32> {
        let text = match read_limited(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => {
                warn!(record = %self.path.display(), error = %e, "cannot read the passthrough record");
                return BTreeMap::new();
            }
        };
        let mut ids = BTreeMap::new();
        for line in text.lines() {
            match parse_line(line).filter(|(node, _)| (*node as usize) < nodes) {
                Some((node, id)) => {
                    ids.insert(node, id);
                }
                None => warn!(record = %self.path.display(), line, "skipping a malformed passthrough record line"),
            }
        }
        ids
    }

    /// Replaces the record with `ids` (a new file renamed over the old one:
    /// a reader never sees half of it).
    pub fn store(&self, ids: impl IntoIterator<Item = (NodeId, u32)>) -> io::Result<()> {
        let text: String = ids.into_iter().map(|(node, id)| format!("{node} {id}\n")).collect();
        let tmp = self.path.with_extension("new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Forgets a record left by an earlier connection of the same mountpoint.
    pub fn clear(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(record = %self.path.display(), error = %e, "cannot remove a stale passthrough record");
            }
        }
    }
}

fn read_limited(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_RECORD).read_to_string(&mut text)?;
    Ok(text)
}

/// `<node> <backing id>`; backing ids start at 1.
fn parse_line(line: &str) -> Option<(NodeId, u32)> {
    let (node, id) = line.split_once(' ')?;
    let id: u32 = id.parse().ok()?;
    (id > 0).then_some((node.parse().ok()?, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> (tempfile::TempDir, BackingRecord) {
        let dir = tempfile::tempdir().unwrap();
        let r = BackingRecord::new(dir.path().join("passthrough"));
        (dir, r)
    }

    #[test]
    fn stored_ids_load_back() {
        let (_dir, r) = record();
        r.store([(3, 1), (7, 2)]).unwrap();
        assert_eq!(r.load(10), BTreeMap::from([(3, 1), (7, 2)]));
    }

    #[test]
    fn no_record_is_an_empty_one() {
        let (_dir, r) = record();
        assert!(r.load(10).is_empty());
        r.store([(1, 1)]).unwrap();
        r.clear();
        assert!(r.load(10).is_empty());
    }

    #[test]
    fn malformed_lines_and_nodes_outside_the_index_are_skipped() {
        let (_dir, r) = record();
        std::fs::write(r.path(), "3 1\nx 2\n4 0\n5\n99 4\n6 -1\n8 5 extra\n2 9\n").unwrap();
        assert_eq!(r.load(10), BTreeMap::from([(3, 1), (2, 9)]));
    }
}
