//! Memory with a many-file image (issue #16): daemon RSS once a container has walked and read
//! every one of 100,000 small files, streamsnap side by side with the stargz snapshotter on the
//! same eStargz image.
use crate::common::image::{finish_with_cmd, umoci};
use crate::common::{
    push_all, umount_all_under, write_random_file, Containerd, ContainerdOpts, Format, OciImage, Registry, ServeProcess,
};
use crate::procfs::{cpu_secs, peak_rss, rss};
use crate::report::spread;
use crate::stargz::Stargz;
use std::fmt::Write;
use std::path::Path;
use std::time::Instant;

/// Files per directory of the image's /data.
const PER_DIR: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Streamsnap,
    Stargz,
}

#[derive(Debug, Clone)]
pub struct FilesSample {
    pub daemon: Daemon,
    /// Files the first container found under /data.
    pub files: u64,
    /// `ctr run` of the walk (`find | wc -l`), timed around it.
    pub walk_secs: f64,
    /// Daemon VmRSS right after the walk.
    pub rss_walk: u64,
    /// `ctr run` of the second container, which reads every file, timed around it (only with
    /// `--files-read`).
    pub read_secs: Option<f64>,
    /// Daemon VmRSS right after the read (after the walk without one).
    pub rss: u64,
    /// Daemon VmHWM (peak) at that time.
    pub hwm: u64,
    /// Daemon CPU seconds (user + system), start to after the read.
    pub cpu: f64,
    /// Blob requests the registry logged from the pull's start to after the walk.
    pub requests: usize,
}

/// Builds (once, kept in `work`) the image: the benchmark's Debian userland, then a layer of
/// `count` files of 1–4 KiB (incompressible) in directories of 100 under /data.
fn build(work: &Path, count: u64) -> OciImage {
    let dir = work.join(format!("image-files-{count}"));
    let tag = format!("files{count}");
    let image = OciImage {
        layout: dir.join("layout"),
        tag: tag.clone(),
    };
    if dir.join("done").exists() {
        return image;
    }
    eprintln!("[bench] building the {count}-file image in {}", dir.display());
    let crate::image::Unpacked { img, bundle, root } = crate::image::unpacked_userland(work, &dir, &tag);
    let b = bundle.to_str().unwrap();
    umoci(&["repack", "--refresh-bundle", "--image", &img, b]);
    for i in 0..count {
        let p = root.join(format!("data/d{:04}/f{:03}", i / PER_DIR, i % PER_DIR));
        write_random_file(&p, 1024 + (i * 7919) % 3073, 5000 + i);
    }
    umoci(&["repack", "--image", &img, b]);
    let image = finish_with_cmd(&dir, &img, &bundle, &tag, &["sh"]);
    std::fs::write(dir.join("done"), "").unwrap();
    image
}

/// The many-file image as eStargz in `registry` (built and pushed once); returns its reference.
pub fn prepare(work: &Path, registry: &Registry, count: u64) -> String {
    // push_all's naming: ADDR/streamsnap/TAG:TAG-FORMAT.
    let reference = format!("{}/streamsnap/files{count}:files{count}-estargz", registry.addr());
    if !registry.has_manifest(&reference) {
        let image = build(work, count);
        eprintln!("[bench] pushing the {count}-file image as eStargz (once)");
        let pushed = push_all(&image, registry, &[Format::Estargz]);
        assert_eq!(pushed[0], reference, "pushed under another name");
    }
    reference
}

