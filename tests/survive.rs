//! Running containers survive the daemon (issue #13, design.md section 9):
//! every layer's FUSE connection is held by the descriptor keeper, and the
//! next daemon (the same binary after SIGKILL, or a new one after SIGTERM)
//! answers the same connections, so reads in a running container never fail.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FILE_MIB: u64 = 100;
const FILES: [(&str, u64, u64); 3] = [
    ("models/a.bin", FILE_MIB, 1),
    ("models/b.bin", FILE_MIB, 2),
    ("models/c.bin", FILE_MIB, 3),
];

/// A node serving an image of three 100 MiB files lazily (eStargz), pulled into containerd.
struct Node {
    registry: Mutex<Option<Registry>>,
    work: tempfile::TempDir,
    root: PathBuf,
    serve: Mutex<Option<ServeProcess>>,
    containerd: Containerd,
    reference: String,
    /// sha256 of each file, by name (`a`, `b`, `c`).
    expected: Vec<(String, String)>,
}

impl Node {
    fn start() -> Node {
        require_root();
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let image = build_files_image(&work.path().join("image"), &FILES);
        let reference = push(&image, &registry, Format::Estargz);
        let root = work.path().join("streamsnap");
        let serve = ServeProcess::start(&root);
        let containerd = Containerd::start(ContainerdOpts {
            streamsnap_socket: Some(serve.socket.clone()),
            ..Default::default()
        });
        containerd.rpull(&reference);
        let expected = FILES
            .iter()
            .map(|(path, mib, seed)| {
                let copy = work.path().join("expected");
                write_random_file(&copy, mib << 20, *seed);
                let name = Path::new(path).file_stem().unwrap().to_string_lossy().into_owned();
                (name, common::tree::file_sha256(&copy))
            })
            .collect();
        std::fs::create_dir_all(work.path().join("out")).unwrap();
        Node {
            registry: Mutex::new(Some(registry)),
            work,
            root,
            serve: Mutex::new(Some(serve)),
            containerd,
            reference,
            expected,
        }
    }

    fn progress_path(&self) -> PathBuf {
        self.work.path().join("out/progress")
    }

    fn kill(&self) {
        self.serve.lock().unwrap().take().unwrap().kill();
    }

    fn stop_for_upgrade(&self) {
        self.serve.lock().unwrap().take().unwrap().stop_for_upgrade();
    }

    fn start_serve(&self, bin: &Path) {
        self.start_serve_with(bin, &[]);
    }

    fn start_serve_with(&self, bin: &Path, extra: &[&str]) {
        *self.serve.lock().unwrap() = Some(ServeProcess::start_binary(bin, &self.root, extra));
    }

    /// As at a reboot: the daemon stops and its layers are taken down (`streamsnap shutdown`).
    fn reboot(&self) {
        self.serve.lock().unwrap().take().unwrap().stop();
    }

    /// Runs `script` in a container of the image (its stdout), or its error.
    fn run(&self, id: &str, script: &str) -> Result<String, String> {
        self.containerd.try_ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "streamsnap",
            &self.reference,
            id,
            "/bin/sh",
            "-c",
            script,
        ])
    }

    fn serve_log(&self) -> String {
        self.serve.lock().unwrap().as_ref().unwrap().log()
    }

    /// Lines the reader container has written so far.
    fn progress(&self) -> Vec<String> {
        std::fs::read_to_string(self.progress_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs a container that hashes the three files over and over for
    /// `secs`, one line per file (`<pass> <sha256> <path>`) in the progress
    /// file; a failed read ends it with `read failed`.
    fn run_reader(&self, secs: u64) -> String {
        let script = format!(
            "end=$(($(date +%s)+{secs})); p=0; \
             while [ $(date +%s) -lt $end ]; do p=$((p+1)); \
               for f in a b c; do \
                 h=$(sha256sum /models/$f.bin) || {{ echo \"read failed: $f\" >> /out/progress; exit 1; }}; \
                 echo \"$p $h\" >> /out/progress; \
               done; \
             done; echo passes=$p"
        );
        let out = self.work.path().join("out");
        let bind = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
        // Unique: runc's state of every test's containerd shares one directory.
        let id = format!(
            "reader{}",
            self.work
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('.', "-")
        );
        self.containerd
            .run_script_with(&["--mount", &bind], "streamsnap", &self.reference, &id, &script)
    }

    /// Every progress line names a file and its right hash.
    fn check_progress(&self) -> usize {
        let lines = self.progress();
        for line in &lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words.len(), 3, "a failed read: {line:?}");
            let name = Path::new(words[2]).file_stem().unwrap().to_string_lossy().into_owned();
            let want = &self.expected.iter().find(|(n, _)| *n == name).unwrap().1;
            assert_eq!(words[1], want, "wrong bytes read from {}", words[2]);
        }
        lines.len()
    }

    /// The host path of `models/<name>` in its layer's FUSE mount.
    fn layer_file(&self, name: &str) -> PathBuf {
        let snapshots = self.root.join("state/snapshots");
        std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().path().join("fs/models").join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no layer mount holds models/{name}"))
    }
}

