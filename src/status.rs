//! `streamsnap status`: what a node serves, per image and layer. The daemon
//! builds a [`NodeStatus`] (the snapshotter gathers it from its mounted layers,
//! their fetchers, fills and the disk cache) and serves it as JSON on
//! `GET /status` of its HTTP endpoint; the command fetches it and prints a
//! table, or the JSON as it came.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// The status document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The daemon serves containerd and every snapshot of its store is mounted again.
    pub ready: bool,
    pub cache: CacheUse,
    /// Images with layers in the snapshot store, by reference.
    pub images: Vec<ImageStatus>,
}

/// The node's disk cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheUse {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub image: String,
    pub layers: Vec<LayerStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStatus {
    pub digest: String,
    pub form: Form,
    pub served: Served,
    /// Compressed bytes fetched from the registry for this layer since it was mounted.
    pub fetched_bytes: u64,
    /// The blob's size (0 when unknown: layers unpacked by containerd).
    pub size_bytes: u64,
    /// Bytes of this layer in the disk cache.
    pub cached_bytes: u64,
    pub prefetch: Prefetch,
    pub profile: Profile,
    pub fill: Fill,
}

/// The layer's form in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Form {
    #[serde(rename = "estargz")]
    Estargz,
    #[serde(rename = "zstd:chunked")]
    ZstdChunked,
    /// Unmodified gzip with a checkpoint index.
    #[serde(rename = "gzip+index")]
    GzipIndex,
    /// Uncompressed tar with a trusted index.
    #[serde(rename = "tar+index")]
    TarIndex,
    /// Any other layer.
    #[serde(rename = "plain")]
    Plain,
}

/// How the layer's files reach containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// FUSE over chunks fetched by range, verified by the layer's own TOC.
    Lazy,
    /// FUSE over spans fetched by range, through a checkpoint index.
    Indexed,
    /// FUSE over the layer downloaded whole.
    Downloaded,
    /// FUSE over the layer's tar, unpacked by streamsnap from one download (on first use, its index built on the way).
    UnpackedHere,
    /// containerd downloaded and unpacked it (an ordinary snapshot).
    UnpackedByContainerd,
    /// Served before the restart, not mounted again yet.
    NotMounted,
}

/// The landmark prefetch done when the layer was mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Prefetch {
    /// The layer marks no landmark files.
    None,
    /// Every landmark file arrived before the layer was reported mounted.
    Complete { files: usize, bytes: u64 },
    /// The wait ended first: the rest went on in the background.
    TimedOut { files: usize, bytes: u64 },
}

/// What a start-up profile did when the layer was mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Profile {
    None,
    /// None was known: the layer's start-up reads were recorded.
    Recorded,
    /// The profile's ranges of the layer were fetched before the mount was reported
    /// (`complete`: all in time).
    Replayed {
        chunks: usize,
        complete: bool,
    },
}

/// The background fill of the layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Fill {
    Off,
    Waiting,
    Running,
    /// Every chunk is cached and the check passed; `proof` says what it proved.
    Complete {
        proof: String,
    },
    /// The filled content does not match the layer digest: reads fail.
    Quarantined {
        reason: String,
    },
    CacheTooSmall,
    Failed {
        reason: String,
    },
    Unmounted,
}

impl Fill {
    fn label(&self) -> String {
        match self {
            Fill::Off => "off".into(),
            Fill::Waiting => "waiting".into(),
            Fill::Running => "running".into(),
            Fill::Complete { proof } => format!("complete({proof})"),
            Fill::Quarantined { .. } => "quarantined".into(),
            Fill::CacheTooSmall => "cache-too-small".into(),
            Fill::Failed { .. } => "failed".into(),
            Fill::Unmounted => "unmounted".into(),
        }
    }
}

/// The PREFETCH column: landmarks, then the profile.
fn prefetch_label(l: &LayerStatus) -> String {
    let landmarks = match &l.prefetch {
        Prefetch::None => None,
        Prefetch::Complete { files, .. } => Some(format!("done({files} files)")),
        Prefetch::TimedOut { files, .. } => Some(format!("timed-out({files} files)")),
    };
    let profile = match &l.profile {
        Profile::None => None,
        Profile::Recorded => Some("recorded".to_string()),
        Profile::Replayed { chunks, complete: true } => Some(format!("replayed({chunks})")),
        Profile::Replayed {
            chunks,
            complete: false,
        } => Some(format!("replaying({chunks})")),
    };
    match (landmarks, profile) {
        (None, None) => "-".into(),
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => format!("{a}+{b}"),
    }
}

fn form_label(f: Form) -> &'static str {
    match f {
        Form::Estargz => "estargz",
        Form::ZstdChunked => "zstd:chunked",
        Form::GzipIndex => "gzip+index",
        Form::TarIndex => "tar+index",
        Form::Plain => "plain",
    }
}

