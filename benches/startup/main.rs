//! Start-up benchmark: how soon a fresh node's model server is `ready` and
//! `serving`, overlayfs full pull (containerd 1.6 and 2.1) vs streamsnap lazy
//! pull vs the stargz snapshotter vs the raw transfer, side by side in one run. Run as root: `bash benches/startup/run.sh [OPTIONS]`.
//!
//! Options: --rate MBIT (default 1000) --rtt MS (default 2) --unshaped (registry
//! on loopback, no shaping) --runs N (default 3) --weights-mib N (default 2048)
//! --libs-mib N (default 512) --work DIR (image and registry cache, default
//! /var/tmp/streamsnap-bench) --out DIR (default target/startup-bench)
//! --only ID,ID… (scenarios to run, default all: curl, overlay, overlay21, estargz,
//! stargz, gzindex, profile, files, and cpu when unshaped) --files-count N (files
//! in the many-file image, default 100000) --files-read (the many-file scenario also
//! reads every file after the walk: streamsnap took 16 minutes for 100,000 in a trial)
//! --serve-config FILE (a config every `streamsnap serve` of the start-up and CPU scenarios
//! reads, e.g. another `[cache] memory_size`; its text goes into the report).
#[path = "../../tests/common/mod.rs"]
mod common;
mod cpu;
mod files;
mod image;
mod net;
mod procfs;
mod report;
mod reread;
mod scenario;
mod stargz;

use common::{push_all, Format, Registry, RegistryOpts};
use scenario::{Scenario, Target};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

struct Options {
    shape: Option<net::Shape>,
    runs: usize,
    sizes: image::Sizes,
    work: PathBuf,
    out: PathBuf,
    only: Option<Vec<String>>,
    files_count: u64,
    files_read: bool,
    serve_config: Option<PathBuf>,
}

/// What `--only` takes besides the start-up scenarios' ids.
const CPU: &str = "cpu";
const FILES: &str = "files";

/// The selected scenarios.
struct Selection {
    startup: Vec<Scenario>,
    cpu: bool,
    files: bool,
}

impl Options {
    fn selection(&self) -> Selection {
        let all = || {
            let mut v: Vec<String> = Scenario::ALL.iter().map(|s| s.id().to_string()).collect();
            v.push(FILES.into());
            if self.shape.is_none() {
                v.push(CPU.into());
            }
            v
        };
        let ids = self.only.clone().unwrap_or_else(all);
        for id in &ids {
            assert!(
                Scenario::from_id(id).is_some() || id == CPU || id == FILES,
                "--only: unknown scenario {id}; ids: {}, {CPU}, {FILES}",
                Scenario::ALL.map(|s| s.id()).join(", ")
            );
        }
        let cpu = ids.iter().any(|i| i == CPU);
        assert!(
            !cpu || self.shape.is_none(),
            "--only {CPU}: the CPU efficiency scenario runs on the unshaped link only (add --unshaped)"
        );
        Selection {
            startup: Scenario::ALL
                .into_iter()
                .filter(|s| ids.iter().any(|i| i == s.id()))
                .collect(),
            cpu,
            files: ids.iter().any(|i| i == FILES),
        }
    }
}

