//! One phase of the fleet run: a fresh, cold mirror (or none), N nodes that
//! each run `streamsnap mount` in their namespace and read what the container
//! reads at start, all released at once; and what the origin sent meanwhile.
use crate::common::{MountProcess, Registry, RegistryOpts};
use crate::net::Fleet;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// What each node reads once its image is mounted, in order, whole.
pub struct Workload {
    /// Paths inside the image.
    pub files: Vec<String>,
    /// Extra `streamsnap mount` flags.
    pub extra: Vec<String>,
    /// Layers of the image (a background fill is complete when each says so).
    pub layers: usize,
}

/// Where the nodes pull from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight from the origin.
    Origin,
    /// Through a pull-through cache started cold for this phase.
    ColdMirror,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub via: Via,
    /// Blob body bytes the origin's log says it wrote.
    pub origin_bytes: u64,
    /// Blob GETs the origin answered, and how many of them with the whole blob (200).
    pub origin_gets: usize,
    pub origin_whole: usize,
    /// Bytes the origin's link carried (TCP/IP framing included): its egress.
    pub origin_wire: u64,
    /// Blob body bytes the nodes received (the mirror's log, or the origin's).
    pub node_bytes: u64,
    /// Per node, from the common start: mount reported, and every start-up file read.
    pub mounted: Vec<Duration>,
    pub serving: Vec<Duration>,
    /// With background fill: per node, every layer filled (and checked).
    pub filled: Vec<Duration>,
    /// Blobs the origin sent whole more than once: the mirror copied them twice, which
    /// docker-registry 2.8 does when a request checks its store just before its copy commits.
    pub copied_twice: Vec<String>,
}

impl Phase {
    /// The origin's egress (what left it on its link) over `one_node`'s. Its log counts more for
    /// a dropped whole-blob answer: bytes written into a socket the mirror closed, never sent.
    pub fn egress_ratio(&self, one_node: &Phase) -> f64 {
        self.origin_wire as f64 / one_node.origin_wire as f64
    }
}

/// Starts a mirror of `origin` in the fleet's mirror namespace, with empty storage.
fn cold_mirror(fleet: &Fleet, origin: &Registry) -> Registry {
    let mut mirror = Registry::start_with(RegistryOpts {
        netns: Some(fleet.mirror.netns.clone()),
        all_interfaces: true,
        proxy_remote_url: Some(format!("http://{}", origin.addr())),
        ..Default::default()
    });
    mirror.set_addr(format!("{}:{}", fleet.mirror.ip, crate::common::registry::NETNS_PORT));
    mirror
}

/// Reads `path` to its end; returns its length.
fn read_whole(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

/// Waits until `bytes()` stays the same for 2 s (a mirror finishing its copies from the origin).
fn quiet(bytes: impl Fn() -> u64) -> u64 {
    let mut last = bytes();
    let mut still = Instant::now();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = bytes();
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > Duration::from_secs(2) || start.elapsed() > Duration::from_secs(120) {
            return now;
        }
    }
}

/// What every phase of a run shares.
pub struct Run<'a> {
    pub fleet: &'a Fleet,
    pub origin: &'a Registry,
    /// The image's reference at the origin.
    pub image: &'a str,
    pub workload: &'a Workload,
    /// Where the nodes keep their state dirs and mount points.
    pub work: &'a Path,
}

/// Runs `nodes` nodes at once, pulling through `via`; with `fill`, each node
/// also fills every layer in the background (from the start) until complete.
pub fn run_phase(run: &Run, via: Via, nodes: usize, name: &'static str, fill: bool) -> Phase {
    let Run {
        fleet,
        origin,
        image,
        workload,
        work,
    } = *run;
    let mirror = (via == Via::ColdMirror).then(|| cold_mirror(fleet, origin));
    let server = mirror.as_ref().unwrap_or(origin);
    // Nodes name the image at the origin; containerd's hosts.toml sends them to the mirror.
    let mut extra = workload.extra.clone();
    if fill {
        extra.extend(["--background-fill", "--background-fill-delay", "0"].map(String::from));
    }
    let layers = workload.layers;
    if let Some(m) = &mirror {
        let hosts = work.join(name).join("hosts");
        let dir = hosts.join(origin.addr());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                origin.addr(),
                m.addr()
            ),
        )
        .unwrap();
        extra.extend(["--registry-config-path".to_string(), hosts.display().to_string()]);
    }
    let (origin_mark, server_mark) = (origin.mark(), server.mark());
    let wire0 = fleet.tx_bytes(&fleet.origin);
    let barrier = Arc::new(Barrier::new(nodes));
    let threads: Vec<_> = (0..nodes)
        .map(|i| {
            let dir = work.join(name).join(format!("node{i}"));
            let netns = fleet.nodes[i].netns.clone();
            let (barrier, reference) = (barrier.clone(), image.to_string());
            let files = workload.files.clone();
            let extra = extra.clone();
            std::thread::spawn(move || {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                barrier.wait();
                let t0 = Instant::now();
                let m = MountProcess::start_in_netns(&netns, &reference, &dir.join("state"), &dir.join("mnt"), &extra);
                let mounted = t0.elapsed();
                for f in &files {
                    read_whole(&m.mountpoint.join(f));
                }
                let serving = t0.elapsed();
                if fill {
                    crate::common::wait_for_log(|| m.log(), "background fill complete", layers);
                }
                (m, mounted, serving, fill.then(|| t0.elapsed()))
            })
        })
        .collect();
    let mut mounts = Vec::new();
    let (mut mounted, mut serving, mut filled) = (Vec::new(), Vec::new(), Vec::new());
    for t in threads {
        let (m, a, b, c) = t.join().expect("a node failed");
        mounts.push(m);
        mounted.push(a);
        serving.push(b);
        filled.extend(c);
    }
    let origin_bytes = quiet(|| origin.bytes_logged_since(origin_mark));
    let gets = origin.blob_requests_since(origin_mark);
    for g in &gets {
        eprintln!("[fleet] {name}: origin {} {} {}", &g.digest[7..19], g.status, g.bytes);
    }
    let phase = Phase {
        copied_twice: copied_twice(&gets),
        name,
        via,
        origin_bytes,
        origin_gets: gets.len(),
        origin_whole: gets.iter().filter(|r| r.status == 200).count(),
        origin_wire: fleet.tx_bytes(&fleet.origin) - wire0,
        node_bytes: server.bytes_served_since(server_mark),
        mounted,
        serving,
        filled,
    };
    if let Some(m) = &mirror {
        let log = std::fs::read_to_string(m.log_path()).unwrap_or_default();
        for l in log.lines().filter(|l| {
            l.contains("level=error")
                && !l.contains("error serving error json")
                && !l.contains("response completed with error")
        }) {
            eprintln!("[fleet] {name}: mirror error: {}", &l[..l.len().min(400)]);
        }
    }
    for m in mounts {
        m.stop();
    }
    let _ = std::fs::remove_dir_all(work.join(name));
    eprintln!("[fleet] {phase:?}");
    phase
}

