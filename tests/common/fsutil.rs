//! Low-level file-system helpers (libc) used to build test trees with exact metadata.
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path contains NUL")
}

fn check(rc: libc::c_int, what: &str, p: &Path) {
    if rc != 0 {
        panic!("{what} {}: {}", p.display(), std::io::Error::last_os_error());
    }
}

/// Creates parent directories and writes `content` to `p`.
pub fn write_file(p: &Path, content: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    std::fs::write(p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Writes `size` deterministic incompressible bytes (xorshift64*, seeded) to `p`, quickly.
pub fn write_random_file(p: &Path, size: u64, seed: u64) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    let f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut x: u64 = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        w.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    w.flush().unwrap();
}

/// Deterministic pseudo-random bytes in memory (same generator as `write_random_file`).
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    write_random_file(tmp.path(), size as u64, seed);
    std::fs::read(tmp.path()).unwrap()
}

/// `mkdir -p`.
pub fn mkdirs(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
}

/// lchown(2): sets uid/gid without following symlinks (clears setuid and security.capability, so call it first).
pub fn lchown(p: &Path, uid: u32, gid: u32) {
    check(unsafe { libc::lchown(cpath(p).as_ptr(), uid, gid) }, "lchown", p);
}

/// chmod with the full mode including setuid/setgid/sticky bits.
pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

/// lsetxattr(2) with an arbitrary binary value.
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let rc = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    check(rc, &format!("lsetxattr {name}"), p);
}

/// The `security.capability` value setcap writes for `cap_net_bind_service,cap_net_raw+ep` (VFS_CAP_REVISION_2).
pub fn capability_bytes() -> Vec<u8> {
    let magic: u32 = 0x0200_0000 | 0x1; // revision 2 | effective
    let permitted: u32 = (1 << 10) | (1 << 13);
    let mut v = Vec::new();
    for w in [magic, permitted, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// utimensat(AT_SYMLINK_NOFOLLOW): sets atime and mtime to `secs.nsec` (works on symlinks too).
pub fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "utimensat", p);
}

/// mknod(2) for a character device `major:minor` with permission bits `perm`.
pub fn mknod_char(p: &Path, perm: u32, major: u32, minor: u32) {
    let dev = libc::makedev(major, minor);
    check(
        unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFCHR | perm, dev) },
        "mknod c",
        p,
    );
}

/// mknod(2) for a block device `major:minor`.
pub fn mknod_block(p: &Path, perm: u32, major: u32, minor: u32) {
    let dev = libc::makedev(major, minor);
    check(
        unsafe { libc::mknod(cpath(p).as_ptr(), libc::S_IFBLK | perm, dev) },
        "mknod b",
        p,
    );
}

/// mkfifo(3).
pub fn mkfifo(p: &Path, perm: u32) {
    check(unsafe { libc::mkfifo(cpath(p).as_ptr(), perm) }, "mkfifo", p);
}

/// Creates a symlink `p -> target`.
pub fn symlink(target: &str, p: &Path) {
    std::os::unix::fs::symlink(target, p).unwrap_or_else(|e| panic!("symlink {} -> {target}: {e}", p.display()));
}

/// Creates a hard link `new` to `existing`.
pub fn hardlink(existing: &Path, new: &Path) {
    if let Some(d) = new.parent() {
        mkdirs(d);
    }
    std::fs::hard_link(existing, new).unwrap_or_else(|e| panic!("link {} {}: {e}", existing.display(), new.display()));
}
