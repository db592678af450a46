//! Test OCI images built with Debian's umoci 0.4.7 (plus GNU tar for layers umoci cannot express).
//!
//! umoci 0.4.7 facts this relies on: layers are always gzip; `repack` truncates mtimes to whole
//! seconds and writes per-path `.wh.NAME` whiteouts for deletions; `insert --opaque` writes
//! `DIR/.wh..wh..opq` but emits a truncated tar (no padding/EOF blocks), so the opaque layer is GNU tar;
//! `raw add-layer` takes an uncompressed tar verbatim (and gzips it).
use super::fsutil::*;
use super::{require_tool, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An image inside an OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The OCI layout directory.
    pub layout: PathBuf,
    /// The tag inside the layout.
    pub tag: String,
}

impl OciImage {
    /// The skopeo/containers-image reference `oci:LAYOUT:TAG`.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.layout.display(), self.tag)
    }

    /// The image's OCI manifest (read from the layout).
    pub fn manifest(&self) -> serde_json::Value {
        let index: serde_json::Value = read_json(&self.layout.join("index.json"));
        let m = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == self.tag.as_str())
            .unwrap_or_else(|| panic!("tag {} not in {}", self.tag, self.layout.display()));
        read_json(&self.blob_path(m["digest"].as_str().unwrap()))
    }

    /// Path of a blob (`sha256:…`) inside the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').expect("digest");
        self.layout.join("blobs").join(alg).join(hex)
    }

    /// Layer digests, bottom first.
    pub fn layer_digests(&self) -> Vec<String> {
        self.manifest()["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// Entry names of every layer tar (bottom first), as listed by `tar -tf` (handles gzip/uncompressed).
pub fn layer_listings(image: &OciImage) -> Vec<Vec<String>> {
    image
        .layer_digests()
        .iter()
        .map(|d| {
            run(Command::new("tar").arg("-tf").arg(image.blob_path(d)))
                .lines()
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Panics unless every layer decompresses to a tar whose length is a multiple of 512 ending in two zero blocks.
pub fn check_tars_well_formed(image: &OciImage) {
    use std::io::Read;
    for d in image.layer_digests() {
        let p = image.blob_path(&d);
        let mut child = Command::new("gzip")
            .arg("-dcf")
            .arg(&p)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn gzip (is gzip installed?)");
        let mut out = child.stdout.take().unwrap();
        let (mut total, mut tail, mut buf) = (0u64, Vec::<u8>::new(), vec![0u8; 1 << 20]);
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 1024 {
                tail.drain(..tail.len() - 1024);
            }
        }
        assert!(child.wait().unwrap().success(), "gzip -dc {} failed", p.display());
        assert!(
            total % 512 == 0 && tail.len() == 1024 && tail.iter().all(|&b| b == 0),
            "layer {d} is not a well-formed tar (len {total}, last 1024 bytes zero: {})",
            tail.iter().all(|&b| b == 0)
        );
    }
}

pub fn umoci(args: &[&str]) -> String {
    run(Command::new("umoci").args(args))
}

/// Builds the multi-layer "feature" image in `dir`/layout (tag "feature"); `big_file_bytes` sizes /data/big.bin
/// (300 MiB for the real thing, small for quick tests). Layers:
/// 1 (umoci repack) base tree: regular/empty/big files, symlinks, cross-dir hard links, special modes,
///   non-root owners, xattrs (user.*, trusted.*, security.capability), long names, fifo, devices;
/// 2 (umoci repack) deletes a file and a directory (whiteouts) and rewrites a file;
/// 3 (GNU tar + raw add-layer) replaces /opq with an explicit `.wh..wh..opq` (verified);
/// 4 (GNU tar pax + umoci raw add-layer) sub-second mtimes, more hard links/xattrs, a whiteout.
pub fn build_feature_image(dir: &Path, big_file_bytes: u64) -> OciImage {
    super::require_root();
    for t in ["umoci", "tar"] {
        require_tool(t);
    }
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let img = format!("{}:feature", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &img]);
    umoci(&["unpack", "--image", &img, bundle.to_str().unwrap()]);
    let r = bundle.join("rootfs");
    populate_base(&r, big_file_bytes);
    umoci(&["repack", "--refresh-bundle", "--image", &img, bundle.to_str().unwrap()]);

    // Layer 2: deletions and a rewrite.
    std::fs::remove_file(r.join("gone/file.txt")).unwrap();
    std::fs::remove_dir_all(r.join("gone-dir")).unwrap();
    write_file(&r.join("etc/motd"), b"motd rewritten in layer 2\n");
    write_file(&r.join("layer2/new.txt"), b"added in layer 2\n");
    for p in ["etc/motd", "etc", "gone", "layer2/new.txt", "layer2", ""] {
        set_mtime(&r.join(p), T0 + 50, 0);
    }
    umoci(&["repack", "--refresh-bundle", "--image", &img, bundle.to_str().unwrap()]);

    // Layer 3: opaque replacement of /opq. (umoci 0.4.7 `insert --opaque` does write `opq/.wh..wh..opq`,
    // but its tar lacks the final padding and end-of-archive blocks, so we write this layer with GNU tar.)
    let l3 = dir.join("layer3");
    write_file(&l3.join("opq/.wh..wh..opq"), b"");
    write_file(&l3.join("opq/new1.txt"), b"new opq content\n");
    write_file(&l3.join("opq/newsub/new2.txt"), b"new opq sub content\n");
    set_xattr(&l3.join("opq"), "user.opq", b"replaced");
    fix_mtimes(&l3, T0 + 100);
    let tar3 = dir.join("layer3.tar");
    gnu_tar(&l3, &tar3);
    umoci(&["raw", "add-layer", "--image", &img, tar3.to_str().unwrap()]);

    // Layer 4: GNU tar (pax) layer with sub-second mtimes.
    let l4 = dir.join("layer4");
    populate_subsecond(&l4);
    let tar4 = dir.join("layer4.tar");
    gnu_tar(&l4, &tar4);
    umoci(&["raw", "add-layer", "--image", &img, tar4.to_str().unwrap()]);

    let image = OciImage {
        layout,
        tag: "feature".into(),
    };
    check_tars_well_formed(&image);
    let lists = layer_listings(&image);
    assert_eq!(lists.len(), 4, "feature image should have 4 layers: {lists:?}");
    let has = |i: usize, name: &str| {
        lists[i]
            .iter()
            .any(|e| e.trim_start_matches("./").trim_end_matches('/') == name)
    };
    assert!(
        has(1, "gone/.wh.file.txt") && has(1, ".wh.gone-dir"),
        "layer 2 lacks whiteouts: {:?}",
        lists[1]
    );
    assert!(
        has(2, "opq/.wh..wh..opq"),
        "layer 3 lacks its opaque whiteout: {:?}",
        lists[2]
    );
    assert!(has(3, "etc/.wh.tar-gone"), "layer 4 lacks its whiteout: {:?}", lists[3]);
    let _ = std::fs::remove_dir_all(&bundle);
    image
}

/// Fixed base mtime (2021-02-03T04:05:06Z) so layers are reproducible-ish.
const T0: i64 = 1_612_325_106;

fn populate_base(r: &Path, big: u64) {
    // Regular, empty, random files.
    write_file(&r.join("etc/hello.txt"), b"hello world\n");
    write_file(&r.join("etc/motd"), b"motd from layer 1\n");
    write_file(&r.join("etc/tar-gone"), b"deleted by the GNU tar layer\n");
    write_file(&r.join("etc/empty"), b"");
    write_random_file(&r.join("data/big.bin"), big, 1);
    write_random_file(&r.join("data/small.bin"), 70_000, 2);
    // Symlinks: relative, absolute, dangling, to a directory.
    mkdirs(&r.join("links"));
    symlink("../etc/hello.txt", &r.join("links/rel"));
    symlink("/etc/hello.txt", &r.join("links/abs"));
    symlink("/does/not/exist", &r.join("links/dangling"));
    symlink("../etc", &r.join("links/dir"));
    // Hard links across directories (3 names), and a hard-linked file with owner+xattr.
    write_file(&r.join("hard/a/orig"), b"hard linked content\n");
    hardlink(&r.join("hard/a/orig"), &r.join("hard/b/link1"));
    hardlink(&r.join("hard/a/orig"), &r.join("hard/link2"));
    write_file(&r.join("hard/x/owned"), b"owned and linked\n");
    lchown(&r.join("hard/x/owned"), 1000, 2000);
    set_xattr(&r.join("hard/x/owned"), "user.linked", b"yes");
    hardlink(&r.join("hard/x/owned"), &r.join("hard/y/owned-link"));
    // Modes and owners.
    write_file(&r.join("modes/setuid"), b"#!/bin/sh\n");
    write_file(&r.join("modes/setgid"), b"#!/bin/sh\n");
    write_file(&r.join("modes/readonly"), b"ro\n");
    write_file(&r.join("modes/private"), b"private\n");
    mkdirs(&r.join("modes/sticky"));
    mkdirs(&r.join("modes/setgid-dir"));
    lchown(&r.join("modes/setuid"), 1000, 2000);
    chmod(&r.join("modes/setuid"), 0o4755);
    chmod(&r.join("modes/setgid"), 0o2755);
    chmod(&r.join("modes/readonly"), 0o444);
    lchown(&r.join("modes/private"), 1000, 2000);
    chmod(&r.join("modes/private"), 0o600);
    chmod(&r.join("modes/sticky"), 0o1777);
    lchown(&r.join("modes/setgid-dir"), 0, 2000);
    chmod(&r.join("modes/setgid-dir"), 0o2775);
    write_file(&r.join("owners/nobody"), b"nobody\n");
    lchown(&r.join("owners/nobody"), 65534, 65534);
    mkdirs(&r.join("owners/dir1000"));
    lchown(&r.join("owners/dir1000"), 1000, 2000);
    mkdirs(&r.join("owners/links"));
    symlink("../nobody", &r.join("owners/links/owned-symlink"));
    lchown(&r.join("owners/links/owned-symlink"), 1000, 2000);
    // Xattrs (set after chown/chmod: chown clears security.capability).
    write_file(&r.join("xattr/user"), b"xattr user\n");
    set_xattr(&r.join("xattr/user"), "user.foo", b"bar");
    set_xattr(&r.join("xattr/user"), "user.bin", &[0, 1, 2, 255, 0]);
    write_file(&r.join("xattr/cap"), b"#!/bin/sh\n");
    chmod(&r.join("xattr/cap"), 0o755);
    set_xattr(&r.join("xattr/cap"), "security.capability", &capability_bytes());
    write_file(&r.join("xattr/trusted"), b"trusted\n");
    set_xattr(&r.join("xattr/trusted"), "trusted.foo", b"tval");
    mkdirs(&r.join("xattr/dir"));
    set_xattr(&r.join("xattr/dir"), "user.dirattr", b"on a directory");
    // Long names: one >100 bytes, and a path >255 bytes in total.
    let n150 = format!("long-name-{}", "n".repeat(140));
    write_file(&r.join("long").join(&n150), b"long name\n");
    let d90 = |c: &str| format!("{}{}", c, "d".repeat(89));
    let deep = r.join("long").join(d90("a")).join(d90("b")).join(d90("c"));
    write_file(&deep.join(format!("f{}", "f".repeat(99))), b"deep long path\n");
    // Special files.
    mkdirs(&r.join("dev"));
    mkfifo(&r.join("dev/fifo"), 0o644);
    mknod_char(&r.join("dev/null-ish"), 0o666, 1, 3);
    mknod_char(&r.join("dev/big-minor"), 0o600, 136, 300);
    mknod_block(&r.join("dev/loop-ish"), 0o660, 7, 200);
    // To be deleted / replaced later.
    write_file(&r.join("gone/file.txt"), b"deleted in layer 2\n");
    write_file(&r.join("gone/stays.txt"), b"sibling of a deleted file\n");
    write_file(&r.join("gone-dir/x"), b"x\n");
    write_file(&r.join("gone-dir/sub/y"), b"y\n");
    write_file(&r.join("opq/old1"), b"old1\n");
    write_file(&r.join("opq/oldsub/old2"), b"old2\n");
    // Fixed mtimes everywhere (umoci keeps whole seconds), directories last.
    fix_mtimes(r, T0);
}

/// Sets every entry's mtime to `base` + 0.5 s (umoci then drops the fraction), children before parents.
fn fix_mtimes(dir: &Path, base: i64) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
        if ft.is_dir() {
            fix_mtimes(&p, base);
        }
        set_mtime(&p, base, 500_000_000);
    }
    set_mtime(dir, base, 500_000_000);
}

fn populate_subsecond(l: &Path) {
    // A whiteout of a layer-1 file, created as a plain empty `.wh.` file.
    write_file(&l.join("etc/.wh.tar-gone"), b"");
    write_file(&l.join("subsec/a.txt"), b"sub-second mtime a\n");
    write_file(&l.join("subsec/b.txt"), b"sub-second mtime b\n");
    hardlink(&l.join("subsec/b.txt"), &l.join("subsec/other/b-link"));
    write_file(&l.join("subsec/setuid-cap"), b"#!/bin/sh\n");
    lchown(&l.join("subsec/setuid-cap"), 1000, 2000);
    chmod(&l.join("subsec/setuid-cap"), 0o4750);
    set_xattr(&l.join("subsec/setuid-cap"), "security.capability", &capability_bytes());
    set_xattr(&l.join("subsec/setuid-cap"), "user.foo", b"pax");
    symlink("a.txt", &l.join("subsec/sym"));
    let long = format!("pax-{}", "p".repeat(200));
    write_file(&l.join("subsec").join(long), b"long pax name\n");
    let times = [
        ("etc/.wh.tar-gone", 1, 0),
        ("subsec/a.txt", T0 + 10, 123_456_789),
        ("subsec/b.txt", T0 + 20, 1),
        ("subsec/setuid-cap", T0 + 30, 999_999_999),
        ("subsec/sym", T0 + 40, 500_000_000),
        ("subsec/other", T0 + 50, 250_000_000),
        ("subsec", T0 + 60, 750_000_000),
        ("etc", T0 + 70, 100),
    ];
    for e in std::fs::read_dir(l.join("subsec")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("pax-") {
            set_mtime(&p, T0 + 80, 424_242_424);
        }
    }
    for (p, s, ns) in times {
        set_mtime(&l.join(p), s, ns);
    }
}

/// Writes an uncompressed pax tar of `dir`'s contents (no `./` prefix, sorted, numeric owners, all xattrs).
fn gnu_tar(dir: &Path, out: &Path) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    run(Command::new("tar")
        .args([
            "--format=pax",
            "--pax-option=delete=atime,delete=ctime",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .args(["--numeric-owner", "--sort=name", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg("--")
        .args(&names));
}

/// A single-layer image whose tar holds small files before and after one big incompressible file.
#[derive(Debug, Clone)]
pub struct BigLayerImage {
    /// The image (tag "big").
    pub image: OciImage,
    /// Path (inside the image) of the big file.
    pub big_path: String,
    /// Size of the big file in bytes.
    pub big_size: u64,
    /// Small files (path, content) stored before the big file in the tar.
    pub before: Vec<(String, Vec<u8>)>,
    /// Small files (path, content) stored after the big file in the tar.
    pub after: Vec<(String, Vec<u8>)>,
}

/// Builds (with GNU tar + `umoci raw add-layer`) a one-layer image: `aa-before/*`, `big.bin` (size_mib MiB), `zz-after/*`.
pub fn build_big_layer_image(dir: &Path, size_mib: u64) -> BigLayerImage {
    for t in ["umoci", "tar"] {
        require_tool(t);
    }
    let layout = dir.join("layout");
    let img = format!("{}:big", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &img]);
    let src = dir.join("big-src");
    let before = vec![
        (
            "aa-before/one.txt".to_string(),
            b"small file before the big one\n".to_vec(),
        ),
        ("aa-before/two.bin".to_string(), random_bytes(5000, 7)),
    ];
    let after = vec![
        (
            "zz-after/one.txt".to_string(),
            b"small file after the big one\n".to_vec(),
        ),
        ("zz-after/two.bin".to_string(), random_bytes(5000, 8)),
    ];
    for (p, c) in before.iter().chain(after.iter()) {
        write_file(&src.join(p), c);
    }
    let big_size = size_mib << 20;
    write_random_file(&src.join("big.bin"), big_size, 42);
    let tar = dir.join("big-layer.tar");
    gnu_tar(&src, &tar);
    umoci(&["raw", "add-layer", "--image", &img, tar.to_str().unwrap()]);
    std::fs::remove_file(&tar).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
    let image = OciImage {
        layout,
        tag: "big".into(),
    };
    check_tars_well_formed(&image);
    let list = &layer_listings(&image)[0];
    let pos = |n: &str| {
        list.iter()
            .position(|e| e == n)
            .unwrap_or_else(|| panic!("{n} not in layer: {list:?}"))
    };
    assert!(
        pos("aa-before/one.txt") < pos("big.bin") && pos("big.bin") < pos("zz-after/one.txt"),
        "order: {list:?}"
    );
    BigLayerImage {
        image,
        big_path: "big.bin".into(),
        big_size,
        before,
        after,
    }
}

/// A new single-tag layout with a bundle whose rootfs holds static busybox and
/// these applets; returns (image "LAYOUT:TAG", bundle dir).
fn busybox_bundle(dir: &Path, tag: &str, applets: &[&str]) -> (String, std::path::PathBuf) {
    require_tool("umoci");
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let layout = dir.join("layout");
    let img = format!("{}:{tag}", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &img]);
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &img, bundle.to_str().unwrap()]);
    let root = bundle.join("rootfs");
    mkdirs(&root.join("bin"));
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in applets {
        symlink("busybox", &root.join("bin").join(applet));
    }
    (img, bundle)
}

