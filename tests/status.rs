//! `streamsnap status` and the daemon's HTTP endpoint with real containerd 1.6,
//! runc and a registry: health and readiness, the status of an image served
//! lazily, and the metrics the Grafana dashboard queries.
mod common;
use common::*;
use std::process::Command;

struct Node {
    registry: Registry,
    serve: Option<ServeProcess>,
    containerd: Containerd,
    work: tempfile::TempDir,
    /// The daemon's `--metrics-address`.
    addr: String,
}

fn start() -> Node {
    start_with(&[])
}

/// Registry, `streamsnap serve --metrics-address ADDR EXTRA…` and a containerd using it.
fn start_with(extra: &[&str]) -> Node {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let serve = serve(work.path(), &addr, extra);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    Node {
        registry,
        serve: Some(serve),
        containerd,
        work,
        addr,
    }
}

fn serve(work: &std::path::Path, addr: &str, extra: &[&str]) -> ServeProcess {
    let mut args = vec!["--metrics-address", addr];
    args.extend(extra);
    ServeProcess::start_with(&work.join("streamsnap"), &args)
}

/// The status document of the daemon at `addr`, and the entry of the image `reference`.
fn image_status(addr: &str, reference: &str) -> (serde_json::Value, serde_json::Value) {
    let json = status(addr, &["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let image = doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"].as_str().unwrap().starts_with(reference))
        .unwrap_or_else(|| panic!("{reference} not in the status:\n{json}"))
        .clone();
    (doc, image)
}

/// An eStargz image pulled lazily, and one container (`id`: unique across tests, runc's
/// state dir is shared) run from it.
fn run_estargz(node: &Node, id: &str) -> String {
    let image = build_runnable_image(&node.work.path().join("image"), 16);
    let reference = push(&image, &node.registry, Format::Estargz);
    node.containerd.rpull(&reference);
    let out = node
        .containerd
        .run_script("streamsnap", &reference, id, "cat /etc/greeting");
    assert_eq!(out.trim(), "hello from streamsnap");
    reference
}

fn status(addr: &str, extra: &[&str]) -> String {
    run(Command::new(common::streamsnap::binary())
        .args(["status", "--metrics-address", addr])
        .args(extra))
}

/// HTTP status code of `GET http://ADDR/PATH`.
fn http_code(addr: &str, path: &str) -> String {
    run(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{addr}{path}"),
    ]))
}

#[test]
fn health_and_readiness_answer_once_the_daemon_serves() {
    let node = start();
    wait_until(std::time::Duration::from_secs(30), "/readyz to answer 200", || {
        http_code(&node.addr, "/readyz") == "200"
    });
    assert_eq!(
        http_code(&node.addr, "/healthz"),
        "200",
        "{}",
        node.serve.as_ref().unwrap().log()
    );
    assert_eq!(http_code(&node.addr, "/nothing"), "404");
}

#[test]
fn status_shows_each_layer_of_a_lazily_pulled_image_with_bytes_fetched_of_total() {
    let node = start();
    let reference = run_estargz(&node, "status-lazy");
    let (_, digests) = node.registry.layers(&reference);

    let json = status(&node.addr, &["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["ready"], true, "{json}");
    assert!(doc["cache"]["limit_bytes"].as_u64().unwrap() > 0, "{json}");
    let images = doc["images"].as_array().unwrap();
    let image = images
        .iter()
        .find(|i| i["image"].as_str().unwrap().starts_with(&reference))
        .unwrap_or_else(|| panic!("{reference} not in the status:\n{json}"));
    let layers = image["layers"].as_array().unwrap();
    assert_eq!(layers.len(), digests.len(), "{json}");
    let (mut fetched, mut total) = (0, 0);
    for (layer, digest) in layers.iter().zip(&digests) {
        assert_eq!(layer["digest"].as_str(), Some(digest.as_str()), "{json}");
        assert_eq!(layer["form"], "estargz", "{json}");
        assert_eq!(layer["served"], "lazy", "{json}");
        assert_eq!(layer["fill"]["state"], "off", "{json}");
        // The first node to mount the image records its start-up.
        assert_eq!(layer["profile"]["state"], "recorded", "{json}");
        let (f, s) = (
            layer["fetched_bytes"].as_u64().unwrap(),
            layer["size_bytes"].as_u64().unwrap(),
        );
        assert!(f <= s, "layer {digest}: fetched {f} of {s}:\n{json}");
        fetched += f;
        total += s;
    }
    eprintln!("status: {} layers, fetched {fetched} of {total} bytes", layers.len());
    assert!(fetched > 0 && fetched < total, "{json}");

    let table = status(&node.addr, &[]);
    eprintln!("{table}");
    assert!(table.starts_with("node: ready"), "{table}");
    for digest in &digests {
        let short = &digest[..digest.find(':').unwrap() + 13];
        let lines: Vec<_> = table.lines().filter(|l| l.trim_start().starts_with(short)).collect();
        assert_eq!(lines.len(), 1, "{short}:\n{table}");
        assert!(lines[0].contains("estargz") && lines[0].contains("lazy"), "{table}");
    }
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_exported_by_a_live_daemon() {
    let node = start();
    run_estargz(&node, "status-dashboard");
    let text = run(Command::new("curl").args(["-sSf", &format!("http://{}/metrics", node.addr)]));
    let samples: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/streamsnap-dashboard.json"
    ))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in doc["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {}: {expr} names no streamsnap metric",
                panel["title"]
            );
            queried.extend(names);
        }
    }
    let missing: Vec<_> = queried.iter().filter(|n| !samples.contains(n.as_str())).collect();
    eprintln!("dashboard queries {} metrics: {queried:?}", queried.len());
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
}

