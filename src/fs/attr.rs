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

/// Never panics on a FUSE thread: out-of-range nanoseconds carry into the
/// seconds and a time the platform cannot represent becomes the epoch.
fn system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(t.nanos.into());
    let at = if t.secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.secs.unsigned_abs()))
    };
    at.and_then(|at| at.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
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
    fn nanoseconds_of_a_full_second_or_more_carry_instead_of_panicking() {
        let t = system_time(Timestamp {
            secs: 1,
            nanos: 1_000_000_000,
        });
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::from_secs(2));
        let t = system_time(Timestamp {
            secs: 0,
            nanos: u32::MAX,
        });
        assert!(t > UNIX_EPOCH);
    }

    #[test]
    fn times_the_platform_cannot_hold_become_the_epoch() {
        let t = system_time(Timestamp {
            secs: i64::MAX,
            nanos: u32::MAX,
        });
        assert_eq!(t, UNIX_EPOCH);
        system_time(Timestamp {
            secs: i64::MIN,
            nanos: u32::MAX,
        });
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
