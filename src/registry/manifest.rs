//! Manifests and indexes: media types, platform selection, layer descriptors.

use super::RegistryError;
use crate::digest::Digest;
use oci_spec::image::{ImageIndex, ImageManifest};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// `Accept` header for manifest requests: every type we understand.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch[/variant]")]
pub struct PlatformError(pub String);

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

/// From a string, parsed like `--platform` (for the config file).
impl<'de> serde::Deserialize<'de> for Platform {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One layer of an image manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDescriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub annotations: HashMap<String, String>,
}

/// An image resolved to one platform's manifest.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The reference with the manifest's digest filled in.
    pub reference: super::Reference,
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub config: Digest,
    pub layers: Vec<LayerDescriptor>,
}

/// What a manifest endpoint answered with.
pub enum Fetched {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

/// Parses a manifest body by its media type (from the header or, failing that, the body).
pub fn parse(image: &str, header_type: Option<&str>, body: &[u8]) -> Result<Fetched, RegistryError> {
    let bad = |reason: String| RegistryError::BadManifest {
        image: image.to_string(),
        reason,
    };
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let header_type = header_type
        .map(|t| t.split(';').next().unwrap_or(t).trim())
        .filter(|t| !t.is_empty() && *t != "application/json" && *t != "text/plain");
    let media_type = probe
        .media_type
        .as_deref()
        .or(header_type)
        .unwrap_or(if probe.manifests.is_some() {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        });
    match media_type {
        OCI_INDEX | DOCKER_LIST => ImageIndex::from_reader(body)
            .map(|i| Fetched::Index(Box::new(i)))
            .map_err(|e| bad(format!("invalid index: {e}"))),
        OCI_MANIFEST | DOCKER_MANIFEST => ImageManifest::from_reader(body)
            .map(|m| Fetched::Manifest(Box::new(m)))
            .map_err(|e| bad(format!("invalid manifest: {e}"))),
        other => Err(bad(format!("unsupported media type {other}"))),
    }
}

/// Picks the index entry for `platform`; a missing variant matches any.
pub fn select_platform(image: &str, index: &ImageIndex, platform: &Platform) -> Result<Digest, RegistryError> {
    let mut available = Vec::new();
    for m in index.manifests() {
        let Some(p) = m.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        available.push(format!("{os}/{arch}"));
        let variant_ok = match (&platform.variant, p.variant()) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
        };
        if os == platform.os && arch == platform.architecture && variant_ok {
            return digest_of(image, m.digest().as_ref());
        }
    }
    Err(RegistryError::NoPlatform {
        image: image.to_string(),
        platform: platform.to_string(),
        available: available.join(", "),
    })
}

pub fn digest_of(image: &str, s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: crate::digest::DigestError| RegistryError::BadManifest {
            image: image.to_string(),
            reason: e.to_string(),
        })
}

/// The layer descriptors of a manifest, typed.
pub fn layers_of(image: &str, m: &ImageManifest) -> Result<Vec<LayerDescriptor>, RegistryError> {
    m.layers()
        .iter()
        .map(|d| {
            Ok(LayerDescriptor {
                digest: digest_of(image, d.digest().as_ref())?,
                size: d.size(),
                media_type: d.media_type().to_string(),
                annotations: d.annotations().clone().unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_json() -> String {
        let d1 = Digest::of(b"amd64");
        let d2 = Digest::of(b"arm64");
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{d1}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{d2}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        )
    }

    #[test]
    fn index_resolves_by_platform_and_variant() {
        let Fetched::Index(idx) = parse("img", None, index_json().as_bytes()).unwrap() else {
            panic!("expected index")
        };
        let amd = select_platform("img", &idx, &Platform::default()).unwrap();
        assert_eq!(amd, Digest::of(b"amd64"));
        let arm = select_platform("img", &idx, &"linux/arm64/v8".parse().unwrap()).unwrap();
        assert_eq!(arm, Digest::of(b"arm64"));
    }

    #[test]
    fn missing_platform_names_what_is_available() {
        let Fetched::Index(idx) = parse("img", None, index_json().as_bytes()).unwrap() else {
            panic!("expected index")
        };
        let err = select_platform("img", &idx, &"linux/s390x".parse().unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("linux/s390x") && msg.contains("linux/amd64"), "{msg}");
    }

    #[test]
    fn docker_manifest_media_type_is_understood() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":3}}]}}"#,
            Digest::of(b"c"),
            Digest::of(b"l")
        );
        let Fetched::Manifest(m) = parse("img", None, body.as_bytes()).unwrap() else {
            panic!("expected manifest")
        };
        let layers = layers_of("img", &m).unwrap();
        assert_eq!(layers[0].digest, Digest::of(b"l"));
        assert_eq!(layers[0].size, 3);
    }

    #[test]
    fn garbage_manifest_is_a_clear_error() {
        let err = parse("img", None, b"{not json").err().unwrap().to_string();
        assert!(err.contains("manifest of img"), "{err}");
    }
}