fn options() -> Options {
    let mut o = Options {
        shape: Some(net::Shape {
            rate_mbit: 1000,
            rtt: Duration::from_millis(2),
        }),
        runs: 3,
        sizes: image::Sizes {
            weights_mib: 2048,
            libs_mib: 512,
        },
        work: PathBuf::from("/var/tmp/streamsnap-bench"),
        out: PathBuf::from("target/startup-bench"),
        only: None,
        files_count: 100_000,
        files_read: false,
        serve_config: None,
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut val = |what: &str| args.next().unwrap_or_else(|| panic!("{a} needs {what}"));
        let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| panic!("{a}: not a number: {v}")) };
        match a.as_str() {
            "--rate" => o.shape.as_mut().expect("--rate with --unshaped").rate_mbit = num(val("Mbit/s")),
            "--rtt" => {
                let ms: f64 = val("milliseconds").parse().expect("--rtt: milliseconds");
                o.shape.as_mut().expect("--rtt with --unshaped").rtt = Duration::from_secs_f64(ms / 1e3);
            }
            "--unshaped" => o.shape = None,
            "--runs" => o.runs = num(val("a count")) as usize,
            "--weights-mib" => o.sizes.weights_mib = num(val("MiB")),
            "--libs-mib" => o.sizes.libs_mib = num(val("MiB")),
            "--work" => o.work = val("a directory").into(),
            "--out" => o.out = val("a directory").into(),
            "--only" => o.only = Some(val("scenario ids").split(',').map(|s| s.trim().to_string()).collect()),
            "--files-count" => o.files_count = num(val("a count")),
            "--files-read" => o.files_read = true,
            "--serve-config" => o.serve_config = Some(val("a config file").into()),
            other => panic!("unknown option {other}; see benches/startup/main.rs"),
        }
    }
    o
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = mem
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .unwrap_or("0");
    let kernel = common::run(std::process::Command::new("uname").arg("-r"));
    format!(
        "{} cores ({model}), {:.0} GiB RAM, kernel {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        mem.parse::<f64>().unwrap_or(0.0) / 1048576.0,
        kernel.trim()
    )
}

fn main() {
    common::require_root();
    let o = options();
    let sel = o.selection();
    std::fs::create_dir_all(&o.work).unwrap();
    std::fs::create_dir_all(&o.out).unwrap();
    let serve_image = !sel.startup.is_empty() || sel.cpu;
    let image = serve_image.then(|| image::build(&o.work, o.sizes));
    let link = o.shape.map(net::Link::create);
    let mut registry = Registry::start_with(RegistryOpts {
        netns: link.as_ref().map(|_| net::NETNS.to_string()),
        storage: Some(o.work.join("registry")),
        ..Default::default()
    });
    if let Some(l) = &link {
        l.start_relay(common::registry::NETNS_PORT);
        registry.set_addr(format!("{}:{}", net::REGISTRY_IP, net::RELAY_PORT));
    }
    let base = format!("{}/streamsnap/serve:serve", registry.addr());
    let (gzip_ref, estargz_ref) = (format!("{base}-gzip"), format!("{base}-estargz"));
    if let Some(image) = &image {
        if !registry.has_manifest(&gzip_ref) || !registry.has_manifest(&estargz_ref) {
            eprintln!("[bench] pushing the image as gzip and eStargz (once)");
            push_all(image, &registry, &[Format::Gzip, Format::Estargz]);
        }
    }
    let files_ref = sel.files.then(|| files::prepare(&o.work, &registry, o.files_count));
    let mut layer_bytes = BTreeMap::new();
    let mut image_desc = String::new();
    if serve_image {
        let (gzip, estargz) = (registry.layers(&gzip_ref).0, registry.layers(&estargz_ref).0);
        for s in Scenario::ALL {
            let estargz_image = matches!(s, Scenario::Stargz | Scenario::Streamsnap | Scenario::Profile);
            layer_bytes.insert(s, if estargz_image { estargz } else { gzip });
        }
        image_desc = format!(
            "Image: Debian + python3, {} MiB of weights in {} files, {} MiB of libraries; layer bytes gzip {gzip} / eStargz {estargz}.",
            o.sizes.weights_mib,
            image::WEIGHT_FILES,
            o.sizes.libs_mib,
        );
    }
    if sel.startup.contains(&Scenario::GzipIndex) {
        let indexing = index_gzip_image(&gzip_ref);
        eprintln!("[bench] {indexing}");
        image_desc = format!("{image_desc} {indexing}");
    }
    if let Some(c) = &o.serve_config {
        let text = std::fs::read_to_string(c).unwrap_or_else(|e| panic!("--serve-config {}: {e}", c.display()));
        image_desc = format!(
            "{image_desc} streamsnap serve config: `{}`.",
            text.trim().replace('\n', " ")
        );
    }
    let target = Target {
        registry: &registry,
        link: link.as_ref(),
        gzip_ref,
        estargz_ref,
        serve_config: o.serve_config.clone(),
    };
    let link_desc = link_check(&target);
    eprintln!("[bench] link: {link_desc}");
    let startup_bytes = sel.startup.contains(&Scenario::Profile).then(|| {
        let b = scenario::record_profile(&target);
        eprintln!("[bench] start-up profile recorded and pushed: start-up read {b} bytes");
        b
    });
    if sel.cpu {
        cpu::warm_registry(&target);
    }
    let mut results = report::Results::new();
    let mut cpu_samples = Vec::new();
    let mut files_samples = Vec::new();
    for run in 0..o.runs {
        for &s in &sel.startup {
            let sample = scenario::run_once(s, &target, run, run + 1 == o.runs);
            eprintln!("[bench] run {} {}: {sample:?}", run + 1, s.label());
            results.entry(s).or_default().push(sample);
        }
        if sel.cpu {
            let sample = cpu::run_once(&target, run);
            eprintln!("[bench] run {} CPU efficiency: {sample:?}", run + 1);
            cpu_samples.push(sample);
        }
        if let Some(r) = &files_ref {
            for d in [files::Daemon::Streamsnap, files::Daemon::Stargz] {
                let sample = files::run_once(d, &registry, r, run, o.files_read);
                eprintln!("[bench] run {} many files: {sample:?}", run + 1);
                files_samples.push(sample);
            }
        }
    }
    let label = match o.shape {
        Some(s) => format!("{}mbit-{}ms", s.rate_mbit, s.rtt.as_secs_f64() * 1e3),
        None => "unshaped".into(),
    };
    let link_name = match o.shape {
        Some(s) => s.to_string(),
        None => "unshaped loopback".into(),
    };
    let title = format!(
        "start-up: {} MiB weights + {} MiB libs, {link_name}",
        o.sizes.weights_mib, o.sizes.libs_mib
    );
    let png = o.out.join(format!("startup-{label}.png"));
    let mut body = String::new();
    if !results.is_empty() {
        report::plot(&results, &title, &png);
        body = format!(
            "{}\n{}{}{}{}{}\nPlot: `{}`\n",
            report::table(&results, &layer_bytes),
            report::ratios(&results),
            report::floor(&results),
            startup_bytes.map(|b| report::profile(&results, b)).unwrap_or_default(),
            report::warm(&results) + &report::reread(&results),
            report::memory(&results),
            png.display()
        );
    }
    let extra = cpu::report(&cpu_samples) + &files::report(&files_samples);
    if !extra.is_empty() {
        if !body.is_empty() {
            body.push('\n');
        }
        body += &extra;
    }
    let md = format!(
        "### Start-up, {label}\n\nMachine: {}. Link: {link_desc}. {image_desc}\n\n{body}",
        machine(),
    );
    std::fs::write(o.out.join(format!("startup-{label}.md")), &md).unwrap();
    println!("{md}");
}

