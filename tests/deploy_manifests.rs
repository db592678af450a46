//! The Kubernetes manifests in deploy/kubernetes: they build with kustomize,
//! validate (strictly) against the schemas of a current Kubernetes release, and
//! the DaemonSet keeps its contract: privileged, host PID and network,
//! /dev/fuse, the state dir shared both ways, node-critical priority, probes on
//! the daemon's health endpoint, the GPU overlay's node selection and taints.
//! Tools (scripts/install-deps.sh): kustomize or kubectl, kubernetes-validate (pip), python3.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Kubernetes release validated against (the newest kubernetes-validate ships schemas for).
const KUBERNETES: &str = "1.37.0";

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes")
        .join(dir)
}

fn output(cmd: &mut Command, stdin: Option<&str>) -> std::process::Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/install-deps.sh installs it)"));
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> String {
    let out = output(cmd, stdin);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// `kustomize build DIR` (or kubectl's built-in kustomize): the manifests as YAML.
fn kustomize(dir: &str) -> String {
    let dir = deploy(dir);
    if on_path("kustomize") {
        run(Command::new("kustomize").arg("build").arg(&dir), None)
    } else {
        assert!(
            on_path("kubectl"),
            "neither kustomize nor kubectl is installed (scripts/install-deps.sh)"
        );
        run(Command::new("kubectl").arg("kustomize").arg(&dir), None)
    }
}

/// Validates YAML documents strictly (unknown fields fail) against KUBERNETES's schemas.
fn validate(yaml: &str) -> std::process::Output {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    output(
        Command::new("kubernetes-validate")
            .args(["--strict", "-k", KUBERNETES])
            .arg(file.path()),
        None,
    )
}

/// Every document of a YAML stream, as JSON.
fn documents(yaml: &str) -> Vec<Value> {
    let json = run(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ]),
        Some(yaml),
    );
    serde_json::from_str(&json).unwrap()
}

fn object<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {docs:#?}"))
}

fn daemonset_pod(dir: &str) -> (Value, Vec<Value>) {
    let docs = documents(&kustomize(dir));
    (object(&docs, "DaemonSet")["spec"]["template"]["spec"].clone(), docs)
}

#[test]
fn base_and_gpu_overlay_build_and_validate_against_a_current_kubernetes() {
    for dir in ["base", "overlays/gpu"] {
        let yaml = kustomize(dir);
        let out = validate(&yaml);
        let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        eprintln!("{dir}:\n{report}");
        assert!(out.status.success(), "{dir} does not validate:\n{report}\n{yaml}");
        assert_eq!(report.matches("passed for resource").count(), 2, "{report}");
    }
}

#[test]
fn the_validator_rejects_a_daemonset_with_an_unknown_field() {
    let yaml = kustomize("base").replace("hostPID: true", "hostPID: true\n      hostPid: true");
    assert!(!validate(&yaml).status.success(), "an unknown field passed validation");
}

#[test]
fn the_daemonset_is_privileged_on_the_host_with_fuse_and_the_state_dir_shared_both_ways() {
    let (pod, _) = daemonset_pod("base");
    assert_eq!(pod["hostPID"], true, "nsenter -t 1 needs the host's PID namespace");
    assert_eq!(
        pod["hostNetwork"], true,
        "the probes reach the daemon on the node's loopback"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}: {pod:#}"))
            .clone()
    };
    let mount = |path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {c:#}"))
            .clone()
    };
    let fuse = volume(mount("/dev/fuse")["name"].as_str().unwrap());
    assert_eq!(fuse["hostPath"]["path"], "/dev/fuse");
    assert_eq!(fuse["hostPath"]["type"], "CharDevice");
    let state = mount("/var/lib/streamsnap");
    assert_eq!(state["mountPropagation"], "Bidirectional");
    assert_eq!(
        volume(state["name"].as_str().unwrap())["hostPath"]["path"],
        "/var/lib/streamsnap"
    );
    let c = c.clone();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}: {c:#}");
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        assert_eq!(get["port"], 9580, "{probe}");
    }
    let tolerations = pod["tolerations"].as_array().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t["effect"] == "NoSchedule"),
        "the base runs on every node whatever its NoSchedule taints: {tolerations:?}"
    );
    let requests = &c["resources"]["requests"];
    assert!(requests["cpu"].is_string() && requests["memory"].is_string(), "{c:#}");
}

