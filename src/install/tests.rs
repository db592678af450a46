//! The merge on real `containerd config default` outputs (1.6.20 and 2.1.9, in `testdata/`) and
//! on small hand-written configs.
use super::merge::{declared_version, merge, ConfigVersion, MergeError, SNAPSHOTTER};

const DEFAULT_1_6: &str = include_str!("testdata/containerd-1.6-default.toml");
const DEFAULT_2_1: &str = include_str!("testdata/containerd-2.1-default.toml");
const SOCKET: &str = "/run/streamsnap/streamsnap.sock";

/// The value at a dotted path, as the `toml` crate (a second parser) reads the text.
fn lookup(text: &str, path: &[&str]) -> Option<toml::Value> {
    let mut v = toml::Value::Table(text.parse::<toml::Table>().expect("merged config parses"));
    for key in path {
        v = v.as_table()?.get(*key)?.clone();
    }
    Some(v)
}

fn string(text: &str, path: &[&str]) -> String {
    match lookup(text, path) {
        Some(toml::Value::String(s)) => s,
        other => panic!("{path:?} is {other:?}"),
    }
}

/// Every line of `before` is in `after`, in order, except the ones `replaced` names.
fn assert_lines_kept(before: &str, after: &str, replaced: &[&str]) {
    let mut rest = after.lines();
    for line in before.lines() {
        if replaced.iter().any(|r| line.trim_start().starts_with(r)) {
            continue;
        }
        assert!(rest.any(|l| l == line), "line {line:?} lost or moved:\n{after}");
    }
}

#[test]
fn an_empty_v2_config_gets_the_proxy_plugin_and_the_cri_snapshotter() {
    let m = merge("", Some(ConfigVersion::V2), SOCKET).unwrap();
    assert_eq!(
        m.text,
        "version = 2\n\n[proxy_plugins.streamsnap]\ntype = \"snapshot\"\naddress = \"/run/streamsnap/streamsnap.sock\"\n\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"streamsnap\"\n\
         disable_snapshot_annotations = false\n"
    );
    assert_eq!(m.changes.len(), 5, "{:?}", m.changes);
    assert_eq!(m.replaced_snapshotter, None);
}

#[test]
fn an_empty_v3_config_also_gets_the_export_and_the_transfer_service_unpack_list() {
    let m = merge("", Some(ConfigVersion::V3), SOCKET).unwrap();
    let t = &m.text;
    assert_eq!(lookup(t, &["version"]), Some(toml::Value::Integer(3)));
    assert_eq!(string(t, &["proxy_plugins", "streamsnap", "address"]), SOCKET);
    assert_eq!(
        string(
            t,
            &[
                "proxy_plugins",
                "streamsnap",
                "exports",
                "enable_remote_snapshot_annotations"
            ]
        ),
        "true"
    );
    assert_eq!(
        string(t, &["plugins", "io.containerd.cri.v1.images", "snapshotter"]),
        SNAPSHOTTER
    );
    let unpack = lookup(t, &["plugins", "io.containerd.transfer.v1.local", "unpack_config"]).unwrap();
    let unpack: Vec<(String, String)> = unpack
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["platform"].as_str().unwrap().into(),
                e["snapshotter"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        unpack,
        [
            ("linux".into(), "streamsnap".into()),
            ("linux".into(), "overlayfs".into())
        ]
    );
}

#[test]
fn containerd_1_6_default_config_keeps_every_other_line_and_reports_the_replaced_snapshotter() {
    let m = merge(DEFAULT_1_6, None, SOCKET).unwrap();
    assert_eq!(m.version, ConfigVersion::V2);
    assert_eq!(m.replaced_snapshotter.as_deref(), Some("overlayfs"));
    assert_lines_kept(
        DEFAULT_1_6,
        &m.text,
        &["snapshotter = ", "disable_snapshot_annotations = "],
    );
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd"];
    assert_eq!(string(&m.text, &[&cri[..], &["snapshotter"]].concat()), SNAPSHOTTER);
    assert_eq!(
        lookup(&m.text, &[&cri[..], &["disable_snapshot_annotations"]].concat()),
        Some(toml::Value::Boolean(false))
    );
    // The replaced keys stay where they were, with their indentation.
    assert!(m.text.contains("\n      snapshotter = \"streamsnap\"\n"), "{}", m.text);
}

