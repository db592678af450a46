//! One state dir, one owner: while `streamsnap serve` runs, a second `serve`,
//! a `mount` or an `index` on its state dir refuses to start, naming the dir
//! and the daemon's pid, and touches nothing in it.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Runs the binary with `args`; checks that it failed and returns its stderr.
fn refused(args: &[&std::ffi::OsStr]) -> String {
    let out = run_output(Command::new(common::streamsnap::binary()).args(args));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a second owner of the state dir started:\n{err}");
    err
}

fn assert_names_owner(err: &str, state: &Path, pid: u32) {
    assert!(err.contains(&state.display().to_string()), "{err}");
    assert!(err.contains("in use") && err.contains(&format!("pid {pid}")), "{err}");
}

#[test]
fn a_second_process_refuses_a_state_dir_the_daemon_holds() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let daemon = streamsnap::ServeProcess::start(dir.path());
    let state = dir.path().join("state");
    let other_socket = dir.path().join("other.sock");
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();

    let err = refused(&[
        "serve".as_ref(),
        "--root".as_ref(),
        state.as_os_str(),
        "--address".as_ref(),
        other_socket.as_os_str(),
    ]);
    assert_names_owner(&err, &state, daemon.pid());
    assert!(!other_socket.exists(), "the refused daemon bound its socket");

    let err = refused(&[
        "mount".as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "127.0.0.1:1/none:latest".as_ref(),
        mountpoint.as_os_str(),
    ]);
    assert_names_owner(&err, &state, daemon.pid());

    let err = refused(&[
        "index".as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "127.0.0.1:1/none:latest".as_ref(),
    ]);
    assert_names_owner(&err, &state, daemon.pid());

    daemon.stop();
}

#[test]
fn a_state_dir_is_free_again_once_its_daemon_stopped() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    streamsnap::ServeProcess::start(dir.path()).stop();
    streamsnap::ServeProcess::start(dir.path()).stop();
}