#[test]
fn the_pod_installs_a_host_unit_whose_daemon_serves_the_probed_address() {
    let (pod, docs) = daemonset_pod("base");
    let files = &object(&docs, "ConfigMap")["data"];
    let config = tempfile::tempdir().unwrap();
    let path = config.path().join("config.toml");
    std::fs::write(&path, files["config.toml"].as_str().unwrap()).unwrap();
    let cfg = streamsnap::config::Config::load(Some(&path)).expect("the ConfigMap's config.toml loads");
    let addr = cfg.metrics_address.expect("metrics_address is set: the probes need it");
    assert_eq!(addr.port(), pod["containers"][0]["livenessProbe"]["httpGet"]["port"]);
    assert_eq!(cfg.root, Path::new("/var/lib/streamsnap"));
    // The CRI proxy for pull secrets is served; kubelet is pointed at it by the node's owner.
    assert_eq!(
        cfg.cri.proxy_address.as_deref(),
        Some(Path::new("/run/streamsnap/cri.sock"))
    );
    let unit = files["streamsnap.service"].as_str().unwrap();
    assert!(unit.contains("Before=containerd.service kubelet.service"), "{unit}");
    assert!(
        unit.contains("ExecStart=/opt/streamsnap/bin/streamsnap serve --config /etc/streamsnap/config.toml"),
        "{unit}"
    );
    let script = files["install.sh"].as_str().unwrap();
    for step in [
        "nsenter -t 1 -m -u -i -n -p --",
        "\"$host/opt/streamsnap/bin/streamsnap\"",
        "systemctl daemon-reload",
        "systemctl enable --now streamsnap.service",
        "/opt/streamsnap/bin/streamsnap install",
    ] {
        assert!(script.contains(step), "install.sh lacks {step}:\n{script}");
    }
    // A rollout replaces the pod; the daemon only when the pod brings a new
    // binary (an upgrade the mounts survive), and it is never stopped.
    assert!(!script.contains("systemctl stop"), "{script}");
    assert_eq!(script.matches("systemctl restart").count(), 1, "{script}");
    assert!(script.contains("cmp -s"), "restarted only for a new binary: {script}");
    assert!(pod["containers"][0].get("lifecycle").is_none(), "no preStop: {pod:#}");
}

#[test]
fn the_gpu_overlay_selects_gpu_nodes_and_tolerates_the_gpu_and_spot_taints() {
    let (pod, _) = daemonset_pod("overlays/gpu");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true", "{pod:#}");
    let tolerations = pod["tolerations"].as_array().unwrap();
    let tolerates = |key: &str, value: Option<&str>| {
        tolerations.iter().any(|t| {
            t["key"] == key
                && t["effect"] == "NoSchedule"
                && match value {
                    Some(v) => t["operator"] == "Equal" && t["value"] == v,
                    None => t["operator"] == "Exists",
                }
        })
    };
    assert!(tolerates("nvidia.com/gpu", None), "{tolerations:?}");
    assert!(
        tolerates("cloud.google.com/gke-spot", Some("true")),
        "GKE spot: {tolerations:?}"
    );
    assert!(
        tolerates("eks.amazonaws.com/capacityType", Some("SPOT")),
        "EKS spot: {tolerations:?}"
    );
    assert!(
        tolerates("kubernetes.azure.com/scalesetpriority", Some("spot")),
        "AKS spot: {tolerations:?}"
    );
    // The overlay keeps the base's contract.
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["hostPID"], true);
}

#[test]
fn the_pods_script_installs_starts_and_then_only_watches() {
    let (_, docs) = daemonset_pod("base");
    let files = &object(&docs, "ConfigMap")["data"];
    let dir = tempfile::tempdir().unwrap();
    let (cm, host, bin) = (dir.path().join("cm"), dir.path().join("host"), dir.path().join("bin"));
    for d in [&cm, &host.join("etc/systemd/system"), &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    for name in ["install.sh", "config.toml", "streamsnap.service"] {
        std::fs::write(cm.join(name), files[name].as_str().unwrap()).unwrap();
    }
    // What the image ships, and an nsenter that records what it was asked to run on the host.
    let shipped = dir.path().join("streamsnap");
    std::fs::write(&shipped, "#!/bin/sh\necho streamsnap\n").unwrap();
    let calls = dir.path().join("calls");
    let nsenter = bin.join("nsenter");
    std::fs::write(&nsenter, format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display())).unwrap();
    std::fs::set_permissions(&nsenter, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut child = Command::new("sh")
        .arg(cm.join("install.sh"))
        .env("PATH", path)
        .env("HOST_ROOT", &host)
        .env("STREAMSNAP_BINARY", &shipped)
        .env("HOST_FILES", &cm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let log = || std::fs::read_to_string(&calls).unwrap_or_default();
    while log().lines().count() < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "install.sh exited early: {:?}",
            child.wait_with_output()
        );
        assert!(std::time::Instant::now() < deadline, "install.sh stalled: {}", log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let host_root = "-t 1 -m -u -i -n -p --";
    assert_eq!(
        log().lines().collect::<Vec<_>>(),
        [
            format!("{host_root} systemctl daemon-reload"),
            format!("{host_root} systemctl enable --now streamsnap.service"),
            format!(
                "{host_root} /opt/streamsnap/bin/streamsnap install --containerd-config /etc/containerd/config.toml"
            ),
        ]
    );
    let installed = host.join("opt/streamsnap/bin/streamsnap");
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(&shipped).unwrap());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&installed).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    for (on_host, name) in [
        ("etc/streamsnap/config.toml", "config.toml"),
        ("etc/systemd/system/streamsnap.service", "streamsnap.service"),
    ] {
        assert_eq!(
            std::fs::read_to_string(host.join(on_host)).unwrap(),
            files[name].as_str().unwrap()
        );
    }
    // Still running: it watches. SIGTERM (pod deletion) ends it at once, and cleanly.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "install.sh did not stay to watch");
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(log().lines().count(), 3, "nothing more ran on the host: {}", log());
}
