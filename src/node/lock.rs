//! One state dir, one owner: a process that opens a state dir holds an
//! exclusive `flock` on `<state>/lock` for as long as it runs. Opening the disk
//! cache drops partial entries and evicts by its own view, so a second
//! process (a `mount` or `index` next to the daemon) must refuse instead.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the state dir.
const LOCK_FILE: &str = "lock";

/// A state dir this process owns; the lock goes with the value (or the process).
#[derive(Debug)]
pub struct StateLock {
    root: PathBuf,
    _file: File,
}

/// The state dir cannot be owned.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "state dir {root} is in use by another streamsnap process ({holder}); stop it or choose another state dir"
    )]
    InUse { root: PathBuf, holder: Holder },
    #[error("locking state dir {root}: {source}")]
    Io {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who holds a lock, as far as its lock file says.
#[derive(Debug)]
pub struct Holder(Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("pid unknown"),
        }
    }
}

impl StateLock {
    /// Creates `root` (0700) if needed and takes its lock without waiting.
    pub fn acquire(root: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            root: root.to_path_buf(),
            source,
        };
        crate::private::dir(root).map_err(io_err)?;
        let mut file = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE))
            .map_err(io_err)?;
        // SAFETY: flock takes a descriptor this function owns (open above) and plain flags.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err(e));
            }
            let mut text = String::new();
            // The holder may not have written its pid yet: then it is unknown.
            let _ = file.read_to_string(&mut text);
            return Err(LockError::InUse {
                root: root.to_path_buf(),
                holder: Holder(text.trim().parse().ok()),
            });
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(Self {
            root: root.to_path_buf(),
            _file: file,
        })
    }

    /// The state dir this lock owns.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_of_a_state_dir_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateLock::acquire(dir.path()).unwrap();
        // flock locks belong to open files, so a second open in this process conflicts too.
        let err = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
    }

    #[test]
    fn a_released_state_dir_can_be_owned_again() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateLock::acquire(dir.path()).unwrap());
        StateLock::acquire(dir.path()).unwrap();
    }
}
