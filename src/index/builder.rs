//! Builds a [`LayerIndex`] from tar-like entries: path checks, implicit
//! parents, overlayfs whiteout conversion, hard links, last-entry-wins.

use super::limits::{MAX_CHUNKS, MAX_DEPTH, MAX_ENTRIES, MAX_PATH, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use super::{Chunk, IndexError, Kind, LayerIndex, Node, NodeId, Timestamp, OPAQUE_XATTR};
use crate::digest::Digest;
use std::collections::BTreeMap;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Metadata of one archive entry (everything but its path).
#[derive(Clone, Debug)]
pub struct EntryMeta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Timestamp,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// File chunks in file order (regular files only).
    pub chunks: Vec<Chunk>,
}

struct BNode {
    meta: EntryMeta,
    kids: BTreeMap<Box<[u8]>, NodeId>,
}

/// Accumulates entries in archive order; [`TreeBuilder::finish`] validates and freezes.
pub struct TreeBuilder {
    layer: Digest,
    nodes: Vec<BNode>,
    /// Chunks of every node added so far (replaced ones included).
    chunks: usize,
    /// Nodes allowed ([`MAX_ENTRIES`]; smaller in tests).
    max_entries: usize,
}

impl TreeBuilder {
    pub fn new(layer: Digest) -> Self {
        let root = BNode {
            meta: dir_meta(Timestamp::default()),
            kids: BTreeMap::new(),
        };
        Self {
            layer,
            nodes: vec![root],
            chunks: 0,
            max_entries: MAX_ENTRIES,
        }
    }

    fn err(&self, path: &[u8], reason: impl Into<String>) -> IndexError {
        // A hostile path can be long: the message names its start.
        let shown = &path[..path.len().min(256)];
        let mut entry = String::from_utf8_lossy(shown).into_owned();
        if shown.len() < path.len() {
            entry.push('…');
        }
        IndexError::Entry {
            layer: self.layer.clone(),
            entry,
            reason: reason.into(),
        }
    }

