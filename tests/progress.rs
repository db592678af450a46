//! Progress of long one-shot work: `streamsnap index` draws a bar per layer
//! (bytes of total) on stderr when it is a terminal, and nothing when it is not.
mod common;
use common::*;
use std::process::Command;

/// A plain gzip image with a layer big enough to index, in a registry.
fn gzip_image(work: &std::path::Path, registry: &Registry) -> String {
    let image = build_runnable_image(&work.join("image"), 16);
    push(&image, registry, Format::Gzip)
}

#[test]
fn index_shows_each_layers_bytes_on_a_terminal() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = gzip_image(work.path(), &registry);
    let (_, digests) = registry.layers(&reference);
    let state = work.path().join("state");
    // `script` gives the command a pseudo-terminal and copies what it drew.
    let command = format!(
        "{} index --state-dir {} {reference} 2>&1",
        common::streamsnap::binary().display(),
        state.display()
    );
    let drawn = run(Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("RUST_LOG", "warn"));
    eprintln!("{drawn}");
    let big = digests.last().unwrap();
    let bar = format!("{} indexed: ", &big[..19]);
    assert!(drawn.contains(&bar), "no finished bar {bar:?}:\n{drawn}");
    assert!(drawn.contains("MiB/"), "no bytes of total:\n{drawn}");

    // Not a terminal: the same command draws nothing.
    let piped = index_image(&reference, &work.path().join("state2"), &[]);
    assert!(!piped.contains(&bar) && !piped.contains("MiB/"), "{piped}");
}

#[test]
fn pull_shows_how_each_layer_was_served_on_a_terminal() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let serve = ServeProcess::start(&work.path().join("streamsnap"));
    let containerd = Containerd::start(ContainerdOpts {
        streamsnap_socket: Some(serve.socket.clone()),
        ..Default::default()
    });
    let image = build_runnable_image(&work.path().join("image"), 8);
    let reference = push(&image, &registry, Format::Estargz);
    let (_, digests) = registry.layers(&reference);
    let command = format!(
        "{} pull --address {} --namespace {} {reference} 2>&1",
        common::streamsnap::binary().display(),
        containerd.socket().display(),
        containerd.namespace()
    );
    let drawn = run(Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("RUST_LOG", "warn"));
    eprintln!("{drawn}");
    for digest in &digests {
        let bar = format!("{} served lazily", &digest[..19]);
        assert!(drawn.contains(&bar), "no finished bar {bar:?}:\n{drawn}");
    }
    assert!(drawn.contains("layers served lazily, 0 unpacked"), "{drawn}");
}
