//! Index nodes as FUSE attributes.

use crate::index::{Kind, Node, NodeId, Timestamp};
use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn file_type(kind: &Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink(_) => FileType::Symlink,
        Kind::CharDev { .. } => FileType::CharDevice,
        Kind::BlockDev { .. } => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::from_nanos(t.nanos as u64)
    }
}

/// The kernel's `new_encode_dev`: the device number layout FUSE carries.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

pub fn file_attr(id: NodeId, n: &Node) -> FileAttr {
    let rdev = match n.kind {
        Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => encode_dev(major, minor),
        _ => 0,
    };
    let t = system_time(n.mtime);
    FileAttr {
        ino: INodeNo(id as u64 + 1),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(&n.kind),
        perm: n.mode as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x1200 << 12));
    }

    #[test]
    fn negative_times_are_before_the_epoch() {
        let t = system_time(Timestamp {
            secs: -2,
            nanos: 500_000_000,
        });
        assert_eq!(UNIX_EPOCH.duration_since(t).unwrap(), Duration::from_millis(1500));
    }
}