    /// Splits a path into checked components; `..` and absolute paths are refused.
    fn components<'a>(&self, path: &'a [u8]) -> Result<Vec<&'a [u8]>, IndexError> {
        if path.first() == Some(&b'/') {
            return Err(self.err(path, "absolute path in layer"));
        }
        if path.len() > MAX_PATH {
            return Err(self.err(
                path,
                format!("path of {} bytes is over the limit of {MAX_PATH}", path.len()),
            ));
        }
        let mut out = Vec::new();
        for c in path.split(|b| *b == b'/') {
            if out.len() == MAX_DEPTH {
                return Err(self.err(path, format!("path deeper than {MAX_DEPTH} components")));
            }
            match c {
                b"" | b"." => {}
                b".." => return Err(self.err(path, "path escapes the layer root (`..`)")),
                c if c.len() > 255 => return Err(self.err(path, "name longer than 255 bytes")),
                c if c.contains(&0) => return Err(self.err(path, "NUL byte in name")),
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// The directory `comps` names, creating missing ones (as unpackers do).
    fn dir_for(&mut self, path: &[u8], comps: &[&[u8]]) -> Result<NodeId, IndexError> {
        let mut dir = 0;
        for c in comps {
            dir = match self.nodes[dir as usize].kids.get(*c).copied() {
                Some(id) if self.nodes[id as usize].meta.kind == Kind::Dir => id,
                Some(_) => return Err(self.err(path, "parent is not a directory")),
                None => {
                    let id = self.push(path, dir_meta(Timestamp::default()))?;
                    self.nodes[dir as usize].kids.insert((*c).into(), id);
                    id
                }
            };
        }
        Ok(dir)
    }

    fn push(&mut self, path: &[u8], meta: EntryMeta) -> Result<NodeId, IndexError> {
        if self.nodes.len() > self.max_entries {
            return Err(self.err(path, format!("layer has more than {} entries", self.max_entries)));
        }
        self.nodes.push(BNode {
            meta,
            kids: BTreeMap::new(),
        });
        Ok((self.nodes.len() - 1) as NodeId)
    }

    /// Per-entry caps: symlink target, xattrs, chunks of the whole layer.
    fn check_meta(&mut self, path: &[u8], meta: &EntryMeta) -> Result<(), IndexError> {
        if let Kind::Symlink(target) = &meta.kind {
            if target.len() > MAX_PATH {
                return Err(self.err(
                    path,
                    format!("symlink target of {} bytes is over the limit", target.len()),
                ));
            }
        }
        for (k, v) in &meta.xattrs {
            if k.len() > MAX_XATTR_NAME || v.len() > MAX_XATTR_VALUE {
                return Err(self.err(
                    path,
                    format!("xattr of {}+{} bytes is over the kernel's limits", k.len(), v.len()),
                ));
            }
        }
        self.chunks = self.chunks.saturating_add(meta.chunks.len());
        if self.chunks > MAX_CHUNKS {
            return Err(self.err(path, format!("layer has more than {MAX_CHUNKS} chunks")));
        }
        Ok(())
    }

    /// Adds an entry; whiteouts become 0/0 char devices, opaque markers an xattr.
    pub fn add(&mut self, path: &[u8], mut meta: EntryMeta) -> Result<(), IndexError> {
        drop_admin_xattrs(&mut meta.xattrs);
        self.check_meta(path, &meta)?;
        let comps = self.components(path)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself ("./"): keep its metadata.
            if meta.kind != Kind::Dir {
                return Err(self.err(path, "layer root is not a directory"));
            }
            self.nodes[0].meta = EntryMeta {
                chunks: Vec::new(),
                ..meta
            };
            return Ok(());
        };
        let dir = self.dir_for(path, parents)?;
        if *name == OPAQUE_MARKER {
            set_xattr(&mut self.nodes[dir as usize].meta.xattrs, OPAQUE_XATTR, b"y");
            return Ok(());
        }
        let (name, meta) = match name.strip_prefix(WHITEOUT_PREFIX) {
            Some(hidden) if !hidden.is_empty() => (
                hidden,
                EntryMeta {
                    kind: Kind::CharDev { major: 0, minor: 0 },
                    mode: 0,
                    size: 0,
                    xattrs: Vec::new(),
                    chunks: Vec::new(),
                    ..meta
                },
            ),
            _ => (*name, meta),
        };
        let existing = self.nodes[dir as usize].kids.get(name).copied();
        match existing {
            Some(id) if meta.kind == Kind::Dir && self.nodes[id as usize].meta.kind == Kind::Dir => {
                // A repeated directory keeps its children; xattrs already set stay.
                let old = &mut self.nodes[id as usize].meta;
                let mut xattrs = std::mem::take(&mut old.xattrs);
                for (k, v) in &meta.xattrs {
                    set_xattr(&mut xattrs, k, v);
                }
                *old = EntryMeta { xattrs, ..meta };
            }
            _ => {
                let id = self.push(path, meta)?;
                self.nodes[dir as usize].kids.insert(name.into(), id);
            }
        }
        Ok(())
    }

    /// Adds a hard link to an earlier entry; its header's metadata lands on
    /// the shared inode, as containerd's unpack leaves it.
    pub fn add_hardlink(&mut self, path: &[u8], target: &[u8], mut meta: EntryMeta) -> Result<(), IndexError> {
        drop_admin_xattrs(&mut meta.xattrs);
        self.check_meta(path, &meta)?;
        let tcomps = self.components(target)?;
        let mut cur: NodeId = 0;
        for c in &tcomps {
            cur = self.nodes[cur as usize].kids.get(*c).copied().ok_or_else(|| {
                self.err(
                    path,
                    format!("hard link to missing {:?}", String::from_utf8_lossy(target)),
                )
            })?;
        }
        if tcomps.is_empty() || self.nodes[cur as usize].meta.kind == Kind::Dir {
            return Err(self.err(path, "hard link to a directory"));
        }
        let comps = self.components(path)?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(self.err(path, "hard link named as the root"));
        };
        let dir = self.dir_for(path, parents)?;
        let node = &mut self.nodes[cur as usize].meta;
        node.mode = meta.mode;
        node.uid = meta.uid;
        node.gid = meta.gid;
        node.mtime = meta.mtime;
        for (k, v) in &meta.xattrs {
            set_xattr(&mut node.xattrs, k, v);
        }
        self.nodes[dir as usize].kids.insert((*name).into(), cur);
        Ok(())
    }

    /// Validates file chunks against sizes and the blob, numbers the reachable
    /// nodes breadth-first from the root and counts links.
    pub fn finish(self, blob_size: u64) -> Result<LayerIndex, IndexError> {
        let mut new_id = vec![u32::MAX; self.nodes.len()];
        let mut order: Vec<NodeId> = vec![0];
        new_id[0] = 0;
        let mut i = 0;
        while i < order.len() {
            let old = order[i];
            for &kid in self.nodes[old as usize].kids.values() {
                if new_id[kid as usize] == u32::MAX {
                    new_id[kid as usize] = order.len() as u32;
                    order.push(kid);
                }
            }
            i += 1;
        }
        let mut nlink = vec![0u32; order.len()];
        for &old in &order {
            let n = &self.nodes[old as usize];
            if n.meta.kind == Kind::Dir {
                nlink[new_id[old as usize] as usize] += 2;
            }
            for &kid in n.kids.values() {
                let k = new_id[kid as usize] as usize;
                if self.nodes[kid as usize].meta.kind == Kind::Dir {
                    nlink[new_id[old as usize] as usize] += 1;
                } else {
                    nlink[k] += 1;
                }
            }
        }
        let mut index = LayerIndex::default();
        let mut nodes = self.nodes;
        for (pos, &old) in order.iter().enumerate() {
            let b = std::mem::replace(
                &mut nodes[old as usize],
                BNode {
                    meta: dir_meta(Timestamp::default()),
                    kids: BTreeMap::new(),
                },
            );
            let path_hint = || format!("inode {pos}");
            let first_chunk = index.chunks.len() as u32;
            if b.meta.kind == Kind::File {
                let mut expect = 0u64;
                for c in &b.meta.chunks {
                    if c.file_offset != expect || c.len == 0 {
                        return Err(IndexError::Entry {
                            layer: self.layer.clone(),
                            entry: path_hint(),
                            reason: format!(
                                "chunk at {} does not follow the previous one (expected {expect})",
                                c.file_offset
                            ),
                        });
                    }
                    if c.blob_offset.checked_add(c.blob_len).is_none_or(|end| end > blob_size) {
                        return Err(IndexError::Entry {
                            layer: self.layer.clone(),
                            entry: path_hint(),
                            reason: format!(
                                "chunk {}+{} lies outside the blob of {blob_size} bytes",
                                c.blob_offset, c.blob_len
                            ),
                        });
                    }
                    // Each chunk lies in the blob; their sum is checked too.
                    expect = expect.saturating_add(c.len);
                }
                if expect != b.meta.size {
                    return Err(IndexError::Entry {
                        layer: self.layer.clone(),
                        entry: path_hint(),
                        reason: format!("size {} but chunks cover {expect} bytes", b.meta.size),
                    });
                }
                index.chunks.extend(b.meta.chunks);
            }
            let mut children: Vec<(Box<[u8]>, NodeId)> = b
                .kids
                .into_iter()
                .map(|(name, id)| (name, new_id[id as usize]))
                .collect();
            children.sort_by(|a, b| a.0.cmp(&b.0));
            let mut xattrs = b.meta.xattrs;
            xattrs.sort();
            let size = match &b.meta.kind {
                Kind::File => b.meta.size,
                Kind::Symlink(t) => t.len() as u64,
                _ => 0,
            };
            index.nodes.push(Node {
                kind: b.meta.kind,
                mode: b.meta.mode & 0o7777,
                uid: b.meta.uid,
                gid: b.meta.gid,
                size,
                mtime: b.meta.mtime,
                nlink: nlink[pos].max(1),
                xattrs,
                children,
                first_chunk,
                chunk_count: index.chunks.len() as u32 - first_chunk,
            });
        }
        Ok(index)
    }
}