#[test]
fn containerd_2_1_default_config_keeps_every_other_line_and_reports_the_replaced_snapshotter() {
    let m = merge(DEFAULT_2_1, None, SOCKET).unwrap();
    assert_eq!(m.version, ConfigVersion::V3);
    assert_eq!(m.replaced_snapshotter.as_deref(), Some("overlayfs"));
    // 2.1's runtime-level `snapshotter = ''` is not CRI's image snapshotter: it stays.
    assert_lines_kept(
        DEFAULT_2_1,
        &m.text,
        &["snapshotter = 'overlayfs'", "disable_snapshot_annotations = "],
    );
    assert_eq!(
        string(&m.text, &["plugins", "io.containerd.cri.v1.images", "snapshotter"]),
        SNAPSHOTTER
    );
}

#[test]
fn a_second_merge_changes_nothing() {
    for (text, fallback) in [
        ("", Some(ConfigVersion::V2)),
        ("", Some(ConfigVersion::V3)),
        (DEFAULT_1_6, None),
        (DEFAULT_2_1, None),
    ] {
        let once = merge(text, fallback, SOCKET).unwrap();
        let twice = merge(&once.text, None, SOCKET).unwrap();
        assert!(twice.changes.is_empty(), "{:?}", twice.changes);
        assert_eq!(twice.text, once.text);
        assert_eq!(twice.replaced_snapshotter, None);
    }
}

#[test]
fn comments_on_replaced_keys_and_elsewhere_are_kept() {
    let text = "# node config\nversion = 2\n\n# CRI\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  \
                # the node's snapshotter\n  snapshotter = \"native\" # was chosen for tests\n";
    let m = merge(text, None, SOCKET).unwrap();
    assert!(
        m.text.starts_with("# node config\nversion = 2\n\n# CRI\n"),
        "{}",
        m.text
    );
    assert!(
        m.text
            .contains("  # the node's snapshotter\n  snapshotter = \"streamsnap\" # was chosen for tests\n"),
        "{}",
        m.text
    );
    assert_eq!(m.replaced_snapshotter.as_deref(), Some("native"));
}

#[test]
fn an_existing_unpack_list_keeps_its_entries_and_gains_ours_once() {
    let text =
        "version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = 'linux/amd64'\n  \
                snapshotter = 'zfs'\n";
    let m = merge(text, None, SOCKET).unwrap();
    let list = lookup(
        &m.text,
        &["plugins", "io.containerd.transfer.v1.local", "unpack_config"],
    )
    .unwrap();
    let snapshotters: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["snapshotter"].as_str().unwrap())
        .collect();
    assert_eq!(snapshotters, ["zfs", "streamsnap"]);
    assert!(merge(&m.text, None, SOCKET).unwrap().changes.is_empty());
}

#[test]
fn an_inline_unpack_list_gains_an_inline_entry() {
    let text = "version = 3\n[plugins.'io.containerd.transfer.v1.local']\n  \
                unpack_config = [{ platform = 'linux', snapshotter = 'overlayfs' }]\n";
    let m = merge(text, None, SOCKET).unwrap();
    let list = lookup(
        &m.text,
        &["plugins", "io.containerd.transfer.v1.local", "unpack_config"],
    )
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{}", m.text);
}

#[test]
fn another_socket_is_replaced_and_reported() {
    let once = merge("", Some(ConfigVersion::V2), "/old.sock").unwrap();
    let m = merge(&once.text, None, SOCKET).unwrap();
    assert_eq!(m.changes.len(), 1, "{:?}", m.changes);
    assert_eq!(m.changes[0].key, "proxy_plugins.streamsnap.address");
    assert_eq!(m.changes[0].old.as_deref(), Some("\"/old.sock\""));
}

