//! A layer's FUSE connection: mounted anew, or taken over from a process
//! that died or handed it on.
//!
//! The connection is the `/dev/fuse` descriptor: the kernel keeps the mount
//! and its readers' requests as long as some process holds a copy. Every
//! mount keeps a copy for the descriptor keeper (`lifecycle`). A new process
//! given that copy answers the same connection: fuser only starts a session
//! with the FUSE_INIT handshake, which the kernel sent once, to the first
//! process. So the session is started on one end of a socket pair holding an
//! INIT message made from what the kernel offered the first time
//! ([`InitRecord`]); once fuser has answered it, the real descriptor is
//! duplicated over that end's number, and fuser goes on reading the kernel's
//! requests. Then FUSE_NOTIFY_RESEND (Linux 6.9+) makes the kernel queue again
//! every request the dead process had read and not answered.

use super::LayerFs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use tracing::warn;

/// Read-ahead window for the mount's backing device: FUSE_INIT can only lower
/// the kernel's 128 KiB default, so it is raised through sysfs after mounting.
const READ_AHEAD_KB: u32 = 4096;
const FUSE_INIT: u32 = 26;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_NOTIFY_RESEND: i32 = 7;

/// What the kernel offered a connection at FUSE_INIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitRecord {
    pub capabilities: u64,
    pub abi_minor: u32,
}

impl InitRecord {
    /// As kept beside the descriptor: `<capabilities hex>.<minor>`.
    pub fn encode(&self) -> String {
        format!("{:x}.{}", self.capabilities, self.abi_minor)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (caps, minor) = s.split_once('.')?;
        Some(Self {
            capabilities: u64::from_str_radix(caps, 16).ok()?,
            abi_minor: minor.parse().ok()?,
        })
    }

    /// The FUSE_INIT request the kernel sent: header, then `fuse_init_in`.
    fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(104);
        m.extend_from_slice(&104u32.to_ne_bytes()); // len
        m.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
        m.extend_from_slice(&1u64.to_ne_bytes()); // unique
        m.extend_from_slice(&[0; 24]); // nodeid, uid, gid, pid, total_extlen, padding
        let flags = self.capabilities | FUSE_INIT_EXT;
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&self.abi_minor.to_ne_bytes());
        m.extend_from_slice(&u32::MAX.to_ne_bytes()); // max_readahead: whatever we ask
        m.extend_from_slice(&(flags as u32).to_ne_bytes());
        m.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
        m.extend_from_slice(&[0; 44]); // unused
        m
    }
}

/// A layer's FUSE mount, served by its own threads. Dropping it unmounts;
/// [`MountedLayer::abandon`] leaves the mount to the descriptor's other holders.
pub struct MountedLayer {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    /// A copy of the connection's descriptor, for the keeper.
    device: OwnedFd,
    init: InitRecord,
    /// Taken over: fuser does not know the mount, so we unmount it.
    taken_over: bool,
}

impl MountedLayer {
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    pub fn init(&self) -> InitRecord {
        self.init
    }

    /// Ends this process's part without unmounting: the serving threads are
    /// left to die with the process, and the mount lives on while another
    /// process holds the descriptor.
    pub fn abandon(mut self) {
        std::mem::forget(self.session.take());
        self.taken_over = false;
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if self.taken_over {
            if let Err(e) = crate::overlay::unmount(&self.mountpoint, true) {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "cannot unmount taken-over layer");
            }
        }
    }
}

fn config(name: &str) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("streamsnap:{name}")),
        fuser::MountOption::Subtype("streamsnap".into()),
        fuser::MountOption::DefaultPermissions,
        // Containers see a layer through overlayfs, whose own mount decides on setuid
        // bits and device nodes and which reaches the layer with its mounter's (root's)
        // credentials: the layer mount itself needs neither, nor other users.
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::Exec,
    ];
    config.acl = fuser::SessionACL::Owner;
    config.n_threads = Some(2);
    // Both threads read the one descriptor the keeper holds a copy of. A cloned one
    // (FUSE_DEV_IOC_CLONE) dies with this process, and the kernel then ends the requests
    // read from it with ECONNABORTED instead of queueing them again on FUSE_NOTIFY_RESEND:
    // a container's read failed across a SIGKILL of the daemon (tests/survive.rs).
    config.clone_fd = false;
    config
}

