//! Read-only FUSE filesystem over one layer's index: exactly what overlayfs
//! expects of an unpacked layer. Metadata comes from memory; reads are handed
//! to the async runtime and answered when their chunks arrive, so no FUSE
//! thread ever waits on the network. Layers are immutable: the kernel may
//! cache attributes, entries and pages for as long as it likes. A file whose
//! whole content is cached is opened in passthrough mode: the kernel reads the
//! cache file itself, at local-disk speed.

mod attr;
mod backing;
mod session;

pub use backing::BackingRecord;
pub use session::{InitRecord, MountedLayer};

use crate::fetch::Fetcher;
use crate::index::{Kind, LayerIndex, NodeId};
use fuser::{
    BackingId, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Kernel cache lifetime for entries and attributes: layers never change.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest read the kernel may send (and read-ahead it may do).
const MAX_READ: u32 = 1 << 20;

/// File handles: how an open file is served.
const FH_FUSE: FileHandle = FileHandle(0);
const FH_PASSTHROUGH: FileHandle = FileHandle(1);

/// Open files per node. The kernel refuses passthrough for an inode that is
/// also open through FUSE's page cache, so a node is served one way at a time.
#[derive(Default)]
struct OpenFiles {
    fuse: HashMap<NodeId, u32>,
    passthrough: HashMap<NodeId, Backing>,
    /// Backing ids an earlier process of a taken-over mount opened (see
    /// `backing`), not yet used by this one.
    inherited: BTreeMap<NodeId, u32>,
}

/// A node's backing file in the kernel, and this process's opens of it.
struct Backing {
    id: BackingId,
    /// `id`'s number in the connection, for the record.
    raw: u32,
    open: u32,
    /// Kept until the mount goes: the earlier process's opens are uncounted.
    pinned: bool,
}

impl Backing {
    /// `raw` wrapped as `id`, for its first open by this process.
    fn first_open(id: BackingId, raw: u32, pinned: bool) -> Self {
        Self {
            id,
            raw,
            open: 1,
            pinned,
        }
    }
}

impl OpenFiles {
    /// What the record must list: every id an inode may be tied to.
    fn recorded(&self) -> Vec<(NodeId, u32)> {
        let live = self.passthrough.iter().map(|(&n, b)| (n, b.raw));
        live.chain(self.inherited.iter().map(|(&n, &id)| (n, id))).collect()
    }
}

/// The FUSE side of one layer.
pub struct LayerFs {
    fetcher: Arc<Fetcher>,
    index: Arc<LayerIndex>,
    runtime: tokio::runtime::Handle,
    passthrough: bool,
    open: Mutex<OpenFiles>,
    /// What the kernel offered at FUSE_INIT (kept for a later takeover).
    offered: Arc<std::sync::OnceLock<InitRecord>>,
    /// Serving a connection an earlier process set up (see `session`).
    taken_over: bool,
    /// Where the nodes open in passthrough mode are kept (see `backing`);
    /// none for a mount no other process takes over (`streamsnap mount`).
    record: Option<BackingRecord>,
}

impl LayerFs {
    pub fn new(fetcher: Arc<Fetcher>, runtime: tokio::runtime::Handle) -> Self {
        let index = Arc::clone(fetcher.index());
        Self {
            fetcher,
            index,
            runtime,
            passthrough: false,
            open: Mutex::default(),
            offered: Arc::default(),
            taken_over: false,
            record: None,
        }
    }

    /// Keeps the nodes open in passthrough mode in `record` (see `backing`).
    pub fn with_backing_record(mut self, record: BackingRecord) -> Self {
        self.record = Some(record);
        self
    }

    /// Stores what `open` ties inodes to; false (and a warning) if it cannot.
    fn store_record(&self, open: &OpenFiles) -> bool {
        let Some(record) = &self.record else { return true };
        match record.store(open.recorded()) {
            Ok(()) => true,
            Err(e) => {
                warn!(layer = %self.fetcher.layer(), record = %record.path().display(), error = %e, "cannot write the passthrough record");
                false
            }
        }
    }

    /// Opens `id` in passthrough mode if its whole content is cached and no FUSE-mode handle is open.
    fn open_passthrough(&self, open: &mut OpenFiles, id: NodeId, reply: ReplyOpen) -> Result<(), ReplyOpen> {
        if let Some(b) = open.passthrough.get_mut(&id) {
            b.open += 1;
            reply.opened_passthrough(FH_PASSTHROUGH, FopenFlags::empty(), &b.id);
            return Ok(());
        }
        if let Some(raw) = open.inherited.remove(&id) {
            // SAFETY: the earlier process opened `raw` on this connection and
            // never closed it (it is in the record, written before any close),
            // and it stays open: pinned, it is only closed with the mount.
            let backing = unsafe { reply.wrap_backing(raw) };
            reply.opened_passthrough(FH_PASSTHROUGH, FopenFlags::empty(), &backing);
            open.passthrough.insert(id, Backing::first_open(backing, raw, true));
            info!(layer = %self.fetcher.layer(), node = id, backing_id = raw, "opened in passthrough mode under the earlier process's backing id");
            return Ok(());
        }
        if !self.passthrough || open.fuse.contains_key(&id) {
            return Err(reply);
        }
        let Some(path) = self.fetcher.cached_file(id) else {
            return Err(reply);
        };
        match std::fs::File::open(&path).and_then(|f| reply.open_backing(&f)) {
            Ok(backing) => {
                let raw = backing.into_raw();
                // SAFETY: `raw` was opened on this connection just now and is
                // closed only by dropping this wrapper.
                let backing = unsafe { reply.wrap_backing(raw) };
                open.passthrough.insert(id, Backing::first_open(backing, raw, false));
                // Recorded before the kernel ties the inode to it.
                if !self.store_record(open) {
                    open.passthrough.remove(&id);
                    return Err(reply);
                }
                reply.opened_passthrough(FH_PASSTHROUGH, FopenFlags::empty(), &open.passthrough[&id].id);
                info!(layer = %self.fetcher.layer(), node = id, "file fully cached: opened in passthrough mode");
                Ok(())
            }
            Err(e) => {
                warn!(layer = %self.fetcher.layer(), node = id, path = %path.display(), error = %e, "passthrough open failed, serving through FUSE");
                Err(reply)
            }
        }
    }

    /// One passthrough open of `id` ended: its backing id is closed with the
    /// last one, once the record no longer lists it (else it stays, pinned).
    fn release_passthrough(&self, open: &mut OpenFiles, id: NodeId) {
        let Some(b) = open.passthrough.get_mut(&id) else { return };
        b.open = b.open.saturating_sub(1);
        if b.open > 0 || b.pinned {
            return;
        }
        let Some(gone) = open.passthrough.remove(&id) else {
            return;
        };
        if self.store_record(open) {
            drop(gone); // closes the backing id
        } else {
            let b = Backing { pinned: true, ..gone };
            open.passthrough.insert(id, b);
        }
    }

    fn node_of(&self, ino: INodeNo) -> Result<NodeId, Errno> {
        let id = ino.0.checked_sub(1).ok_or(Errno::ENOENT)?;
        if (id as usize) < self.index.nodes.len() {
            Ok(id as NodeId)
        } else {
            Err(Errno::ENOENT)
        }
    }

    fn attr(&self, id: NodeId) -> fuser::FileAttr {
        attr::file_attr(id, &self.index.nodes[id as usize])
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_background(64);
        let wanted = fuser::InitFlags::FUSE_ASYNC_READ
            | fuser::InitFlags::FUSE_CACHE_SYMLINKS
            | fuser::InitFlags::FUSE_PARALLEL_DIROPS
            | fuser::InitFlags::FUSE_MAX_PAGES;
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = self.offered.set(InitRecord {
            capabilities: config.capabilities().bits(),
            abi_minor: config.kernel_abi().1,
        });
        // Depth 1: backing files live on a plain filesystem, and overlayfs can still stack on this one.
        // Not after a takeover: the earlier process's open files are unknown, and the
        // kernel fails a passthrough open of an inode open through the page cache.
        if !self.taken_over
            && config.capabilities().contains(fuser::InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough = true;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .node_of(parent)
            .and_then(|p| self.index.lookup(p, name.as_bytes()).ok_or(Errno::ENOENT));
        match found {
            Ok(id) => reply.entry(&TTL, &self.attr(id), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node_of(ino) {
            Ok(id) => reply.attr(&TTL, &self.attr(id)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node_of(ino).map(|id| &self.index.nodes[id as usize].kind) {
            Ok(Kind::Symlink(target)) => reply.data(target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let id = match self.node_of(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        // One decision under one lock: a node is never open both ways at once.
        let mut open = self.open.lock();
        if let Err(reply) = self.open_passthrough(&mut open, id, reply) {
            *open.fuse.entry(id).or_default() += 1;
            reply.opened(FH_FUSE, FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let id = match self.node_of(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        let fetcher = Arc::clone(&self.fetcher);
        let started = Instant::now();
        self.runtime.spawn(async move {
            let result = fetcher.read(id, offset, size).await;
            fetcher.metrics().fuse_read(started.elapsed());
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    // Unverifiable or unreachable data is never handed out.
                    error!(layer = %fetcher.layer(), inode = ino.0, offset, size, error = %e, "read failed, answering EIO");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: fuser::ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        if let Ok(id) = self.node_of(ino) {
            let mut open = self.open.lock();
            if fh == FH_PASSTHROUGH {
                self.release_passthrough(&mut open, id);
            } else if let Some(count) = open.fuse.get_mut(&id) {
                *count -= 1;
                if *count == 0 {
                    open.fuse.remove(&id);
                }
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: fuser::ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node_of(ino) {
            Ok(id) if self.index.nodes[id as usize].kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let id = match self.node_of(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        let node = &self.index.nodes[id as usize];
        // Offsets: 1 = ".", 2 = "..", 3.. = children.
        let dots = [(ino, &b"."[..]), (ino, &b".."[..])];
        let entries =
            dots.into_iter()
                .map(|(i, n)| (i, fuser::FileType::Directory, n))
                .chain(node.children.iter().map(|(name, kid)| {
                    (
                        INodeNo(*kid as u64 + 1),
                        attr::file_type(&self.index.nodes[*kid as usize].kind),
                        name.as_ref(),
                    )
                }));
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index.content_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.index.nodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let id = match self.node_of(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        let xattrs = &self.index.nodes[id as usize].xattrs;
        match xattrs.binary_search_by(|(k, _)| k.as_slice().cmp(name.as_bytes())) {
            Ok(i) => reply_sized(reply, size, &xattrs[i].1),
            Err(_) => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let id = match self.node_of(ino) {
            Ok(id) => id,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (k, _) in &self.index.nodes[id as usize].xattrs {
            names.extend_from_slice(k);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: fuser::ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); only refuse writes.
        let _ = ino;
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}

/// xattr protocol: size 0 asks for the length; too small a buffer is ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        warn!(needed = data.len(), size, "xattr buffer too small");
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}
