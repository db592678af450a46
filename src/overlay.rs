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

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