impl LayerFs {
    /// Mounts this layer read-only at `mountpoint`.
    pub fn mount(self, mountpoint: &Path, name: &str) -> io::Result<MountedLayer> {
        if let Some(record) = &self.record {
            record.clear(); // a new connection: ids of an earlier one mean nothing
        }
        let offered = std::sync::Arc::clone(&self.offered);
        let session = fuser::Session::new(self, mountpoint, &config(name))?;
        let device = session.as_fd().try_clone_to_owned()?;
        let init = *offered.get().ok_or_else(|| io::Error::other("FUSE_INIT not seen"))?;
        let session = session.spawn()?;
        raise_read_ahead(mountpoint);
        Ok(MountedLayer {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            device,
            init,
            taken_over: false,
        })
    }

    /// Serves the connection of the mount at `mountpoint`, given its
    /// descriptor and what its kernel offered at FUSE_INIT (see the module doc).
    pub fn take_over(mut self, device: OwnedFd, init: InitRecord, mountpoint: &Path) -> io::Result<MountedLayer> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        self.taken_over = true;
        if let Some(record) = &self.record {
            self.open.get_mut().inherited = record.load(self.index.nodes.len());
        }
        let (ours, kernel_side) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        nix::unistd::write(&kernel_side, &init.message())?;
        let slot = ours.as_raw_fd();
        let session = fuser::Session::from_fd(self, ours, fuser::SessionACL::Owner, config(""))?;
        // The session's descriptor number now names the connection itself.
        // SAFETY: `slot` is the session's open descriptor and `device` a valid
        // one; dup3 replaces the former atomically and leaves ownership as is.
        if unsafe { libc::dup3(device.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(kernel_side);
        resend_pending(&device);
        let session = session.spawn()?;
        Ok(MountedLayer {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            device,
            init,
            taken_over: true,
        })
    }
}

/// Asks the kernel to queue again every request of the connection that was
/// read and not answered (by a process now gone). Linux before 6.9 does not
/// know the notification: those requests then wait until the mount goes.
fn resend_pending(device: &OwnedFd) {
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_ne_bytes());
    m.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes());
    if let Err(e) = nix::unistd::write(device, &m) {
        warn!(error = %e, "FUSE_NOTIFY_RESEND refused (Linux before 6.9?): requests the previous process had read stay unanswered");
    }
}

/// Sets the mount's read-ahead to `READ_AHEAD_KB`: sequential readers then keep
/// several 1 MiB FUSE reads in flight instead of one 128 KiB read at a time.
/// Best effort: without it reads are slower, never wrong.
fn raise_read_ahead(mountpoint: &Path) {
    // Not stat(2): a request to our own mount would hang this thread for good
    // if the daemon were killed before answering it.
    let Some(mount) = crate::overlay::mount_at(mountpoint) else {
        return warn!(mountpoint = %mountpoint.display(), "the new mount is not in mountinfo");
    };
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", mount.dev.0, mount.dev.1);
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        warn!(mountpoint = %mountpoint.display(), knob, error = %e, "cannot raise read-ahead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_init_record_survives_its_encoding() {
        let r = InitRecord {
            capabilities: 0x1_2345_6789,
            abi_minor: 41,
        };
        assert_eq!(InitRecord::decode(&r.encode()), Some(r));
        assert_eq!(InitRecord::decode("zz.1"), None);
    }

    #[test]
    fn the_init_message_is_a_whole_fuse_init_request() {
        let m = InitRecord {
            capabilities: 1 << 33,
            abi_minor: 41,
        }
        .message();
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(m[44..48].try_into().unwrap()), 41, "minor");
        assert_eq!(
            u32::from_ne_bytes(m[52..56].try_into().unwrap()),
            1 << 30,
            "INIT_EXT set"
        );
        assert_eq!(
            u32::from_ne_bytes(m[56..60].try_into().unwrap()),
            2,
            "high flags in flags2"
        );
    }
}
