//! The disk cache across crashes and restarts, end to end (real registry,
//! containerd, runc, FUSE): a daemon killed with SIGKILL while a large file
//! is being cached, or a cache file with a flipped byte, never makes a
//! container read wrong bytes after the restart.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WEIGHTS_MIB: u64 = 48;
/// Slow enough that the fill is caught mid-file.
const SLOW_FILL: &[&str] = &[
    "--background-fill",
    "--background-fill-delay",
    "0",
    "--background-fill-rate",
    "4MiB",
];
const FILL: &[&str] = &["--background-fill", "--background-fill-delay", "0"];

struct Node {
    _registry: Registry,
    work: tempfile::TempDir,
    reference: String,
    layers: Vec<String>,
    serve: Option<ServeProcess>,
    containerd: Containerd,
}

impl Node {
    /// An eStargz image with `WEIGHTS_MIB` of weights, pulled lazily by a containerd using `serve EXTRA…`.
    fn start(extra: &[&str]) -> Node {
        require_root();
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let image = build_runnable_image(&work.path().join("image"), WEIGHTS_MIB);
        let reference = push(&image, &registry, Format::Estargz);
        let (_, layers) = registry.layers(&reference);
        let serve = ServeProcess::start_with(&work.path().join("streamsnap"), extra);
        let containerd = Containerd::start(ContainerdOpts {
            streamsnap_socket: Some(serve.socket.clone()),
            ..Default::default()
        });
        containerd.rpull(&reference);
        Node {
            _registry: registry,
            work,
            reference,
            layers,
            serve: Some(serve),
            containerd,
        }
    }

    fn serve(&self) -> &ServeProcess {
        self.serve.as_ref().expect("daemon running")
    }

    fn cache(&self) -> PathBuf {
        self.work.path().join("streamsnap/state/cache")
    }

    /// Starts the daemon again on the same state (it replaces mounts a killed
    /// daemon left) and waits until containerd reaches it.
    fn restart(&mut self, extra: &[&str]) {
        self.serve = Some(ServeProcess::start_with(&self.work.path().join("streamsnap"), extra));
        wait_until(Duration::from_secs(60), "containerd to reconnect to streamsnap", || {
            self.containerd
                .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
                .is_ok()
        });
    }

    /// sha256 of the weights as a new container reads them.
    fn weights_sha256(&self, name: &str) -> String {
        let out = self.containerd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "streamsnap",
            &self.reference,
            name,
            "/bin/sh",
            "-c",
            "sha256sum /models/weights.bin",
        ]);
        out.split_whitespace().next().unwrap_or_default().to_string()
    }

    fn expected_sha256(&self) -> String {
        let expected = self.work.path().join("weights-expected");
        write_random_file(&expected, WEIGHTS_MIB << 20, 11);
        common::tree::file_sha256(&expected)
    }
}

/// Cache files whose name starts with `prefix`, largest first.
fn cache_files(cache: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for layer in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(layer.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && !name.ends_with(".sums") {
                found.push((f.metadata().map(|m| m.len()).unwrap_or(0), f.path()));
            }
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn a_file_being_cached_when_the_daemon_is_killed_reads_correctly_after_restart() {
    let mut node = Node::start(SLOW_FILL);
    // The fill is writing the weights into their partial entry: kill the daemon there.
    wait_until(
        Duration::from_secs(120),
        "the fill to be inside the weights file",
        || {
            cache_files(&node.cache(), "partial-")
                .first()
                .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= WEIGHTS_MIB << 20))
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    node.serve.take().unwrap().kill();

    node.restart(FILL);
    assert_eq!(node.weights_sha256("durable-after-kill"), node.expected_sha256());
    // And once the new fill has completed the file, read from the cache only.
    wait_for_log(|| node.serve().log(), "background fill complete", node.layers.len());
    assert_eq!(node.weights_sha256("durable-after-fill"), node.expected_sha256());
    let log = node.serve().log();
    assert!(!log.contains("chunk read failed"), "{log}");
}

#[test]
fn a_flipped_byte_in_a_cached_file_is_never_served_after_restart() {
    let mut node = Node::start(FILL);
    wait_for_log(|| node.serve().log(), "background fill complete", node.layers.len());
    node.serve.take().unwrap().stop();
    let weights = cache_files(&node.cache(), "file-")
        .into_iter()
        .next()
        .expect("the weights' whole-file entry");
    assert_eq!(std::fs::metadata(&weights).unwrap().len(), WEIGHTS_MIB << 20);
    let mut data = std::fs::read(&weights).unwrap();
    data[(WEIGHTS_MIB << 19) as usize + 7] ^= 0x01;
    std::fs::write(&weights, data).unwrap();
    run_sh("sync; echo 3 > /proc/sys/vm/drop_caches");

    node.restart(&[]);
    assert_eq!(node.weights_sha256("durable-after-flip"), node.expected_sha256());
    let log = node.serve().log();
    assert!(
        log.contains("fails its check"),
        "the flipped entry was not caught:\n{log}"
    );
}
