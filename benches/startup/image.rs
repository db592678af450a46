//! The benchmark image: a GPU inference server in miniature. A real Debian
//! userland with python3 (debootstrap), a layer of libraries start-up never
//! touches, and a layer of incompressible model weights that the server reads
//! completely before it serves.
use crate::common::image::{finish_with_cmd, umoci};
use crate::common::{require_tool, run, write_random_file, OciImage};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The server: `ready` once its modules are imported, `serving` once every weight file was read.
const SERVE_PY: &str = r#"import json, email.parser, http.server, urllib.request, decimal, logging, sqlite3
import os, sys
print("ready", flush=True)
buf = bytearray(8 << 20)
total = 0
for name in sorted(os.listdir("/models")):
    with open(os.path.join("/models", name), "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
print("serving", total, flush=True)
"#;

/// Reads one file and prints `bytes seconds`, for warm-read measurements.
const READ_PY: &str = r#"import sys, time
buf = bytearray(8 << 20)
t = time.monotonic()
total = 0
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        n = f.readinto(buf)
        if not n:
            break
        total += n
print(total, time.monotonic() - t, flush=True)
"#;

pub const WEIGHT_FILES: u64 = 8;

/// Sizes of the two big layers.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub weights_mib: u64,
    pub libs_mib: u64,
}

/// Debian's suite and mirror as this machine's apt is configured.
fn apt_source() -> (String, String) {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap_or("bookworm")
        .trim_matches('"')
        .to_string();
    // The source that carries this release's main suite (others, such as vendors', do not).
    let mut mirror = None;
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let apt_file = |p: &Path| matches!(p.extension().and_then(|e| e.to_str()), Some("list" | "sources"));
        files.extend(dir.flatten().map(|e| e.path()).filter(|p| apt_file(p)));
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        // One-line form: `deb [opts] URI SUITE COMPONENTS…`.
        for l in text.lines().filter(|l| l.starts_with("deb ")) {
            let words: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
                .collect();
            if words.len() >= 3 && words[2] == suite && mirror.is_none() {
                mirror = Some(words[1].to_string());
            }
        }
        // deb822 form: stanzas of `Key: value` lines.
        for stanza in text.split("\n\n") {
            let field = |k: &str| stanza.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
            let suites = field("Suites:").unwrap_or("");
            if suites.split_whitespace().any(|s| s == suite) && mirror.is_none() {
                mirror = field("URIs:")
                    .and_then(|u| u.split_whitespace().next())
                    .map(String::from);
            }
        }
    }
    let mirror = mirror.unwrap_or_else(|| panic!("no apt source for {suite} in /etc/apt/sources.list(.d)"));
    (suite, mirror)
}

/// A minbase Debian root with python3, made once and kept in `work`.
pub fn userland(work: &Path) -> PathBuf {
    let root = work.join("rootfs");
    if work.join("rootfs.done").exists() {
        return root;
    }
    require_tool("debootstrap");
    let (suite, mirror) = apt_source();
    eprintln!("[bench] debootstrap {suite} from {mirror} (once; a few minutes)");
    let _ = std::fs::remove_dir_all(&root);
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3"])
        .arg(&suite)
        .arg(&root)
        .arg(&mirror));
    // Not part of an image's rootfs: apt lists and caches.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = run(Command::new("find").arg(root.join(d)).args(["-type", "f", "-delete"]));
    }
    std::fs::write(work.join("rootfs.done"), "").unwrap();
    root
}

/// A fresh OCI layout in `dir` whose image `tag` is unpacked (for `umoci repack`) with the
/// Debian userland copied in.
pub struct Unpacked {
    /// `LAYOUT:TAG`, as umoci names the image.
    pub img: String,
    pub bundle: PathBuf,
    /// The bundle's rootfs.
    pub root: PathBuf,
}

pub fn unpacked_userland(work: &Path, dir: &Path, tag: &str) -> Unpacked {
    let rootfs = userland(work);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let layout = dir.join("layout").to_str().unwrap().to_string();
    let img = format!("{layout}:{tag}");
    umoci(&["init", "--layout", &layout]);
    umoci(&["new", "--image", &img]);
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &img, bundle.to_str().unwrap()]);
    let root = bundle.join("rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(&root));
    Unpacked { img, bundle, root }
}

/// Builds (or reuses) the benchmark image's OCI layout under `work`.
pub fn build(work: &Path, sizes: Sizes) -> OciImage {
    let dir = work.join(format!("image-w{}-l{}", sizes.weights_mib, sizes.libs_mib));
    let image = OciImage {
        layout: dir.join("layout"),
        tag: "serve".into(),
    };
    if dir.join("done").exists() {
        return image;
    }
    eprintln!("[bench] building the image in {}", dir.display());
    let Unpacked { img, bundle, root } = unpacked_userland(work, &dir, "serve");
    let b = bundle.to_str().unwrap();
    std::fs::create_dir_all(root.join("app")).unwrap();
    std::fs::write(root.join("app/serve.py"), SERVE_PY).unwrap();
    std::fs::write(root.join("app/read.py"), READ_PY).unwrap();
    umoci(&["repack", "--refresh-bundle", "--image", &img, b]);
    // Libraries: 20 MiB files nobody opens at start-up.
    let lib_files = (sizes.libs_mib / 20).max(1);
    for i in 0..lib_files {
        let p = root.join(format!("opt/cuda/lib64/libbench{i:03}.so"));
        write_random_file(&p, (sizes.libs_mib / lib_files) << 20, 1000 + i);
    }
    umoci(&["repack", "--refresh-bundle", "--image", &img, b]);
    for i in 0..WEIGHT_FILES {
        let p = root.join(format!("models/weights-{i}.bin"));
        write_random_file(&p, (sizes.weights_mib / WEIGHT_FILES) << 20, 2000 + i);
    }
    umoci(&["repack", "--image", &img, b]);
    let image = finish_with_cmd(&dir, &img, &bundle, "serve", &["python3", "/app/serve.py"]);
    std::fs::write(dir.join("done"), "").unwrap();
    image
}