/// A process that opens `file` and reads 4 KiB of it over and over, each
/// open a FUSE request, printing `<start ns> <end ns>` per read to `log`.
/// Not a thread of the test: a process that holds a FUSE file while it starts
/// the next daemon would block in its child's close-on-exec (FUSE_FLUSH)
/// until that very daemon answered.
fn start_probe(file: &Path, log: &Path) -> std::process::Child {
    let script = format!(
        "while :; do s=$(date +%s%N); head -c 4096 {} >/dev/null || exit 1; echo $s $(date +%s%N); sleep 0.01; done",
        file.display()
    );
    std::process::Command::new("bash")
        .args(["-c", &script])
        .stdout(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// The probe's reads: (start, latency).
fn probe_reads(log: &Path, epoch: (Instant, u128)) -> Vec<(Instant, Duration)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_once(' ')?;
            let (s, e): (u128, u128) = (s.parse().ok()?, e.parse().ok()?);
            let at = epoch.0 + Duration::from_nanos(s.saturating_sub(epoch.1) as u64);
            Some((at, Duration::from_nanos(e.saturating_sub(s) as u64)))
        })
        .collect()
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Drops the page cache every second until `stop`, so reads keep reaching the layer.
fn drop_caches(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Sets its flag when dropped (also when unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Median and max, in ms.
fn median_max(mut v: Vec<Duration>) -> (u128, u128) {
    v.sort();
    (v[v.len() / 2].as_millis(), v[v.len() - 1].as_millis())
}

/// Ends the daemon `cycles` times while a container reads, starting it again
/// each time (`restart` does both), and checks no read failed and reads went
/// on after each restart. Returns the longest probe wait of each cycle.
fn survive(node: &Node, cycles: usize, restart: impl Fn(&Node, usize)) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    let mut kills = Vec::new();
    let probe_log = node.work.path().join("probe.log");
    let epoch = (Instant::now(), now_ns());
    std::thread::scope(|s| {
        let reader = s.spawn(|| node.run_reader(20 + 6 * cycles as u64));
        wait_until(Duration::from_secs(120), "a first pass of the reader", || {
            node.progress().len() >= 3
        });
        let mut probe = start_probe(&node.layer_file("a.bin"), &probe_log);
        let stop = &stop;
        // Whatever fails below, the cache dropper stops, or the scope would wait for it forever.
        let stopper = StopOnDrop(stop);
        s.spawn(move || drop_caches(stop));
        std::thread::sleep(Duration::from_secs(1));
        for cycle in 0..cycles {
            let before = node.progress().len();
            kills.push(Instant::now());
            restart(node, cycle);
            wait_until(Duration::from_secs(60), "reads to go on after the restart", || {
                node.progress().len() >= before + 2
            });
        }
        let out = reader.join();
        drop(stopper);
        let out = out.unwrap_or_else(|_| panic!("the reader failed; its progress: {:?}", node.progress()));
        // The probe ends itself only when a read of the layer failed.
        let probe_ended = probe.try_wait().unwrap();
        let _ = probe.kill();
        let _ = probe.wait();
        assert!(
            probe_ended.is_none(),
            "the probe's read of the layer mount failed: {probe_ended:?}"
        );
        assert!(out.contains("passes="), "the reader did not finish: {out}");
    });
    let lines = node.check_progress();
    eprintln!("{lines} file hashes read, all right, across {cycles} restarts");
    let probes = probe_reads(&probe_log, epoch);
    assert!(!probes.is_empty());
    kills
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let end = kills.get(i + 1).copied();
            probes
                .iter()
                .filter(|(t, _)| *t + Duration::from_secs(1) >= *k && end.is_none_or(|e| *t < e))
                .map(|(_, d)| *d)
                .max()
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn reads_in_a_running_container_go_on_across_ten_sigkills_of_the_daemon() {
    let node = Node::start();
    let stalls = survive(&node, 10, |node, _| {
        node.kill();
        node.start_serve(&common::streamsnap::binary());
    });
    let (median, max) = median_max(stalls);
    eprintln!("read stall across SIGKILL + restart: median {median} ms, max {max} ms");
    let log = node.serve_log();
    assert!(log.contains("mounts held across the restart"), "{log}");
}

#[test]
fn reads_go_on_across_sigterm_and_the_start_of_a_different_binary() {
    let node = Node::start();
    // The upgrade's binary: a copy at another path.
    let other = node.work.path().join("bin/streamsnap-next");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::copy(common::streamsnap::binary(), &other).unwrap();
    let stalls = survive(&node, 10, |node, cycle| {
        node.stop_for_upgrade();
        let bin = if cycle % 2 == 0 {
            other.clone()
        } else {
            common::streamsnap::binary()
        };
        node.start_serve(&bin);
    });
    let (median, max) = median_max(stalls);
    eprintln!("read stall across SIGTERM + start of another binary: median {median} ms, max {max} ms");
}

#[test]
fn reads_in_flight_when_the_daemon_is_killed_complete_after_the_restart() {
    let node = Node::start();
    // Nothing of the files is fetched yet: each read waits on the registry. Three
    // readers keep requests in flight on both FUSE threads: a request read by either
    // must be answered by the next daemon. (Processes, not threads: see `start_probe`.)
    let mut reads: Vec<_> = (0..3)
        .map(|i| {
            let (name, _) = &node.expected[i];
            let out = node.work.path().join(format!("{i}.sha256"));
            let child = std::process::Command::new("sha256sum")
                .arg(node.layer_file(&format!("{name}.bin")))
                .stdout(std::fs::File::create(&out).unwrap())
                .spawn()
                .unwrap();
            (name.clone(), out, child)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let running = reads
        .iter_mut()
        .map(|(_, _, c)| c.try_wait().unwrap().is_none())
        .filter(|&r| r)
        .count();
    assert!(running > 0, "every read ended before the kill");
    node.kill();
    std::thread::sleep(Duration::from_millis(500));
    node.start_serve(&common::streamsnap::binary());
    for (i, (name, out, mut child)) in reads.into_iter().enumerate() {
        let mut status = None;
        wait_until(Duration::from_secs(90), "the reads to complete", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(status.unwrap().success(), "the read of {name} failed across the kill");
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            got.split_whitespace().next(),
            Some(node.expected[i].1.as_str()),
            "{name} read across the kill"
        );
    }
}

#[test]
fn after_a_reboot_with_the_registry_down_cached_files_read_and_uncached_ones_fail_with_eio() {
    let node = Node::start();
    let a = node.run("warm", "sha256sum /models/a.bin").unwrap();
    assert!(a.starts_with(&node.expected[0].1), "{a}");
    node.reboot();
    assert!(
        common::no_fuse_mount_under(&node.root.join("state/snapshots")),
        "the layers' FUSE mounts are gone"
    );
    drop(node.registry.lock().unwrap().take());
    let config = node.work.path().join("deadline.toml");
    std::fs::write(&config, "[fetch]\nread_deadline = 5.0\n").unwrap();
    node.start_serve_with(&common::streamsnap::binary(), &["--config", config.to_str().unwrap()]);
    // Every layer is there again, from its record: no file is missing.
    wait_until(Duration::from_secs(30), "the layers to be mounted again", || {
        node.serve_log().matches("re-mounted lazy layer").count() >= 4
    });
    wait_until(Duration::from_secs(60), "containerd to reconnect to streamsnap", || {
        node.containerd
            .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
            .is_ok()
    });
    let listing = node.run("list", "ls /models").unwrap();
    assert_eq!(
        listing.split_whitespace().collect::<Vec<_>>(),
        ["a.bin", "b.bin", "c.bin"]
    );
    // Cached before the reboot: read from the node alone.
    let a = node.run("cached", "sha256sum /models/a.bin").unwrap();
    assert!(a.starts_with(&node.expected[0].1), "{a}");
    // Never fetched: the read fails (EIO) once the registry's retries are
    // spent, at the latest after the read deadline (5 s here).
    let started = Instant::now();
    let c = node.run("uncached", "sha256sum /models/c.bin && echo read-ok");
    let waited = started.elapsed();
    assert!(c.as_ref().map_or(true, |out| !out.contains("read-ok")), "{c:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    let log = node.serve_log();
    assert!(log.contains("read failed, answering EIO"), "{log}");
    assert!(
        !log.contains("asking the registry"),
        "every layer came from its record: {log}"
    );
}

#[test]
fn a_file_held_open_in_passthrough_mode_opens_again_after_a_sigkill_of_the_daemon() {
    let node = Node::start();
    let file = node.layer_file("a.bin");
    let hash = |what: &str| {
        let out = run(std::process::Command::new("sha256sum").arg(&file));
        assert_eq!(
            out.split_whitespace().next(),
            Some(node.expected[0].1.as_str()),
            "{what}"
        );
    };
    // Read whole, the file is cached whole once its chunks are written, which
    // may come after the read returned: opens go through the page cache until then.
    hash("the first read");
    let passthrough_opens = || node.serve_log().matches("opened in passthrough mode").count();
    wait_until(Duration::from_secs(60), "an open in passthrough mode", || {
        drop(std::fs::File::open(&file).unwrap());
        passthrough_opens() > 0
    });
    let before = passthrough_opens();
    let mut holder = std::process::Command::new("sh")
        .args(["-c", &format!("exec sleep 600 3< {}", file.display())])
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "the holder's passthrough open", || {
        passthrough_opens() > before
    });
    node.kill();
    node.start_serve(&common::streamsnap::binary());
    // The inode is still tied to its backing file by the holder's open: the
    // next daemon must answer with the same backing id, or the open fails (EIO).
    hash("an open while another process holds the file across the restart");
    let log = node.serve_log();
    assert!(log.contains("under the earlier process's backing id"), "{log}");
    let _ = holder.kill();
    let _ = holder.wait();
    hash("an open after the holder closed it");
}