#[test]
fn configs_it_cannot_edit_are_refused() {
    type Expected = fn(&MergeError) -> bool;
    let cases: [(&str, Expected); 5] = [
        ("version = 2\n[plugins\n", |e| matches!(e, MergeError::Parse(_))),
        (
            "version = 4\n",
            |e| matches!(e, MergeError::UnsupportedVersion(v) if v == "4"),
        ),
        ("[plugins.cri]\n  sandbox_image = 'x'\n", |e| {
            matches!(e, MergeError::Version1)
        }),
        ("root = '/var/lib/containerd'\n", |e| matches!(e, MergeError::NoVersion)),
        (
            "version = 2\nplugins = 'x'\n",
            |e| matches!(e, MergeError::NotATable(k) if k == "plugins"),
        ),
    ];
    for (text, expected) in cases {
        let err = merge(text, None, SOCKET).unwrap_err();
        assert!(expected(&err), "{text:?}: {err}");
    }
}

#[test]
fn a_config_without_version_or_plugins_takes_the_given_version() {
    assert_eq!(declared_version("# nothing yet\n").unwrap(), None);
    let m = merge("# nothing yet\nroot = '/data'\n", Some(ConfigVersion::V3), SOCKET).unwrap();
    assert_eq!(lookup(&m.text, &["version"]), Some(toml::Value::Integer(3)));
    assert_eq!(string(&m.text, &["root"]), "/data");
    assert!(m.text.starts_with("# nothing yet\n"), "{}", m.text);
}

#[test]
fn the_config_version_follows_the_containerd_release() {
    for (out, v) in [
        (
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
            ConfigVersion::V2,
        ),
        (
            "containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da",
            ConfigVersion::V2,
        ),
        (
            "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
            ConfigVersion::V3,
        ),
        (
            "containerd github.com/containerd/containerd/v2 v2.0.5 fb4c30d4",
            ConfigVersion::V3,
        ),
    ] {
        assert_eq!(ConfigVersion::for_containerd(out), Some(v), "{out}");
    }
    assert_eq!(ConfigVersion::for_containerd("containerd 3.0.0"), None);
}

#[test]
fn imported_files_are_reported_not_edited() {
    let text = "version = 2\nimports = ['/etc/containerd/conf.d/*.toml']\n";
    let m = merge(text, None, SOCKET).unwrap();
    assert_eq!(m.imports, ["/etc/containerd/conf.d/*.toml"]);
    assert_eq!(merge(DEFAULT_2_1, None, SOCKET).unwrap().imports, Vec::<String>::new());
}

#[test]
fn dotted_keys_and_inline_tables_are_edited_where_they_are() {
    let dotted = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd.snapshotter = \"overlayfs\"\n";
    let m = merge(dotted, None, SOCKET).unwrap();
    assert!(
        m.text.contains("  containerd.snapshotter = \"streamsnap\"\n"),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("containerd.disable_snapshot_annotations = false"),
        "{}",
        m.text
    );
    let inline =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  containerd = { snapshotter = \"overlayfs\" }\n";
    let m = merge(inline, None, SOCKET).unwrap();
    let cri = ["plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"];
    assert_eq!(string(&m.text, &cri), SNAPSHOTTER);
    assert_eq!(m.replaced_snapshotter.as_deref(), Some("overlayfs"));
    for text in [dotted, inline] {
        let once = merge(text, None, SOCKET).unwrap().text;
        assert!(merge(&once, None, SOCKET).unwrap().changes.is_empty(), "{once}");
    }
}

#[test]
fn containerds_registry_config_path_is_reported_for_streamsnaps_mirrors() {
    let v2 =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
    let m = merge(v2, None, SOCKET).unwrap();
    assert_eq!(m.registry_config_path.as_deref(), Some("/etc/containerd/certs.d"));
    let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'\n";
    let m = merge(v3, None, SOCKET).unwrap();
    assert_eq!(
        m.registry_config_path.as_deref(),
        Some("/etc/containerd/certs.d:/etc/docker/certs.d")
    );
    // containerd's defaults leave it empty: nothing to report.
    assert_eq!(merge(DEFAULT_2_1, None, SOCKET).unwrap().registry_config_path, None);
}