/// Indexes the gzip image once (`streamsnap index --push`, through the same
/// link) and describes what that cost: a one-time step per image, not per node.
fn index_gzip_image(image: &str) -> String {
    let state = tempfile::Builder::new().prefix("streamsnap-index-").tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let out = common::index_image(image, state.path(), &["--push", "--plain-http"]);
    let secs = t0.elapsed().as_secs_f64();
    let dir = state.path().join("indexes");
    let bytes: u64 = std::fs::read_dir(&dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    let layers = out.lines().filter(|l| l.contains(": indexed:")).count();
    format!("Gzip index (built once with `streamsnap index --push`): {layers} layers in {secs:.1} s, {bytes} bytes.")
}

/// Measures the link actually built: ping RTT (veth alone) and time to first byte through the relay.
fn link_check(t: &Target) -> String {
    let Some(link) = t.link else {
        return "unshaped loopback".into();
    };
    let url = format!("http://{}/v2/", t.registry.addr());
    // On a real link a new connection's first byte takes 2 RTT: handshake, then request and response.
    let out = common::run(std::process::Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{time_starttransfer}",
        &url,
    ]));
    let first_byte_ms = out.trim().parse::<f64>().unwrap_or(f64::NAN) * 1e3;
    format!(
        "{} (measured: ping {:.2} ms on the veth, first byte of a new HTTP connection {:.2} ms through the relay)",
        link.shape,
        link.ping_ms(),
        first_byte_ms
    )
}
