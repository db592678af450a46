//! Layer mounts that outlive the daemon. Each layer's FUSE connection is a
//! `/dev/fuse` descriptor, and the kernel keeps a mount (with its readers'
//! pending requests) as long as some process holds one. The descriptor
//! keeper (`streamsnap keeper`, [`keeper::run`]) is a small process of ours
//! that holds a copy of every mount's descriptor, by name, on a unix socket
//! in the state dir; the daemon starts it when none answers there (it is no
//! child that dies with the daemon: its own process group, reaped by whoever
//! inherits it). The daemon hands it each new mount, takes the copies back
//! after a restart to answer the same connections (`fs::MountedLayer`), and
//! tells it when containerd removes a snapshot. The keeper drops a
//! descriptor whose connection the kernel ended, and exits once it holds
//! none and no daemon has talked to it for a minute, or when told to.
//!
//! Wire: SOCK_SEQPACKET, one text message per packet, descriptors as
//! SCM_RIGHTS. Requests: `put <name> <meta>` (+ descriptor), `del <name>`,
//! `list`, `quit`; each answered `ok` or `err <reason>`, `list` with one
//! `fd <name> <meta>` (+ descriptor) per held mount, then `ok`.

pub mod keeper;
mod wire;

use parking_lot::Mutex;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::info;

/// The keeper's socket, in the state dir.
pub const SOCKET: &str = "keeper.sock";
/// Its log, beside it.
const LOG: &str = "keeper.log";
/// Longest wait for a keeper just started to listen.
const START_WAIT: Duration = Duration::from_secs(5);

/// A failed exchange with the keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("descriptor keeper at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("descriptor keeper at {path}: {request}: {reason}")]
    Refused {
        path: PathBuf,
        request: String,
        reason: String,
    },
}

/// A mount's descriptor as the keeper held it.
pub struct Held {
    pub name: String,
    pub meta: String,
    pub fd: OwnedFd,
}

/// The daemon's connection to its keeper.
pub struct Keeper {
    path: PathBuf,
    sock: Mutex<OwnedFd>,
}

impl Keeper {
    /// Connects to the keeper of state dir `root`, starting one if none answers.
    pub fn connect_or_start(root: &Path) -> Result<Self, KeeperError> {
        let path = root.join(SOCKET);
        let err = |source| KeeperError::Io {
            path: path.clone(),
            source,
        };
        if let Ok(sock) = wire::connect(&path) {
            info!(socket = %path.display(), "descriptor keeper found");
            return Ok(Self {
                path,
                sock: Mutex::new(sock),
            });
        }
        let _ = std::fs::remove_file(&path);
        let log = crate::private::options()
            .create(true)
            .append(true)
            .open(root.join(LOG))
            .map_err(err)?;
        let exe = std::env::current_exe().map_err(err)?;
        let mut child = std::process::Command::new(exe)
            .arg("keeper")
            .arg("--socket")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Not in the daemon's group: a signal to the group must not reach it.
            .process_group(0)
            .spawn()
            .map_err(err)?;
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        let started = Instant::now();
        loop {
            match wire::connect(&path) {
                Ok(sock) => {
                    info!(socket = %path.display(), pid, "descriptor keeper started");
                    return Ok(Self {
                        path,
                        sock: Mutex::new(sock),
                    });
                }
                Err(e) if started.elapsed() > START_WAIT => return Err(err(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Hands the keeper a copy of mount `name`'s descriptor, with `meta`.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>, meta: &str) -> Result<(), KeeperError> {
        self.request(&format!("put {name} {meta}"), Some(fd)).map(drop)
    }

    /// The keeper closes its copy of mount `name`'s descriptor.
    pub fn forget(&self, name: &str) -> Result<(), KeeperError> {
        self.request(&format!("del {name}"), None).map(drop)
    }

    /// Copies of every descriptor the keeper holds.
    pub fn held(&self) -> Result<Vec<Held>, KeeperError> {
        self.request("list", None)
    }

    /// The keeper closes every descriptor it holds and exits.
    pub fn quit(&self) -> Result<(), KeeperError> {
        self.request("quit", None).map(drop)
    }

    fn request(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> Result<Vec<Held>, KeeperError> {
        let io = |source| KeeperError::Io {
            path: self.path.clone(),
            source,
        };
        let sock = self.sock.lock();
        wire::send(&sock, text, fd).map_err(io)?;
        let mut held = Vec::new();
        loop {
            let (reply, fd) = wire::recv(&sock)
                .map_err(io)?
                .ok_or_else(|| io(io::Error::new(io::ErrorKind::UnexpectedEof, "the keeper hung up")))?;
            let mut words = reply.splitn(3, ' ');
            match (words.next(), words.next(), words.next(), fd) {
                (Some("ok"), ..) => return Ok(held),
                (Some("fd"), Some(name), meta, Some(fd)) => held.push(Held {
                    name: name.to_string(),
                    meta: meta.unwrap_or_default().to_string(),
                    fd,
                }),
                _ => {
                    return Err(KeeperError::Refused {
                        path: self.path.clone(),
                        request: text.split(' ').next().unwrap_or_default().to_string(),
                        reason: reply,
                    })
                }
            }
        }
    }
}

/// `streamsnap shutdown`: the keeper of state dir `root` (if one runs) closes
/// its descriptors and exits, and every FUSE mount under `root` is taken
/// down (connection aborted, lazily unmounted). Returns how many.
pub fn shutdown(root: &Path) -> Result<usize, KeeperError> {
    let path = root.join(SOCKET);
    if let Ok(sock) = wire::connect(&path) {
        Keeper {
            path,
            sock: Mutex::new(sock),
        }
        .quit()?;
    }
    let mounts = crate::overlay::fuse_mounts_under(&root.join("snapshots"));
    for m in &mounts {
        crate::overlay::unmount_stale(m);
    }
    Ok(mounts.len())
}
