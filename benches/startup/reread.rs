//! The re-read right after start-up (issue #16): once the registry has been
//! quiet for 5 s, every file under the snapshotter's and containerd's roots
//! has its page cache dropped with `posix_fadvise(DONTNEED)` (not
//! `drop_caches`, which would also drop what a node keeps cached for other
//! reasons), then a new container reads every weight file.
use crate::common::Containerd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Re-reads per run; the run's figure is their median.
pub const REREADS: usize = 3;

/// How long the link must not move before the re-read.
const QUIET: Duration = Duration::from_secs(5);

/// Waits until `received` (bytes from the registry so far) has not changed for `QUIET`;
/// gives up after two minutes and says so.
pub fn wait_quiet(received: &dyn Fn() -> u64) {
    let t0 = Instant::now();
    let (mut last, mut since) = (received(), Instant::now());
    while since.elapsed() < QUIET {
        if t0.elapsed() > Duration::from_secs(120) {
            eprintln!("[bench] the registry link never went quiet for {QUIET:?} in 2 minutes; re-reading anyway");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = received();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` on every regular file under `roots`, mounts below them
/// included (a FUSE file's page cache belongs to the mount's inode, not to the cache file
/// behind it); returns how many files. Symlinks are not followed.
pub fn fadvise_dontneed(roots: &[&Path]) -> u64 {
    let mut files = 0;
    let mut stack: Vec<std::path::PathBuf> = roots.iter().map(|r| r.to_path_buf()).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let p = e.path();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOATIME | libc::O_NONBLOCK)
                    .open(&p)
                    .or_else(|_| std::fs::File::open(&p));
                if let Ok(f) = f {
                    use std::os::fd::AsRawFd;
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                    files += 1;
                }
            }
        }
    }
    files
}

/// `cat /models/* > /dev/null` in a new container, timed inside it (around `cat` alone, not
/// the container's start); returns (file bytes, seconds).
fn read_models(ctd: &Containerd, snap: &[&str], image: &str, name: &str) -> (u64, f64) {
    let script = "a=$(date +%s%N); cat /models/* > /dev/null; b=$(date +%s%N); echo $((b - a)); stat -c %s /models/*";
    let args = [&["run", "--rm"][..], snap, &[image, name, "sh", "-c", script]].concat();
    let out = ctd.ctr(&args);
    let mut nums = out.split_whitespace().map(|w| w.parse::<u64>());
    let nanos = nums.next().and_then(Result::ok);
    let sizes: Result<Vec<u64>, _> = nums.collect();
    match (nanos, sizes) {
        (Some(n), Ok(s)) if !s.is_empty() => (s.iter().sum(), n as f64 / 1e9),
        _ => panic!("re-read {name} printed {out:?}"),
    }
}

/// The re-read, `REREADS` times: each waits for a quiet registry, drops the page caches of
/// every file under `roots` and reads all weights in a new container. Returns (bytes, median s).
pub fn reread(
    ctd: &Containerd,
    snap: &[&str],
    image: &str,
    id: &str,
    roots: &[&Path],
    received: &dyn Fn() -> u64,
) -> (u64, f64) {
    let mut bytes = 0;
    let mut times = Vec::new();
    for i in 0..REREADS {
        wait_quiet(received);
        let files = fadvise_dontneed(roots);
        let (b, secs) = read_models(ctd, snap, image, &format!("reread-{id}-{i}"));
        eprintln!("[bench] {id}: re-read {i}: {b} bytes in {secs:.3} s (fadvise on {files} files)");
        bytes = b;
        times.push(secs);
    }
    let (median, _, _) = crate::report::spread(times).expect("re-reads");
    (bytes, median)
}
