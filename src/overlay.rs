//! Kernel mounts we make ourselves: read-only overlayfs over layer mounts
//! (or a bind mount for a single layer), and unmounting.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in path {}", p.display())))
}

/// Mounts `lowers` (topmost first) read-only at `target`.
pub fn mount_readonly(lowers: &[PathBuf], target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    match lowers {
        [] => Err(io::Error::new(io::ErrorKind::InvalidInput, "no layers to mount")),
        // overlayfs without an upper dir needs two lowers; one layer is a bind mount.
        [only] => {
            let src = cstr(only)?;
            // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
            check(unsafe {
                libc::mount(
                    src.as_ptr(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: as above; remount the bind read-only.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                )
            })
        }
        many => {
            let lowerdir: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            let opts = CString::new(format!("lowerdir={}", lowerdir.join(":"))).expect("no NUL in paths");
            if opts.as_bytes().len() >= 4096 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "overlay lowerdir option is longer than a page",
                ));
            }
            let fstype = CString::new("overlay").expect("literal");
            // SAFETY: valid NUL-terminated strings; data is a string option as overlayfs expects.
            check(unsafe {
                libc::mount(
                    fstype.as_ptr(),
                    t.as_ptr(),
                    fstype.as_ptr(),
                    libc::MS_RDONLY,
                    opts.as_ptr().cast(),
                )
            })
        }
    }
}

/// Unmounts `target`; `lazy` detaches it even while busy.
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let t = cstr(target)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(t.as_ptr(), flags) })
}

/// A mount as /proc/self/mountinfo lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device (`major`, `minor`); for FUSE, the minor numbers its connection.
    pub dev: (u32, u32),
    pub fs_type: String,
    pub source: String,
}

/// The topmost mount at `path`, found without touching the mounted filesystem
/// (only its parent is resolved): a FUSE mount whose server is gone, or stuck,
/// never answers, and asking it would hang the caller.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let canon = path.parent()?.canonicalize().ok()?.join(path.file_name()?);
    let want = escape_mountinfo(&canon.to_string_lossy());
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        if left.get(4) != Some(&want.as_str()) {
            return None;
        }
        let (major, minor) = left.get(2)?.split_once(':')?;
        let mut right = right.split(' ');
        Some(MountEntry {
            dev: (major.parse().ok()?, minor.parse().ok()?),
            fs_type: right.next()?.to_string(),
            source: right.next()?.to_string(),
        })
    })
}

/// Where the kernel's FUSE control filesystem lists connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mounts the FUSE control filesystem where init systems usually do, if nothing has.
fn mount_fusectl() {
    if is_mountpoint(Path::new(FUSECTL)) {
        return;
    }
    let (name, target) = (
        CString::new("fusectl").expect("literal"),
        CString::new(FUSECTL).expect("literal"),
    );
    // SAFETY: valid NUL-terminated strings; fusectl takes no data.
    let rc = unsafe { libc::mount(name.as_ptr(), target.as_ptr(), name.as_ptr(), 0, std::ptr::null()) };
    if let Err(e) = check(rc) {
        tracing::warn!(target = FUSECTL, error = %e, "cannot mount the FUSE control filesystem");
    }
}

/// mountinfo's escaping of space, tab, newline and backslash.
fn escape_mountinfo(path: &str) -> String {
    path.replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012")
}

/// FUSE mount points under `dir` (per /proc/self/mountinfo; nothing under it is touched).
pub fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let prefix = format!("{}/", escape_mountinfo(&dir.to_string_lossy()));
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let fs_type = right.split(' ').next()?;
            let fuse = fs_type == "fuse" || fs_type.starts_with("fuse.");
            (fuse && point.starts_with(&prefix)).then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect()
}

/// The inverse of `escape_mountinfo`.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// Removes a mount left at `path` by a process that is gone. A FUSE connection
/// is aborted first: a killed server can linger with requests that will never be
/// answered (even of its own threads), and aborting fails them so it can exit.
pub fn unmount_stale(path: &Path) {
    let Some(mount) = mount_at(path) else { return };
    if mount.fs_type == "fuse" || mount.fs_type.starts_with("fuse.") {
        mount_fusectl();
        let abort = format!("{FUSECTL}/{}/abort", mount.dev.1);
        if let Err(e) = std::fs::write(&abort, "1") {
            tracing::warn!(path = %path.display(), abort, error = %e, "cannot abort a stale FUSE connection");
        }
    }
    if let Err(e) = unmount(path, true) {
        tracing::warn!(path = %path.display(), error = %e, "cannot unmount a stale mount");
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
