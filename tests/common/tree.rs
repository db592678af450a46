//! Entry-by-entry comparison of two directory trees (lstat, xattrs, content hashes, hard-link partition).
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Options for `compare_trees`.
#[derive(Debug, Clone, Default)]
pub struct CompareOpts {
    /// Top-level names present in either tree to ignore (e.g. `stargz.index.json`, `.no.prefetch.landmark`).
    pub ignore_root_names: Vec<String>,
    /// Allowed |mtime difference| in nanoseconds (e.g. 1_000_000_000 for formats storing whole seconds).
    pub mtime_tolerance_ns: u64,
    /// Skip comparing the root directory's own attributes (mode/owner/mtime/xattrs).
    pub ignore_root_attrs: bool,
    /// Skip mtime comparison for directories (overlay/FUSE may touch them).
    pub ignore_dir_mtime: bool,
    /// Xattr name prefixes to ignore on both sides (e.g. "trusted.": containerd's applier drops them).
    pub ignore_xattr_prefixes: Vec<String>,
}

impl CompareOpts {
    /// Options that ignore the artefacts eStargz/zstd:chunked conversion adds at the image root, and the
    /// root directory's own attributes (a layer without a `.` entry gets an unpack-time root mtime).
    pub fn stargz_artefacts() -> CompareOpts {
        CompareOpts {
            ignore_root_names: ["stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ignore_root_attrs: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i128,
    target: Option<String>,
    rdev: Option<(u32, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
    sha256: Option<String>,
    inode: (u64, u64),
    nlink: u64,
}

/// Compares `ours` against `truth` and returns one readable line per difference (empty = equal).
/// Covers presence, type, mode (incl. setuid/setgid/sticky), uid, gid, size, mtime (ns), symlink target,
/// device numbers, all xattrs, sha256 of regular files, and the hard-link partition of paths.
pub fn compare_trees(ours: &Path, truth: &Path, opts: CompareOpts) -> Vec<String> {
    let opts = &opts;
    let a = scan(ours, opts);
    let b = scan(truth, opts);
    let mut diffs = Vec::new();
    let all: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for p in &all {
        match (a.get(*p), b.get(*p)) {
            (Some(_), None) => diffs.push(format!("{p}: present in ours, missing in truth")),
            (None, Some(_)) => diffs.push(format!("{p}: missing in ours (present in truth)")),
            (Some(x), Some(y)) => compare_entry(p, x, y, opts, &mut diffs),
            (None, None) => unreachable!(),
        }
    }
    // Hard-link identity: for every path, the set of paths sharing its inode must match.
    let groups = |m: &BTreeMap<String, Entry>| {
        let mut by_ino: BTreeMap<(u64, u64), BTreeSet<String>> = BTreeMap::new();
        for (p, e) in m {
            if e.kind != "dir" {
                by_ino.entry(e.inode).or_default().insert(p.clone());
            }
        }
        let mut per_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for set in by_ino.values() {
            for p in set {
                per_path.insert(p.clone(), set.clone());
            }
        }
        per_path
    };
    let (ga, gb) = (groups(&a), groups(&b));
    let mut reported = BTreeSet::new();
    for (p, sa) in &ga {
        let Some(sb) = gb.get(p) else { continue };
        if sa != sb && reported.insert((sa.clone(), sb.clone())) {
            diffs.push(format!("{p}: hard-link group differs: ours {sa:?}, truth {sb:?}"));
        }
    }
    diffs
}

fn compare_entry(p: &str, x: &Entry, y: &Entry, opts: &CompareOpts, d: &mut Vec<String>) {
    if x.kind != y.kind {
        d.push(format!("{p}: type differs: ours {}, truth {}", x.kind, y.kind));
        return;
    }
    if p == "/" && opts.ignore_root_attrs {
        return;
    }
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{p}: {name} differs: ours {a}, truth {b}"));
        }
    };
    field("mode", format!("{:o}", x.mode), format!("{:o}", y.mode));
    field("uid", x.uid.to_string(), y.uid.to_string());
    field("gid", x.gid.to_string(), y.gid.to_string());
    if x.kind != "dir" {
        // Directory sizes are file-system specific.
        field("size", x.size.to_string(), y.size.to_string());
        field("nlink", x.nlink.to_string(), y.nlink.to_string());
    }
    field("symlink target", format!("{:?}", x.target), format!("{:?}", y.target));
    field("rdev", fmt_rdev(x.rdev), fmt_rdev(y.rdev));
    field("sha256", format!("{:?}", x.sha256), format!("{:?}", y.sha256));
    let skip_mtime = x.kind == "dir" && opts.ignore_dir_mtime;
    if !skip_mtime && (x.mtime_ns - y.mtime_ns).unsigned_abs() > opts.mtime_tolerance_ns as u128 {
        field("mtime", fmt_ns(x.mtime_ns), fmt_ns(y.mtime_ns));
    }
    let ignored = |k: &String| opts.ignore_xattr_prefixes.iter().any(|p| k.starts_with(p.as_str()));
    let keys: BTreeSet<&String> = x.xattrs.keys().chain(y.xattrs.keys()).filter(|k| !ignored(k)).collect();
    for k in keys {
        let (a, b) = (x.xattrs.get(k), y.xattrs.get(k));
        if a != b {
            d.push(format!(
                "{p}: xattr {k} differs: ours {}, truth {}",
                fmt_val(a),
                fmt_val(b)
            ));
        }
    }
}

fn fmt_rdev(r: Option<(u32, u32)>) -> String {
    r.map(|(a, b)| format!("{a}:{b}")).unwrap_or_else(|| "-".into())
}

fn fmt_ns(ns: i128) -> String {
    format!("{}.{:09}", ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

fn fmt_val(v: Option<&Vec<u8>>) -> String {
    match v {
        None => "<absent>".into(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) if !s.contains('\0') => format!("{s:?}"),
            _ => format!("0x{}", hex::encode(v)),
        },
    }
}

fn scan(root: &Path, opts: &CompareOpts) -> BTreeMap<String, Entry> {
    let md = std::fs::symlink_metadata(root).unwrap_or_else(|e| panic!("lstat {}: {e}", root.display()));
    assert!(md.is_dir(), "{} is not a directory", root.display());
    let mut out = BTreeMap::new();
    out.insert("/".to_string(), entry(root, &md));
    walk(root, "", &mut out, opts);
    out
}

fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Entry>, opts: &CompareOpts) {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
    for e in rd {
        let e = e.unwrap_or_else(|err| panic!("readdir {}: {err}", dir.display()));
        let name = e.file_name().to_string_lossy().into_owned();
        if rel.is_empty() && opts.ignore_root_names.contains(&name) {
            continue;
        }
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|err| panic!("lstat {}: {err}", p.display()));
        let r = format!("{rel}/{name}");
        let en = entry(&p, &md);
        let is_dir = en.kind == "dir";
        out.insert(r.clone(), en);
        if is_dir {
            walk(&p, &r, out, opts);
        }
    }
}

fn entry(p: &Path, md: &std::fs::Metadata) -> Entry {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chardev"
    } else if ft.is_block_device() {
        "blockdev"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown"
    };
    let rdev = (ft.is_char_device() || ft.is_block_device()).then(|| {
        (
            libc::major(md.rdev() as libc::dev_t) as u32,
            libc::minor(md.rdev() as libc::dev_t) as u32,
        )
    });
    let target = ft.is_symlink().then(|| {
        std::fs::read_link(p)
            .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
            .to_string_lossy()
            .into_owned()
    });
    Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: md.len(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        target,
        rdev,
        xattrs: xattrs(p),
        sha256: ft.is_file().then(|| file_sha256(p)),
        inode: (md.dev(), md.ino()),
        nlink: md.nlink(),
    }
}

/// sha256 (hex) of a regular file's content.
pub fn file_sha256(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// All extended attributes of `p` (not following symlinks), via llistxattr/lgetxattr.
pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut out = BTreeMap::new();
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOTSUP) {
            return out;
        }
        panic!("llistxattr {}: {err}", p.display());
    }
    let mut names = vec![0u8; n as usize + 1024];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr() as *mut libc::c_char, names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    for name in names[..n as usize].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(
            len >= 0,
            "lgetxattr {} {:?}: {}",
            p.display(),
            cn,
            std::io::Error::last_os_error()
        );
        let mut v = vec![0u8; len as usize + 256];
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr() as *mut libc::c_void, v.len()) };
        assert!(
            len >= 0,
            "lgetxattr {} {:?}: {}",
            p.display(),
            cn,
            std::io::Error::last_os_error()
        );
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}
