//! CPU efficiency (issue #16), on the unshaped loopback link only: a cold read of every weight
//! file through a streamsnap mount against `curl` of the weights layer's blob piped through the
//! same work outside FUSE, side by side in each round.
//!
//! Per byte, streamsnap inflates each eStargz chunk and checks the sha256 of the inflated bytes
//! against the TOC (`fetch::decode`). The pipeline does that work on the whole blob:
//! `curl | gzip -dc | sha256sum` (inflate, then sha256 of what was inflated; three processes, so
//! it may use both cores, as the daemon's threads may). The blob is the weights layer alone: the
//! weight files' chunks plus their tar headers and the TOC, about 0.1% more than the file bytes.
use crate::common::{run, umount_all_under, Containerd, ContainerdOpts, ServeProcess};
use crate::procfs::{children_cpu_secs, cpu_secs};
use crate::report::spread;
use crate::scenario::Target;
use std::fmt::Write;
use std::process::Command;
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
    pub pipeline_secs: f64,
    /// CPU seconds (user + system) of curl, gzip and sha256sum.
    pub pipeline_cpu: f64,
}

/// The weights layer (the image's last) of the eStargz image: its blob URL.
fn weights_blob_url(t: &Target) -> String {
    let (_, digests) = t.registry.layers(&t.estargz_ref);
    let repo = t.estargz_ref.split_once('/').unwrap().1.rsplit_once(':').unwrap().0;
    let d = digests.last().expect("the eStargz image has layers");
    format!("http://{}/v2/{repo}/blobs/{d}", t.registry.addr())
}

/// Brings the weights blob into the page cache, so neither side reads the registry's disk.
pub fn warm_registry(t: &Target) {
    run(Command::new("curl").args(["-sSf", "-o", "/dev/null", &weights_blob_url(t)]));
}

fn pipeline(t: &Target) -> (f64, f64) {
    let script = format!(
        "set -o pipefail; curl -sSf '{}' | gzip -dc | sha256sum > /dev/null",
        weights_blob_url(t)
    );
    let cpu0 = children_cpu_secs();
    let t0 = Instant::now();
    run(Command::new("bash").args(["-c", &script]));
    (t0.elapsed().as_secs_f64(), children_cpu_secs() - cpu0)
}

/// A fresh daemon (cold: no profile, no referrers) and containerd; rpull; one container reads
/// every weight file, timed inside it.
fn mount(t: &Target, id: usize) -> (u64, f64, u64, f64) {
    let root = tempfile::Builder::new().prefix("streamsnap-cpu-").tempdir().unwrap();
    let addr = t.registry.addr();
    let serve = ServeProcess::start_with(root.path(), &["--insecure-registry", &addr, "--no-profile-replay"]);
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

/// One round: the pipeline, then the mount.
pub fn run_once(t: &Target, id: usize) -> CpuSample {
    let (pipeline_secs, pipeline_cpu) = pipeline(t);
    let (file_bytes, mount_secs, mount_received, daemon_cpu) = mount(t, id);
    CpuSample {
        file_bytes,
        mount_secs,
        mount_received,
        daemon_cpu,
        pipeline_secs,
        pipeline_cpu,
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
    let pipe = med(&|s| s.file_bytes as f64 / s.pipeline_secs / 1e6);
    let mb = samples[0].file_bytes as f64 / 1e6;
    let _ = writeln!(
        t,
        "- CPU efficiency, unshaped loopback, cold read of all weight files ({mb:.0} MB), {} rounds, MB/s of file bytes, median (min–max): \
         through the streamsnap mount (eStargz, `cat /models/*` in a new container) {:.0} ({:.0}–{:.0}); \
         `curl` of the weights blob `| gzip -dc | sha256sum` {:.0} ({:.0}–{:.0}); ratio mount ÷ pipeline {:.3}",
        samples.len(),
        mount.0,
        mount.1,
        mount.2,
        pipe.0,
        pipe.1,
        pipe.2,
        mount.0 / pipe.0
    );
    let _ = writeln!(
        t,
        "- CPU seconds (user + system) for that read, median: streamsnap daemon {:.2} s (received {:.1} MB); \
         curl + gzip + sha256sum {:.2} s",
        med(&|s| s.daemon_cpu).0,
        med(&|s| s.mount_received as f64).0 / 1e6,
        med(&|s| s.pipeline_cpu).0
    );
    t
}
