//! The stargz snapshotter as a baseline: `containerd-stargz-grpc` (built by build-stargz.sh from
//! Debian's sources) with its own root, serving containerd on a socket of its own, reaching the
//! benchmark's registry over plain HTTP.
use crate::common::{terminate, umount_all_under, wait_until};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Stargz {
    child: Child,
    pub socket: PathBuf,
    root: tempfile::TempDir,
}

impl Stargz {
    /// Starts the daemon; `registry` (`host:port`) is reached over plain HTTP.
    pub fn start(registry: &str) -> Stargz {
        let bin = std::env::var_os("STREAMSNAP_STARGZ_BIN")
            .map(PathBuf::from)
            .expect("STREAMSNAP_STARGZ_BIN: run the benchmark with benches/startup/run.sh");
        let root = tempfile::Builder::new().prefix("stargz-bench-").tempdir().unwrap();
        let config = root.path().join("config.toml");
        // Its defaults otherwise (prefetch of the landmark files, background fetch on), like ours.
        std::fs::write(
            &config,
            format!("[[resolver.host.\"{registry}\".mirrors]]\nhost = \"{registry}\"\ninsecure = true\n"),
        )
        .unwrap();
        let socket = root.path().join("stargz.sock");
        let log = std::fs::File::create(root.path().join("stargz.log")).unwrap();
        let child = Command::new(&bin)
            .arg("--address")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(root.path().join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        wait_until(Duration::from_secs(30), "the stargz snapshotter's socket", || {
            socket.exists()
        });
        Stargz { child, socket, root }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its root: state (cache included) and the FUSE mounts under it.
    pub fn root(&self) -> &std::path::Path {
        self.root.path()
    }

    /// Its state directory (cache included).
    pub fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }
}

impl Drop for Stargz {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
        umount_all_under(self.root.path());
    }
}
