//! Owner-only paths: what streamsnap keeps (state, cache, snapshot and mount
//! dirs) must not be reachable by host users, as containerd keeps its own
//! snapshotters' dirs (CVE-2021-41103). A leaf module.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of directories we create.
pub const DIR_MODE: u32 = 0o700;
/// Mode of files we create.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` (and missing parents) and makes it 0700, whatever existed before.
pub fn dir(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE))
}

/// Creates (truncating) a 0600 file for writing.
pub fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

/// The same options with `mode(0o600)` applied, for callers that need more flags.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}
