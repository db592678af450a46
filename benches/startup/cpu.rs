//! CPU efficiency (issue #16), on the unshaped loopback link only: a cold read of every weight
//! file through a streamsnap mount against `curl` of the weights layer's blob piped through the
//! same work outside FUSE, side by side in each round. `curl` asks for the blob twice: in the
//! ranges the daemon requests (4 MiB, four in flight: the issue's measure, the registry doing
//! the same work for both sides) and in one GET (the registry's cheapest way to send it).
//!
//! Per byte, streamsnap inflates each eStargz chunk and checks the sha256 of the inflated bytes
//! against the TOC (`fetch::decode`). The pipeline does that work on the whole blob with the same
//! crates, outside FUSE: `curl` writes the blob to a pipe, the bench inflates it
//! (`flate2::read::MultiGzDecoder`, one member per chunk) on one thread and hashes what was
//! inflated (`sha2::Sha256`) on another, so it may use both cores as the daemon's threads may.
//! (`curl | gzip -dc | sha256sum` would measure slower tools: coreutils' sha256 and gzip's
//! inflate run at a fraction of these crates' speed here.) The blob is the weights layer alone:
//! the weight files' chunks plus their tar headers and the TOC (0.01% more than the file bytes
//! in a 256 MiB trial).
use crate::common::{run, umount_all_under, Containerd, ContainerdOpts, ServeProcess};
use crate::procfs::{cpu_secs, own_cpu_secs};
use crate::report::spread;
use crate::scenario::Target;
use sha2::Digest;
use std::fmt::Write;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct CpuSample {
    /// Weight file bytes read (both sides are credited with these).
    pub file_bytes: u64,
    /// `cat /models/*` in the container, timed inside it.
    pub mount_secs: f64,
    /// Blob bytes the registry logged during the mount's read.
    pub mount_received: u64,
    /// CPU seconds (user + system) of the streamsnap daemon during the read.
    pub daemon_cpu: f64,
    /// The pipeline with one GET of the whole blob: seconds, CPU seconds (user + system) of
    /// curl and the bench's inflate and hash threads.
    pub pipeline_secs: f64,
    pub pipeline_cpu: f64,
    /// The same with the daemon's ranges.
    pub ranges_secs: f64,
    pub ranges_cpu: f64,
}

/// The weights layer (the image's last) of the eStargz image: its blob URL and size.
fn weights_blob(t: &Target) -> (String, u64) {
    let m = t.registry.manifest(&t.estargz_ref);
    let last = m["layers"]
        .as_array()
        .and_then(|l| l.last())
        .expect("the eStargz image has layers");
    let (d, size) = (last["digest"].as_str().unwrap(), last["size"].as_u64().unwrap());
    let repo = t.estargz_ref.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    (format!("http://{}/v2/{repo}/blobs/{d}", t.registry.addr()), size)
}

/// Brings the weights blob into the page cache, so neither side reads the registry's disk.
pub fn warm_registry(t: &Target) {
    run(Command::new("curl").args(["-sSf", "-o", "/dev/null", &weights_blob(t).0]));
}

/// How the pipeline's `curl` asks for the weights blob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Body {
    /// One GET of the whole blob: the registry's cheapest way to send it.
    Whole,
    /// The ranges the daemon asks for: `fetch::MAX_REQUEST` each, as many in flight as
    /// `fetch::READ_AHEAD` holds (four `curl`s, each taking every fourth range in turn).
    Ranges,
}

/// Ranges in flight at once, as the daemon's read-ahead keeps them.
const LANES: u64 = streamsnap::fetch::READ_AHEAD / streamsnap::fetch::MAX_REQUEST;

/// The blob's bytes in order from `LANES` curls of `MAX_REQUEST` ranges: lane `i` fetches
/// ranges `i`, `i + LANES`, … one after another on one connection, and a thread per lane holds
/// its next range ready while the reader takes the others'.
struct RangeBody {
    lanes: Vec<std::sync::mpsc::Receiver<Vec<u8>>>,
    next: usize,
    current: std::io::Cursor<Vec<u8>>,
    curls: Vec<std::thread::JoinHandle<()>>,
}

