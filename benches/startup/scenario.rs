//! One timed run of each way to start the server: containerd's overlayfs full
//! pull (1.6, and 2.1 at its fastest), streamsnap's lazy pull, the stargz
//! snapshotter's, and the raw transfer of every layer blob.
use crate::common::{run, umount_all_under, Containerd, ContainerdOpts, Registry, Release, ServeProcess};
use crate::net::Link;
use crate::procfs::{cpu_secs, peak_rss};
use crate::reread::reread;
use crate::stargz::Stargz;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Curl,
    Overlay,
    Overlay21,
    Streamsnap,
    GzipIndex,
    GzipFirst,
    GzipSecond,
    Profile,
    Stargz,
}

impl Scenario {
    /// Every start-up scenario, in the order a round runs them.
    pub const ALL: [Scenario; 9] = [
        Scenario::Curl,
        Scenario::Overlay,
        Scenario::Overlay21,
        Scenario::Streamsnap,
        Scenario::Stargz,
        Scenario::GzipIndex,
        Scenario::GzipFirst,
        Scenario::GzipSecond,
        Scenario::Profile,
    ];

    /// The id `--only` takes.
    pub fn id(self) -> &'static str {
        match self {
            Scenario::Curl => "curl",
            Scenario::Overlay => "overlay",
            Scenario::Overlay21 => "overlay21",
            Scenario::Streamsnap => "estargz",
            Scenario::GzipIndex => "gzindex",
            Scenario::GzipFirst => "gzfirst",
            Scenario::GzipSecond => "gzsecond",
            Scenario::Profile => "profile",
            Scenario::Stargz => "stargz",
        }
    }

    pub fn from_id(id: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.id() == id)
    }

    /// For the plot's axis.
    pub fn short(self) -> &'static str {
        match self {
            Scenario::Curl => "curl (floor)",
            Scenario::Overlay => "overlayfs",
            Scenario::Overlay21 => "overlayfs, 2.1",
            Scenario::Streamsnap => "eStargz",
            Scenario::GzipIndex => "gzip + index",
            Scenario::GzipFirst => "gzip, first node",
            Scenario::GzipSecond => "gzip, second node",
            Scenario::Profile => "eStargz + profile",
            Scenario::Stargz => "stargz snapshotter",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Curl => "raw curl of all layer blobs",
            Scenario::Overlay => "overlayfs full pull (gzip), containerd 1.6",
            Scenario::Overlay21 => "overlayfs full pull (gzip), containerd 2.1, parallel ranges",
            Scenario::Streamsnap => "streamsnap lazy pull (eStargz)",
            Scenario::GzipIndex => "streamsnap lazy pull (unmodified gzip + index)",
            Scenario::GzipFirst => {
                "streamsnap, unmodified gzip, no index: first node (indexes on first use, publishes)"
            }
            Scenario::GzipSecond => "streamsnap lazy pull, unmodified gzip: second node (index published by the first)",
            Scenario::Profile => "streamsnap lazy pull (eStargz) + start-up profile",
            Scenario::Stargz => "stargz snapshotter lazy pull (eStargz)",
        }
    }
}

/// What one run measured; times count from the pull's start.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ready: Option<Duration>,
    pub serving: Duration,
    pub bytes_before_ready: Option<u64>,
    pub bytes_total: u64,
    /// (bytes, seconds) of a warm read of one weight file, page caches dropped first.
    pub warm_read: Option<(u64, f64)>,
    /// (bytes, seconds) of the re-read of every weight file right after start-up: the median
    /// of `reread::REREADS` reads in new containers (`reread.rs`).
    pub reread: Option<(u64, f64)>,
    /// Peak resident memory of the snapshotter daemon (lazy pulls only).
    pub peak_rss: Option<u64>,
    /// CPU seconds (user + system) the snapshotter daemon used from its start to the
    /// container's exit after `serving` (lazy pulls only).
    pub cpu_serving: Option<f64>,
    /// The same to the daemon's stop (re-reads, warm reads and background fetch included).
    pub cpu_secs: Option<f64>,
}

/// The registry and what the runs pull from it.
pub struct Target<'a> {
    pub registry: &'a Registry,
    pub link: Option<&'a Link>,
    pub gzip_ref: String,
    pub estargz_ref: String,
    /// A config file every `streamsnap serve` of a start-up scenario reads.
    pub serve_config: Option<std::path::PathBuf>,
}

