//! Runs the `streamsnap` binary under test as users do.
use super::{terminate, wait_until};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Path of the binary cargo built for these tests, or `$STREAMSNAP_BIN` (the
/// start-up benchmark compares two builds side by side that way).
pub fn binary() -> PathBuf {
    std::env::var_os("STREAMSNAP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_streamsnap")))
}

/// A running `streamsnap mount`; stopped with SIGTERM on drop (or `stop()`).
pub struct MountProcess {
    child: Child,
    pub mountpoint: PathBuf,
    log: Arc<Mutex<String>>,
}

impl MountProcess {
    /// Starts `streamsnap mount [extra] IMAGE MOUNTPOINT` and waits until it reports the mount.
    pub fn start(image: &str, state_dir: &Path, mountpoint: &Path, extra: &[&str]) -> MountProcess {
        Self::try_start(image, state_dir, mountpoint, extra)
            .unwrap_or_else(|log| panic!("streamsnap mount {image} failed:\n{log}"))
    }

    /// Like `start`, but returns the log when the command exits instead of mounting.
    pub fn try_start(image: &str, state_dir: &Path, mountpoint: &Path, extra: &[&str]) -> Result<MountProcess, String> {
        Self::try_start_env(image, state_dir, mountpoint, extra, &[])
    }