/// Median and max, in seconds.
fn spread(d: &[Duration]) -> (f64, f64) {
    let mut s: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let mid = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (mid, *s.last().unwrap())
}

/// The figures as a markdown table plus the ratios the issue asks for.
/// Digests (over 4 MiB: a small blob may be read whole by nodes too) whose whole body the
/// origin sent more than once, by its log.
fn copied_twice(gets: &[crate::common::BlobRequest]) -> Vec<String> {
    let mut biggest: std::collections::BTreeMap<&str, (u64, usize)> = Default::default();
    for g in gets.iter().filter(|g| g.status == 200) {
        let e = biggest.entry(&g.digest).or_insert((0, 0));
        match g.bytes.cmp(&e.0) {
            std::cmp::Ordering::Greater => *e = (g.bytes, 1),
            std::cmp::Ordering::Equal => e.1 += 1,
            std::cmp::Ordering::Less => {}
        }
    }
    biggest
        .into_iter()
        .filter(|(_, (bytes, n))| *bytes > 4 << 20 && *n > 1)
        .map(|(d, _)| d.to_string())
        .collect()
}

pub fn report(phases: &[&Phase], one_node: &Phase, image_bytes: u64) -> String {
    let mut out = String::from(
        "| phase | nodes | origin egress (link bytes) | x one node | origin log (blob bytes) | x one node | origin GETs (whole blob) | nodes received | mounted, s (median / max) | serving, s (median / max) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in phases {
        let (mm, mx) = spread(&p.mounted);
        let (sm, sx) = spread(&p.serving);
        out += &format!(
            "| {} ({}) | {} | {} | {:.2} | {} | {:.2} | {} ({}) | {} | {mm:.2} / {mx:.2} | {sm:.2} / {sx:.2} |\n",
            p.name,
            match (p.via, p.copied_twice.len()) {
                (Via::Origin, _) => "from the origin".to_string(),
                (Via::ColdMirror, 0) => "cold mirror".to_string(),
                (Via::ColdMirror, n) => format!("cold mirror; it copied {n} blob(s) twice"),
            },
            p.serving.len(),
            p.origin_wire,
            p.egress_ratio(one_node),
            p.origin_bytes,
            p.origin_bytes as f64 / one_node.origin_bytes as f64,
            p.origin_gets,
            p.origin_whole,
            p.node_bytes,
        );
    }
    for p in phases.iter().filter(|p| !p.filled.is_empty()) {
        let (fm, fx) = spread(&p.filled);
        out += &format!(
            "\n{}: background fill complete on every node after {fm:.2} s (median) / {fx:.2} s (max).\n",
            p.name
        );
    }
    let alone = spread(&one_node.serving).0;
    for p in phases.iter().filter(|p| p.serving.len() > 1) {
        let (sm, sx) = spread(&p.serving);
        out += &format!(
            "\n{}: origin egress {:.2}x one node's bytes (its log: {:.2}x); time to serving {:.2}x (median) / {:.2}x (max) a single node alone ({alone:.2} s). Image: {image_bytes} layer bytes.\n",
            p.name,
            p.egress_ratio(one_node),
            p.origin_bytes as f64 / one_node.origin_bytes as f64,
            sm / alone,
            sx / alone,
        );
    }
    out
}

/// The links as built: MB/s of one layer blob from the origin, to the mirror and to a node.
pub fn link_check(fleet: &Fleet, origin: &Registry, image: &str, layers: &[String]) -> String {
    let repo = image
        .strip_prefix(&format!("{}/", origin.addr()))
        .and_then(|r| r.rsplit_once(':'))
        .map(|(r, _)| r)
        .expect("image at the origin");
    let url = format!("http://{}/v2/{repo}/blobs/{}", origin.addr(), layers.last().unwrap());
    format!(
        "origin egress {} Mbit/s, mirror egress {} Mbit/s, node downlinks {} Mbit/s (tbf; no added delay); \
         one blob origin -> mirror {:.0} MB/s, origin -> node {:.0} MB/s",
        fleet.rates.origin_mbit,
        fleet.rates.mirror_mbit,
        fleet.rates.node_mbit,
        fleet.curl_mbs(&fleet.mirror, &url),
        fleet.curl_mbs(&fleet.nodes[0], &url),
    )
}