impl Target<'_> {
    /// Received bytes: on the wire when shaped (IP packets: about 3% over the bodies), else blob
    /// bytes the registry logged. Not the registry's count on a shaped link: its relay reads
    /// ahead, so a request the client drops (containerd 2.1's parallel ranges do) counts in full.
    pub fn counter(&self) -> impl Fn() -> u64 + '_ {
        let mark = self.registry.mark();
        let rx0 = self.link.map(|l| l.rx_bytes()).unwrap_or(0);
        move || match self.link {
            Some(l) => l.rx_bytes() - rx0,
            None => self.registry.bytes_logged_since(mark),
        }
    }
}

pub fn drop_caches() {
    run(std::process::Command::new("sh").args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"]));
}

pub fn run_once(s: Scenario, t: &Target, id: usize, warm: bool) -> Sample {
    match s {
        Scenario::Curl => curl(t),
        Scenario::Overlay => overlay(t, id, warm, Release::System1_6),
        Scenario::Overlay21 => overlay(t, id, warm, Release::V2_1),
        Scenario::Stargz => stargz(t, id, warm),
        Scenario::Streamsnap => streamsnap(t, &t.estargz_ref, &format!("lazy-{id}"), warm, true, COLD),
        Scenario::GzipIndex => streamsnap(t, &t.gzip_ref, &format!("gzindex-{id}"), warm, true, COLD),
        // No referrers trusted: the index `streamsnap index` pushed next to the image is not
        // seen, so the first node builds its own and publishes it where the second looks.
        Scenario::GzipFirst => {
            let repo = first_use_repo(t);
            let flags = [
                "--no-profile-replay",
                "--build-index-on-first-use",
                "--publish-index",
                &repo,
            ];
            streamsnap(t, &t.gzip_ref, &format!("gzfirst-{id}"), warm, true, &flags)
        }
        Scenario::GzipSecond => {
            let repo = first_use_repo(t);
            let flags = ["--no-profile-replay", "--index-repo", &repo];
            streamsnap(t, &t.gzip_ref, &format!("gzsecond-{id}"), warm, true, &flags)
        }
        // The profile recorded by `record_profile` is found next to the image and replayed; the
        // scenario is about start-up only (no warm read, no re-read).
        Scenario::Profile => streamsnap(t, &t.estargz_ref, &format!("profile-{id}"), false, false, TRUSTING),
    }
}

fn curl(t: &Target) -> Sample {
    let (_, digests) = t.registry.layers(&t.gzip_ref);
    let repo = t.gzip_ref.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sSf", "-Z", "--parallel-max", "8"]);
    for d in &digests {
        cmd.arg("-o")
            .arg("/dev/null")
            .arg(format!("http://{}/v2/{repo}/blobs/{d}", t.registry.addr()));
    }
    drop_caches();
    let bytes = t.counter();
    let t0 = Instant::now();
    run(&mut cmd);
    let serving = t0.elapsed();
    Sample {
        ready: None,
        serving,
        bytes_before_ready: None,
        bytes_total: bytes(),
        warm_read: None,
        reread: None,
        peak_rss: None,
        cpu_serving: None,
        cpu_secs: None,
    }
}

fn overlay(t: &Target, id: usize, warm: bool, release: Release) -> Sample {
    let ctd = Containerd::start(ContainerdOpts {
        release,
        parallel_pull: release == Release::V2_1,
        ..Default::default()
    });
    drop_caches();
    let bytes = t.counter();
    let t0 = Instant::now();
    ctd.ctr(&["images", "pull", "--plain-http", &t.gzip_ref]);
    let (ready, serving, before) = watch(&ctd, &[], &t.gzip_ref, &format!("overlay-{id}"), t0, &bytes);
    let total = bytes();
    let reread = reread(&ctd, &[], &t.gzip_ref, &format!("overlay-{id}"), &[&ctd.root()], &bytes);
    let warm_read = warm.then(|| warm_read(&ctd, &[], &t.gzip_ref, &id.to_string()));
    Sample {
        ready: Some(ready),
        serving,
        bytes_before_ready: Some(before),
        bytes_total: total,
        warm_read,
        reread: Some(reread),
        peak_rss: None,
        cpu_serving: None,
        cpu_secs: None,
    }
}

/// Indexes and the profile published next to the benchmark's own image: a
/// fresh node takes them only because it opts into referrers.
const TRUSTING: &[&str] = &["--trust-referrers"];
/// Cold runs ignore the published start-up profile.
const COLD: &[&str] = &["--trust-referrers", "--no-profile-replay"];

/// Where the first node publishes the indexes it built on first use.
fn first_use_repo(t: &Target) -> String {
    format!("{}/bench/first-use-indexes", t.registry.addr())
}

/// A fresh `streamsnap serve FLAGS` (empty cache and index cache) and containerd; rpull, run;
/// then the re-reads (if `rereads`) and the warm read (if `warm`).
fn streamsnap(t: &Target, image: &str, name: &str, warm: bool, rereads: bool, flags: &[&str]) -> Sample {
    let root = tempfile::Builder::new().prefix("streamsnap-bench-").tempdir().unwrap();
    let addr = t.registry.addr();
    let config = t.serve_config.as_ref().map(|c| c.to_string_lossy().into_owned());
    let config = config.iter().flat_map(|c| ["--config", c.as_str()]);
    let args: Vec<&str> = ["--insecure-registry", addr.as_str()]
        .into_iter()
        .chain(config)
        .chain(flags.iter().copied())
        .collect();
    let serve = ServeProcess::start_with(root.path(), &args);
    let ctd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    drop_caches();
    let bytes = t.counter();
    let t0 = Instant::now();
    let snap = ["--snapshotter", "streamsnap"];
    ctd.ctr_remote(&[&["images", "rpull", "--plain-http"][..], &snap, &[image]].concat());
    let (ready, serving, before) = watch(&ctd, &snap, image, name, t0, &bytes);
    let (total, cpu_serving) = (bytes(), cpu_secs(serve.pid()));
    let reread = rereads.then(|| reread(&ctd, &snap, image, name, &[root.path(), &ctd.root()], &bytes));
    let warm_read = warm.then(|| {
        settle(&root.path().join("state/cache"));
        let r = warm_read(&ctd, &snap, image, name);
        // Whether the kernel read the cache file itself (passthrough) or every read came through FUSE.
        let log = serve.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("passthrough")).collect();
        eprintln!(
            "[bench] {name}: passthrough log lines: {}\n{}",
            lines.len(),
            lines.join("\n")
        );
        r
    });
    let (peak_rss, cpu_secs) = (peak_rss(serve.pid()), cpu_secs(serve.pid()));
    drop(ctd);
    drop(serve);
    umount_all_under(root.path());
    Sample {
        ready: Some(ready),
        serving,
        bytes_before_ready: Some(before),
        bytes_total: total,
        warm_read,
        reread,
        peak_rss,
        cpu_serving,
        cpu_secs,
    }
}