/// Sets the image's default command and drops the bundle.
pub fn finish_with_cmd(dir: &Path, img: &str, bundle: &Path, tag: &str, cmd: &[&str]) -> OciImage {
    let mut args = vec!["config", "--image", img];
    for c in cmd {
        args.extend(["--config.cmd", c]);
    }
    umoci(&args);
    std::fs::remove_dir_all(bundle).unwrap();
    OciImage {
        layout: dir.join("layout"),
        tag: tag.into(),
    }
}

/// A runnable image: busybox userland in one layer, then `size_mib` MiB of
/// incompressible "model weights" start-up never reads in a second; default
/// command `/bin/sh -c 'cat /etc/greeting'`.
pub fn build_runnable_image(dir: &Path, size_mib: u64) -> OciImage {
    let (img, bundle) = busybox_bundle(dir, "run", &["sh", "cat", "ls", "echo", "sha256sum", "head", "wc"]);
    let root = bundle.join("rootfs");
    write_file(&root.join("etc/greeting"), b"hello from streamsnap\n");
    // --refresh-bundle: the next repack then holds only what changed since.
    umoci(&["repack", "--refresh-bundle", "--image", &img, bundle.to_str().unwrap()]);
    write_random_file(&root.join("models/weights.bin"), size_mib << 20, 11);
    umoci(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    finish_with_cmd(dir, &img, &bundle, "run", &["/bin/sh", "-c", "cat /etc/greeting"])
}

/// Busybox (with `date`, `sleep`, `sha256sum`) and one random file per
/// `(path, MiB, seed)` in a layer of its own each, above the busybox layer.
pub fn build_files_image(dir: &Path, files: &[(&str, u64, u64)]) -> OciImage {
    let tools = ["sh", "cat", "echo", "sha256sum", "date", "sleep", "ls", "head"];
    let (img, bundle) = busybox_bundle(dir, "files", &tools);
    let root = bundle.join("rootfs");
    umoci(&["repack", "--refresh-bundle", "--image", &img, bundle.to_str().unwrap()]);
    for (path, mib, seed) in files {
        write_random_file(&root.join(path), mib << 20, *seed);
        umoci(&["repack", "--refresh-bundle", "--image", &img, bundle.to_str().unwrap()]);
    }
    finish_with_cmd(dir, &img, &bundle, "files", &["/bin/sh"])
}

/// A pod "pause" image for CRI sandboxes: one busybox layer, default command
/// `/bin/sleep 3600` (containerd kills a sandbox with SIGKILL, so no signal handling is needed).
pub fn build_pause_image(dir: &Path) -> OciImage {
    let (img, bundle) = busybox_bundle(dir, "pause", &["sleep"]);
    umoci(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    finish_with_cmd(dir, &img, &bundle, "pause", &["/bin/sleep", "3600"])
}

/// An image for the isolation promises: busybox with `su`, a setuid-root static
/// binary `/bin/euid` printing its real and effective uid, the device node
/// `/devices/null` (char 1:3, 0666) and `/etc/secret`, readable by root only (0600).
pub fn build_privileged_image(dir: &Path) -> OciImage {
    require_tool("gcc");
    let (img, bundle) = busybox_bundle(dir, "privileged", &["sh", "su", "cat", "echo"]);
    let root = bundle.join("rootfs");
    let source = dir.join("euid.c");
    write_file(
        &source,
        b"#include <stdio.h>\n#include <unistd.h>\n\
          int main(void) { printf(\"uid=%d euid=%d\\n\", (int)getuid(), (int)geteuid()); return 0; }\n",
    );
    let euid = root.join("bin/euid");
    run(Command::new("gcc").arg("-static").arg("-o").arg(&euid).arg(&source));
    chmod(&euid, 0o4755);
    mkdirs(&root.join("devices"));
    mknod_char(&root.join("devices/null"), 0o666, 1, 3);
    chmod(&root.join("devices/null"), 0o666); // mknod's mode went through the umask
    write_file(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    );
    write_file(&root.join("etc/group"), b"root:x:0:\nnogroup:x:65534:\n");
    write_file(&root.join("etc/secret"), b"top secret\n");
    chmod(&root.join("etc/secret"), 0o600);
    umoci(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    finish_with_cmd(dir, &img, &bundle, "privileged", &["/bin/sh"])
}

/// One file of a model packaged as an image.
#[derive(Debug, Clone)]
pub struct ModelFile {
    /// Path inside the image, e.g. `shard-1.bin`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the content, as `sha256sum` prints it.
    pub sha256: String,
}

/// A model as an image volume wants it (KEP-4639): no userland, no command, one layer of
/// incompressible files `(path, MiB, seed)`; returns the image (tag "model") and its files.
pub fn build_model_image(dir: &Path, files: &[(&str, u64, u64)]) -> (OciImage, Vec<ModelFile>) {
    use sha2::{Digest, Sha256};
    require_tool("umoci");
    let layout = dir.join("layout");
    let img = format!("{}:model", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &img]);
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &img, bundle.to_str().unwrap()]);
    let mut model = Vec::new();
    for (path, mib, seed) in files {
        let p = bundle.join("rootfs").join(path);
        write_random_file(&p, mib << 20, *seed);
        let mut hash = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&p).unwrap(), &mut hash).unwrap();
        model.push(ModelFile {
            path: path.to_string(),
            size: mib << 20,
            sha256: hex::encode(hash.finalize()),
        });
    }
    umoci(&["repack", "--image", &img, bundle.to_str().unwrap()]);
    std::fs::remove_dir_all(&bundle).unwrap();
    (
        OciImage {
            layout,
            tag: "model".into(),
        },
        model,
    )
}
