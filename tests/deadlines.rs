//! A stalled registry costs a bounded wait and holds up nothing else: real
//! registries (one behind a proxy that trickles bodies), `streamsnap serve`
//! with short deadlines from its config file, real containerd and FUSE.
mod common;
use common::*;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const READ_DEADLINE: u64 = 8;
const STALL_TIMEOUT: u64 = 2;

/// Reads the first 4 KiB of `path` with O_DIRECT: one FUSE read, no page
/// cache (whose retry of a failed read-ahead would ask a second time).
fn direct_read(path: &Path) -> std::io::Result<usize> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a non-zero-sized layout; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    use std::os::fd::AsRawFd;
    // SAFETY: buf holds 4096 writable bytes.
    let n = unsafe { libc::pread(f.as_raw_fd(), buf.cast(), 4096, 0) };
    let result = match n {
        n if n < 0 => Err(std::io::Error::last_os_error()),
        n => Ok(n as usize),
    };
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result
}

#[test]
fn a_read_from_a_stalled_registry_fails_within_the_deadline_while_another_image_runs() {
    require_root();
    let healthy = Registry::start();
    let stalling = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let runnable = build_runnable_image(&work.path().join("runnable"), 4);
    let runnable = push(&runnable, &healthy, Format::Estargz);
    let big = build_big_layer_image(&work.path().join("big"), 8);
    let pushed = push(&big.image, &stalling, Format::Estargz);
    let proxy = FaultProxy::start(&stalling.addr());
    let stalled_ref = pushed.replacen(&stalling.addr(), &proxy.addr(), 1);

    let config = work.path().join("streamsnap.toml");
    std::fs::write(
        &config,
        format!("[fetch]\nread_deadline = {READ_DEADLINE}\nstall_timeout = {STALL_TIMEOUT}\n"),
    )
    .unwrap();
    let root = work.path().join("streamsnap");
    let serve = ServeProcess::start_with(&root, &["--config", config.to_str().unwrap()]);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });

    containerd.rpull(&stalled_ref);
    let mounts = fuse_mounts_under(&root);
    let big_file = mounts
        .iter()
        .map(|m| m.join(&big.big_path))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no layer mount holds {} among {mounts:?}", big.big_path));

    // From now on the registry sends headers, then one byte every 20 s.
    proxy.set(
        "/blobs/",
        Fault::Stall {
            every: Duration::from_secs(20),
        },
    );
    let reader = std::thread::spawn(move || {
        let started = Instant::now();
        let result = direct_read(&big_file);
        (result, started.elapsed())
    });

    // Meanwhile an image from the healthy registry is pulled and run.
    let started = Instant::now();
    containerd.rpull(&runnable);
    let out = containerd.ctr(&["run", "--rm", "--snapshotter", "streamsnap", &runnable, "healthy"]);
    assert_eq!(out.trim(), "hello from streamsnap");
    eprintln!("healthy image pulled and run in {:.1?}", started.elapsed());

    let (result, waited) = reader.join().unwrap();
    eprintln!("stalled read answered after {waited:.1?}: {result:?}");
    let err = result.expect_err("the stalled read returned data");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let bound = Duration::from_secs(READ_DEADLINE + STALL_TIMEOUT + 2);
    assert!(waited <= bound, "the read waited {waited:?}, over {bound:?}");
    assert!(
        waited >= Duration::from_secs(READ_DEADLINE - 1),
        "failed before the deadline: {waited:?}"
    );
    // The daemon's output is collected by a thread: give it a moment.
    let deadline_line = || {
        serve
            .log()
            .lines()
            .find(|l| l.contains("read deadline passed"))
            .map(str::to_string)
    };
    let waiting = Instant::now();
    while deadline_line().is_none() && waiting.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = serve.log();
    let line = deadline_line().unwrap_or_else(|| panic!("no deadline log line:\n{log}"));
    eprintln!("{line}");
    assert!(
        line.contains("/big.bin") && line.contains("sha256:") && line.contains(&proxy.addr()),
        "the log line does not name image, layer and file: {line}"
    );
    assert!(log.contains("stalled connection"), "no stall was detected:\n{log}");
    drop(containerd);
    serve.stop();
}
