//! `streamsnap install` on containerd's own default config is all a node needs: a real containerd
//! (1.6, 2.1) started with the installed config pulls an eStargz image lazily through CRI's
//! PullImage (the kubelet's path) and, on 2.1, through its transfer service (`ctr image pull`).
//! Only the paths the test must keep private (root, state, sockets, ports, a plain-HTTP
//! registry) are set over the installed config, in a copy.
mod common;
use common::cri::Cri;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use toml_edit::{value, Array, DocumentMut};

#[test]
fn after_install_on_containerd_1_6_default_config_a_cri_pull_is_lazy() {
    let node = Node::start(Release::System1_6);
    let reference = node.push_estargz();
    node.assert_lazy(&reference, "CRI PullImage", || {
        Cri::connect(&node.containerd).pull_image(&reference);
    });
}

#[test]
fn after_install_on_containerd_2_1_default_config_a_cri_pull_is_lazy() {
    let node = Node::start(Release::V2_1);
    let reference = node.push_estargz();
    node.assert_lazy(&reference, "CRI PullImage", || {
        Cri::connect(&node.containerd).pull_image(&reference);
    });
}

#[test]
fn after_install_on_containerd_2_1_default_config_a_transfer_service_pull_is_lazy() {
    let node = Node::start(Release::V2_1);
    let reference = node.push_estargz();
    node.assert_lazy(&reference, "ctr image pull", || {
        // 2.x's `ctr image pull` runs in the transfer service: the installed unpack list and
        // export make it unpack into streamsnap.
        node.containerd.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "streamsnap",
            &reference,
        ]);
    });
    let out = node
        .containerd
        .run_script("streamsnap", &reference, "t1", "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
}

/// A registry, `streamsnap serve`, and containerd running the config `streamsnap install` made
/// from that containerd's `config default`.
struct Node {
    registry: Registry,
    serve: ServeProcess,
    containerd: Containerd,
    work: tempfile::TempDir,
}

impl Node {
    fn start(release: Release) -> Node {
        require_root();
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let serve = ServeProcess::start(&work.path().join("streamsnap"));
        let bin = match release {
            Release::System1_6 => PathBuf::from("containerd"),
            Release::V2_1 => common::containerd2::bin_dir().join("containerd"),
        };
        let config = work.path().join("config.toml");
        std::fs::write(&config, run(Command::new(&bin).args(["config", "default"]))).unwrap();
        let out = run(Command::new(common::streamsnap::binary())
            .arg("install")
            .arg("--containerd-config")
            .arg(&config)
            .arg("--address")
            .arg(&serve.socket)
            .arg("--no-restart"));
        eprintln!("{out}");
        let dir = tempfile::Builder::new().prefix("containerd-").tempdir().unwrap();
        let installed = std::fs::read_to_string(&config).unwrap();
        let private = private_paths(&installed, release, dir.path(), &registry.addr());
        let containerd = Containerd::start_with_config(release, dir, &private);
        Node {
            registry,
            serve,
            containerd,
            work,
        }
    }

    /// A runnable image with 64 MiB of files nobody reads, pushed as eStargz.
    fn push_estargz(&self) -> String {
        let image = build_runnable_image(&self.work.path().join("image"), 64);
        push(&image, &self.registry, Format::Estargz)
    }

    /// Runs `pull` and asserts the registry served under a fifth of the image's layer bytes,
    /// streamsnap serving the layers.
    fn assert_lazy(&self, reference: &str, what: &str, pull: impl FnOnce()) {
        let (total, digests) = self.registry.layers(reference);
        let mark = self.registry.mark();
        pull();
        let served = self.registry.layer_bytes_served_since(&digests, mark);
        eprintln!(
            "{what}: layers {total} bytes, registry served {served} ({:.1}%)",
            served as f64 * 100.0 / total as f64
        );
        assert!(
            served * 5 < total,
            "{what}: registry served {served} of {total} layer bytes (not lazy)"
        );
        let log = self.serve.log();
        assert!(log.contains("layer served lazily"), "{what}: {log}");
    }
}

/// The installed config with this test's private paths and ports over it, and `registry`
/// reachable over plain HTTP (1.6: a CRI mirror; 2.1: a hosts.toml for CRI and the transfer
/// service). Nothing streamsnap's install wrote is touched.
fn private_paths(installed: &str, release: Release, dir: &Path, registry: &str) -> String {
    let mut doc: DocumentMut = installed.parse().expect("installed config parses");
    let path = |p: &str| dir.join(p).display().to_string();
    doc["root"] = value(path("root"));
    doc["state"] = value(path("state"));
    doc["grpc"]["address"] = value(path("containerd.sock"));
    doc["ttrpc"]["address"] = value(path("containerd.sock.ttrpc"));
    doc["debug"]["address"] = value(path("debug.sock"));
    doc["debug"]["level"] = value("info");
    doc["metrics"]["address"] = value("");
    doc["plugins"]["io.containerd.internal.v1.opt"]["path"] = value(path("opt"));
    let cri = &mut doc["plugins"]["io.containerd.grpc.v1.cri"];
    cri["stream_server_address"] = value("127.0.0.1");
    cri["stream_server_port"] = value("0");
    match release {
        Release::System1_6 => {
            let mirror = &mut cri["registry"]["mirrors"][registry];
            mirror["endpoint"] = value(Array::from_iter([format!("http://{registry}")]));
        }
        Release::V2_1 => {
            // NRI listens on a fixed host path.
            doc["disabled_plugins"] = value(Array::from_iter(["io.containerd.nri.v1.nri"]));
            let hosts = dir.join("certs.d");
            let host_dir = hosts.join(registry);
            std::fs::create_dir_all(&host_dir).unwrap();
            std::fs::write(
                host_dir.join("hosts.toml"),
                format!(
                    "server = 'http://{registry}'\n[host.'http://{registry}']\n  capabilities = ['pull', 'resolve']\n"
                ),
            )
            .unwrap();
            let hosts = hosts.display().to_string();
            doc["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] = value(&hosts);
            doc["plugins"]["io.containerd.transfer.v1.local"]["config_path"] = value(&hosts);
        }
    }
    doc.to_string()
}