impl RangeBody {
    fn start(url: &str, size: u64) -> Self {
        let step = streamsnap::fetch::MAX_REQUEST;
        let ranges: Vec<(u64, u64)> = (0..size)
            .step_by(step as usize)
            .map(|a| (a, (a + step).min(size)))
            .collect();
        let (mut lanes, mut curls) = (Vec::new(), Vec::new());
        for lane in 0..LANES as usize {
            let mine: Vec<(u64, u64)> = ranges.iter().copied().skip(lane).step_by(LANES as usize).collect();
            let mut args = vec!["-sSf".to_string()];
            for (i, (a, b)) in mine.iter().enumerate() {
                if i > 0 {
                    args.push("--next".into());
                }
                args.extend(["-r".into(), format!("{a}-{}", b - 1), url.to_string()]);
            }
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
            let mut curl = Command::new("curl")
                .args(&args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn curl");
            let url = url.to_string();
            curls.push(std::thread::spawn(move || {
                let mut out = curl.stdout.take().unwrap();
                for (a, b) in mine {
                    let mut buf = vec![0; (b - a) as usize];
                    out.read_exact(&mut buf)
                        .unwrap_or_else(|e| panic!("curl {url} bytes {a}-{b}: {e}"));
                    if tx.send(buf).is_err() {
                        break;
                    }
                }
                let status = curl.wait().expect("wait for curl");
                assert!(status.success(), "curl {url}: {status}");
            }));
            lanes.push(rx);
        }
        Self {
            lanes,
            next: 0,
            current: std::io::Cursor::new(Vec::new()),
            curls,
        }
    }

    fn finish(self) {
        drop(self.lanes);
        for c in self.curls {
            c.join().expect("a curl lane");
        }
    }
}

impl Read for RangeBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let lane = self.next % self.lanes.len();
            match self.lanes[lane].recv() {
                Ok(range) => {
                    self.current = std::io::Cursor::new(range);
                    self.next += 1;
                }
                Err(_) => return Ok(0), // every lane is done: the blob's end
            }
        }
    }
}

/// `curl` of the weights blob into this process: inflated on this thread, hashed on another.
/// Returns (seconds, CPU seconds of curl and this process).
fn pipeline(t: &Target, how: Body) -> (f64, f64) {
    let (url, size) = weights_blob(t);
    let cpu0 = own_cpu_secs();
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let hasher = std::thread::spawn(move || {
        let mut h = sha2::Sha256::new();
        for b in rx {
            h.update(&b);
        }
        h.finalize()
    });
    let inflated = match how {
        Body::Whole => {
            let mut curl = Command::new("curl")
                .args(["-sSf", &url])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn curl");
            let n = inflate_into(curl.stdout.take().unwrap(), tx, &url);
            let status = curl.wait().expect("wait for curl");
            assert!(status.success(), "curl {url}: {status}");
            n
        }
        Body::Ranges => {
            let mut body = RangeBody::start(&url, size);
            let n = inflate_into(&mut body, tx, &url);
            body.finish();
            n
        }
    };
    let digest = hasher.join().expect("the hashing thread");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("[bench] pipeline ({how:?}): inflated {inflated} bytes, sha256 {digest:x}, in {secs:.2} s");
    (secs, own_cpu_secs() - cpu0)
}

/// Inflates `body` (gzip members, one per chunk) and sends the output to the hashing thread
/// in pieces of 1 MiB; returns the bytes inflated.
fn inflate_into(body: impl Read, tx: std::sync::mpsc::SyncSender<Vec<u8>>, url: &str) -> u64 {
    let body = std::io::BufReader::with_capacity(1 << 20, body);
    let mut inflate = flate2::bufread::MultiGzDecoder::new(body);
    let mut inflated = 0u64;
    loop {
        let mut buf = Vec::with_capacity(1 << 20);
        let n = (&mut inflate)
            .take(1 << 20)
            .read_to_end(&mut buf)
            .unwrap_or_else(|e| panic!("inflating {url}: {e}"));
        if n == 0 {
            return inflated;
        }
        inflated += n as u64;
        tx.send(buf).expect("the hashing thread");
    }
}