    /// Like `try_start`, with extra environment variables for the process.
    pub fn try_start_env(
        image: &str,
        state_dir: &Path,
        mountpoint: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<MountProcess, String> {
        Self::spawn(Command::new(binary()), image, state_dir, mountpoint, extra, env)
    }

    /// Like `start`, in the network namespace `netns` (`nsenter --net`: the
    /// mounts stay in this mount namespace, which `ip netns exec` would not do).
    pub fn start_in_netns(
        netns: &str,
        image: &str,
        state_dir: &Path,
        mountpoint: &Path,
        extra: &[&str],
    ) -> MountProcess {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(binary());
        Self::spawn(cmd, image, state_dir, mountpoint, extra, &[])
            .unwrap_or_else(|log| panic!("streamsnap mount {image} in {netns} failed:\n{log}"))
    }

    fn spawn(
        mut cmd: Command,
        image: &str,
        state_dir: &Path,
        mountpoint: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Result<MountProcess, String> {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut child = cmd
            .arg("mount")
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .arg(image)
            .arg(mountpoint)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn streamsnap");
        let log = Arc::new(Mutex::new(String::new()));
        let mounted = Arc::new(Mutex::new(false));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (l, m) = (log.clone(), mounted.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("mounted ") {
                    *m.lock().unwrap() = true;
                }
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let mut exited = false;
        wait_until(Duration::from_secs(300), "streamsnap mount to report its mount", || {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            exited || *mounted.lock().unwrap()
        });
        if exited {
            std::thread::sleep(Duration::from_millis(100));
            return Err(log.lock().unwrap().clone());
        }
        Ok(MountProcess {
            child,
            mountpoint: mountpoint.to_path_buf(),
            log,
        })
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status; panics if it does not exit 0 or leaves mounts behind.
    pub fn stop(self) -> String {
        self.stop_with(libc::SIGTERM)
    }

    /// Like `stop`, with another signal (SIGINT, as Ctrl-C sends).
    pub fn stop_with(mut self, signal: i32) -> String {
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let log = self.log();
        assert!(status.success(), "streamsnap mount exited with {status}:\n{log}");
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mp = std::fs::canonicalize(&self.mountpoint).unwrap();
        assert!(
            !info.lines().any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap())),
            "mount point {} still mounted after exit",
            mp.display()
        );
        log
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
        super::umount_all_under(&self.mountpoint);
    }
}

/// A running `streamsnap serve` with its own root and socket. Dropped (or
/// `stop`ped), it gets SIGTERM and its layers are taken down (`streamsnap
/// shutdown`), as a node's shutdown would; `kill` and `stop_for_upgrade` leave
/// them to the descriptor keeper, for the next daemon.
pub struct ServeProcess {
    child: Child,
    pub root: PathBuf,
    pub socket: PathBuf,
    log: Arc<Mutex<String>>,
    /// The mounts outlive this process (killed, or stopped for an upgrade).
    handed_over: bool,
}

impl ServeProcess {
    /// Starts `streamsnap serve --root ROOT --address ROOT/streamsnap.sock` and waits for the socket.
    pub fn start(root: &Path) -> ServeProcess {
        Self::start_with(root, &[])
    }

    /// Like `start`, with extra `serve` flags.
    pub fn start_with(root: &Path, extra: &[&str]) -> ServeProcess {
        Self::start_env(root, extra, &[])
    }

    /// Like `start_with`, with extra environment variables for the daemon.
    pub fn start_env(root: &Path, extra: &[&str], env: &[(&str, &Path)]) -> ServeProcess {
        Self::start_binary_env(&binary(), root, extra, env)
    }

    /// Like `start_with`, running the streamsnap binary at `bin` (an upgrade's new binary).
    pub fn start_binary(bin: &Path, root: &Path, extra: &[&str]) -> ServeProcess {
        Self::start_binary_env(bin, root, extra, &[])
    }

    fn start_binary_env(bin: &Path, root: &Path, extra: &[&str], env: &[(&str, &Path)]) -> ServeProcess {
        let socket = root.join("streamsnap.sock");
        std::fs::create_dir_all(root).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--root"])
            .arg(root.join("state"))
            .arg("--address")
            .arg(&socket)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn streamsnap serve");
        let log = Arc::new(Mutex::new(String::new()));
        // Also on disk, for a test that hangs: `<root>/serve-<pid>.log`.
        let file = Arc::new(Mutex::new(
            std::fs::File::create(root.join(format!("serve-{}.log", child.id()))).unwrap(),
        ));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (l, f) = (log.clone(), file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = writeln!(f.lock().unwrap(), "{line}");
                    l.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        let mut exited = false;
        wait_until(Duration::from_secs(60), "streamsnap serve to create its socket", || {
            exited = matches!(child.try_wait(), Ok(Some(_)));
            exited || socket.exists()
        });
        assert!(!exited, "streamsnap serve exited:\n{}", log.lock().unwrap());
        ServeProcess {
            child,
            root: root.to_path_buf(),
            socket,
            log,
            handed_over: false,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The daemon's process id (for /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash: nothing is cleaned up (the keeper keeps the mounts).
    pub fn kill(mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
        self.handed_over = true;
    }

    /// SIGTERM, as for an upgrade: the daemon leaves its mounts to the keeper.
    pub fn stop_for_upgrade(mut self) -> String {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        self.handed_over = true;
        let log = self.log();
        assert!(status.success(), "streamsnap serve exited with {status}:\n{log}");
        log
    }

    /// Takes every layer of this daemon's state dir down (`streamsnap shutdown`).
    pub fn shutdown_layers(root: &Path) {
        let out = Command::new(binary())
            .args(["shutdown", "--root"])
            .arg(root.join("state"))
            .output()
            .expect("spawn streamsnap shutdown");
        assert!(
            out.status.success(),
            "streamsnap shutdown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the daemon is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM; panics unless it exits 0.
    pub fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let log = self.log();
        assert!(status.success(), "streamsnap serve exited with {status}:\n{log}");
        log
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
        if !self.handed_over {
            // Not asserted: this may run while a test panics.
            let _ = Command::new(binary())
                .args(["shutdown", "--root"])
                .arg(self.root.join("state"))
                .stdout(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            eprintln!("--- streamsnap serve log tail ---\n{}", super::tail(&self.log(), 60));
        }
    }
}

/// Runs `streamsnap index --state-dir STATE [extra] IMAGE`; panics unless it
/// succeeds; returns its stdout and log.
pub fn index_image(image: &str, state_dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(binary())
        .arg("index")
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .arg(image)
        .env("RUST_LOG", "info")
        .output()
        .expect("spawn streamsnap index");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "streamsnap index {image} failed:\n{text}");
    text
}