/// A fresh stargz snapshotter and containerd 1.6; `ctr-remote images rpull` of the same eStargz
/// image, run.
fn stargz(t: &Target, id: usize, warm: bool) -> Sample {
    let daemon = Stargz::start(&t.registry.addr());
    let ctd = Containerd::start(ContainerdOpts {
        proxy_snapshotters: vec![("stargz".into(), daemon.socket.clone())],
        ..Default::default()
    });
    drop_caches();
    let bytes = t.counter();
    let t0 = Instant::now();
    let snap = ["--snapshotter", "stargz"];
    let image = &t.estargz_ref;
    ctd.ctr_remote(&[&["images", "rpull", "--plain-http"][..], &snap, &[image]].concat());
    let name = format!("stargz-{id}");
    let (ready, serving, before) = watch(&ctd, &snap, image, &name, t0, &bytes);
    let (total, cpu_serving) = (bytes(), cpu_secs(daemon.pid()));
    let reread = Some(reread(&ctd, &snap, image, &name, &[daemon.root(), &ctd.root()], &bytes));
    let warm_read = warm.then(|| {
        settle(&daemon.state());
        warm_read(&ctd, &snap, image, &name)
    });
    let (peak_rss, cpu_secs) = (peak_rss(daemon.pid()), cpu_secs(daemon.pid()));
    drop(ctd);
    drop(daemon);
    Sample {
        ready: Some(ready),
        serving,
        bytes_before_ready: Some(before),
        bytes_total: total,
        warm_read,
        reread,
        peak_rss,
        cpu_serving,
        cpu_secs,
    }
}

