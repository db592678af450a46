//! containerd's own snapshotter test suite (Go, containerd 1.6's
//! `snapshots/testsuite`, unmodified) plus contract checks containerd relies
//! on, driven through containerd's `snapshots/proxy` gRPC client against a
//! live `streamsnap serve` started per case. See tests/conformance/run.sh.
mod common;
use common::*;
use std::process::Command;

#[test]
fn containerd_snapshotter_suite_passes_against_streamsnap_serve() {
    require_root();
    require_tool("go");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance/run.sh");
    let out = run_output(
        Command::new("bash")
            .arg(script)
            .env("STREAMSNAP_BIN", env!("CARGO_BIN_EXE_streamsnap")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("--- ")).collect();
    assert!(
        out.status.success(),
        "conformance suite failed ({}):\n{}\n{stderr}\n{}",
        out.status,
        summary.join("\n"),
        stdout
    );
    // Every case ran: the suite's 21 (Rename is skipped by the suite itself on every snapshotter) and our contract checks.
    let passed = summary
        .iter()
        .filter(|l| l.contains("--- PASS: TestConformance/"))
        .count();
    assert!(
        passed >= 20,
        "only {passed} suite cases passed:\n{}",
        summary.join("\n")
    );
}