fn served_label(s: Served) -> &'static str {
    match s {
        Served::Lazy => "lazy",
        Served::Indexed => "indexed",
        Served::Downloaded => "downloaded",
        Served::UnpackedHere => "unpacked-here",
        Served::UnpackedByContainerd => "unpacked",
        Served::NotMounted => "not-mounted",
    }
}

fn size(b: u64) -> String {
    bytesize::ByteSize::b(b).display().iec().to_string()
}

/// The table `streamsnap status` prints: a block per image, a line per layer.
pub fn table(s: &NodeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node: {}, cache {} of {}",
        if s.ready { "ready" } else { "not ready" },
        size(s.cache.used_bytes),
        size(s.cache.limit_bytes)
    );
    for image in &s.images {
        let _ = writeln!(out, "\n{}", image.image);
        let _ = writeln!(
            out,
            "  {:<19} {:<12} {:<11} {:<21} {:<18} {:<22} {:>10}",
            "LAYER", "FORM", "SERVED", "FETCHED / SIZE", "PREFETCH", "FILL", "CACHED"
        );
        for l in &image.layers {
            let fetched = match l.served {
                Served::UnpackedByContainerd => "-".to_string(),
                _ => format!("{} / {}", size(l.fetched_bytes), size(l.size_bytes)),
            };
            let _ = writeln!(
                out,
                "  {:<19} {:<12} {:<11} {:<21} {:<18} {:<22} {:>10}",
                short(&l.digest),
                form_label(l.form),
                served_label(l.served),
                fetched,
                prefetch_label(l),
                l.fill.label(),
                size(l.cached_bytes)
            );
        }
    }
    out
}

/// `sha256:` and the first 12 hex digits.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(12, |i| i + 13);
    &digest[..end.min(digest.len())]
}

/// Why the status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("asking the daemon at {address} for its status: {source}")]
    Request {
        address: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the daemon at {address} answered {status}: {body}")]
    Refused { address: String, status: u16, body: String },
    #[error("the daemon at {address} sent a status this command cannot read: {source}")]
    Parse {
        address: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The daemon's status document, as text and parsed, from its HTTP endpoint at `address`.
pub async fn fetch(address: &str) -> Result<(String, NodeStatus), StatusError> {
    let url = format!("http://{address}/status");
    let req = |source| StatusError::Request {
        address: address.to_string(),
        source,
    };
    let resp = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(req)?
        .get(&url)
        .send()
        .await
        .map_err(req)?;
    let status = resp.status();
    let body = resp.text().await.map_err(req)?;
    if !status.is_success() {
        return Err(StatusError::Refused {
            address: address.to_string(),
            status: status.as_u16(),
            body,
        });
    }
    let parsed = serde_json::from_str(&body).map_err(|source| StatusError::Parse {
        address: address.to_string(),
        source,
    })?;
    Ok((body, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(digest: &str, served: Served) -> LayerStatus {
        LayerStatus {
            digest: digest.into(),
            form: Form::Estargz,
            served,
            fetched_bytes: 1024,
            size_bytes: 4 << 20,
            cached_bytes: 1024,
            prefetch: Prefetch::Complete { files: 2, bytes: 100 },
            profile: Profile::Recorded,
            fill: Fill::Complete {
                proof: "layer_digest".into(),
            },
        }
    }

    #[test]
    fn the_document_names_forms_and_states_as_documented() {
        let s = NodeStatus {
            ready: true,
            cache: CacheUse {
                used_bytes: 1,
                limit_bytes: 2,
            },
            images: vec![ImageStatus {
                image: "r/a:b".into(),
                layers: vec![layer("sha256:00", Served::Lazy)],
            }],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""form":"estargz""#), "{json}");
        assert!(json.contains(r#""served":"lazy""#), "{json}");
        assert!(
            json.contains(r#""fill":{"state":"complete","proof":"layer_digest"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<NodeStatus>(&json).unwrap(), s);
    }

    #[test]
    fn the_table_has_a_line_per_layer() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let s = NodeStatus {
            ready: false,
            cache: CacheUse {
                used_bytes: 0,
                limit_bytes: 1 << 30,
            },
            images: vec![ImageStatus {
                image: "r/a:b".into(),
                layers: vec![
                    layer(&digest, Served::Lazy),
                    layer(&digest, Served::UnpackedByContainerd),
                ],
            }],
        };
        let t = table(&s);
        assert_eq!(
            t.lines().filter(|l| l.contains("sha256:abababababab ")).count(),
            2,
            "{t}"
        );
        assert!(
            t.contains("1.0 KiB / 4.0 MiB") && t.contains("complete(layer_digest)"),
            "{t}"
        );
        assert!(t.starts_with("node: not ready, cache 0 B of 1.0 GiB"), "{t}");
    }
}