fn dir_meta(mtime: Timestamp) -> EntryMeta {
    EntryMeta {
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime,
        xattrs: Vec::new(),
        chunks: Vec::new(),
    }
}

/// `trusted.*` xattrs from an archive are dropped, as containerd's unpack
/// does: they would let a layer steer overlayfs (`trusted.overlay.*`).
fn drop_admin_xattrs(xattrs: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    xattrs.retain(|(k, _)| !k.starts_with(b"trusted."));
}

fn set_xattr(xattrs: &mut Vec<(Vec<u8>, Vec<u8>)>, name: &[u8], value: &[u8]) {
    match xattrs.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value.to_vec(),
        None => xattrs.push((name.to_vec(), value.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Encoding;
    use super::*;

    fn layer() -> Digest {
        Digest::of(b"layer")
    }

    fn file(size: u64, at: u64) -> EntryMeta {
        EntryMeta {
            kind: Kind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size,
            mtime: Timestamp { secs: 5, nanos: 7 },
            xattrs: Vec::new(),
            chunks: if size == 0 {
                Vec::new()
            } else {
                vec![Chunk {
                    file_offset: 0,
                    len: size,
                    blob_offset: at,
                    blob_len: size,
                    inner_offset: 0,
                    encoding: Encoding::Raw,
                    digest: None,
                    whole: None,
                }]
            },
        }
    }

    #[test]
    fn dotdot_and_absolute_paths_are_rejected_naming_the_entry() {
        let mut b = TreeBuilder::new(layer());
        let e = b.add(b"a/../../x", file(0, 0)).unwrap_err().to_string();
        assert!(e.contains("a/../../x") && e.contains(".."), "{e}");
        assert!(b.add(b"/etc/passwd", file(0, 0)).is_err());
    }

    #[test]
    fn whiteouts_become_char_devices_and_opaque_markers_an_xattr() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"d/.wh.gone", file(0, 0)).unwrap();
        b.add(b"d/.wh..wh..opq", file(0, 0)).unwrap();
        let idx = b.finish(0).unwrap();
        let d = idx.resolve("d").unwrap();
        let gone = idx.node(idx.resolve("d/gone").unwrap()).unwrap();
        assert_eq!(gone.kind, Kind::CharDev { major: 0, minor: 0 });
        assert_eq!(
            idx.node(d).unwrap().xattrs,
            vec![(OPAQUE_XATTR.to_vec(), b"y".to_vec())]
        );
        assert!(idx.resolve("d/.wh..wh..opq").is_none());
    }

    #[test]
    fn hard_links_share_one_node_with_the_last_headers_metadata() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"a/f", file(3, 0)).unwrap();
        let mut m = file(0, 0);
        m.mtime = Timestamp { secs: 99, nanos: 0 };
        b.add_hardlink(b"b/g", b"a/f", m).unwrap();
        let idx = b.finish(3).unwrap();
        let f = idx.resolve("a/f").unwrap();
        assert_eq!(Some(f), idx.resolve("b/g"));
        let n = idx.node(f).unwrap();
        assert_eq!((n.nlink, n.size, n.mtime.secs), (2, 3, 99));
    }

    #[test]
    fn trusted_xattrs_from_the_archive_are_dropped() {
        let mut b = TreeBuilder::new(layer());
        let mut m = file(0, 0);
        m.xattrs = vec![
            (b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()),
            (b"user.k".to_vec(), b"v".to_vec()),
        ];
        b.add(b"f", m).unwrap();
        let idx = b.finish(0).unwrap();
        assert_eq!(
            idx.node(idx.resolve("f").unwrap()).unwrap().xattrs,
            vec![(b"user.k".to_vec(), b"v".to_vec())]
        );
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"x", file(1, 0)).unwrap();
        b.add(b"x", file(2, 1)).unwrap();
        let idx = b.finish(3).unwrap();
        assert_eq!(idx.node(idx.resolve("x").unwrap()).unwrap().size, 2);
        assert_eq!(idx.nodes.len(), 2, "the replaced node is dropped");
    }

    #[test]
    fn a_size_that_lies_about_its_chunks_is_rejected() {
        let mut b = TreeBuilder::new(layer());
        let mut m = file(10, 0);
        m.size = 20;
        b.add(b"f", m).unwrap();
        assert!(b.finish(100).unwrap_err().to_string().contains("size 20"));
    }

    #[test]
    fn chunks_outside_the_blob_are_rejected() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"f", file(10, 95)).unwrap();
        assert!(b.finish(100).unwrap_err().to_string().contains("outside the blob"));
    }

    #[test]
    fn directory_link_counts_include_subdirectories() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"a/b/c", file(0, 0)).unwrap();
        let idx = b.finish(0).unwrap();
        assert_eq!(idx.node(0).unwrap().nlink, 3);
        assert_eq!(idx.node(idx.resolve("a/b").unwrap()).unwrap().nlink, 2);
    }

    #[test]
    fn every_chunk_maps_back_to_the_file_that_owns_it() {
        let mut b = TreeBuilder::new(layer());
        b.add(b"d/one", file(10, 0)).unwrap();
        b.add(b"d/empty", file(0, 0)).unwrap();
        b.add(b"e/two", file(10, 10)).unwrap();
        b.add(b"three", file(10, 20)).unwrap();
        let idx = b.finish(30).unwrap();
        for path in ["d/one", "e/two", "three"] {
            let node = idx.resolve(path).unwrap();
            let id = idx.node(node).unwrap().first_chunk;
            assert_eq!(idx.node_of_chunk(id), Some(node), "{path}");
        }
        assert_eq!(idx.node_of_chunk(3), None);
    }

    #[test]
    fn paths_longer_or_deeper_than_the_caps_are_refused() {
        let mut b = TreeBuilder::new(layer());
        let long = "a/".repeat(MAX_PATH / 2 + 1);
        let e = b.add(long.as_bytes(), file(0, 0)).unwrap_err().to_string();
        assert!(e.contains("over the limit") && e.contains('…'), "{e}");
        let deep = "a/".repeat(MAX_DEPTH + 1);
        let e = b.add(deep.as_bytes(), file(0, 0)).unwrap_err().to_string();
        assert!(e.contains("deeper than"), "{e}");
    }

    #[test]
    fn a_layer_of_more_entries_than_the_cap_is_refused() {
        let mut b = TreeBuilder::new(layer());
        assert_eq!(b.max_entries, MAX_ENTRIES);
        b.max_entries = 1000;
        let e = (0..=1000)
            .map(|i| b.add(format!("f{i}").as_bytes(), file(0, 0)))
            .find_map(Result::err)
            .expect("refused");
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn oversized_xattrs_and_symlink_targets_are_refused() {
        let mut b = TreeBuilder::new(layer());
        let mut m = file(0, 0);
        m.xattrs = vec![(b"user.k".to_vec(), vec![0; MAX_XATTR_VALUE + 1])];
        assert!(b.add(b"x", m).is_err());
        let mut m = file(0, 0);
        m.kind = Kind::Symlink(vec![b'a'; MAX_PATH + 1]);
        assert!(b.add(b"l", m).is_err());
    }
}