/// The `streamsnap_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("streamsnap_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn status_names_layers_containerd_unpacked_itself() {
    let node = start();
    // Plain gzip without an index: not servable lazily, so containerd unpacks it.
    let image = build_runnable_image(&node.work.path().join("image"), 8);
    let reference = push(&image, &node.registry, Format::Gzip);
    let (_, digests) = node.registry.layers(&reference);
    node.containerd.rpull(&reference);
    let json = status(&node.addr, &["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let image = doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"].as_str().unwrap().starts_with(&reference))
        .unwrap_or_else(|| panic!("{reference} not in the status:\n{json}"));
    let layers = image["layers"].as_array().unwrap();
    assert_eq!(layers.len(), digests.len(), "{json}");
    for (layer, digest) in layers.iter().zip(&digests) {
        assert_eq!(layer["digest"].as_str(), Some(digest.as_str()), "{json}");
        assert_eq!(layer["served"], "unpacked_by_containerd", "{json}");
    }
}

#[test]
fn status_shows_a_background_fill_complete_with_its_proof() {
    let node = start_with(&["--background-fill", "--background-fill-delay", "0"]);
    let reference = run_estargz(&node, "status-fill");
    let (_, digests) = node.registry.layers(&reference);
    let mut last = serde_json::Value::Null;
    wait_until(
        std::time::Duration::from_secs(120),
        "every layer's fill to complete",
        || {
            last = image_status(&node.addr, &reference).1;
            last["layers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["fill"]["state"] == "complete")
        },
    );
    let layers = last["layers"].as_array().unwrap();
    assert_eq!(layers.len(), digests.len(), "{last:#}");
    for l in layers {
        let proof = l["fill"]["proof"].as_str();
        assert_eq!(proof, Some("layer_digest"), "a first fill hashes every blob: {last:#}");
        assert!(l["cached_bytes"].as_u64().unwrap() > 0, "{last:#}");
    }
    let table = status(&node.addr, &[]);
    assert_eq!(table.matches(" complete(").count(), digests.len(), "{table}");
}

#[test]
fn after_a_restart_the_daemon_is_ready_once_its_layers_are_mounted_again() {
    let mut node = start();
    let reference = run_estargz(&node, "status-restart");
    let (_, digests) = node.registry.layers(&reference);
    node.serve.take().unwrap().stop();
    node.serve = Some(serve(node.work.path(), &node.addr, &[]));
    wait_until(
        std::time::Duration::from_secs(60),
        "/readyz to answer 200 after the restart",
        || http_code(&node.addr, "/readyz") == "200",
    );
    let (doc, image) = image_status(&node.addr, &reference);
    assert_eq!(doc["ready"], true, "{doc:#}");
    let layers = image["layers"].as_array().unwrap();
    assert_eq!(layers.len(), digests.len(), "{doc:#}");
    assert!(layers.iter().all(|l| l["served"] == "lazy"), "{doc:#}");
}

#[test]
fn status_finds_the_daemon_through_its_config_file() {
    let node = start();
    let config = node.work.path().join("config.toml");
    std::fs::write(&config, format!("metrics_address = \"{}\"\n", node.addr)).unwrap();
    let table = run(Command::new(common::streamsnap::binary())
        .args(["status", "--config"])
        .arg(&config));
    assert!(table.starts_with("node: ready"), "{table}");
    // Without an address anywhere it says where to give one.
    let empty = node.work.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = run_output(
        Command::new(common::streamsnap::binary())
            .args(["status", "--config"])
            .arg(&empty),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--metrics-address"), "{err}");
}
