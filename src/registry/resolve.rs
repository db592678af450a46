//! Manifests: a reference resolved to one platform's image manifest, and
//! manifests fetched by tag (from hosts trusted to resolve) or by digest
//! (from any host that pulls; the content is checked against the digest).

use super::body::{BodyError, BodyLimit};
use super::hosts::Capabilities;
use super::manifest::{self, Fetched, LayerDescriptor, ResolvedImage, MANIFEST_ACCEPT};
use super::mirror::Job;
use super::{Platform, Reference, Registry, RegistryError};
use crate::digest::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};

impl Registry {
    /// Resolves a reference to one platform's image manifest.
    pub async fn resolve(&self, image: &Reference, platform: &Platform) -> Result<ResolvedImage, RegistryError> {
        let name = image.to_string();
        let (body, ctype, digest) = self.fetch_manifest(image, &image.manifest_ref()).await?;
        let (body, ctype, digest, m) = match manifest::parse(&name, ctype.as_deref(), &body)? {
            Fetched::Manifest(m) => (body, ctype, digest, m),
            Fetched::Index(idx) => {
                let d = manifest::select_platform(&name, &idx, platform)?;
                let (body, ctype, digest) = self.fetch_manifest(image, &d.to_string()).await?;
                match manifest::parse(&name, ctype.as_deref(), &body)? {
                    Fetched::Manifest(m) => (body, ctype, digest, m),
                    Fetched::Index(_) => {
                        return Err(RegistryError::BadManifest {
                            image: name,
                            reason: format!("index entry {d} is itself an index"),
                        })
                    }
                }
            }
        };
        let layers: Vec<LayerDescriptor> = manifest::layers_of(&name, &m)?;
        Ok(ResolvedImage {
            reference: image.with_digest(digest.clone()),
            manifest_digest: digest,
            media_type: m
                .media_type()
                .as_ref()
                .map(|t| t.to_string())
                .or(ctype)
                .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string()),
            config: manifest::digest_of(&name, m.config().digest().as_ref())?,
            manifest: body,
            layers,
        })
    }

    /// Fetches a manifest by tag or digest; verifies the content when asked by digest.
    pub async fn fetch_manifest(
        &self,
        image: &Reference,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>, Digest), RegistryError> {
        const OP: &str = "fetching manifest";
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        // A tag is resolved only by hosts trusted to (containerd's `resolve`).
        let caps = match reference.parse::<Digest>() {
            Ok(_) => Capabilities::PULL,
            Err(_) => Capabilities::PULL.union(Capabilities::RESOLVE),
        };
        let object = format!("manifest {reference}");
        let (body, ctype) = self
            .fetch_body(
                Job {
                    op: OP,
                    repo: image,
                    caps,
                    object: &object,
                },
                &format!("manifests/{reference}"),
                headers,
                BodyLimit::MANIFEST,
            )
            .await
            .map_err(|e| match e {
                RegistryError::Body {
                    source: source @ BodyError::TooLarge { .. },
                    ..
                } => RegistryError::BadManifest {
                    image: image.to_string(),
                    reason: source.to_string(),
                },
                e => e,
            })?;
        let actual = Digest::of(&body);
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != actual {
                return Err(RegistryError::BadManifest {
                    image: image.to_string(),
                    reason: format!("content at {expected} hashes to {actual}"),
                });
            }
        }
        Ok((body.to_vec(), ctype, actual))
    }
}
