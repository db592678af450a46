//! Prefetch hints: eStargz landmarks put by `ctr-remote` in front of the files
//! start-up reads are honoured before a layer is reported mounted.
mod common;
use common::*;

/// Converts the pushed gzip image to eStargz with `ctr-remote`, placing
/// `record` (paths in the image) first, followed by `.prefetch.landmark`
/// (an empty record: `.no.prefetch.landmark`); pushes it as `tag`.
fn estargz_with_landmark(image: &OciImage, registry: &Registry, record: &[&str], tag: &str) -> String {
    let gz = push(image, registry, Format::Gzip);
    let out = format!("{}:{tag}", gz.rsplit_once(':').unwrap().0);
    let ctd = Containerd::start(ContainerdOpts::default());
    ctd.ctr(&["content", "fetch", "--plain-http", &gz]);
    let mut args = vec!["images", "convert", "--oci", "--estargz"];
    let record_file = ctd.scratch_dir().join("record.json");
    if !record.is_empty() {
        let lines: Vec<String> = record.iter().map(|p| format!("{{\"path\":\"{p}\"}}")).collect();
        std::fs::write(&record_file, lines.join("\n") + "\n").unwrap();
        args.extend(["--estargz-record-in", record_file.to_str().unwrap()]);
    }
    args.extend([gz.as_str(), out.as_str()]);
    ctd.ctr_remote(&args);
    ctd.ctr_remote(&["images", "push", "--plain-http", &out]);
    out
}

#[test]
fn landmark_files_arrive_before_the_mount_is_ready() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = estargz_with_landmark(&image, &registry, &["/etc/greeting", "/bin/busybox"], "landmark");
    let (_, layers) = registry.layers(&reference);
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    let log = mount.log();
    assert!(
        log.contains("landmark files prefetched") && log.contains("complete=true"),
        "{log}"
    );
    let mark = registry.mark();
    let greeting = std::fs::read_to_string(mount.mountpoint.join("etc/greeting")).unwrap();
    assert_eq!(greeting, "hello from streamsnap\n");
    let busybox = std::fs::read(mount.mountpoint.join("bin/busybox")).unwrap();
    assert_eq!(busybox, std::fs::read("/bin/busybox").unwrap());
    let fetched = registry.layer_bytes_served_since(&layers, mark);
    assert_eq!(fetched, 0, "start-up files were fetched on demand:\n{}", mount.log());
    mount.stop();
}

#[test]
fn no_prefetch_landmark_means_no_prefetch() {
    require_root();
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = build_runnable_image(&work.path().join("image"), 16);
    let reference = estargz_with_landmark(&image, &registry, &[], "nolandmark");
    let (_, layers) = registry.layers(&reference);
    let mount = MountProcess::start(&reference, &work.path().join("state"), &work.path().join("mnt"), &[]);
    assert!(!mount.log().contains("landmark files prefetched"), "{}", mount.log());
    let mark = registry.mark();
    std::fs::read(mount.mountpoint.join("etc/greeting")).unwrap();
    assert!(registry.layer_bytes_served_since(&layers, mark) > 0);
    mount.stop();
}
