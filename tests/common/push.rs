//! Pushing test images to the test registry in four layer formats, verifying the pushed manifests.
use super::image::OciImage;
use super::{require_tool, run, Containerd, ContainerdOpts, Registry};
use std::process::Command;

/// Layer format of a pushed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `application/vnd.oci.image.layer.v1.tar` (made by `ctr-remote images convert --oci --uncompress`).
    Uncompressed,
    /// `…tar+gzip` as umoci wrote it, pushed by `skopeo copy`.
    Gzip,
    /// eStargz (`…tar+gzip` + `containerd.io/snapshot/stargz/toc.digest`), by `ctr-remote images convert --estargz`.
    Estargz,
    /// zstd:chunked (`…tar+zstd` + toc/manifest annotations), by `ctr-remote images convert --zstdchunked`.
    ZstdChunked,
}

impl Format {
    /// All four formats.
    pub const ALL: [Format; 4] = [Format::Uncompressed, Format::Gzip, Format::Estargz, Format::ZstdChunked];

    /// Short name used as the pushed tag suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Format::Uncompressed => "uncompressed",
            Format::Gzip => "gzip",
            Format::Estargz => "estargz",
            Format::ZstdChunked => "zstdchunked",
        }
    }

    /// The layer mediaType every layer of a pushed image of this format must have.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Format::Uncompressed => "application/vnd.oci.image.layer.v1.tar",
            Format::Gzip | Format::Estargz => "application/vnd.oci.image.layer.v1.tar+gzip",
            Format::ZstdChunked => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Pushes `image` as `ADDR/streamsnap/<tag>:<tag>-<format>` and returns that reference.
/// Non-gzip formats start a private containerd for the conversion.
pub fn push(image: &OciImage, registry: &Registry, format: Format) -> String {
    push_all(image, registry, &[format]).pop().unwrap()
}

/// Pushes `image` in each of `formats` (one shared converter containerd); returns the references in order.
pub fn push_all(image: &OciImage, registry: &Registry, formats: &[Format]) -> Vec<String> {
    require_tool("skopeo");
    let base = format!("{}/streamsnap/{}", registry.addr(), image.tag);
    let gz = format!("{base}:{}-gzip", image.tag);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--format", "oci"])
        .arg(image.oci_ref())
        .arg(format!("docker://{gz}")));
    let mut ctd: Option<Containerd> = None;
    let mut out = Vec::new();
    for &f in formats {
        let r = format!("{base}:{}-{}", image.tag, f.suffix());
        if f != Format::Gzip {
            let c = ctd.get_or_insert_with(|| {
                let c = Containerd::start(ContainerdOpts::default());
                c.ctr(&["content", "fetch", "--plain-http", &gz]);
                c
            });
            let flag = match f {
                Format::Uncompressed => "--uncompress",
                Format::Estargz => "--estargz",
                Format::ZstdChunked => "--zstdchunked",
                Format::Gzip => unreachable!(),
            };
            c.ctr_remote(&["images", "convert", "--oci", flag, &gz, &r]);
            c.push_image(&r);
        }
        verify_pushed(registry, &r, f);
        out.push(r);
    }
    out
}

/// Panics unless the manifest at `reference` has only layers of `format`'s media type and annotations.
pub fn verify_pushed(registry: &Registry, reference: &str, format: Format) {
    let m = registry.manifest(reference);
    let layers = m["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers in {reference}: {m}"));
    assert!(!layers.is_empty(), "{reference} has no layers");
    for l in layers {
        assert_eq!(
            l["mediaType"],
            format.layer_media_type(),
            "{reference} ({format:?}) layer: {l}"
        );
        let ann = &l["annotations"];
        let toc = ann["containerd.io/snapshot/stargz/toc.digest"].is_string();
        match format {
            Format::Uncompressed | Format::Gzip => {
                assert!(!toc, "{reference}: unexpected TOC annotation {l}")
            }
            Format::Estargz => assert!(toc, "{reference}: eStargz layer lacks toc.digest: {l}"),
            Format::ZstdChunked => assert!(
                toc && ann["io.containers.zstd-chunked.manifest-checksum"].is_string(),
                "{reference}: zstd:chunked layer lacks annotations: {l}"
            ),
        }
    }
}
