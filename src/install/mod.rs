//! `streamsnap install` / `streamsnap uninstall`: streamsnap merged into the node's containerd
//! config (version 2 for containerd 1.6/1.7, version 3 for 2.x), the original kept byte for byte
//! next to it until `uninstall` puts it back, containerd restarted only when the file changed.
//!
//! - [`merge`]: the config text edit itself (pure, no I/O).
//! - [`files`]: reading, backing up, atomically writing and restoring the config; the restart.
//! - [`report`]: what the commands print.

pub mod files;
pub mod merge;
pub mod report;

pub use files::{install, uninstall, Installed, Options, Uninstalled};
pub use merge::{Change, ConfigVersion, MergeError};

use std::path::PathBuf;

/// What failed, on which file or command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (`reason` is no `source`: its text is already in the message, once is enough.)
    #[error("containerd config {path}: {reason} (left unchanged)")]
    Config { path: PathBuf, reason: MergeError },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshotter socket {0} is not valid UTF-8")]
    Address(PathBuf),
    #[error(
        "cannot tell the config version for {config} (it declares none): running `{binary} --version`: \
         {reason}; pass --config-version"
    )]
    ContainerdVersion {
        config: PathBuf,
        binary: PathBuf,
        reason: String,
    },
    #[error("both {0} and {1} exist: cannot tell which original to restore")]
    TwoBackups(PathBuf, PathBuf),
    #[error(
        "restart command `{command}` failed ({status}); the config file is written, and the next \
         install or uninstall restarts containerd again"
    )]
    Restart { command: String, status: String },
}

#[cfg(test)]
mod tests;