/// Records the image's start-up profile once, as a first node would: the
/// server runs until it prints `ready` and is then stopped; the profile
/// (reads until they went quiet) is pushed next to the eStargz image.
/// Returns the file bytes start-up read, as the profile lists them.
pub fn record_profile(t: &Target) -> u64 {
    let root = tempfile::Builder::new().prefix("streamsnap-record-").tempdir().unwrap();
    let addr = t.registry.addr();
    let serve = ServeProcess::start_with(
        root.path(),
        &[
            "--insecure-registry",
            &addr,
            "--profile-quiet",
            "2",
            "--no-profile-replay",
        ],
    );
    let ctd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let snap = ["--snapshotter", "streamsnap"];
    ctd.ctr_remote(&[&["images", "rpull", "--plain-http"][..], &snap, &[&t.estargz_ref]].concat());
    let mut child = ctd
        .command(
            "ctr",
            &[&["run", "--rm"][..], &snap, &[&t.estargz_ref, "record"]].concat(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ctr run");
    let ready = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "ready");
    assert!(ready, "the recording run never printed ready");
    let _ = ctd.try_ctr(&["task", "kill", "-s", "SIGKILL", "record"]);
    let _ = child.wait();
    let t0 = Instant::now();
    while !serve.log().contains("start-up profile recorded") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no profile recorded:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = root.path().join("state/profiles");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .next()
        .expect("a profile")
        .path();
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let bytes = profile["reads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["len"].as_u64().unwrap_or(0))
        .sum();
    run(std::process::Command::new(crate::common::streamsnap::binary())
        .args(["profile", "push", "--plain-http", "--state-dir"])
        .arg(root.path().join("state"))
        .arg(&t.estargz_ref));
    drop(ctd);
    drop(serve);
    umount_all_under(root.path());
    bytes
}

/// Runs the server container and timestamps its `ready` and `serving` lines;
/// returns (ready, serving, bytes received at ready).
fn watch(
    ctd: &Containerd,
    snap: &[&str],
    image: &str,
    name: &str,
    t0: Instant,
    bytes: &dyn Fn() -> u64,
) -> (Duration, Duration, u64) {
    let args = [&["run", "--rm"][..], snap, &[image, name]].concat();
    let mut child = ctd
        .command("ctr", &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ctr run");
    let mut ready = None;
    let mut serving = None;
    let mut output = String::new();
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        let at = t0.elapsed();
        if line == "ready" && ready.is_none() {
            ready = Some((at, bytes()));
        } else if line.starts_with("serving") {
            serving = Some(at);
        }
        output += &line;
        output.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    match (ready, serving) {
        (Some((r, b)), Some(s)) if out.status.success() => (r, s, b),
        _ => panic!(
            "container {name} did not serve ({}):\n{output}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Waits until the daemon's cache stops growing (its disk writes trail the
/// reads they serve), so that the warm read measures a cache at rest.
fn settle(cache: &std::path::Path) {
    let size = || {
        let out = run(std::process::Command::new("du")
            .args(["-s", "--block-size=1"])
            .arg(cache));
        out.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    let mut last = size();
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        let now = size();
        if now == last {
            break;
        }
        last = now;
    }
    eprintln!(
        "[bench] cache settled at {last} bytes after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Warm reads of one weight file, each in a new container after dropping page caches.
const WARM_READS: usize = 5;

/// Reads the first weight file `WARM_READS` times, each in a new container after dropping page
/// caches; returns the bytes and the median time (one sample varies too much on shared machines).
fn warm_read(ctd: &Containerd, snap: &[&str], image: &str, id: &str) -> (u64, f64) {
    let mut bytes = 0;
    let mut times = Vec::new();
    for i in 0..WARM_READS {
        drop_caches();
        let name = format!("warm-{id}-{i}");
        let args = [
            &["run", "--rm"][..],
            snap,
            &[image, &name, "python3", "/app/read.py", "/models/weights-0.bin"],
        ]
        .concat();
        let out = ctd.ctr(&args);
        let mut it = out.split_whitespace();
        let parsed: Option<(u64, f64)> = (|| Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?)))();
        let (b, secs) = parsed.unwrap_or_else(|| panic!("warm read printed {out:?}"));
        bytes = b;
        times.push(secs);
    }
    eprintln!("[bench] {id}: warm reads of {bytes} bytes took {times:?} s");
    let (median, _, _) = crate::report::spread(times).expect("warm reads");
    (bytes, median)
}
