//! The daemon restarts, containers do not notice (design.md section 9): after a
//! restart the layers are mounted again while the socket serves, and a layer
//! that cannot be served is reported by name, never shown as an empty directory.
mod common;
use common::*;
use std::time::Duration;

/// Waits until containerd has reconnected to the (new) daemon.
fn wait_for_reconnect(containerd: &Containerd) {
    wait_until(Duration::from_secs(60), "containerd to reconnect to streamsnap", || {
        containerd
            .try_ctr(&["snapshots", "--snapshotter", "streamsnap", "ls"])
            .is_ok()
    });
}

#[test]
fn a_layer_not_mounted_again_after_a_restart_fails_container_start_by_name_until_it_can_be() {
    require_root();
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("streamsnap");
    let serve = ServeProcess::start(&root);
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let image = build_runnable_image(&work.path().join("image"), 4);
    let pushed = push(&image, &registry, Format::Estargz);
    let (_, digests) = registry.layers(&pushed);
    let reference = pushed.replacen(&registry.addr(), &proxy.addr(), 1);
    containerd.rpull(&reference);
    let greeting = |id: &str| containerd.run_script("streamsnap", &reference, id, "cat /etc/greeting");
    assert_eq!(greeting("before"), "hello from streamsnap\n");

    // A reboot: the daemon and its mounts go; the registry is down when it is back.
    serve.stop();
    let refused = Fault::Status {
        code: 503,
        times: u32::MAX,
        retry_after: None,
    };
    proxy.set("/v2/", refused);
    let serve = ServeProcess::start(&root);
    wait_for_reconnect(&containerd);
    let args = [
        "run",
        "--rm",
        "--snapshotter",
        "streamsnap",
        &reference,
        "during",
        "/bin/sh",
        "-c",
        "cat /etc/greeting",
    ];
    let error = containerd
        .try_ctr(&args)
        .expect_err("a container started on a layer that is not served");
    eprintln!("container start refused: {error}");
    assert!(
        error.contains("after the restart") || error.contains("since the restart"),
        "{error}"
    );
    assert!(digests.iter().any(|d| error.contains(d.as_str())), "{error}");

    // The registry is back: the next start mounts the layer again and runs.
    proxy.clear();
    assert_eq!(greeting("after"), "hello from streamsnap\n");
    let log = serve.stop();
    assert!(log.contains("re-mounted lazy layer"), "{log}");
}
