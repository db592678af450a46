//! File-level helpers of the disk cache: sidecar names, durability, sparse
//! partial entries and their O_DIRECT writes.

use super::books::PartialFiles;
use super::SUMS;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The sums sidecar of the whole-file entry at `file`.
pub(super) fn sums_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(SUMS);
    PathBuf::from(name)
}

/// Flushes everything written to the filesystem holding `f`.
pub(super) fn syncfs(f: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs takes a descriptor `f` keeps open for the call.
    match unsafe { libc::syncfs(f.as_raw_fd()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Creates a sparse partial entry of `size` bytes and opens it twice: plainly and with O_DIRECT.
pub(super) fn create_partial(path: &Path, size: u64) -> io::Result<PartialFiles> {
    crate::private::dir(path.parent().expect("cache path has a parent"))?;
    let f = crate::private::options()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(path)?;
    f.set_len(size)?;
    let direct = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
        .map(Arc::new);
    Ok((Arc::new(f), direct))
}

/// Writes `data` at `offset`; its page-aligned part through `direct` (O_DIRECT)
/// when there is one: the device copies it, not the CPU, which a cold read of
/// a large file is short of. The unaligned tail goes through the page cache.
pub(super) fn write_at(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    data: &[u8],
    offset: u64,
) -> io::Result<()> {
    const ALIGN: usize = 4096;
    let aligned = data.as_ptr() as usize % ALIGN == 0 && offset % ALIGN as u64 == 0;
    let head = if aligned { data.len() / ALIGN * ALIGN } else { 0 };
    if let (Some(d), true) = (direct, head > 0) {
        match d.write_all_at(&data[..head], offset) {
            Ok(()) => return file.write_all_at(&data[head..], offset + head as u64),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // no O_DIRECT here after all
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(data, offset)
}
