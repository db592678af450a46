//! `streamsnap install` / `uninstall` against the real containerd binaries (1.6 with version-2
//! configs, 2.1 with version-3 configs), starting from an empty file, no file, `containerd config
//! default` and a hand-kept config with other plugins, registry mirrors and comments: containerd
//! reads the result with streamsnap as CRI's snapshotter, the rest is kept, a second install
//! changes nothing and restarts nothing, uninstall puts the original back byte for byte.
mod common;
use common::{containerd2, run, run_output, Release};
use std::path::{Path, PathBuf};
use std::process::Command;

const SOCKET: &str = "/run/streamsnap-test/streamsnap.sock";

/// A config containerd 1.6 reads, kept by hand: comments, other plugins, registry mirrors.
const HAND_KEPT_V2: &str = r#"# Node config, kept by hand.
version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.local:5000/pause:3.9"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc" # the only runtime here

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true

  # Mirrors of the cluster's registries.
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."registry.local:5000"]
    endpoint = ["http://mirror.local:5000", "http://registry.local:5000"]

[plugins."io.containerd.snapshotter.v1.overlayfs"]
  root_path = "/data/overlayfs"

[proxy_plugins.other]
  type = "snapshot"
  address = "/run/other/other.sock"
"#;

/// The same for containerd 2.1 (mirrors live in hosts.toml files under `config_path`).
const HAND_KEPT_V3: &str = r#"# Node config, kept by hand.
version = 3
root = '/var/lib/containerd'

[plugins.'io.containerd.cri.v1.images']
  max_concurrent_downloads = 5 # the uplink is small
  [plugins.'io.containerd.cri.v1.images'.registry]
    # Mirrors of the cluster's registries, one hosts.toml each.
    config_path = '/etc/containerd/certs.d'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = 'registry.local:5000/pause:3.10'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = true

[plugins.'io.containerd.snapshotter.v1.overlayfs']
  root_path = '/data/overlayfs'

[proxy_plugins.other]
  type = 'snapshot'
  address = '/run/other/other.sock'
"#;

/// One starting point: a release and the config (None: no file).
struct Case {
    release: Release,
    name: &'static str,
    original: Option<String>,
}

fn containerd_bin(release: Release) -> PathBuf {
    match release {
        Release::System1_6 => {
            common::require_tool("containerd");
            PathBuf::from("containerd")
        }
        Release::V2_1 => containerd2::bin_dir().join("containerd"),
    }
}

/// Every starting point, for both releases; `containerd config default` comes from each binary.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (release, hand_kept) in [(Release::System1_6, HAND_KEPT_V2), (Release::V2_1, HAND_KEPT_V3)] {
        let default = run(Command::new(containerd_bin(release)).args(["config", "default"]));
        for (name, original) in [
            ("empty", Some(String::new())),
            ("absent", None),
            ("default", Some(default)),
            ("hand-kept", Some(hand_kept.to_string())),
        ] {
            cases.push(Case {
                release,
                name,
                original,
            });
        }
    }
    cases
}

/// A case's config file in its own directory, with a restart command that counts its runs.
struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
    release: Release,
}