/// A fresh daemon (cold: no profile, no referrers) and containerd; rpull; one container reads
/// every weight file, timed inside it.
fn mount(t: &Target, id: usize) -> (u64, f64, u64, f64) {
    let root = tempfile::Builder::new().prefix("streamsnap-cpu-").tempdir().unwrap();
    let addr = t.registry.addr();
    let config = t.serve_config.as_ref().map(|c| c.to_string_lossy().into_owned());
    let args: Vec<&str> = ["--insecure-registry", addr.as_str(), "--no-profile-replay"]
        .into_iter()
        .chain(config.iter().flat_map(|c| ["--config", c.as_str()]))
        .collect();
    let serve = ServeProcess::start_with(root.path(), &args);
    let ctd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let snap = ["--snapshotter", "streamsnap"];
    ctd.ctr_remote(&[&["images", "rpull", "--plain-http"][..], &snap, &[&t.estargz_ref]].concat());
    let script = "a=$(date +%s%N); cat /models/* > /dev/null; b=$(date +%s%N); echo $((b - a)); stat -c %s /models/*";
    let name = format!("cpu-{id}");
    let args = [
        &["run", "--rm"][..],
        &snap,
        &[t.estargz_ref.as_str(), &name, "sh", "-c", script],
    ]
    .concat();
    let received = t.counter();
    let cpu0 = cpu_secs(serve.pid()).expect("the daemon's /proc/PID/stat");
    let out = ctd.ctr(&args);
    let cpu = cpu_secs(serve.pid()).expect("the daemon's /proc/PID/stat") - cpu0;
    let bytes = received();
    let mut nums = out
        .split_whitespace()
        .map(|w| w.parse::<u64>().unwrap_or_else(|_| panic!("{name} printed {out:?}")));
    let nanos = nums.next().unwrap_or_else(|| panic!("{name} printed {out:?}"));
    let file_bytes: u64 = nums.sum();
    drop(ctd);
    drop(serve);
    umount_all_under(root.path());
    (file_bytes, nanos as f64 / 1e9, bytes, cpu)
}

/// One round: the pipelines, then the mount.
pub fn run_once(t: &Target, id: usize) -> CpuSample {
    let (pipeline_secs, pipeline_cpu) = pipeline(t, Body::Whole);
    let (ranges_secs, ranges_cpu) = pipeline(t, Body::Ranges);
    let (file_bytes, mount_secs, mount_received, daemon_cpu) = mount(t, id);
    CpuSample {
        file_bytes,
        mount_secs,
        mount_received,
        daemon_cpu,
        pipeline_secs,
        pipeline_cpu,
        ranges_secs,
        ranges_cpu,
    }
}

/// The report's lines: throughputs in MB/s of weight file bytes, the ratio, CPU seconds.
pub fn report(samples: &[CpuSample]) -> String {
    let mut t = String::new();
    if samples.is_empty() {
        return t;
    }
    let med = |f: &dyn Fn(&CpuSample) -> f64| spread(samples.iter().map(f).collect()).unwrap();
    let mount = med(&|s| s.file_bytes as f64 / s.mount_secs / 1e6);
    let ranges = med(&|s| s.file_bytes as f64 / s.ranges_secs / 1e6);
    let pipe = med(&|s| s.file_bytes as f64 / s.pipeline_secs / 1e6);
    let mb = samples[0].file_bytes as f64 / 1e6;
    let _ = writeln!(
        t,
        "- CPU efficiency, unshaped loopback, cold read of all weight files ({mb:.0} MB), rounds: {}, MB/s of file bytes, median (min–max): \
         through the streamsnap mount (eStargz, `cat /models/*` in a new container) {:.0} ({:.0}–{:.0}); \
         `curl` of the weights blob into an inflate thread and a sha256 thread (flate2, sha2), in the daemon's ranges \
         (4 MiB, four in flight) {:.0} ({:.0}–{:.0}), in one GET {:.0} ({:.0}–{:.0}); \
         ratio mount ÷ pipeline: same ranges **{:.3}**, one GET {:.3}",
        samples.len(),
        mount.0,
        mount.1,
        mount.2,
        ranges.0,
        ranges.1,
        ranges.2,
        pipe.0,
        pipe.1,
        pipe.2,
        mount.0 / ranges.0,
        mount.0 / pipe.0
    );
    let _ = writeln!(
        t,
        "- CPU seconds (user + system) for that read, median: streamsnap daemon {:.2} s (received {:.1} MB); \
         curl + inflate + sha256, same ranges {:.2} s, one GET {:.2} s",
        med(&|s| s.daemon_cpu).0,
        med(&|s| s.mount_received as f64).0 / 1e6,
        med(&|s| s.ranges_cpu).0,
        med(&|s| s.pipeline_cpu).0
    );
    t
}