/// A fresh daemon and containerd; rpull; one container walks /data (counting its files), a
/// second reads every file; the daemon's memory after each.
pub fn run_once(daemon: Daemon, registry: &Registry, reference: &str, id: usize, read: bool) -> FilesSample {
    let addr = registry.addr();
    let root = tempfile::Builder::new().prefix("streamsnap-files-").tempdir().unwrap();
    let (serve, stargz, snapshotter) = match daemon {
        Daemon::Streamsnap => {
            let s = ServeProcess::start_with(root.path(), &["--insecure-registry", &addr, "--no-profile-replay"]);
            (Some(s), None, "streamsnap")
        }
        Daemon::Stargz => (None, Some(Stargz::start(&addr)), "stargz"),
    };
    let pid = serve
        .as_ref()
        .map(|s| s.pid())
        .or(stargz.as_ref().map(|s| s.pid()))
        .unwrap();
    let ctd = Containerd::start(ContainerdOpts {
        streamsnap_socket: serve.as_ref().map(|s| s.socket.clone()),
        proxy_snapshotters: stargz
            .iter()
            .map(|s| ("stargz".to_string(), s.socket.clone()))
            .collect(),
        ..Default::default()
    });
    let snap = ["--snapshotter", snapshotter];
    let mark = registry.mark();
    ctd.ctr_remote(&[&["images", "rpull", "--plain-http"][..], &snap, &[reference]].concat());
    let timed = |what: &str, script: &str| {
        let name = format!("files-{what}-{snapshotter}-{id}");
        let args = [&["run", "--rm"][..], &snap, &[reference, &name, "sh", "-c", script]].concat();
        let t0 = Instant::now();
        let out = ctd.ctr(&args);
        (out, t0.elapsed().as_secs_f64())
    };
    let (out, walk_secs) = timed("walk", "find /data -type f | wc -l");
    let files = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the walk printed {out:?}"));
    let rss_walk = rss(pid).expect("the daemon's VmRSS");
    let read_secs = read.then(|| timed("read", "find /data -type f -print0 | xargs -0 cat > /dev/null").1);
    let sample = FilesSample {
        daemon,
        files,
        walk_secs,
        rss_walk,
        read_secs,
        rss: rss(pid).expect("the daemon's VmRSS"),
        hwm: peak_rss(pid).expect("the daemon's VmHWM"),
        cpu: cpu_secs(pid).expect("the daemon's CPU time"),
        requests: registry.blob_requests_since(mark).len(),
    };
    drop(ctd);
    drop(serve);
    drop(stargz);
    umount_all_under(root.path());
    sample
}

/// The report's lines: medians per daemon and the ratios.
pub fn report(samples: &[FilesSample]) -> String {
    let mut t = String::new();
    let med = |d: Daemon, f: &dyn Fn(&FilesSample) -> f64| {
        spread(samples.iter().filter(|s| s.daemon == d).map(f).collect()).map(|x| x.0)
    };
    let files = samples.first().map(|s| s.files).unwrap_or(0);
    for (d, label) in [
        (Daemon::Streamsnap, "streamsnap"),
        (Daemon::Stargz, "stargz snapshotter"),
    ] {
        let m = |f: &dyn Fn(&FilesSample) -> f64| med(d, f).unwrap_or(f64::NAN);
        if med(d, &|s| s.rss as f64).is_none() {
            continue;
        }
        let read = match med(d, &|s| s.read_secs.unwrap_or(f64::NAN)).filter(|r| !r.is_nan()) {
            Some(secs) => format!(
                "{:.1} MB after a second read every file ({secs:.2} s)",
                m(&|s| s.rss as f64) / 1e6
            ),
            None => "files not read (no `--files-read`)".into(),
        };
        let _ = writeln!(
            t,
            "- {files}-file image (eStargz), {label}: daemon RSS {:.1} MB after a container walked /data \
             ({:.2} s around `ctr run`); {read}; peak {:.1} MB; {:.0} blob requests from the pull on; \
             daemon CPU {:.2} s",
            m(&|s| s.rss_walk as f64) / 1e6,
            m(&|s| s.walk_secs),
            m(&|s| s.hwm as f64) / 1e6,
            m(&|s| s.requests as f64),
            m(&|s| s.cpu),
        );
    }
    let ratio = |f: &dyn Fn(&FilesSample) -> f64| Some(med(Daemon::Streamsnap, f)? / med(Daemon::Stargz, f)?);
    let read = samples.iter().any(|s| s.read_secs.is_some());
    if let (Some(w), Some(r), Some(h)) = (
        ratio(&|s| s.rss_walk as f64),
        ratio(&|s| s.rss as f64),
        ratio(&|s| s.hwm as f64),
    ) {
        let after_read = if read {
            format!(", after the read {r:.3}")
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "- {files}-file image, streamsnap ÷ stargz snapshotter, daemon RSS after the walk {w:.3}{after_read}, peak {h:.3}"
        );
    }
    t
}