impl Node {
    fn new(case: &Case) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("etc/containerd/config.toml");
        if let Some(text) = &case.original {
            std::fs::create_dir_all(config.parent().unwrap()).unwrap();
            std::fs::write(&config, text).unwrap();
        }
        Node {
            dir,
            config,
            release: case.release,
        }
    }

    /// `streamsnap COMMAND` on this node's config; its stdout, panics with stderr on failure.
    fn streamsnap(&self, command: &str) -> String {
        let out = run_output(&mut self.command(command));
        assert!(
            out.status.success(),
            "streamsnap {command} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn command(&self, command: &str) -> Command {
        let mut c = Command::new(common::streamsnap::binary());
        c.arg(command)
            .arg("--containerd-config")
            .arg(&self.config)
            .args(["--address", SOCKET])
            .arg("--restart-command")
            .arg(self.restart_command())
            // Asked only for configs that declare no version.
            .arg("--containerd-bin")
            .arg(containerd_bin(self.release));
        c
    }

    /// Counts its runs in `restarts`; fails while a file `restart-fails` exists.
    fn restart_command(&self) -> String {
        let d = self.dir.path().display();
        format!("test ! -e {d}/restart-fails && echo restarted >> {d}/restarts")
    }

    fn restarts_file(&self) -> PathBuf {
        self.dir.path().join("restarts")
    }

    fn restarts(&self) -> usize {
        std::fs::read_to_string(self.restarts_file()).map_or(0, |s| s.lines().count())
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// `containerd --config CONFIG config dump`: the config as containerd reads it.
    fn dump(&self) -> toml::Table {
        let out = run(Command::new(containerd_bin(self.release))
            .arg("--config")
            .arg(&self.config)
            .args(["config", "dump"]));
        out.parse()
            .unwrap_or_else(|e| panic!("containerd's dump does not parse: {e}\n{out}"))
    }

    /// Files next to the config (backups left behind would show here).
    fn siblings(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.config.parent().unwrap())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The value at a dotted path of a parsed config.
fn at<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(table.get(*first)?, |v, k| v.get(*k))
}

fn at_str<'a>(table: &'a toml::Table, path: &[&str]) -> &'a str {
    at(table, path)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string at {path:?}"))
}

/// Every line of `before` is in `after` in the same order, except lines setting `replaced` keys.
fn assert_lines_kept(before: &str, after: &str, replaced: &[&str], case: &str) {
    let mut rest = after.lines();
    for line in before.lines() {
        let key = line.split('=').next().unwrap().trim();
        if replaced.contains(&key) {
            continue;
        }
        assert!(rest.any(|l| l == line), "{case}: line {line:?} lost or moved:\n{after}");
    }
}

fn label(case: &Case) -> String {
    format!("{:?} {}", case.release, case.name)
}

#[test]
fn install_gives_a_config_containerd_reads_with_streamsnap_as_cri_snapshotter() {
    for case in cases() {
        let node = Node::new(&case);
        let out = node.streamsnap("install");
        let dump = node.dump();
        let what = label(&case);
        assert_eq!(
            at_str(&dump, &["proxy_plugins", "streamsnap", "type"]),
            "snapshot",
            "{what}"
        );
        assert_eq!(
            at_str(&dump, &["proxy_plugins", "streamsnap", "address"]),
            SOCKET,
            "{what}"
        );
        match case.release {
            Release::System1_6 => {
                let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
                assert_eq!(
                    at_str(&dump, &[&cri[..], &["snapshotter"]].concat()),
                    "streamsnap",
                    "{what}"
                );
                assert_eq!(
                    at(&dump, &[&cri[..], &["disable_snapshot_annotations"]].concat()),
                    Some(&toml::Value::Boolean(false)),
                    "{what}"
                );
            }
            Release::V2_1 => {
                let images = ["plugins", "io.containerd.cri.v1.images"];
                assert_eq!(
                    at_str(&dump, &[&images[..], &["snapshotter"]].concat()),
                    "streamsnap",
                    "{what}"
                );
                let export = [
                    "proxy_plugins",
                    "streamsnap",
                    "exports",
                    "enable_remote_snapshot_annotations",
                ];
                assert_eq!(at_str(&dump, &export), "true", "{what}");
                let unpack = at(&dump, &["plugins", "io.containerd.transfer.v1.local", "unpack_config"])
                    .and_then(|v| v.as_array())
                    .unwrap_or_else(|| panic!("{what}: no unpack_config in containerd's dump"));
                let snapshotters: Vec<&str> = unpack.iter().map(|e| e["snapshotter"].as_str().unwrap()).collect();
                assert_eq!(snapshotters, ["streamsnap", "overlayfs"], "{what}");
            }
        }
        assert!(out.contains("installed streamsnap"), "{what}: {out}");
        assert_eq!(node.restarts(), 1, "{what}");
    }
}

