//! `streamsnap serve` configuration: the file is read, flags override it,
//! unknown keys are refused with a message naming the file and the key.
mod common;
use common::*;
use std::process::Command;

/// `serve --config FILE` with `text` in FILE: its stderr, after checking that it failed.
fn refused(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("streamsnap.toml");
    std::fs::write(&config, text).unwrap();
    let out = run_output(
        Command::new(common::streamsnap::binary())
            .arg("serve")
            .arg("--config")
            .arg(&config),
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused() {
    let err = refused("root = \"/tmp/x\"\n[cache]\ndisk_sise = \"1GiB\"\n");
    assert!(err.contains("disk_sise") && err.contains("streamsnap.toml"), "{err}");
}

#[test]
fn a_config_file_with_a_bad_value_is_refused_naming_key_and_value() {
    let err = refused("[prefetch]\ntimeout = -2.5\n");
    assert!(
        err.contains("timeout") && err.contains("-2.5") && err.contains("streamsnap.toml"),
        "{err}"
    );
}

#[test]
fn flags_override_the_config_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("streamsnap.toml");
    let from_file = dir.path().join("file.sock");
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\naddress = \"{}\"\n",
            dir.path().join("root").display(),
            from_file.display()
        ),
    )
    .unwrap();
    let flag = dir.path().join("flag.sock");
    let mut child = Command::new(common::streamsnap::binary())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--address")
        .arg(&flag)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        std::time::Duration::from_secs(30),
        "the socket named by --address",
        || flag.exists(),
    );
    assert!(!from_file.exists());
    assert!(
        dir.path().join("root/metadata.redb").exists(),
        "root from the file is used"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!flag.exists(), "socket removed on shutdown");
}

#[test]
fn the_socket_and_the_state_are_not_reachable_by_host_users() {
    require_root();
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let serve = common::streamsnap::ServeProcess::start(dir.path());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&serve.socket), 0o660);
    let state = dir.path().join("state");
    for p in [state.clone(), state.join("cache"), state.join("snapshots")] {
        assert_eq!(mode(&p), 0o700, "{}", p.display());
    }
    serve.stop();
}
