//! `streamsnap keeper`: holds mounts' FUSE descriptors for whichever daemon
//! comes next (see the module above). One thread, one poll loop, no state
//! but the descriptors: nothing in it can fail the way a daemon can.

use super::wire;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, bind, listen, Backlog, SockFlag, UnixAddr};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// With nothing held and no daemon connected for this long, the keeper exits.
const IDLE_EXIT: Duration = Duration::from_secs(60);
/// How often the loop wakes to look at idleness.
const TICK: u16 = 5000;

/// Serves the keeper's socket at `path` until told to quit or idle.
pub fn run(path: &Path) -> io::Result<()> {
    let listener = wire::seqpacket()?;
    let _ = std::fs::remove_file(path);
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&listener, Backlog::new(16)?)?;
    info!(socket = %path.display(), "descriptor keeper listening");
    let mut held: BTreeMap<String, (OwnedFd, String)> = BTreeMap::new();
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        let names: Vec<String> = held.keys().cloned().collect();
        let (ready, ended) = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(clients.iter().map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)));
            // No events asked: only an error (the kernel ended the connection) wakes us.
            fds.extend(held.values().map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::empty())));
            match poll(&mut fds, PollTimeout::from(TICK)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let fired = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let ready: Vec<bool> = fds.iter().map(fired).collect();
            let ended: Vec<String> = names
                .iter()
                .zip(&ready[1 + clients.len()..])
                .filter(|(_, r)| **r)
                .map(|(n, _)| n.clone())
                .collect();
            (ready, ended)
        };
        for name in ended {
            held.remove(&name);
            info!(name, "mount's connection ended: descriptor dropped");
        }
        let mut gone = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            if !ready[1 + i] {
                continue;
            }
            match wire::recv(client) {
                Ok(Some((text, fd))) => match handle(&mut held, client, &text, fd) {
                    Ok(Flow::Go) => {}
                    Ok(Flow::Quit) => {
                        info!(descriptors = held.len(), "told to quit: closing every descriptor");
                        let _ = wire::send(client, "ok", None);
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(error = %e, "answering a daemon failed");
                        gone.push(i);
                    }
                },
                Ok(None) => gone.push(i),
                Err(e) => {
                    warn!(error = %e, "reading from a daemon failed");
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if ready[0] {
            match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor this process owns.
                Ok(fd) => clients.push(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) => warn!(error = %e, "accepting a daemon failed"),
            }
        }
        if !held.is_empty() || !clients.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > IDLE_EXIT {
            info!("nothing held and no daemon for a minute: exiting");
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
    }
}

enum Flow {
    Go,
    Quit,
}

fn handle(
    held: &mut BTreeMap<String, (OwnedFd, String)>,
    client: &OwnedFd,
    text: &str,
    fd: Option<OwnedFd>,
) -> io::Result<Flow> {
    let mut words = text.splitn(3, ' ');
    match (words.next(), words.next(), words.next(), fd) {
        (Some("put"), Some(name), meta, Some(fd)) => {
            held.insert(name.to_string(), (fd, meta.unwrap_or_default().to_string()));
            wire::send(client, "ok", None)?;
        }
        (Some("del"), Some(name), None, None) => {
            held.remove(name);
            wire::send(client, "ok", None)?;
        }
        (Some("list"), None, None, None) => {
            for (name, (fd, meta)) in held.iter() {
                wire::send(client, &format!("fd {name} {meta}"), Some(fd.as_fd()))?;
            }
            wire::send(client, "ok", None)?;
        }
        (Some("quit"), None, None, None) => return Ok(Flow::Quit),
        _ => wire::send(client, &format!("err malformed request {text:?}"), None)?,
    }
    Ok(Flow::Go)
}