#[test]
fn install_keeps_unrelated_settings_and_comments() {
    for case in cases() {
        let Some(original) = &case.original else { continue };
        let node = Node::new(&case);
        node.streamsnap("install");
        let replaced = ["snapshotter", "disable_snapshot_annotations"];
        assert_lines_kept(original, &node.text(), &replaced, &label(&case));
    }
    // And containerd still sees them.
    for case in cases().into_iter().filter(|c| c.name == "hand-kept") {
        let node = Node::new(&case);
        node.streamsnap("install");
        let dump = node.dump();
        let what = label(&case);
        assert_eq!(
            at_str(&dump, &["proxy_plugins", "other", "address"]),
            "/run/other/other.sock",
            "{what}"
        );
        let overlay = ["plugins", "io.containerd.snapshotter.v1.overlayfs", "root_path"];
        assert_eq!(at_str(&dump, &overlay), "/data/overlayfs", "{what}");
        match case.release {
            Release::System1_6 => {
                let mirror = [
                    "plugins",
                    "io.containerd.grpc.v1.cri",
                    "registry",
                    "mirrors",
                    "registry.local:5000",
                ];
                let endpoints = at(&dump, &[&mirror[..], &["endpoint"]].concat()).unwrap();
                assert_eq!(endpoints.as_array().unwrap().len(), 2, "{what}");
                let runc = "runtimes";
                let options = [
                    "plugins",
                    "io.containerd.grpc.v1.cri",
                    "containerd",
                    runc,
                    "runc",
                    "options",
                ];
                assert_eq!(
                    at(&dump, &[&options[..], &["SystemdCgroup"]].concat()),
                    Some(&toml::Value::Boolean(true)),
                    "{what}"
                );
            }
            Release::V2_1 => {
                let images = ["plugins", "io.containerd.cri.v1.images"];
                let config_path = [&images[..], &["registry", "config_path"]].concat();
                assert_eq!(at_str(&dump, &config_path), "/etc/containerd/certs.d", "{what}");
                assert_eq!(
                    at(&dump, &[&images[..], &["max_concurrent_downloads"]].concat()),
                    Some(&toml::Value::Integer(5)),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn a_second_install_changes_no_byte_and_does_not_restart_containerd() {
    for case in cases() {
        let node = Node::new(&case);
        node.streamsnap("install");
        let (once, siblings) = (node.text(), node.siblings());
        let out = node.streamsnap("install");
        let what = label(&case);
        assert_eq!(node.text(), once, "{what}");
        assert_eq!(node.siblings(), siblings, "{what}");
        assert_eq!(node.restarts(), 1, "{what}: the second install restarted containerd");
        assert!(out.contains("nothing changed"), "{what}: {out}");
    }
}

#[test]
fn uninstall_restores_the_original_byte_for_byte_and_removes_the_backup() {
    for case in cases() {
        let node = Node::new(&case);
        let before = node.siblings();
        node.streamsnap("install");
        node.streamsnap("install");
        let out = node.streamsnap("uninstall");
        let what = label(&case);
        match &case.original {
            Some(original) => assert_eq!(std::fs::read(&node.config).unwrap(), original.as_bytes(), "{what}"),
            None => assert!(
                !node.config.exists(),
                "{what}: uninstall left a config where there was none"
            ),
        }
        assert_eq!(node.siblings(), before, "{what}: files left beside the config");
        assert_eq!(node.restarts(), 2, "{what}: one restart to install, one to uninstall");
        // Nothing left to undo: a second uninstall changes nothing.
        let again = node.streamsnap("uninstall");
        assert!(again.contains("nothing to undo"), "{what}: {out} / {again}");
        assert_eq!(node.restarts(), 2, "{what}");
    }
}

#[test]
fn install_keeps_the_config_file_mode() {
    use std::os::unix::fs::PermissionsExt as _;
    let case = Case {
        release: Release::System1_6,
        name: "mode 0600",
        original: Some(HAND_KEPT_V2.into()),
    };
    let node = Node::new(&case);
    std::fs::set_permissions(&node.config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    node.streamsnap("install");
    assert_eq!(mode(&node.config), 0o600);
    node.streamsnap("uninstall");
    assert_eq!(mode(&node.config), 0o600);
}

#[test]
fn install_says_which_cri_snapshotter_it_replaced() {
    for case in cases().into_iter().filter(|c| c.name == "default") {
        let node = Node::new(&case);
        let out = node.streamsnap("install");
        assert!(
            out.contains("CRI's snapshotter was \"overlayfs\", now \"streamsnap\""),
            "{}: {out}",
            label(&case)
        );
        let backup = node.config.with_file_name("config.toml.streamsnap-orig");
        assert_eq!(
            std::fs::read_to_string(&backup).unwrap(),
            *case.original.as_ref().unwrap()
        );
    }
}

#[test]
fn install_refuses_a_config_it_cannot_parse_naming_the_file_and_writing_nothing() {
    for (name, text) in [
        ("broken", "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\n"),
        ("version 1", "[plugins.cri]\n  sandbox_image = 'pause'\n"),
        ("version 4", "version = 4\n"),
    ] {
        let case = Case {
            release: Release::System1_6,
            name: "",
            original: Some(text.into()),
        };
        let node = Node::new(&case);
        let siblings = node.siblings();
        let out = run_output(&mut node.command("install"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: install accepted it");
        assert!(stderr.contains(&node.config.display().to_string()), "{name}: {stderr}");
        assert_eq!(node.text(), text, "{name}");
        assert_eq!(node.siblings(), siblings, "{name}");
        assert_eq!(node.restarts(), 0, "{name}");
    }
}

#[test]
fn a_symlinked_config_is_edited_where_it_points_and_stays_a_link() {
    let case = Case {
        release: Release::System1_6,
        name: "symlink",
        original: None,
    };
    let node = Node::new(&case);
    let real = node.dir.path().join("managed/containerd.toml");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, HAND_KEPT_V2).unwrap();
    std::fs::create_dir_all(node.config.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&real, &node.config).unwrap();
    node.streamsnap("install");
    assert!(node.config.is_symlink());
    assert!(std::fs::read_to_string(&real)
        .unwrap()
        .contains("snapshotter = \"streamsnap\""));
    assert_eq!(
        std::fs::read_to_string(real.with_file_name("containerd.toml.streamsnap-orig")).unwrap(),
        HAND_KEPT_V2
    );
    node.streamsnap("uninstall");
    assert!(node.config.is_symlink());
    assert_eq!(std::fs::read_to_string(&real).unwrap(), HAND_KEPT_V2);
    assert_eq!(node.siblings(), ["config.toml"]);
}

#[test]
fn a_failed_restart_is_an_error_and_the_next_run_restarts_even_without_changes() {
    for case in cases().into_iter().filter(|c| c.name == "default") {
        let node = Node::new(&case);
        let what = label(&case);
        let fails = node.dir.path().join("restart-fails");
        std::fs::write(&fails, "").unwrap();
        let out = run_output(&mut node.command("install"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: a failed restart went unreported");
        assert!(stderr.contains("restart command"), "{what}: {stderr}");
        assert!(
            node.text().contains("\"streamsnap\""),
            "{what}: the config was not written"
        );
        std::fs::remove_file(&fails).unwrap();
        let out = node.streamsnap("install");
        assert!(out.contains("nothing changed"), "{what}: {out}");
        assert_eq!(node.restarts(), 1, "{what}: the pending restart was not made");
        node.streamsnap("install");
        assert_eq!(node.restarts(), 1, "{what}: restarted again with nothing pending");
        // The same on the way out.
        std::fs::write(&fails, "").unwrap();
        assert!(!run_output(&mut node.command("uninstall")).status.success(), "{what}");
        assert_eq!(
            std::fs::read_to_string(&node.config).unwrap(),
            *case.original.as_ref().unwrap()
        );
        std::fs::remove_file(&fails).unwrap();
        let out = node.streamsnap("uninstall");
        assert!(out.contains("nothing to undo"), "{what}: {out}");
        assert_eq!(node.restarts(), 2, "{what}");
        assert_eq!(node.siblings(), ["config.toml"], "{what}");
    }
}
