//! Integration-test support: real docker-registry, real containerd, real test images
//! (umoci + GNU tar), pushes in four layer formats, containerd ground truth, tree comparison.
//! Every helper panics loudly (with the tool's stderr) instead of skipping.
#![allow(dead_code, unused_imports)]

pub mod containerd;
pub mod containerd2;
pub mod cri;
pub mod fsutil;
pub mod image;
pub mod proxy;
pub mod push;
pub mod raw;
pub mod registry;
pub mod streamsnap;
pub mod tree;

pub use containerd::{containerd_unpack, Containerd, ContainerdOpts, MountedImage, Release};
pub use fsutil::write_random_file;
pub use image::{
    build_big_layer_image, build_feature_image, build_files_image, build_runnable_image, layer_listings, BigLayerImage,
    OciImage,
};
pub use proxy::{Fault, FaultProxy};
pub use push::{push, push_all, verify_pushed, Format};
pub use registry::{BlobRequest, Registry, RegistryOpts};
pub use streamsnap::{index_image, MountProcess, ServeProcess};
pub use tree::{compare_trees, CompareOpts};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` to completion and returns its stdout; panics with the full command, exit status and stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = run_output(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns its raw output whatever the exit status; panics only if it cannot be spawned (tool missing).
pub fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run {:?}: {e} (is the tool installed? see .ci/run / apt packages)",
            cmd
        ),
    }
}

/// Runs a `sh -c` script and returns stdout; panics with stderr on failure.
pub fn run_sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Panics with a clear message unless `tool` is found on PATH (tests must fail, never skip).
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(tool).is_file());
    assert!(
        found,
        "required tool `{tool}` not found on PATH: install it (Debian package) before running tests"
    );
}

/// Panics unless running as root: containerd, mounts, mknod and chown all need it.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these integration tests must run as root"
    );
}

/// Returns a currently free TCP port on 127.0.0.1 (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// An IPv4 address of this machine that is not loopback (for a registry
/// that must not be on loopback); panics when the machine has none.
pub fn non_loopback_ipv4() -> String {
    let out = run(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]));
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!("no global IPv4 address on this machine; add one, e.g. `ip link add d0 type dummy; ip addr add 198.18.0.1/32 dev d0; ip link set d0 up`")
        })
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// No FUSE mount under `dir` (per /proc/self/mountinfo)?
pub fn no_fuse_mount_under(dir: &Path) -> bool {
    fuse_mounts_under(dir).is_empty()
}

/// FUSE mount points (a daemon's layer mounts) at or below `dir`, from this process's mountinfo.
pub fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = PathBuf::from(unescape_mountinfo(pre.split(' ').nth(4)?));
            (post.starts_with("fuse") && point.starts_with(&dir)).then_some(point)
        })
        .collect()
}

/// Waits until `log()` holds `needle` `count` times (or panics with the log).
pub fn wait_for_log(log: impl Fn() -> String, needle: &str, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while log().matches(needle).count() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "no {count}x {needle:?} in:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGTERM to a child, waits up to `grace`, then SIGKILLs it; used by the Drop impls.
pub fn terminate(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Lazily unmounts (MNT_DETACH) every mount point at or below `dir`, deepest first; errors are ignored.
pub fn umount_all_under(dir: &Path) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| Path::new(p).starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let c = std::ffi::CString::new(p).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
